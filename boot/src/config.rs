//! The agent's start-up configuration: flags and an optional `boot.toml`, turned into
//! validated settings in one place. Errors name the file or flag at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::settings::{CgroupParent, Limits, Supervision, MIN_LOG_MAX_BYTES};

/// Default root directory.
pub(crate) const DEFAULT_ROOT: &str = "/var/lib/erel";
/// Default certificate bundle directory.
pub(crate) const DEFAULT_CERTS: &str = "/etc/erel/certs";
/// Default listen address.
pub(crate) const DEFAULT_LISTEN: &str = "0.0.0.0:7070";
/// Longest `handshake_timeout_ms` accepted.
pub(crate) const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Command-line flags, and the same settings as a `boot.toml` holds them (every key
/// optional, unknown keys refused). Each flag overrides the same setting in the file.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(name = "erel-boot", version, about = "The erel boot agent")]
#[serde(deny_unknown_fields)]
pub(crate) struct Flags {
    /// A TOML file with the settings below (flags win over the file).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub(crate) config: Option<PathBuf>,
    /// Address and port to listen on [default: 0.0.0.0:7070].
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) listen: Option<String>,
    /// Root directory for releases and the agent's state [default: /var/lib/erel].
    #[arg(long, value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
    /// Host certificate bundle: ca.pem, host.pem, host.key, crl.pem [default: /etc/erel/certs].
    #[arg(long, value_name = "DIR")]
    pub(crate) certs: Option<PathBuf>,
    /// Largest file a master may write, in bytes.
    #[arg(long)]
    pub(crate) max_file_bytes: Option<u64>,
    /// Free disk the agent never writes into, in bytes.
    #[arg(long)]
    pub(crate) disk_reserve_bytes: Option<u64>,
    /// Most bytes one archive may unpack to.
    #[arg(long)]
    pub(crate) max_unpack_bytes: Option<u64>,
    /// Most entries one archive may hold.
    #[arg(long)]
    pub(crate) max_unpack_entries: Option<u64>,
    /// Most connections from masters (authenticated) served at once.
    #[arg(long)]
    pub(crate) max_connections: Option<usize>,
    /// Most TLS handshakes in progress at once (peers not yet authenticated).
    #[arg(long)]
    pub(crate) max_handshakes: Option<usize>,
    /// Most TLS handshakes in progress from one address (IPv4, or IPv6 /64).
    #[arg(long)]
    pub(crate) max_handshakes_per_address: Option<usize>,
    /// Time a peer has to complete its TLS handshake, in milliseconds.
    #[arg(long)]
    pub(crate) handshake_timeout_ms: Option<u64>,
    /// Seconds a newly pushed certificate bundle waits for a master to authenticate
    /// with it before the agent goes back to the previous one [default: 300].
    #[arg(long)]
    pub(crate) bundle_probation_secs: Option<u64>,
    /// Versions of each release kept besides the running one.
    #[arg(long)]
    pub(crate) keep_versions: Option<usize>,
    /// First restart delay for a release that died, in milliseconds.
    #[arg(long)]
    pub(crate) restart_backoff_ms: Option<u64>,
    /// Longest restart delay, in milliseconds.
    #[arg(long)]
    pub(crate) restart_backoff_max_ms: Option<u64>,
    /// A run shorter than this (milliseconds) counts towards crash-looping.
    #[arg(long)]
    pub(crate) stable_after_ms: Option<u64>,
    /// Short runs in a row after which a release is marked crash-looping.
    #[arg(long)]
    pub(crate) crash_loop_after: Option<u32>,
    /// Most bytes of each release's output kept on disk, across its log and the rotated
    /// log, at every instant [default: 4194304; at least 4096].
    #[arg(long)]
    pub(crate) log_max_bytes: Option<u64>,
    /// Parent of the releases' cgroups: `auto` (the agent's own cgroup), an absolute
    /// cgroup v2 path, or `none` (process groups only) [default: auto].
    #[arg(long, value_name = "auto|none|PATH")]
    pub(crate) cgroup_parent: Option<String>,
}

/// Validated start-up settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The root directory.
    pub root: PathBuf,
    /// The certificate bundle directory.
    pub certs: PathBuf,
    /// Limits on commands.
    pub limits: Limits,
    /// Supervision settings.
    pub supervision: Supervision,
    /// Whether the agent goes away for good when [`crate::run`] returns (as `erel demo`'s
    /// agents do): its empty cgroups are then removed. A host's agent keeps them.
    pub remove_cgroups_on_exit: bool,
}

/// A start-up setting is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub(crate) struct ConfigError {
    origin: String,
    message: String,
}

/// Fills each setting not given as a flag from the file.
macro_rules! fill_from {
    ($flags:ident, $file:ident: $($field:ident),*) => {
        $( $flags.$field = $flags.$field.take().or($file.$field); )*
    };
}

impl Config {
    /// Merges flags over the config file and validates the result.
    pub(crate) fn from_flags(mut flags: Flags) -> Result<Self, ConfigError> {
        let (file, origin) = match &flags.config {
            Some(path) => (read_file(path)?, path.display().to_string()),
            None => (Flags::default(), "flags".to_string()),
        };
        fill_from!(flags, file: listen, root, certs, max_file_bytes, disk_reserve_bytes,
            max_unpack_bytes, max_unpack_entries, max_connections, max_handshakes,
            max_handshakes_per_address, handshake_timeout_ms, bundle_probation_secs, keep_versions, restart_backoff_ms,
            restart_backoff_max_ms, stable_after_ms, crash_loop_after, log_max_bytes,
            cgroup_parent);
        let in_file = flags.config.is_some();
        let refuse = |name: &str, message: String| {
            let flag = format!("--{}", name.replace('_', "-"));
            let origin = if in_file {
                format!("{origin}: setting '{name}' (or {flag})")
            } else {
                flag
            };
            Err(ConfigError { origin, message })
        };
        let listen_text = flags.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = match listen_text.parse() {
            Ok(listen) => listen,
            Err(e) => return refuse("listen", format!("'{listen_text}' is not ADDR:PORT: {e}")),
        };
        let root = flags.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        let certs = flags.certs.unwrap_or_else(|| PathBuf::from(DEFAULT_CERTS));
        let needed = ["ca.pem", "host.pem", "host.key"].map(|name| certs.join(name));
        if let Some(missing) = needed.iter().find(|path| !path.is_file()) {
            return refuse("certs", format!(
                "{} is missing: the bundle needs ca.pem, host.pem and host.key (from `erel certs host`)",
                missing.display()
            ));
        }
        let ms =
            |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let d = Limits::default();
        let limits = Limits {
            max_file_bytes: flags.max_file_bytes.unwrap_or(d.max_file_bytes),
            disk_reserve_bytes: flags.disk_reserve_bytes.unwrap_or(d.disk_reserve_bytes),
            max_unpack_bytes: flags.max_unpack_bytes.unwrap_or(d.max_unpack_bytes),
            max_unpack_entries: flags.max_unpack_entries.unwrap_or(d.max_unpack_entries),
            max_connections: flags.max_connections.unwrap_or(d.max_connections),
            max_handshakes: flags.max_handshakes.unwrap_or(d.max_handshakes),
            max_handshakes_per_address: flags
                .max_handshakes_per_address
                .unwrap_or(d.max_handshakes_per_address),
            handshake_timeout: ms(flags.handshake_timeout_ms, d.handshake_timeout),
            bundle_probation: flags
                .bundle_probation_secs
                .map_or(d.bundle_probation, Duration::from_secs),
        };
        let cgroup_parent = match flags.cgroup_parent {
            Some(text) => match CgroupParent::parse(&text) {
                Ok(parent) => parent,
                Err(message) => return refuse("cgroup_parent", message),
            },
            None => CgroupParent::Auto,
        };
        let d = Supervision::default();
        let supervision = Supervision {
            restart_backoff: ms(flags.restart_backoff_ms, d.restart_backoff),
            restart_backoff_max: ms(flags.restart_backoff_max_ms, d.restart_backoff_max),
            stable_after: ms(flags.stable_after_ms, d.stable_after),
            crash_loop_after: flags.crash_loop_after.unwrap_or(d.crash_loop_after),
            log_max_bytes: flags.log_max_bytes.unwrap_or(d.log_max_bytes),
            output_writer: d.output_writer,
            keep_versions: flags.keep_versions.unwrap_or(d.keep_versions),
            cgroup_parent,
        };
        let at_least_one = [
            ("max_connections", limits.max_connections == 0),
            ("max_handshakes", limits.max_handshakes == 0),
            (
                "max_handshakes_per_address",
                limits.max_handshakes_per_address == 0,
            ),
        ];
        if let Some((name, _)) = at_least_one.into_iter().find(|(_, zero)| *zero) {
            return refuse(name, "must be at least 1".into());
        }
        if limits.max_handshakes_per_address > limits.max_handshakes {
            return refuse(
                "max_handshakes_per_address",
                format!(
                    "{} is above max_handshakes ({}): one address could take every handshake",
                    limits.max_handshakes_per_address, limits.max_handshakes
                ),
            );
        }
        if limits.handshake_timeout.is_zero() || limits.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            return refuse(
                "handshake_timeout_ms",
                format!(
                    "{} ms is out of range: between 1 and {} ms (a TLS 1.3 handshake takes \
                 one round trip; a long timeout only helps idle peers hold room)",
                    limits.handshake_timeout.as_millis(),
                    MAX_HANDSHAKE_TIMEOUT.as_millis()
                ),
            );
        }
        if limits.bundle_probation.is_zero() {
            return refuse("bundle_probation_secs", "must be at least 1".into());
        }
        if supervision.crash_loop_after == 0 {
            return refuse("crash_loop_after", "must be at least 1".into());
        }
        if supervision.log_max_bytes < MIN_LOG_MAX_BYTES {
            return refuse("log_max_bytes", format!(
                "{} is below the minimum of {MIN_LOG_MAX_BYTES}: each of the two log files must hold the tail Ping reports",
                supervision.log_max_bytes
            ));
        }
        if supervision.restart_backoff.is_zero() {
            return refuse("restart_backoff_ms", "must be at least 1".into());
        }
        if supervision.restart_backoff_max < supervision.restart_backoff {
            return refuse(
                "restart_backoff_max_ms",
                "must not be below restart_backoff_ms".into(),
            );
        }
        Ok(Config {
            listen,
            root,
            certs,
            limits,
            supervision,
            remove_cgroups_on_exit: false,
        })
    }
}

fn read_file(path: &Path) -> Result<Flags, ConfigError> {
    let refuse = |message: String| ConfigError {
        origin: path.display().to_string(),
        message: message.trim().to_string(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| refuse(format!("cannot read: {e}")))?;
    toml::from_str(&text).map_err(|e| refuse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["ca.pem", "host.pem", "host.key"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        dir
    }

    fn flags(args: &[&str]) -> Flags {
        Flags::parse_from(std::iter::once("erel-boot").chain(args.iter().copied()))
    }

    /// The configuration from `args` after `--certs certs`.
    fn with_certs(certs: &tempfile::TempDir, args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["--certs", certs.path().to_str().expect("utf8")];
        all.extend_from_slice(args);
        Config::from_flags(flags(&all))
    }

    /// The refusal of the configuration from `args` after `--certs certs`.
    fn refusal(certs: &tempfile::TempDir, args: &[&str]) -> String {
        with_certs(certs, args).unwrap_err().to_string()
    }

    #[test]
    fn file_settings_apply_and_flags_win() {
        let certs = bundle();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("boot.toml");
        std::fs::write(
            &file,
            format!(
                "listen = \"127.0.0.1:7000\"\ncerts = \"{}\"\nkeep_versions = 5\n",
                certs.path().display()
            ),
        )
        .expect("write");
        let config = Config::from_flags(flags(&[
            "--config",
            file.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:7001",
        ]))
        .expect("config");
        assert_eq!(config.listen.port(), 7001);
        assert_eq!(config.supervision.keep_versions, 5);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let certs = bundle();
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/boot.toml.example");
        let text = std::fs::read_to_string(example).expect("example");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("boot.toml");
        let text = text.replace("/etc/erel/certs", certs.path().to_str().expect("utf8"));
        std::fs::write(&file, text).expect("write");
        let config =
            Config::from_flags(flags(&["--config", file.to_str().expect("utf8")])).expect("valid");
        assert_eq!(config.listen.port(), 7070);
        assert_eq!(config.supervision.crash_loop_after, 5);
        assert_eq!(config.supervision.cgroup_parent, CgroupParent::Auto);
    }

    #[test]
    fn the_shipped_unit_delegates_its_cgroup() {
        let unit = include_str!("../erel-boot.service");
        let directives: Vec<&str> = unit.lines().map(str::trim).collect();
        // The agent creates release cgroups below the unit's: systemd must hand it over,
        // and must not kill the releases when the agent alone restarts.
        assert!(directives.contains(&"Delegate=yes"), "{unit}");
        assert!(directives.contains(&"KillMode=process"), "{unit}");
    }

    #[test]
    fn errors_name_the_file_and_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("boot.toml");
        std::fs::write(&file, "listne = \"x\"\n").expect("write");
        let err = Config::from_flags(flags(&["--config", file.to_str().expect("utf8")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("boot.toml") && err.contains("listne"), "{err}");

        let certs = bundle();
        let err = refusal(&certs, &["--listen", "nowhere"]);
        assert!(err.contains("--listen") && err.contains("nowhere"), "{err}");

        let err = refusal(&certs, &["--log-max-bytes", "4095"]);
        assert!(
            err.contains("--log-max-bytes") && err.contains("4095") && err.contains("4096"),
            "{err}"
        );

        let err = refusal(&certs, &["--cgroup-parent", "erel.slice"]);
        assert!(
            err.contains("--cgroup-parent") && err.contains("absolute cgroup path"),
            "{err}"
        );
        for bad in ["/a/../b", "/a/./b"] {
            let err = refusal(&certs, &["--cgroup-parent", bad]);
            assert!(err.contains("'.' or '..'"), "{err}");
        }
        for (text, parent) in [
            ("none", CgroupParent::None),
            ("auto", CgroupParent::Auto),
            ("/erel.slice", CgroupParent::Path("/erel.slice".into())),
        ] {
            let config = with_certs(&certs, &["--cgroup-parent", text]).expect("valid");
            assert_eq!(config.supervision.cgroup_parent, parent);
        }

        let err = Config::from_flags(flags(&["--certs", "/nonexistent-bundle"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent-bundle/ca.pem"), "{err}");
    }

    #[test]
    fn peer_limits_are_read_and_checked() {
        let certs = bundle();
        let dir = certs.path().to_str().expect("utf8");
        let config = Config::from_flags(flags(&[
            "--certs",
            dir,
            "--max-handshakes",
            "10",
            "--max-handshakes-per-address",
            "2",
            "--handshake-timeout-ms",
            "1500",
        ]))
        .expect("valid");
        assert_eq!(config.limits.max_handshakes, 10);
        assert_eq!(config.limits.max_handshakes_per_address, 2);
        assert_eq!(config.limits.handshake_timeout, Duration::from_millis(1500));

        for (args, names) in [
            (&["--max-handshakes", "0"][..], "--max-handshakes"),
            (
                &["--max-handshakes-per-address", "0"][..],
                "--max-handshakes-per-address",
            ),
            (
                &["--max-handshakes", "4", "--max-handshakes-per-address", "5"][..],
                "--max-handshakes-per-address",
            ),
            (
                &["--handshake-timeout-ms", "0"][..],
                "--handshake-timeout-ms",
            ),
            (
                &["--handshake-timeout-ms", "600000"][..],
                "--handshake-timeout-ms",
            ),
        ] {
            let mut all = vec!["--certs", dir];
            all.extend_from_slice(args);
            let err = Config::from_flags(flags(&all)).unwrap_err().to_string();
            assert!(err.contains(names), "{args:?}: {err}");
        }
    }
}
