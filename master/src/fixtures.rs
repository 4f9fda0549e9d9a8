//! Values the unit tests of several modules build alike.

use std::path::{Path, PathBuf};

use erel_proto::{ReleaseState, ReleaseStatus};

/// What an agent reports of release `name` with `version` present and current, in
/// `state`: desired running or not, pid 42 while running, never restarted, up for
/// `up_secs` seconds, no output.
pub(crate) fn release_status(
    name: &str,
    version: &str,
    state: ReleaseState,
    desired_running: bool,
    up_secs: u64,
) -> ReleaseStatus {
    ReleaseStatus {
        name: name.into(),
        versions: vec![version.into()],
        version: Some(version.into()),
        desired_running,
        pid: (state == ReleaseState::Running).then_some(42),
        state,
        restarts: 0,
        up_secs: Some(up_secs),
        output_tail: String::new(),
    }
}

/// A cluster file at revision 3: `hosts`, then group `web` running beat 0.2.0 and
/// group `metrics` running probe 1.0.0 (archives `beat.tar.gz`, `probe.tar.gz`).
pub(crate) fn groups_text(hosts: &str) -> String {
    format!(
        r#"
revision = 3
{hosts}
[group.web]
release = "beat"
version = "0.2.0"
archive = "beat.tar.gz"

[group.metrics]
release = "probe"
version = "1.0.0"
archive = "probe.tar.gz"
"#
    )
}

/// Three `[[host]]` entries: `both-1` in groups `web` and `metrics`, `web-1` in `web`,
/// `spare-1` in none (waiting).
pub(crate) const HOSTS_IN_SEVERAL_GROUPS: &str = r#"
[[host]]
id = "both-1"
addr = "10.0.0.1:7070"
groups = ["web", "metrics"]

[[host]]
id = "web-1"
addr = "10.0.0.2:7070"
group = "web"

[[host]]
id = "spare-1"
addr = "10.0.0.3:7070"
"#;

/// An artifact directory `dir/artifacts` holding a copy of `archive` named `name`, as a
/// master's `--artifacts` directory would.
pub(crate) fn artifacts_holding(dir: &Path, archive: &Path, name: &str) -> PathBuf {
    let artifacts = dir.join("artifacts");
    std::fs::create_dir(&artifacts).expect("mkdir");
    std::fs::copy(archive, artifacts.join(name)).expect("copy");
    artifacts
}
