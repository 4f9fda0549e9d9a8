//! The I/O of verification: watching a started release until
//! [`super::decide::verify`] gives a verdict, with its evidence (the probes' answers,
//! the agent's figures, the release's own output on a failure); the probes themselves
//! (TCP connect, HTTP `GET`); and the drain request sent before a running release is
//! stopped.
//!
//! HTTP is plain HTTP/1.1 (RFC 9112) over TCP, through `hyper`'s client connection: one
//! connection per request, no TLS, no redirects followed; any 2xx status passes.

use std::time::{Duration, Instant};

use erel_proto::{ReleaseState, ReleaseStatus};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use tokio_util::task::AbortOnDropHandle;

use super::decide::{
    next_look, output_tail_wait, phase_budget, probe_due, verify, Observation, Observed, PassCount,
    ProbeAnswer, Verdict,
};
use super::{emit, DrainOutcome, EventSink, HostPhase, RolloutEvent, RolloutOptions};
use crate::client::HostSession;
use crate::cluster::{GroupPlan, HostPlan};

/// `host:port` as a URL authority and `Host` header (RFC 9110 section 7.2): an IPv6
/// address in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// Connects to `host:port` once, within `limit`: `connected`, or why not.
pub(crate) async fn probe_tcp(host: &str, port: u16, limit: Duration) -> ProbeAnswer {
    timed(format!("tcp {}", authority(host, port)), async {
        let outcome =
            tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await;
        match outcome {
            Ok(Ok(_stream)) => (true, "connected".to_string()),
            Ok(Err(e)) => (false, e.to_string()),
            Err(_) => (false, no_answer_within(limit)),
        }
    })
    .await
}

/// Runs one `check` (passed, answer) of `probe` and times it.
async fn timed(
    probe: String,
    check: impl std::future::Future<Output = (bool, String)>,
) -> ProbeAnswer {
    let began = Instant::now();
    let (passed, answer) = check.await;
    ProbeAnswer {
        probe,
        passed,
        answer,
        took_ms: millis(began.elapsed()),
    }
}

/// The answer of a probe that got none within `limit`.
fn no_answer_within(limit: Duration) -> String {
    format!("no answer within {}s", limit.as_secs_f32())
}

/// Sends one bodiless HTTP/1.1 request, `method` `path` to `host:port`, and waits for
/// the response's status line, all within `limit`. `Ok(status)` whatever the status;
/// `Err` says why there was none (connect error, broken exchange, timeout). The body
/// is not read.
pub(crate) async fn http_request(
    method: Method,
    host: &str,
    port: u16,
    path: &str,
    limit: Duration,
) -> std::result::Result<hyper::StatusCode, String> {
    let authority = authority(host, port);
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        // The connection is driven beside the request, and dropped with it.
        let _driver = AbortOnDropHandle::new(tokio::spawn(connection));
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &authority);
        if request.method_ref() == Some(&Method::POST) {
            request = request.header(header::CONTENT_LENGTH, "0");
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot form the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        Ok(response.status())
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(no_answer_within(limit)),
    }
}

/// `GET http://host:port/path` once, within `limit`: passed by a 2xx status.
pub(crate) async fn probe_http(host: &str, port: u16, path: &str, limit: Duration) -> ProbeAnswer {
    timed(format!("http GET {}{path}", authority(host, port)), async {
        match http_request(Method::GET, host, port, path, limit).await {
            Ok(status) => (status.is_success(), format!("HTTP {status}")),
            Err(why) => (false, why),
        }
    })
    .await
}

/// Every probe `group` configures, once, on `host`, each within `limit`: TCP first,
/// then HTTP. Empty when the group has none. A rollout's verification and `erel status`
/// both look through here.
pub(crate) async fn probe_all(
    group: &GroupPlan,
    host: &HostPlan,
    limit: Duration,
) -> Vec<ProbeAnswer> {
    let mut answers = Vec::new();
    if let Some(port) = group.probe_port(host) {
        answers.push(probe_tcp(host.probe_host(), port, limit).await);
    }
    if let (Some(http), Some(port)) = (&group.health.http, group.http_port(host)) {
        answers.push(probe_http(host.probe_host(), port, &http.path, limit).await);
    }
    answers
}

/// Polls until `version` (process `pid`, up `already_up`) is healthy or fails; every
/// verdict goes out as a [`RolloutEvent::HostVerdict`] with its evidence; on failure,
/// why (with the evidence) and the release's output tail.
#[allow(clippy::too_many_arguments)]
pub(super) async fn watch_health(
    group: &GroupPlan,
    options: &RolloutOptions,
    events: &EventSink,
    host: &HostPlan,
    session: &mut HostSession,
    version: &str,
    pid: u32,
    already_up: Duration,
) -> Observed {
    let began = Instant::now();
    let look = phase_budget(HostPhase::Verifying, group);
    let mut passes = PassCount::default();
    loop {
        let pong = session.ping(look).await;
        let lost = pong.as_ref().err().map(ToString::to_string);
        let status = pong
            .as_ref()
            .ok()
            .and_then(|pong| release_status(&pong.releases, &group.release));
        let up = already_up + began.elapsed();
        let answers = if lost.is_none() && probe_due(up, &group.health) {
            probe_all(group, host, options.probe_timeout).await
        } else {
            Vec::new()
        };
        let observation = Observation {
            lost: lost.as_deref(),
            status,
            probes: &answers,
            passes: passes.record(&answers),
            up,
            elapsed: began.elapsed(),
        };
        let verdict = verify(&observation, version, pid, &group.health);
        if let Some((verdict, evidence)) = verdict.evidence() {
            emit(
                events,
                RolloutEvent::HostVerdict {
                    group: group.name.clone(),
                    host: host.id.clone(),
                    version: version.to_string(),
                    verdict,
                    evidence: evidence.clone(),
                },
            );
        }
        match verdict {
            Verdict::Healthy(_) => return Observed::Ok,
            Verdict::Wait => {
                let wait = next_look(up, &group.health, options.poll_interval);
                tokio::time::sleep(wait).await;
            }
            Verdict::Lost(reason) => return Observed::failed(reason),
            Verdict::Unhealthy { reason, evidence } | Verdict::Deadline { reason, evidence } => {
                let tail = match output_tail_wait(&observation) {
                    Some(wait) => {
                        let interval = options.poll_interval;
                        output_tail_soon(session, &group.release, interval, wait, look).await
                    }
                    None => status.map(|s| s.output_tail.clone()).unwrap_or_default(),
                };
                return Observed::Failed {
                    reason: format!("{version}: {reason} (evidence: {evidence})"),
                    output_tail: super::decide::output_of_version(&tail, &group.release, version),
                };
            }
        }
    }
}

/// Before `host`'s running release is stopped: when the group drains, and the agent
/// reports the release running (or cannot say), `POST`s the drain path and waits for
/// the answer within the drain timeout. Whatever the answer (a 2xx, another status,
/// none), the stop proceeds; the outcome goes out as a [`RolloutEvent::HostDrain`].
/// Nothing is sent when the release does not run.
pub(super) async fn drain_before_stop(
    group: &GroupPlan,
    events: &EventSink,
    host: &HostPlan,
    session: &mut HostSession,
) {
    let (Some(drain), Some(port)) = (&group.drain, group.drain_port(host)) else {
        return;
    };
    let look = phase_budget(HostPhase::Pinging, group);
    let running = match session.ping(look).await {
        Ok(pong) => release_status(&pong.releases, &group.release)
            .filter(|s| s.state == ReleaseState::Running)
            .map(|s| s.version.clone().unwrap_or_default()),
        // The agent cannot say: drain, as the release may well run.
        Err(_) => Some(String::new()),
    };
    let Some(version) = running else {
        return;
    };
    let target = host.probe_host();
    let began = Instant::now();
    let outcome = http_request(Method::POST, target, port, &drain.path, drain.timeout).await;
    let (drained, status, answer) = match outcome {
        Ok(status) => (
            status.is_success(),
            Some(status.as_u16()),
            format!("HTTP {status}"),
        ),
        Err(why) => (false, None, why),
    };
    emit(
        events,
        RolloutEvent::HostDrain {
            group: group.name.clone(),
            host: host.id.clone(),
            outcome: DrainOutcome {
                version: (!version.is_empty()).then_some(version),
                request: format!("POST http://{}{}", authority(target, port), drain.path),
                drained,
                status,
                answer,
                took_ms: millis(began.elapsed()),
                timeout_secs: drain.timeout.as_secs(),
            },
        },
    );
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
