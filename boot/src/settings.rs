//! The agent's validated settings: limits on what it accepts and how it supervises.
//!
//! `main` turns flags and `boot.toml` into these once; the rest of the agent only reads them.

use std::time::Duration;

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
    /// Most connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 8 << 30,
            disk_reserve_bytes: 256 << 20,
            max_unpack_bytes: 16 << 30,
            max_unpack_entries: 200_000,
            max_connections: 32,
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
    /// Largest output log per release before it is rotated.
    pub log_max_bytes: u64,
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
    pub fn parse(text: &str) -> Result<Self, String> {
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
            keep_versions: 2,
            cgroup_parent: CgroupParent::Auto,
        }
    }
}
