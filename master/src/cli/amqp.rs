//! What the AMQP commands share: the broker flags, `erel master --amqp` (the daemon on
//! the config log), signal handling and time formatting.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::Context;
use crate::amqp::daemon::{self, DaemonOptions};
use crate::amqp::{Backoff, Broker, DEFAULT_PREFIX};
use crate::client::Connector;
use crate::error::Error;
use crate::rollout::RolloutOptions;

/// `--amqp URL --amqp-prefix PREFIX`.
#[derive(Debug, Clone, Args)]
pub(super) struct BrokerArgs {
    /// The RabbitMQ broker, e.g. amqp://guest:guest@127.0.0.1:5672/%2f. For a cluster,
    /// one URL per node: --amqp repeated, or comma-separated (in EREL_AMQP too); the
    /// first node that answers is used, the next ones when it does not.
    #[arg(
        long = "amqp",
        env = "EREL_AMQP",
        value_name = "URL",
        value_delimiter = ',',
        required = true
    )]
    pub url: Vec<String>,
    /// Prefix of every queue and exchange name on the broker.
    #[arg(long = "amqp-prefix", env = "EREL_AMQP_PREFIX", default_value = DEFAULT_PREFIX, value_name = "PREFIX")]
    pub prefix: String,
}

impl BrokerArgs {
    /// The broker these flags name.
    pub(super) fn broker(&self) -> crate::Result<Broker> {
        Broker::new(self.url.join(","), self.prefix.clone())
    }
}

/// `--amqp URL --amqp-prefix PREFIX` for a command that also works on the cluster file
/// alone: without `--amqp`, no broker.
#[derive(Debug, Clone, Args)]
pub(super) struct OptionalBrokerArgs {
    /// The RabbitMQ broker of the masters, when they follow the config log (AMQP mode):
    /// `erel master` follows the log there, and the groups' holders and leases are
    /// there instead of in the daemon lock beside the cluster file. For a RabbitMQ
    /// cluster, one URL per node: --amqp repeated, or comma-separated (in EREL_AMQP
    /// too), e.g. amqp://h1:5672,amqp://h2:5672,amqp://h3:5672. A connection goes to
    /// the first node that answers (10 s per attempt); `erel master` reconnects to the
    /// next node when its connection is lost, logging which one it is on.
    #[arg(
        long = "amqp",
        env = "EREL_AMQP",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub url: Vec<String>,
    /// Prefix of every queue and exchange name on the broker.
    #[arg(long = "amqp-prefix", env = "EREL_AMQP_PREFIX", default_value = DEFAULT_PREFIX, value_name = "PREFIX")]
    pub prefix: String,
}

impl OptionalBrokerArgs {
    /// `--amqp` given as a list (repeated, or split at commas by clap) as the one
    /// comma-separated string [`Broker::new`] reads; `None` when it was not given.
    pub(super) fn url_list(&self) -> Option<String> {
        (!self.url.is_empty()).then(|| self.url.join(","))
    }
}

/// The flags of `erel master` that select the AMQP config log instead of a file.
#[derive(Debug, Clone, Args)]
pub(super) struct AmqpMasterArgs {
    /// `--amqp URL --amqp-prefix PREFIX`: follow the config log on this broker instead
    /// of a cluster file.
    #[command(flatten)]
    pub broker: OptionalBrokerArgs,
    /// Where the newest accepted config is kept (with --amqp).
    #[arg(long, value_name = "DIR", requires = "url")]
    pub state_dir: Option<PathBuf>,
    /// This master's name in events and holder records [default: erel@<host name>].
    #[arg(long, value_name = "NAME", requires = "url")]
    pub name: Option<String>,
    /// Where the archives configs name are found, by file name and sha256 (with --amqp).
    #[arg(long, value_name = "DIR", requires = "url")]
    pub artifacts: Option<PathBuf>,
    /// Apply only revisions signed with this minisign public key (`erel bundle import`
    /// publishes them); others are logged and not applied (with --amqp).
    #[arg(long, env = "EREL_TRUSTED_KEY", value_name = "FILE")]
    pub trusted_key: Option<PathBuf>,
    /// Longest wait between two reconnection attempts, in milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS", hide = true)]
    pub reconnect_max_ms: u64,
    /// Whether `url` came from `EREL_AMQP` in the environment ([`Self::pick_mode`]).
    #[arg(skip)]
    pub url_from_env: bool,
}

impl AmqpMasterArgs {
    /// Settles which mode `erel master` runs in, from where its flags came from:
    /// `cluster_given` when `--cluster` was on the command line, `amqp` where `--amqp`
    /// came from (`None`: not given). An explicit `--cluster` wins over an `EREL_AMQP`
    /// from the environment (the URL is dropped, and the mode is the file's); both
    /// `--cluster` and `--amqp` on the command line are refused, naming both. An
    /// `--amqp` from the environment is remembered, so refusals name `EREL_AMQP`.
    ///
    /// # Errors
    /// [`Error::Usage`] for `--cluster` and `--amqp` both on the command line.
    pub(super) fn pick_mode(
        &mut self,
        cluster_given: bool,
        amqp: Option<clap::parser::ValueSource>,
    ) -> crate::Result<()> {
        use clap::parser::ValueSource;
        match (cluster_given, amqp) {
            (true, Some(ValueSource::EnvVariable)) => {
                self.broker.url.clear();
                if self.state_dir.is_some() || self.artifacts.is_some() || self.name.is_some() {
                    return Err(Error::Usage(
                        "erel master: --cluster FILE was given, so EREL_AMQP from the \
                         environment is not used, yet --state-dir, --artifacts or --name \
                         (AMQP mode only) were given too; drop --cluster to follow the \
                         config log, or drop those flags"
                            .to_string(),
                    ));
                }
            }
            (true, Some(ValueSource::CommandLine)) => {
                return Err(Error::Usage(format!(
                    "erel master: --cluster FILE and --amqp {} are two modes (a cluster \
                     file, or the config log on the broker); give one",
                    self.broker.url.join(",")
                )));
            }
            (_, Some(ValueSource::EnvVariable)) => self.url_from_env = true,
            _ => {}
        }
        Ok(())
    }

    /// `--amqp`, as a refusal names it: with `(from EREL_AMQP in the environment)`
    /// when it came from there.
    fn amqp_words(&self) -> &'static str {
        if self.url_from_env {
            "--amqp (from EREL_AMQP in the environment)"
        } else {
            "--amqp"
        }
    }
}

/// Runs `erel master --amqp URL …` until SIGTERM or Ctrl-C, serving Prometheus metrics
/// at `metrics` when given.
pub(super) async fn master(
    ctx: &Context,
    args: AmqpMasterArgs,
    interval: Duration,
    connect_timeout: Duration,
    metrics: Option<std::net::SocketAddr>,
) -> crate::Result<ExitCode> {
    let amqp = args.amqp_words();
    let Some(url) = args.broker.url_list() else {
        return Err(Error::Usage("--amqp URL is required".to_string()));
    };
    let state_dir = args.state_dir.ok_or_else(|| {
        Error::Usage(format!(
            "--state-dir DIR is required with {amqp}; for the cluster file, give --cluster FILE"
        ))
    })?;
    let artifacts = args.artifacts.ok_or_else(|| {
        Error::Usage(format!(
            "--artifacts DIR is required with {amqp}; for the cluster file, give --cluster FILE"
        ))
    })?;
    if !artifacts.is_dir() {
        return Err(Error::Usage(format!(
            "--artifacts {}: not a directory",
            artifacts.display()
        )));
    }
    let trusted_key = match &args.trusted_key {
        Some(path) => Some(crate::bundle::TrustedKey::load(path)?),
        None => None,
    };
    let name = args.name.unwrap_or_else(|| ctx.master_name());
    let connector =
        Connector::new(ctx.tls()?, ctx.master_name()).with_connect_timeout(connect_timeout);
    let cancel = cancel_on_termination();
    let metrics = match metrics {
        Some(addr) => Some(super::daemon::serve_metrics(addr, &cancel).await?),
        None => None,
    };
    let options = DaemonOptions {
        broker: Broker::new(url, args.broker.prefix)?,
        state_dir,
        name,
        artifacts,
        connector,
        rollout: RolloutOptions::default(),
        interval,
        backoff: Backoff::new(
            Duration::from_millis(250),
            Duration::from_millis(args.reconnect_max_ms.max(250)),
        ),
        metrics,
        trusted_key,
    };
    info!(trusted_key = ?options.trusted_key.as_ref().map(|k| k.id().to_string()), broker = %options.broker.display_url(), name = %options.name, "master starting");
    daemon::run(options, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled by SIGTERM or Ctrl-C.
pub(super) fn cancel_on_termination() -> CancellationToken {
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                error!("cannot install the SIGTERM handler: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        info!("terminating");
        signals.cancel();
    });
    cancel
}

/// `2024-05-01T12:00:00.123Z` for milliseconds since the Unix epoch.
pub(super) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Who publishes from this shell: `USER@<host name>`, the user being `$USER`, else
/// `$LOGNAME`, else the name the password database gives the real uid (getpwuid(3)),
/// else the uid as a number.
pub(super) fn publisher() -> String {
    let user = user_name(|name| std::env::var(name).ok());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{user}@{host}")
}

/// `$USER`, else `$LOGNAME` (empty ones skipped), else [`uid_name`]; `var` reads the
/// environment.
fn user_name(var: impl Fn(&str) -> Option<String>) -> String {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|name| var(name).filter(|v| !v.is_empty()))
        .next()
        .unwrap_or_else(uid_name)
}

/// The real uid's name in the password database, or the uid as a number when it has
/// none (a container's user without a passwd entry).
fn uid_name() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{user_name, utc};

    #[test]
    fn without_user_or_logname_the_publisher_is_the_uids_name_or_number() {
        let uid = nix::unistd::getuid();
        let expected = match nix::unistd::User::from_uid(uid) {
            Ok(Some(user)) => user.name,
            _ => uid.to_string(),
        };
        assert_eq!(user_name(|_| None), expected);
        assert_eq!(user_name(|_| Some(String::new())), expected);
        assert_ne!(expected, "unknown");
        let logname = |name: &str| (name == "LOGNAME").then(|| "ops".to_string());
        assert_eq!(user_name(logname), "ops");
        let both = |name: &str| Some(format!("{name}-value"));
        assert_eq!(user_name(both), "USER-value");
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_825_600_123), "2000-02-29T12:00:00.123Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
