//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while making, storing or loading certificates.
///
/// Every variant says which file, directory or name it is about, so a message
/// shown to an operator is enough to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CA or key file that is never overwritten silently is already there.
    #[error("{path} already exists; refusing to overwrite an existing cluster CA or key (move the directory away to start a new cluster)")]
    AlreadyExists {
        /// The file that exists.
        path: PathBuf,
    },

    /// A host already has a bundle (with its private key), and replacing it was not asked for.
    #[error("{path} already exists: host {id} already has a key and certificate; refusing to overwrite them (pass --force to replace the bundle with a new key; run `erel certs revoke {id}` first, since revoke names the certificate the bundle holds, or the old certificate stays valid until it expires)")]
    BundleExists {
        /// The host id.
        id: String,
        /// The existing key file (`hosts/<id>/host.key`) or bundle directory.
        path: PathBuf,
    },

    /// A file that is needed does not exist.
    #[error("{path} does not exist")]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
    },

    /// The cluster CA has not been created in this directory.
    #[error("no cluster CA: {path} does not exist (run `erel certs init` first)")]
    MissingCa {
        /// The CA certificate that was looked for (`ca.pem`).
        path: PathBuf,
    },

    /// `revoke` was asked for a name that has no certificate here.
    #[error("unknown certificate name '{id}': {path} does not exist (expected \"master\" or a host id issued with `erel certs host`)")]
    UnknownHost {
        /// The name asked for.
        id: String,
        /// The certificate file that was looked for.
        path: PathBuf,
    },

    /// A file exists but its contents are not what they should be.
    #[error("{path}: {reason}")]
    Parse {
        /// The file that could not be used.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A host id, DNS name or cluster name is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: String,
    },

    /// Reading, writing, renaming or creating a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// rcgen could not build or sign a certificate or CRL.
    #[error("could not create {what}: {source}")]
    Rcgen {
        /// What was being made (for example "host certificate for web-1").
        what: String,
        /// The underlying error.
        source: rcgen::Error,
    },

    /// rustls refused a configuration (for example a key that does not match its certificate).
    #[error("{what}: {source}")]
    Tls {
        /// Which configuration and files were involved.
        what: String,
        /// The underlying error.
        source: rustls::Error,
    },

    /// The certificate verifier could not be built from the CA and CRL files.
    #[error("cannot verify peers with CA {ca}: {source}")]
    Verifier {
        /// The CA file the verifier was built from.
        ca: PathBuf,
        /// The underlying error.
        source: rustls::server::VerifierBuilderError,
    },

    /// A pushed bundle (see [`crate::PushedBundle`]) failed one of the checks it must
    /// pass before an agent takes it.
    #[error("{path}: refused ({check}): {reason}")]
    Refused {
        /// The pushed bundle file.
        path: PathBuf,
        /// The check that failed, as [`crate::PushedBundle::validate`] names it.
        check: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// The system's secure random generator failed.
    #[error("no secure random numbers available for {what}")]
    Random {
        /// What the randomness was for.
        what: &'static str,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A parse error for `path`.
    pub(crate) fn parse(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Parse {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// [`Error::InvalidName`] for `name` when a check found a `reason` to refuse it.
    pub(crate) fn name_check(name: &str, reason: Option<String>) -> Result<()> {
        match reason {
            Some(reason) => Err(Error::InvalidName {
                name: name.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// An rcgen error while making `what`.
    pub(crate) fn rcgen(what: impl Into<String>, source: rcgen::Error) -> Self {
        Error::Rcgen {
            what: what.into(),
            source,
        }
    }
}
