//! Values the unit tests of several modules build alike.

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
