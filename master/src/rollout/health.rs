//! Watching a started release until [`super::decide::verify`] gives a verdict, with
//! the evidence of a failure (the release's own output), and the TCP probe a verdict
//! is partly made of.

use std::time::{Duration, Instant};

use erel_proto::ReleaseStatus;

use super::decide::{
    output_tail_wait, phase_budget, probe_due, verify, Observation, Observed, Verdict,
};
use super::{HostPhase, RolloutOptions};
use crate::client::HostSession;
use crate::cluster::{GroupPlan, HostPlan};
use crate::error::{Error, Result};

/// Connects to `host:port` once; `Err` says why not.
pub(crate) async fn probe_tcp(host: &str, port: u16, limit: Duration) -> Result<()> {
    let failed = |message: String| Error::Probe {
        target: format!("{host}:{port}"),
        message,
    };
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {}s", limit.as_secs_f32()))),
    }
}

/// Polls until `version` (process `pid`, up `already_up`) is healthy or fails; on
/// failure, why and the release's output tail.
pub(super) async fn watch_health(
    group: &GroupPlan,
    options: &RolloutOptions,
    host: &HostPlan,
    session: &mut HostSession,
    version: &str,
    pid: u32,
    already_up: Duration,
) -> Observed {
    let began = Instant::now();
    let look = phase_budget(HostPhase::Verifying, group);
    loop {
        let pong = session.ping(look).await;
        let lost = pong.as_ref().err().map(ToString::to_string);
        let status = pong
            .as_ref()
            .ok()
            .and_then(|pong| release_status(&pong.releases, &group.release));
        let up = already_up + began.elapsed();
        let probe = match group.probe_port(host) {
            Some(port) if lost.is_none() && probe_due(up, &group.health) => {
                Some(probe_tcp(host.probe_host(), port, options.probe_timeout).await)
            }
            _ => None,
        };
        let observation = Observation {
            lost: lost.as_deref(),
            status,
            probe: probe.as_ref(),
            up,
            elapsed: began.elapsed(),
        };
        match verify(&observation, version, pid, &group.health) {
            Verdict::Healthy => return Observed::Ok,
            Verdict::Wait => tokio::time::sleep(options.poll_interval).await,
            Verdict::Lost(reason) => return Observed::failed(reason),
            Verdict::Unhealthy(reason) => {
                let tail = match output_tail_wait(&observation) {
                    Some(wait) => {
                        let interval = options.poll_interval;
                        output_tail_soon(session, &group.release, interval, wait, look).await
                    }
                    None => status.map(|s| s.output_tail.clone()).unwrap_or_default(),
                };
                return Observed::Failed {
                    reason: format!("{version}: {reason}"),
                    output_tail: tail,
                };
            }
        }
    }
}

/// Looks a few more times, briefly, for the output of a release's next exit, for at
/// most `wait` (see [`output_tail_wait`]).
async fn output_tail_soon(
    session: &mut HostSession,
    release: &str,
    interval: Duration,
    wait: Duration,
    look: Duration,
) -> String {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
        let Ok(pong) = session.ping(look).await else {
            break;
        };
        if let Some(status) = release_status(&pong.releases, release) {
            if !status.output_tail.trim().is_empty() {
                return status.output_tail.clone();
            }
        }
    }
    String::new()
}

/// The status of release `name` in a `Pong`'s list.
pub(super) fn release_status<'a>(
    releases: &'a [ReleaseStatus],
    name: &str,
) -> Option<&'a ReleaseStatus> {
    releases.iter().find(|r| r.name == name)
}
