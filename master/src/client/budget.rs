//! How long an agent may take to answer each command, once sent: one bound per
//! command and per try, none wrapped around another. A rollout maps its phases onto
//! these ([`crate::rollout::decide::phase_budget`]); an operator's single command uses
//! [`answer_budget`].

use std::time::Duration;

use erel_proto::Request;

use super::TRANSFER_STALL_TIMEOUT;

/// How long an agent may take to answer `Ping` (a look, in every phase that looks).
pub(crate) const PING_BUDGET: Duration = Duration::from_secs(15);
/// How long an agent may take to unpack an archive: large archives on slow disks.
pub(crate) const UNPACK_BUDGET: Duration = Duration::from_secs(600);
/// How long an agent may take to start a release: it may first stop another version.
pub(crate) const START_BUDGET: Duration = Duration::from_secs(120);
/// How long beyond the stop grace an agent may take to answer `Stop`.
const STOP_MARGIN: Duration = Duration::from_secs(30);

/// How long the agent may take to answer `request`, once sent, outside a rollout (an
/// operator's single command): the same bounds a rollout's phases use
/// ([`crate::rollout::decide::phase_budget`]).
pub(crate) fn answer_budget(request: &Request) -> Duration {
    match request {
        Request::Ping(_) => PING_BUDGET,
        Request::Unpack(_) => UNPACK_BUDGET,
        Request::Start(_) => START_BUDGET,
        Request::Stop(stop) => stop_budget(Duration::from_millis(stop.grace_ms)),
        Request::Hello(_) | Request::WriteFile(_) => TRANSFER_STALL_TIMEOUT,
    }
}

/// How long an agent may take to answer `Stop` with `grace`: the grace plus
/// [`STOP_MARGIN`]. The agent caps the grace itself; a huge one must not overflow the
/// wait here.
pub(crate) fn stop_budget(grace: Duration) -> Duration {
    grace.saturating_add(STOP_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_has_its_own_budget() {
        let request = Request::Stop(erel_proto::Stop {
            name: "beat".into(),
            grace_ms: u64::MAX,
        });
        assert!(
            answer_budget(&request) > Duration::from_secs(u64::MAX / 1000),
            "no overflow"
        );
        let ping = Request::Ping(erel_proto::Ping {});
        assert_eq!(answer_budget(&ping), PING_BUDGET);
    }
}
