//! Prometheus metrics of the daemon (`erel master --metrics ADDR`), in the OpenMetrics
//! text format (encoded by the `prometheus-client` crate), served over plain HTTP/1.1
//! (RFC 9112, through `hyper`'s server connection) at `GET /metrics`.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `erel_revision` | gauge | | the cluster revision in force |
//! | `erel_config_age_seconds` | gauge | | seconds since that revision was taken in |
//! | `erel_hosts` | gauge | `state` | hosts by state: `converged`, `in_flight`, `pending`, `failed` |
//! | `erel_rollouts_total` | counter | `group` | rollouts that switched or failed a host |
//! | `erel_host_failures_total` | counter | `group` | hosts that failed a rollout |
//! | `erel_group_halted` | gauge | `group` | 1 while the group is halted at the revision in force (a failed rollout, not tried again), else 0 |
//! | `erel_waiting_revision` | gauge | | the newer revision an AMQP master waits for (received, not applied yet for a reason that can pass, such as a missing archive or a full disk; no group is rolled out meanwhile), else 0 |
//! | `erel_waiting_seconds` | gauge | | seconds since it began waiting for that revision, else 0 |
//!
//! The daemon feeds [`Metrics`] from its rollout events ([`Metrics::record`]), from
//! the revision it applies ([`Metrics::set_revision`]) and from the one it waits for
//! ([`Metrics::set_waiting`]); [`serve`] answers scrapes.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::rollout::{RolloutEvent, StopReason};

/// The `Content-Type` of the OpenMetrics text format, as its specification names it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The longest request head read from a scraper, in bytes (the least `hyper` allows).
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Time a scraper has to send its request head and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Label sets: `[("state", "converged")]`, `[("group", "web")]`.
type Labels = Vec<(String, String)>;

/// The host states `erel_hosts` counts.
const HOST_STATES: [&str; 5] = ["converged", "in_flight", "pending", "failed", "stopped"];

/// The daemon's metrics; shared between the daemon's event callback and [`serve`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    revision: Gauge,
    config_age: Gauge<f64, AtomicU64>,
    hosts: Family<Labels, Gauge>,
    rollouts: Family<Labels, Counter>,
    host_failures: Family<Labels, Counter>,
    group_halted: Family<Labels, Gauge>,
    waiting_revision: Gauge,
    waiting_age: Gauge<f64, AtomicU64>,
    state: Mutex<State>,
}

/// What the gauges are computed from.
#[derive(Debug, Default)]
struct State {
    /// The revision in force and when it was taken in.
    revision: Option<(u64, Instant)>,
    /// Each host's state, by (group, host).
    hosts: HashMap<(String, String), &'static str>,
    /// The revision waited for and since when.
    waiting: Option<(u64, Instant)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics, registered under the names in the module's table.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let revision = Gauge::default();
        let config_age = Gauge::<f64, AtomicU64>::default();
        let hosts = Family::<Labels, Gauge>::default();
        let rollouts = Family::<Labels, Counter>::default();
        let host_failures = Family::<Labels, Counter>::default();
        let group_halted = Family::<Labels, Gauge>::default();
        let waiting_revision = Gauge::default();
        let waiting_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "erel_revision",
            "The cluster revision in force",
            revision.clone(),
        );
        registry.register(
            "erel_config_age_seconds",
            "Seconds since the revision in force was taken in",
            config_age.clone(),
        );
        registry.register(
            "erel_hosts",
            "Hosts by state (converged, in_flight, pending, failed, stopped)",
            hosts.clone(),
        );
        registry.register(
            "erel_rollouts",
            "Rollouts of a group that switched or failed at least one host",
            rollouts.clone(),
        );
        registry.register(
            "erel_host_failures",
            "Hosts of a group that failed a rollout",
            host_failures.clone(),
        );
        registry.register(
            "erel_group_halted",
            "1 while the group is halted at the revision in force, else 0",
            group_halted.clone(),
        );
        registry.register(
            "erel_waiting_revision",
            "The newer revision this master waits for (not applied yet; nothing is rolled \
             out meanwhile), else 0",
            waiting_revision.clone(),
        );
        registry.register(
            "erel_waiting_seconds",
            "Seconds since this master began waiting for that revision, else 0",
            waiting_age.clone(),
        );
        for state in HOST_STATES {
            hosts.get_or_create(&state_labels(state)).set(0);
        }
        Metrics {
            registry,
            revision,
            config_age,
            hosts,
            rollouts,
            host_failures,
            group_halted,
            waiting_revision,
            waiting_age,
            state: Mutex::new(State::default()),
        }
    }

    /// The revision in force; the config age restarts when it changes.
    pub fn set_revision(&self, revision: u64) {
        let mut state = self.lock();
        if state.revision.map(|(r, _)| r) != Some(revision) {
            state.revision = Some((revision, Instant::now()));
        }
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// The newer revision the master waits for (`erel_waiting_revision`), `None` when it
    /// waits for none; the wait's age (`erel_waiting_seconds`) restarts when the
    /// revision changes.
    pub fn set_waiting(&self, revision: Option<u64>) {
        let mut state = self.lock();
        match revision {
            Some(revision) if state.waiting.map(|(r, _)| r) != Some(revision) => {
                state.waiting = Some((revision, Instant::now()));
            }
            Some(_) => {}
            None => state.waiting = None,
        }
        self.waiting_revision
            .set(i64::try_from(revision.unwrap_or(0)).unwrap_or(i64::MAX));
        if revision.is_none() {
            self.waiting_age.set(0.0);
        }
    }

    /// Whether `group` is halted at the revision in force (`erel_group_halted`, 1 or
    /// 0); the daemon sets it at each pass and when it halts the group.
    pub fn set_halted(&self, group: &str, halted: bool) {
        self.group_halted
            .get_or_create(&group_labels(group))
            .set(i64::from(halted));
    }

    /// Takes in one rollout event.
    pub fn record(&self, event: &RolloutEvent) {
        let host_state = match event {
            RolloutEvent::HostPhase { group, host, phase } => {
                let state = if phase.changes_host() {
                    "in_flight"
                } else {
                    "pending"
                };
                Some((group, host, state))
            }
            RolloutEvent::HostDone { group, host, .. }
            | RolloutEvent::HostSkipped { group, host, .. } => Some((group, host, "converged")),
            RolloutEvent::HostFailed { group, host, .. } => {
                self.host_failures.get_or_create(&group_labels(group)).inc();
                Some((group, host, "failed"))
            }
            RolloutEvent::GroupDone {
                group,
                switched,
                failed,
                stopped,
                ..
            } => {
                if switched + failed + stopped > 0 {
                    self.rollouts.get_or_create(&group_labels(group)).inc();
                }
                None
            }
            RolloutEvent::GroupStarted { group, .. } => {
                // Make the group's counters visible (at 0) from its first rollout on.
                let _ = self.rollouts.get_or_create(&group_labels(group));
                let _ = self.host_failures.get_or_create(&group_labels(group));
                let _ = self.group_halted.get_or_create(&group_labels(group));
                None
            }
            // A host that left a group is no longer one of its hosts.
            RolloutEvent::HostStopped {
                group,
                host,
                why: StopReason::LeftGroup,
                ..
            } => Some((group, host, "")),
            RolloutEvent::HostStopped { group, host, .. } => Some((group, host, "stopped")),
            RolloutEvent::GroupHalted { group, .. } => {
                // Halted until the daemon's next pass says otherwise.
                self.set_halted(group, true);
                None
            }
            RolloutEvent::HostVerdict { .. } | RolloutEvent::HostDrain { .. } => None,
        };
        if let Some((group, host, host_state)) = host_state {
            let mut state = self.lock();
            let key = (group.clone(), host.clone());
            if host_state.is_empty() {
                state.hosts.remove(&key);
            } else {
                state.hosts.insert(key, host_state);
            }
            for name in HOST_STATES {
                let count = state.hosts.values().filter(|s| **s == name).count();
                self.hosts
                    .get_or_create(&state_labels(name))
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    /// The metrics in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let state = self.lock();
        if let Some((_, since)) = state.revision {
            self.config_age.set(since.elapsed().as_secs_f64());
        }
        if let Some((_, since)) = state.waiting {
            self.waiting_age.set(since.elapsed().as_secs_f64());
        }
        drop(state);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn state_labels(state: &str) -> Labels {
    vec![("state".to_string(), state.to_string())]
}

fn group_labels(group: &str) -> Labels {
    vec![("group".to_string(), group.to_string())]
}

/// Answers scrapes on `listener` until `cancel`: `GET /metrics` gets the metrics (200),
/// any other path 404, any other method 405 (with `Allow: GET`, RFC 9110 section
/// 15.5.6); one request per connection (HTTP/1.1 with `Connection: close`, RFC 9112).
/// A request head longer than 8 KiB, or a scrape not done within 10 seconds, is
/// dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, metrics)).await;
                });
            }
            Err(e) => {
                tracing::warn!("metrics: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one connection: one request, one response.
async fn answer(stream: TcpStream, metrics: Arc<Metrics>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &metrics);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let served = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_REQUEST_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(SCRAPE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("metrics: a scrape's connection ended early: {e}");
    }
}

/// The answer to one request (its body is not read).
fn respond(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, metrics.encode()),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            TEXT,
            "erel serves only /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::HostPhase;

    fn phase(host: &str, phase: HostPhase) -> RolloutEvent {
        RolloutEvent::HostPhase {
            group: "web".into(),
            host: host.into(),
            phase,
        }
    }

    #[test]
    fn events_become_hosts_by_state_rollouts_and_failures() {
        let metrics = Metrics::new();
        metrics.set_revision(7);
        metrics.record(&phase("web-1", HostPhase::Verifying));
        metrics.record(&phase("web-2", HostPhase::Staged));
        let text = metrics.encode();
        assert!(text.contains("erel_revision 7\n"), "{text}");
        assert!(
            text.contains("erel_hosts{state=\"in_flight\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("erel_hosts{state=\"pending\"} 1\n"), "{text}");
        assert!(text.contains("erel_config_age_seconds "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");

        metrics.record(&RolloutEvent::HostDone {
            group: "web".into(),
            host: "web-1".into(),
            version: "0.2.0".into(),
            pid: 1,
        });
        metrics.record(&RolloutEvent::HostFailed {
            group: "web".into(),
            host: "web-2".into(),
            addr: "127.0.0.1:1".into(),
            failure: crate::rollout::HostFailure::new(HostPhase::Verifying, "boom"),
        });
        metrics.record(&RolloutEvent::GroupDone {
            group: "web".into(),
            switched: 1,
            skipped: 0,
            failed: 1,
            stopped: 0,
        });
        let text = metrics.encode();
        for line in [
            "erel_hosts{state=\"converged\"} 1\n",
            "erel_hosts{state=\"failed\"} 1\n",
            "erel_hosts{state=\"in_flight\"} 0\n",
            "erel_rollouts_total{group=\"web\"} 1\n",
            "erel_host_failures_total{group=\"web\"} 1\n",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
    }

    #[test]
    fn a_halted_group_is_1_until_the_daemon_says_it_is_not() {
        let metrics = Metrics::new();
        metrics.record(&RolloutEvent::GroupHalted {
            group: "web".into(),
            reason: "boom".into(),
            untouched: Vec::new(),
        });
        metrics.set_halted("db", false);
        let text = metrics.encode();
        assert!(
            text.contains("erel_group_halted{group=\"web\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("erel_group_halted{group=\"db\"} 0\n"),
            "{text}"
        );
        metrics.set_halted("web", false);
        let text = metrics.encode();
        assert!(
            text.contains("erel_group_halted{group=\"web\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE erel_group_halted gauge\n"), "{text}");
    }

    /// The value of the unlabelled gauge `name` in `text`.
    fn gauge(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e} in {text}"))
    }

    #[test]
    fn a_waiting_revision_shows_with_its_age_until_the_daemon_waits_for_none() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert_eq!(gauge(&text, "erel_waiting_revision"), 0.0, "{text}");
        assert_eq!(gauge(&text, "erel_waiting_seconds"), 0.0, "{text}");

        metrics.set_waiting(Some(2));
        std::thread::sleep(Duration::from_millis(20));
        let first = gauge(&metrics.encode(), "erel_waiting_seconds");
        assert!(first >= 0.02, "{first}");
        // The same revision again: the wait goes on.
        metrics.set_waiting(Some(2));
        let text = metrics.encode();
        assert_eq!(gauge(&text, "erel_waiting_revision"), 2.0, "{text}");
        assert!(gauge(&text, "erel_waiting_seconds") >= first, "{text}");
        // A newer one: a new wait.
        metrics.set_waiting(Some(3));
        let text = metrics.encode();
        assert_eq!(gauge(&text, "erel_waiting_revision"), 3.0, "{text}");
        assert!(gauge(&text, "erel_waiting_seconds") < first, "{text}");

        metrics.set_waiting(None);
        let text = metrics.encode();
        assert_eq!(gauge(&text, "erel_waiting_revision"), 0.0, "{text}");
        assert_eq!(gauge(&text, "erel_waiting_seconds"), 0.0, "{text}");
        assert!(
            text.contains("# TYPE erel_waiting_revision gauge\n"),
            "{text}"
        );
    }

    #[test]
    fn a_pass_that_changes_nothing_is_not_a_rollout() {
        let metrics = Metrics::new();
        metrics.record(&RolloutEvent::GroupDone {
            group: "web".into(),
            switched: 0,
            skipped: 3,
            failed: 0,
            stopped: 0,
        });
        assert!(!metrics
            .encode()
            .contains("erel_rollouts_total{group=\"web\"} 1"));
    }

    /// Sends `request` as it stands to `addr` and reads until the server closes: the
    /// status line, the head (lower-cased) and the body.
    async fn exchange(addr: std::net::SocketAddr, request: &str) -> (String, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut text = String::new();
        let read = stream.read_to_string(&mut text);
        tokio::time::timeout(SCRAPE_TIMEOUT, read)
            .await
            .expect("the server closes the connection after its answer")
            .expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn get_metrics_is_answered_other_paths_are_404_other_methods_405() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        metrics.set_revision(9);
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics, cancel.clone()));

        let (status, head, body) =
            exchange(addr, "GET /metrics HTTP/1.1\r\nHost: erel\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            head.contains(&format!("content-type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("erel_revision 9\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        let (status, _, body) = exchange(addr, "GET /other HTTP/1.1\r\nHost: erel\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(body, "erel serves only /metrics\n");

        let post = "POST /metrics HTTP/1.1\r\nHost: erel\r\nContent-Length: 0\r\n\r\n";
        let (status, head, _) = exchange(addr, post).await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(head.contains("allow: get"), "{head}");

        let (status, _, _) = exchange(addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert_eq!(
            status, "HTTP/1.1 400 Bad Request",
            "hyper refuses a broken head"
        );

        cancel.cancel();
        tokio::time::timeout(SCRAPE_TIMEOUT, server)
            .await
            .expect("serve returns once cancelled")
            .expect("serve does not panic");
    }
}
