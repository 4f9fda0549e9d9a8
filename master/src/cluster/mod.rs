//! The cluster file: which hosts form which group, and which release and version each
//! group runs. Parsed into raw structs (`raw`), then validated once into a [`Plan`]
//! (`validate`); every error names the file, the field and what is wrong.
//!
//! ```toml
//! revision = 7
//!
//! [[host]]
//! id = "web-1"
//! addr = "10.0.0.11:7070"
//! group = "web"                   # or groups = ["web", "metrics"]; neither: waiting
//! env = { BEAT_PORT = "27182" }   # optional, merged over the group's env
//!
//! [group.web]
//! release = "beat"
//! version = "0.2.0"
//! archive = "releases/beat-0.2.0.tar.gz"   # relative to this file, or found by sha256
//! sha256 = "…"
//! argv = ["bin/beat", "foreground"]        # default: bin/<release> foreground
//! env = { NODE_NAME = "beat" }
//! user = "beat"                            # optional
//! max_in_flight = 1                        # default 1
//! canaries = 1                             # default 1 (0 for a stopped group)
//! stop_grace_secs = 10                     # default 10
//! max_failed = 0                           # default 0: hosts that may fail or be
//!                                          # unreachable before the rollout halts
//! state = "running"                        # default; "stopped" stops it everywhere
//! health = { tcp = 27182, min_up_secs = 5, deadline_secs = 60 }
//! # or an HTTP probe, 3 consecutive passes of every probe:
//! # health = { http = 8080, path = "/health", passes = 3, min_up_secs = 5 }
//! drain = { http = 8080, path = "/drain", timeout_secs = 10 }  # optional
//! restarted_at = "2026-11-29T12:00:00Z"   # optional: restart what runs since before
//! ```
//!
//! `restarted_at` (RFC 3339) asks for a rolling cold restart, as `kubectl rollout
//! restart` does with its `restartedAt` annotation: every host whose release has run
//! since before that instant is restarted once (canaries, `max_in_flight`, the health
//! gate), by `erel deploy` and by the daemons. A release's start is the master's clock
//! less the agent's up time, so no state is kept and host clocks do not matter. An
//! instant more than [`RESTARTED_AT_MAX_AHEAD`] ahead of the clock that judges it is
//! refused ([`Plan::parse_as_of`]; a config from the log is judged by its publish time,
//! so every master gives it one verdict): it would be a restart scheduled for later,
//! which the daemons would carry out at an unforeseen moment; an instant slightly ahead
//! (clocks of the writer and the master apart) takes effect once the master's clock
//! reaches it.
//!
//! A host may belong to several groups (`groups = [...]`), each running its own
//! release on it; two groups of one host may not name the same release. A host in no
//! group is waiting: known and pinged, but nothing is deployed to it. A group that no
//! host names is refused, unless it is `state = "stopped"`.
//!
//! `health.tcp`, `health.http` and `drain.http` may also name a variable of each
//! host's environment, as `tcp = "$BEAT_PORT"`, when hosts listen on different ports
//! (several agents on one machine); every host of the group must then give that
//! variable a port number.
//!
//! When the archive is opened, its `releases/<version>/` directories (the relx layout)
//! must include the group's `version`; an archive with no such directory is not checked.
//!
//! Where archives are found is the caller's choice ([`ArchiveLookup`]): beside the
//! file for `erel deploy`, in an artifact directory for a config received over AMQP.

mod contents;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use erel_proto::{Sha256, Start};

use crate::error::{Error, Result};
use crate::HostAddr;

/// The file `--cluster` defaults to.
pub(crate) const DEFAULT_CLUSTER_FILE: &str = "cluster.toml";
/// Seconds a release must stay up when the group says nothing.
pub(crate) const DEFAULT_MIN_UP_SECS: u64 = 5;
/// Seconds a release has to become healthy when the group says nothing.
pub(crate) const DEFAULT_DEADLINE_SECS: u64 = 60;
/// Consecutive passes of every probe a release needs when the group says nothing.
pub(crate) const DEFAULT_PASSES: u32 = 1;
/// The HTTP health probe's path when the group says nothing.
pub(crate) const DEFAULT_HEALTH_PATH: &str = "/health";
/// The drain request's path when the group says nothing.
pub(crate) const DEFAULT_DRAIN_PATH: &str = "/drain";
/// Seconds the drain request may take when the group says nothing.
pub(crate) const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 10;
/// Seconds between SIGTERM and SIGKILL when the group says nothing.
pub(crate) const DEFAULT_STOP_GRACE_SECS: u64 = 10;
/// The largest revision a cluster file may carry: 2^53 - 1, the largest integer every
/// JSON reader holds exactly (RFC 8259 section 6), so `--json` output and events show
/// it as published; it also leaves room above for every later revision.
pub const MAX_REVISION: u64 = (1 << 53) - 1;
/// The most a revision may be above the newest revision before it in the config log:
/// 2^32. A revision further ahead is refused when published and by every master, so
/// one message cannot bring the log to [`MAX_REVISION`] (reaching it takes at least
/// 2^21 publishes) and leave no revision to publish after it.
pub const MAX_REVISION_STEP: u64 = 1 << 32;
/// The longest wait a cluster file may ask for, in seconds (`health.min_up_secs`,
/// `health.deadline_secs`, `drain.timeout_secs`): one day. A longer one is a typo, and
/// the master adds these to clock instants, which must not overflow.
pub const MAX_WAIT_SECS: u64 = 24 * 60 * 60;
/// How far ahead of the master's clock `restarted_at` may be: the clocks of whoever
/// wrote the file and of the master may differ by this much.
pub(crate) const RESTARTED_AT_MAX_AHEAD: Duration = Duration::from_secs(5 * 60);

/// Where the archives a cluster file names are found and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ArchiveLookup {
    /// `archive` is relative to this directory (the cluster file's); a group naming only
    /// `sha256` is matched against the `.tar.gz`/`.tgz`/`.tar` files in this directory
    /// and its `artifacts/` subdirectory.
    Beside(PathBuf),
    /// Archives live in this artifact directory: `archive` is looked up by its file
    /// name there, a group naming only `sha256` is matched against its files.
    Artifacts(PathBuf),
    /// Archives are not opened: [`GroupPlan::archive`] is `None`. For commands that
    /// only need hosts and desired versions (`status`, host lookup).
    Unchecked,
}

/// A validated cluster file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where it came from, as errors name it.
    pub(crate) origin: String,
    /// The revision; a daemon applies only a larger one.
    pub(crate) revision: u64,
    /// Every host, in file order.
    pub(crate) hosts: Vec<HostPlan>,
    /// Every group by name.
    pub(crate) groups: BTreeMap<String, GroupPlan>,
}

/// One host of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPlan {
    /// Host id, as its certificate names it.
    pub(crate) id: String,
    /// `ADDR:PORT` of its agent.
    pub(crate) addr: String,
    /// The groups it belongs to, in file order; each runs its own release. Empty: the
    /// host is waiting (pinged by `status`, nothing deployed to it).
    pub(crate) groups: Vec<String>,
    /// Host-only environment, merged over the group's.
    pub(crate) env: BTreeMap<String, String>,
}

/// What a group of hosts runs and how it is rolled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupPlan {
    /// Group name.
    pub(crate) name: String,
    /// Release name.
    pub(crate) release: String,
    /// Desired version.
    pub(crate) version: String,
    /// The archive, checked; `None` only with [`ArchiveLookup::Unchecked`].
    pub(crate) archive: Option<Archive>,
    /// The command, relative to the version directory; empty means the agent's default
    /// `bin/<release> foreground`.
    pub(crate) argv: Vec<String>,
    /// Environment for every host of the group.
    pub(crate) env: BTreeMap<String, String>,
    /// Run as this user on the hosts.
    pub(crate) user: Option<String>,
    /// Most hosts switching at once (at least 1).
    pub(crate) max_in_flight: usize,
    /// Hosts that switch first, alone, before the rest.
    pub(crate) canaries: usize,
    /// Grace between SIGTERM and SIGKILL when stopping the release.
    pub(crate) stop_grace: Duration,
    /// The health gate.
    pub(crate) health: Health,
    /// Hosts that may fail or be unreachable before the group's rollout halts.
    pub(crate) max_failed: usize,
    /// Whether the group's release runs or is stopped on its hosts.
    pub(crate) state: GroupState,
    /// The request that drains a running release before it is stopped, if any.
    pub(crate) drain: Option<Drain>,
    /// `restarted_at`: every host whose release has run since before this instant (UTC)
    /// is given a rolling cold restart, once the instant has come (see
    /// [`crate::rollout::decide::restart_due`]).
    pub(crate) restarted_at: Option<time::OffsetDateTime>,
}

/// `state = "running" | "stopped"`: what the group's release does on its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupState {
    /// The release runs its version on every host of the group (the default).
    Running,
    /// The release is stopped on every host of the group; the group may have no hosts.
    Stopped,
}

/// Which port a probe (TCP or HTTP) or the drain request connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TcpProbe {
    /// The same port on every host.
    Port(u16),
    /// The port in this variable of each host's environment (checked for every host).
    Variable(String),
}

impl std::fmt::Display for TcpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpProbe::Port(port) => write!(f, "{port}"),
            TcpProbe::Variable(name) => write!(f, "${name}"),
        }
    }
}

/// A release archive on the master's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Archive {
    /// The local file.
    pub(crate) path: PathBuf,
    /// Its file name, used for `archives/<file name>` on the agents.
    pub(crate) file_name: String,
    /// Its sha256, checked.
    pub(crate) sha256: Sha256,
}

/// When a freshly started release counts as healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    /// A TCP port on the host's address that must accept a connection.
    pub(crate) tcp: Option<TcpProbe>,
    /// An HTTP path on the host's address that must answer `GET` with a 2xx status.
    pub(crate) http: Option<HttpProbe>,
    /// Consecutive looks at which every configured probe must pass (at least 1); a
    /// failure resets the count. Meaningless without a probe.
    pub(crate) passes: u32,
    /// How long it must run without a restart.
    pub(crate) min_up: Duration,
    /// How long it has, from its start, to be healthy.
    pub(crate) deadline: Duration,
}

impl Health {
    /// Whether any probe (TCP or HTTP) is configured.
    pub(crate) fn has_probe(&self) -> bool {
        self.tcp.is_some() || self.http.is_some()
    }
}

/// `health.http`: plain HTTP/1.1 `GET http://HOST:PORT/PATH`, passed by a 2xx status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpProbe {
    /// The port, on the host's address.
    pub(crate) port: TcpProbe,
    /// The absolute path requested (with its query, if any).
    pub(crate) path: String,
}

/// `drain`: before a running release is stopped, plain HTTP/1.1
/// `POST http://HOST:PORT/PATH` (POST: draining changes the release's state), answered
/// by a 2xx status once the release has drained. The stop proceeds after `timeout`, or
/// after any other answer, and says so in an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Drain {
    /// The port, on the host's address.
    pub(crate) port: TcpProbe,
    /// The absolute path requested.
    pub(crate) path: String,
    /// How long the request (connect, send, answer) may take.
    pub(crate) timeout: Duration,
}

impl Plan {
    /// Loads and validates `path`, with archives relative to its directory.
    pub fn load(path: &Path) -> Result<Plan> {
        Plan::load_with(path, &ArchiveLookup::Beside(base_dir(path)))
    }

    /// Loads and validates `path`, finding archives as `lookup` says.
    pub(crate) fn load_with(path: &Path, lookup: &ArchiveLookup) -> Result<Plan> {
        let text = read(path)?;
        Plan::parse(&text, &path.display().to_string(), lookup)
    }

    /// Validates a cluster file's text as of this machine's clock. `origin` names it in
    /// errors (a path, or where a config received over the wire came from).
    pub(crate) fn parse(text: &str, origin: &str, lookup: &ArchiveLookup) -> Result<Plan> {
        validate::plan(text, origin, lookup, Some(time::OffsetDateTime::now_utc()))
    }

    /// Validates a cluster file's text as of `now`, the instant a `restarted_at` may be
    /// at most [`RESTARTED_AT_MAX_AHEAD`] ahead of; `None` measures nothing (a config
    /// already accepted). A config from the log is judged as of its publish time, so
    /// that every master gives it the verdict `publish` gave it, whatever their clocks.
    pub(crate) fn parse_as_of(
        text: &str,
        origin: &str,
        lookup: &ArchiveLookup,
        now: Option<time::OffsetDateTime>,
    ) -> Result<Plan> {
        validate::plan(text, origin, lookup, now)
    }

    /// Reads only the revision of a cluster file, without validating the rest.
    pub(crate) fn read_revision(path: &Path) -> Result<u64> {
        let text = read(path)?;
        let origin = path.display().to_string();
        toml::from_str::<raw::RawRevision>(&text)
            .map(|r| r.revision)
            .map_err(|e| validate::toml_error(&origin, &text, &e))
    }

    /// The host with this id.
    pub(crate) fn host(&self, id: &str) -> Option<&HostPlan> {
        self.hosts.iter().find(|h| h.id == id)
    }

    /// The hosts that are members of `group`, in file order.
    pub(crate) fn hosts_in(&self, group: &str) -> Vec<&HostPlan> {
        self.hosts
            .iter()
            .filter(|h| h.groups.iter().any(|g| g == group))
            .collect()
    }

    /// The group of `host` whose release is `release`, if any (validation allows at
    /// most one).
    pub(crate) fn group_running(&self, host: &HostPlan, release: &str) -> Option<&GroupPlan> {
        self.groups_of(host)
            .into_iter()
            .find(|g| g.release == release)
    }

    /// The groups a host belongs to, in the host's order; empty for a waiting host.
    pub(crate) fn groups_of(&self, host: &HostPlan) -> Vec<&GroupPlan> {
        host.groups
            .iter()
            .filter_map(|name| self.groups.get(name))
            .collect()
    }
}

impl HostPlan {
    /// Its id and address, for a client.
    pub(crate) fn host_addr(&self) -> HostAddr {
        HostAddr {
            id: self.id.clone(),
            addr: self.addr.clone(),
        }
    }

    /// The address without its port (and without the brackets of an IPv6 address):
    /// where health probes connect.
    pub(crate) fn probe_host(&self) -> &str {
        let host = self
            .addr
            .rsplit_once(':')
            .map(|(host, _)| host)
            .unwrap_or(&self.addr);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

impl GroupPlan {
    /// The `Start` request for `version` of this group's release on `host`: the
    /// group's argv and user, the group's env with the host's merged over it.
    ///
    /// A rollback starts the previous version with this same argv and env: the agent
    /// needs them to start anything, the master keeps no history of what an old version
    /// was started with, and a release's command line rarely changes between versions.
    pub(crate) fn start_request(&self, host: &HostPlan, version: &str) -> Start {
        let mut env = self.env.clone();
        env.extend(host.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Start {
            name: self.release.clone(),
            version: version.to_string(),
            argv: self.argv.clone(),
            env: env.into_iter().collect(),
            user: self.user.clone(),
        }
    }

    /// The port the TCP health probe connects to on `host`, if the group has a probe.
    pub(crate) fn probe_port(&self, host: &HostPlan) -> Option<u16> {
        self.port_on(self.health.tcp.as_ref()?, host)
    }

    /// The port the HTTP health probe connects to on `host`, if the group has one.
    pub(crate) fn http_port(&self, host: &HostPlan) -> Option<u16> {
        self.port_on(&self.health.http.as_ref()?.port, host)
    }

    /// The port the drain request goes to on `host`, if the group drains.
    pub(crate) fn drain_port(&self, host: &HostPlan) -> Option<u16> {
        self.port_on(&self.drain.as_ref()?.port, host)
    }

    /// `port` on `host`: the number, or the host's (else the group's) variable.
    pub(crate) fn port_on(&self, port: &TcpProbe, host: &HostPlan) -> Option<u16> {
        match port {
            TcpProbe::Port(port) => Some(*port),
            TcpProbe::Variable(name) => host
                .env
                .get(name)
                .or_else(|| self.env.get(name))
                .and_then(|v| v.parse().ok()),
        }
    }

    /// Where the archive goes on an agent: `archives/<file name>`.
    pub(crate) fn archive_dest(archive: &Archive) -> String {
        format!("archives/{}", archive.file_name)
    }

    /// Where the version is unpacked on an agent: `releases/<name>/<version>`.
    pub(crate) fn version_dir(&self) -> String {
        erel_proto::rules::version_dir(&self.release, &self.version)
    }
}

/// Resolves a `HOST` argument: `ID@ADDR:PORT`, or an id found in the cluster file.
/// `cluster` is the file given with `--cluster`, else `cluster.toml` when it exists.
pub(crate) fn resolve_host(text: &str, cluster: Option<&Path>) -> Result<HostAddr> {
    resolve_host_in(text, cluster).map(|(host, _)| host)
}

/// Like [`resolve_host`], with the cluster file's plan (archives unchecked) when the
/// host was found in it; `None` for an `ID@ADDR:PORT` argument, which names no group.
pub(crate) fn resolve_host_in(
    text: &str,
    cluster: Option<&Path>,
) -> Result<(HostAddr, Option<Plan>)> {
    if text.contains('@') {
        return Ok((text.parse()?, None));
    }
    let path = match cluster {
        Some(path) => path.to_path_buf(),
        None => {
            let default = PathBuf::from(DEFAULT_CLUSTER_FILE);
            if !default.exists() {
                return Err(Error::InvalidHost {
                    text: text.to_string(),
                    reason: format!(
                        "expected ID@ADDR:PORT, or a host id with --cluster FILE (no {DEFAULT_CLUSTER_FILE} here)"
                    ),
                });
            }
            default
        }
    };
    let plan = Plan::load_with(&path, &ArchiveLookup::Unchecked)?;
    let host = plan
        .host(text)
        .map(HostPlan::host_addr)
        .ok_or_else(|| Error::InvalidHost {
            text: text.to_string(),
            reason: format!("no host with this id in {}", path.display()),
        })?;
    Ok((host, Some(plan)))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Cluster {
        file: path.display().to_string(),
        field: String::new(),
        message: format!("cannot read: {e}"),
    })
}

fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests;
