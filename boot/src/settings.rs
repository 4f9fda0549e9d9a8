//! The agent's validated settings: limits on what it accepts and how it supervises.
//!
//! `main` turns flags and `boot.toml` into these once; the rest of the agent only reads them.

use std::path::PathBuf;
use std::time::Duration;

use erel_proto::OUTPUT_TAIL_MAX;

/// Smallest `log_max_bytes`: each of the two log files holds at least the tail `Ping`
/// reports.
pub(crate) const MIN_LOG_MAX_BYTES: u64 = 2 * OUTPUT_TAIL_MAX as u64;

/// Bounds on what one command may make the agent write.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest file a `WriteFile` may announce.
    pub max_file_bytes: u64,
    /// Free disk the agent never writes into.
    pub disk_reserve_bytes: u64,
    /// Most bytes of file content one archive may unpack to.
    pub max_unpack_bytes: u64,
    /// Most entries one archive may hold.
    pub max_unpack_entries: u64,
    /// Most authenticated connections (masters) served at once. A master beyond it is
    /// answered `Busy`, naming this limit. Peers still in the TLS handshake do not count.
    pub max_connections: usize,
    /// Most TLS handshakes in progress at once: peers that have not yet proved who they
    /// are. When full, the oldest pending handshake of the address with the most is
    /// dropped for the newcomer (see `peers`).
    pub max_handshakes: usize,
    /// Most TLS handshakes in progress from one address (an IPv4 address or an IPv6
    /// /64); beyond it the oldest from that address is dropped for the newcomer.
    pub max_handshakes_per_address: usize,
    /// Time a peer has to complete its TLS handshake, from the moment it is accepted.
    pub handshake_timeout: Duration,
    /// How long a newly pushed certificate bundle (`certs/bundle.toml`) may wait for a
    /// master to authenticate with it before the agent goes back to the previous one.
    pub bundle_probation: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 8 << 30,
            disk_reserve_bytes: 256 << 20,
            max_unpack_bytes: 16 << 30,
            max_unpack_entries: 200_000,
            max_connections: 32,
            max_handshakes: 64,
            max_handshakes_per_address: 8,
            handshake_timeout: Duration::from_secs(5),
            bundle_probation: Duration::from_secs(300),
        }
    }
}

/// How releases are supervised.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// First delay before restarting a release that died; doubles each time.
    pub restart_backoff: Duration,
    /// Longest delay between restarts.
    pub restart_backoff_max: Duration,
    /// A run shorter than this counts as a crash towards crash-looping.
    pub stable_after: Duration,
    /// This many short runs in a row mark a release crash-looping.
    pub crash_loop_after: u32,
    /// Most bytes of a release's output kept on disk, across `<name>.log` and
    /// `<name>.log.1` (each holds at most half), at every instant; at least
    /// [`MIN_LOG_MAX_BYTES`]. See the supervisor's `log` module.
    pub log_max_bytes: u64,
    /// The program that writes each release's output into its capped log.
    pub output_writer: OutputWriter,
    /// Versions kept per release besides the running one.
    pub keep_versions: usize,
    /// Where the cgroup v2 of each running release is created.
    pub cgroup_parent: CgroupParent,
}

/// Where the agent puts the cgroups of the releases it runs (see `supervisor::cgroup`).
///
/// Whatever the parent, the agent creates `<parent>/erel@<root>` (the root path escaped
/// as `systemd-escape --path` does) and in it one cgroup per running release,
/// `release.<name>`, so that two agents with different roots never share a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupParent {
    /// The cgroup the agent itself runs in (`0::` in `/proc/self/cgroup`): under systemd
    /// with `Delegate=yes`, the unit's own cgroup, which the agent may manage.
    #[default]
    Auto,
    /// A cgroup v2 path as `/proc/self/cgroup` shows them (absolute, from the hierarchy's
    /// root, e.g. `/erel.slice`); missing components are created.
    Path(String),
    /// No cgroups: releases are tracked by process group, session, descendants and the
    /// agent's environment markers (the fallback, also taken when cgroup v2 is missing or
    /// not writable).
    None,
}

impl CgroupParent {
    /// Parses the setting as written in `boot.toml` or given as `--cgroup-parent`:
    /// `auto`, `none`, or an absolute cgroup path without `.` or `..` components.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(CgroupParent::Auto),
            "none" => Ok(CgroupParent::None),
            path if path.starts_with('/') => {
                if path.contains('\0') || path.contains('\n') {
                    return Err(format!("{path:?} holds a NUL or newline"));
                }
                if path.split('/').any(|part| part == "." || part == "..") {
                    return Err(format!("{path:?} holds '.' or '..'"));
                }
                Ok(CgroupParent::Path(path.to_string()))
            }
            other => Err(format!(
                "{other:?} is not 'auto', 'none' or an absolute cgroup path such as /erel.slice"
            )),
        }
    }
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            restart_backoff: Duration::from_millis(500),
            restart_backoff_max: Duration::from_secs(30),
            stable_after: Duration::from_secs(10),
            crash_loop_after: 5,
            log_max_bytes: 4 << 20,
            output_writer: OutputWriter::default(),
            keep_versions: 2,
            cgroup_parent: CgroupParent::Auto,
        }
    }
}

/// The output writer command: `program args.. LOG MAX_BYTES`, with the release's output
/// on its stdin. It copies its input into `LOG` and `LOG.1`, never more than `MAX_BYTES`
/// together, until end of input. The default is the running program itself with
/// `output-writer` (see [`crate::supervisor::run_output_writer`]); a program that embeds the
/// agent must hand that subcommand to it (see [`crate::cli::run_output_writer_if_asked`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputWriter {
    /// The program to run.
    pub program: PathBuf,
    /// Arguments before the log path and the cap.
    pub args: Vec<String>,
}

impl OutputWriter {
    /// The running program, as the kernel names it for any process (`proc(5)`): valid even
    /// after the file on disk was replaced.
    pub(crate) const SELF: &'static str = "/proc/self/exe";
}

impl Default for OutputWriter {
    fn default() -> Self {
        OutputWriter {
            program: PathBuf::from(OutputWriter::SELF),
            args: vec![crate::supervisor::OUTPUT_WRITER_COMMAND.to_string()],
        }
    }
}
