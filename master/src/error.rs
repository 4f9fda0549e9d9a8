//! The master library's one error type. Each variant names the host, file or field at
//! fault, so the binary can print it as is.

use std::path::PathBuf;

use erel_proto::{ErrorKind, ErrorReply};

/// Why a master operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `HOST` argument is not `ID@ADDR:PORT` or a known id.
    #[error("invalid host '{text}': {reason}")]
    InvalidHost {
        /// The argument as given.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The TCP connection could not be made.
    #[error("{host}: cannot connect to {addr}: {source}")]
    Connect {
        /// Host id.
        host: String,
        /// Address tried.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TLS authentication failed on either side.
    #[error("{host} ({addr}): {message}")]
    Tls {
        /// Host id.
        host: String,
        /// Address.
        addr: String,
        /// What went wrong, in words an operator can act on.
        message: String,
    },
    /// A phase took too long.
    #[error("{host}: timed out {phase}")]
    Timeout {
        /// Host id.
        host: String,
        /// What the master was waiting for.
        phase: String,
    },
    /// The agent broke the protocol or the connection failed mid-exchange.
    #[error("{host}: {message}")]
    Protocol {
        /// Host id.
        host: String,
        /// What happened.
        message: String,
    },
    /// The agent refused or failed the request. Its message is printed with control
    /// characters escaped and at most [`MAX_AGENT_TEXT`] bytes of it, so that what an
    /// archive or a release named (an entry name, a path) cannot drive the terminal or
    /// flood the output.
    #[error("{host}: {}", agent_text(reply))]
    Agent {
        /// Host id.
        host: String,
        /// The agent's error.
        reply: ErrorReply,
    },
    /// A local file could not be used.
    #[error("{path}: {message}")]
    Local {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Certificates could not be loaded or made.
    #[error(transparent)]
    Certs(#[from] erel_certs::Error),
    /// A cluster file is invalid: which file, which field, what is wrong.
    #[error("{}", cluster_message(file, field, message))]
    Cluster {
        /// The cluster file (or where a config text came from).
        file: String,
        /// The field at fault, e.g. `group.web.max_in_flight` or `host[2].id`; empty
        /// when the text is not TOML at all.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An archive a cluster file names is not (or not yet) usable in the directory it
    /// is looked up in: missing, unreadable, or with other contents than its `sha256`
    /// says. Unlike [`Error::Cluster`], the file itself may be right: the daemon retries
    /// such a revision until the archive arrives or a newer revision supersedes it.
    #[error("{}", cluster_message(file, field, message))]
    ArchiveUnavailable {
        /// The cluster file (or where a config text came from).
        file: String,
        /// The field naming the archive, e.g. `group.web.archive`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The AMQP broker could not be reached, or refused or failed an operation.
    #[error("AMQP {target}: {action}: {message}")]
    Amqp {
        /// What was at fault: the broker's URL (password hidden), a queue, an exchange.
        target: String,
        /// What was being done.
        action: String,
        /// What went wrong.
        message: String,
    },
    /// A config from the config log is refused, and why (the reason the log records).
    #[error("{0}")]
    ConfigRefused(String),
    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),
    /// An operation failed: what was being done, and the cause (printed after it).
    #[error("{what}")]
    Context {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A config's revision is not newer than the newest one already in the config log.
    #[error(
        "{origin}: revision {revision} is not newer than revision {newest}, the newest in the config log {log}{}",
        by.as_ref().map(|by| format!(" (published by {by})")).unwrap_or_default()
    )]
    RevisionNotNewer {
        /// The config file.
        origin: String,
        /// Its revision.
        revision: u64,
        /// The newest revision in the log.
        newest: u64,
        /// Who published the newest revision, as its record says.
        by: Option<String>,
        /// The config log (a queue name).
        log: String,
    },
}

/// The longest part of an agent's refusal the master prints, in bytes.
pub const MAX_AGENT_TEXT: usize = 2048;

/// An agent's refusal as the master prints it: control characters escaped as Rust
/// writes them (`\u{1b}`, `\n`), then shortened to [`MAX_AGENT_TEXT`] bytes with its
/// full length said ([`erel_proto::text::shorten`]).
fn agent_text(reply: &ErrorReply) -> String {
    let text = reply.to_string();
    let escaped: String = text
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    if escaped.len() <= MAX_AGENT_TEXT {
        return escaped;
    }
    format!(
        "{} ({} bytes)",
        erel_proto::text::shorten(&escaped, MAX_AGENT_TEXT),
        escaped.len()
    )
}

fn cluster_message(file: &str, field: &str, message: &str) -> String {
    if field.is_empty() {
        format!("{file}: {message}")
    } else {
        format!("{file}: {field}: {message}")
    }
}

impl Error {
    /// The agent's error kind, when the agent refused.
    pub fn agent_kind(&self) -> Option<ErrorKind> {
        match self {
            Error::Agent { reply, .. } => Some(reply.kind),
            _ => None,
        }
    }

    /// True when retrying on a new connection may succeed (connection problems).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Protocol { .. } => true,
            Error::Agent { reply, .. } => {
                matches!(reply.kind, ErrorKind::Busy | ErrorKind::Timeout)
            }
            _ => false,
        }
    }

    /// Builds an [`Error::Local`].
    pub fn local(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Local {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Adds what was being done to an error, as [`Error::Context`].
pub(crate) trait ResultExt<T> {
    /// The error, after `what`.
    fn context(self, what: impl Into<String>) -> Result<T>;
    /// The error, after the text `what` makes (only on failure).
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E> ResultExt<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what.into(),
            source: Box::new(e),
        })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what().into(),
            source: Box::new(e),
        })
    }
}

/// Result with the master's error.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(message: &str) -> Error {
        Error::Agent {
            host: "web-1".to_string(),
            reply: ErrorReply {
                kind: ErrorKind::UnsafeArchive,
                message: message.to_string(),
            },
        }
    }

    #[test]
    fn an_agents_refusal_is_printed_escaped() {
        let text = refusal("entry '../\u{1b}]0;x\u{7}evil\nline' leaves the root").to_string();
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.contains("\\u{1b}]0;x\\u{7}evil\\nline"), "{text}");
        assert!(text.starts_with("web-1: "), "{text}");
    }

    #[test]
    fn an_agents_long_refusal_is_bounded_and_says_its_length() {
        let text = refusal(&"é".repeat(4000)).to_string();
        assert!(text.len() < MAX_AGENT_TEXT + 100, "{}", text.len());
        assert!(text.contains("bytes)"), "{text}");
    }
}
