//! Watching a started release until [`super::decide::verify`] gives a verdict, with
//! the evidence of a failure (the release's own output), and the TCP probe a verdict
//! is partly made of.

use std::time::{Duration, Instant};

use erel_proto::ReleaseStatus;

use super::decide::{probe_due, verify, Observation, Observed, Verdict};
use super::RolloutOptions;
use crate::client::HostSession;
use crate::cluster::{GroupPlan, HostPlan};

/// How long a failed release's output is waited for when it restarted unseen.
const OUTPUT_TAIL_WAIT: Duration = Duration::from_secs(2);

/// Connects to `host:port` once; `Err` says why not.
pub(crate) async fn probe_tcp(
    host: &str,
    port: u16,
    limit: Duration,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("{host}:{port}: {e}")),
        Err(_) => Err(format!(
            "{host}:{port}: no answer within {}s",
            limit.as_secs_f32()
        )),
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
    loop {
        let pong = match session.ping().await {
            Ok(pong) => pong,
            Err(e) => return Observed::failed(format!("lost the agent while verifying: {e}")),
        };
        let status = release_status(&pong.releases, &group.release);
        let up = already_up + began.elapsed();
        let probe = match group.probe_port(host) {
            Some(port) if probe_due(up, &group.health) => {
                Some(probe_tcp(host.probe_host(), port, options.probe_timeout).await)
            }
            _ => None,
        };
        let observation = Observation {
            status,
            probe: probe.as_ref(),
            up,
            elapsed: began.elapsed(),
        };
        match verify(&observation, version, pid, &group.health) {
            Verdict::Healthy => return Observed::Ok,
            Verdict::Wait => tokio::time::sleep(options.poll_interval).await,
            Verdict::Unhealthy(reason) => {
                let mut tail = status.map(|s| s.output_tail.clone()).unwrap_or_default();
                if tail.trim().is_empty() {
                    tail = output_tail_soon(session, &group.release, options.poll_interval).await;
                }
                return Observed::Failed {
                    reason: format!("{version}: {reason}"),
                    output_tail: tail,
                };
            }
        }
    }
}

/// The agent fills a release's output tail once it has exited; one that restarted
/// between two looks shows none while it runs again. Looks a few more times, briefly,
/// for the output of its next exit.
async fn output_tail_soon(session: &mut HostSession, release: &str, interval: Duration) -> String {
    let deadline = Instant::now() + OUTPUT_TAIL_WAIT;
    while Instant::now() < deadline {
        tokio::time::sleep(interval.min(Duration::from_millis(100))).await;
        let Ok(pong) = session.ping().await else {
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
