//! Configs over AMQP: how fast a published revision reaches every master, on one
//! broker and on a RabbitMQ cluster of three nodes, and how fast a new master catches up
//! on a long config log.
//!
//! The masters run in this process: the real daemon loop (`amqp::daemon::run`, one
//! broker connection each) on a config whose group has no hosts, so that only the config
//! path is measured. "Applied" is the daemon's acceptance: the revision is validated
//! (its archive checked by sha256 in the artifact directory), written to the state
//! directory (temporary file, fsync, rename, directory fsync) and acknowledged; it is
//! seen through the `revision_accepted` event each master publishes right after the
//! fsync, so the figure includes one more hop through the broker.
//!
//! - **Publish-to-applied**: the clock starts when the publisher opens its connection to
//!   append a revision (`log::append`, publisher confirms) and stops at each master's
//!   `revision_accepted`; p50, p99 and max of `masters × publishes` samples per run.
//!   The floor is the same publish seen by a bare stream consumer (no parsing, no
//!   validation, no write).
//! - **Catch-up**: a new master, started on a log of `EREL_BENCH_CONFIG_LOG` revisions,
//!   until the newest is accepted (on disk). The floor is a bare consumer reading the
//!   same log to its newest message with the daemon's prefetch.
//!
//! Settings: `EREL_BENCH_AMQP` (the broker, else `amqp://guest:guest@127.0.0.1:5672/%2f`;
//! names of its own, deleted at the end), `EREL_BENCH_CONFIG_MASTERS` (10),
//! `EREL_BENCH_CONFIG_PUBLISHES` (publishes per run, 50), `EREL_BENCH_CONFIG_LOG`
//! (10,000), `EREL_BENCH_CONFIG_PARTS` (which figures, of `broker` (latency on one
//! broker), `catch-up` (on one broker) and `cluster` (latency on a three-node cluster
//! this section starts and stops itself); default all three).

use std::sync::Arc;
use std::time::{Duration, Instant};

use erel_master::amqp::daemon::{self, DaemonOptions};
use erel_master::amqp::events::{self, MasterEvent};
use erel_master::amqp::{log, Backoff, Broker};
use erel_master::client::Connector;
use erel_master::release::{write_tarball, ReleaseFile};
use erel_master::rollout::RolloutOptions;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{env_parse, Bench, Row, Timing};
use crate::helper::amqp::{BrokerLock, TestBroker};
use crate::helper::cluster::RabbitCluster;

/// The target for publish-to-applied p99, in seconds.
const LATENCY_TARGET: f64 = 0.050;
/// The target for catching up on 10,000 revisions, in seconds.
const CATCH_UP_TARGET: f64 = 1.0;
/// How long one revision may take to reach every master before the run fails.
const ACCEPT_LIMIT: Duration = Duration::from_secs(60);
/// The daemon's prefetch (`log::PREFETCH`), for the floor reader.
const PREFETCH: u16 = 100;
/// Publishes in flight while the catch-up log is filled.
const FILL_WINDOW: usize = 500;
/// The one group of the configs ([`config_text`]).
const GROUP: &str = "bench";

type Error = Box<dyn std::error::Error>;

/// The section: latency on one broker, catch-up on one broker, latency on the cluster.
pub fn config(bench: &Bench, rows: &mut Vec<Row>) {
    let settings = Settings {
        runs: bench.runs as usize,
        masters: env_parse("EREL_BENCH_CONFIG_MASTERS", 10),
        publishes: env_parse("EREL_BENCH_CONFIG_PUBLISHES", 50),
        log: env_parse("EREL_BENCH_CONFIG_LOG", 10_000),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = match std::env::var("EREL_BENCH_AMQP") {
        Ok(url) => url,
        Err(_) => {
            let local = std::net::SocketAddr::from(([127, 0, 0, 1], 5672));
            if std::net::TcpStream::connect_timeout(&local, Duration::from_secs(2)).is_err() {
                println!("skipped: configs (no broker on {local}; set EREL_BENCH_AMQP)");
                return;
            }
            format!("amqp://guest:guest@{local}/%2f")
        }
    };
    let parts = std::env::var("EREL_BENCH_CONFIG_PARTS")
        .unwrap_or_else(|_| "broker,catch-up,cluster".to_string());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    if part("broker") || part("catch-up") {
        // As the end-to-end tests do: never while a test restarts the shared broker.
        let _lock = BrokerLock::shared();
        let setup = Setup::new();
        if part("broker") {
            let latency = runtime
                .block_on(latency(&setup, std::slice::from_ref(&url), &settings))
                .unwrap_or_else(|e| panic!("config latency on one broker: {e}"));
            latency.rows("one broker", rows);
        }
        if part("catch-up") {
            let catch_up = runtime
                .block_on(catch_up(&setup, &url, &settings))
                .unwrap_or_else(|e| panic!("config catch-up: {e}"));
            catch_up.rows(settings.log, rows);
        }
    }
    if !part("cluster") {
        println!("skipped: configs on a three-node cluster (not in EREL_BENCH_CONFIG_PARTS)");
        return;
    }
    let started = Instant::now();
    let cluster = match RabbitCluster::start("bench") {
        Ok(cluster) => cluster,
        Err(why) => {
            println!("skipped: configs on a three-node cluster, which could not start: {why}");
            return;
        }
    };
    println!(
        "three-node RabbitMQ cluster started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let setup = Setup::new();
    let latency = runtime
        .block_on(latency(&setup, &cluster.urls(), &settings))
        .unwrap_or_else(|e| panic!("config latency on the cluster: {e}"));
    latency.rows("three-node cluster", rows);
    drop(cluster);
}

struct Settings {
    runs: usize,
    masters: usize,
    publishes: u64,
    log: u64,
}

/// An artifact directory with the one archive the configs name, the masters' state
/// directories, their client certificates.
struct Setup {
    dir: tempfile::TempDir,
    artifacts: std::path::PathBuf,
    connector: Connector,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let artifacts = dir.path().join("artifacts");
        std::fs::create_dir_all(&artifacts).expect("artifacts");
        let script = ReleaseFile::start_script("beat", "#!\n");
        write_tarball(&artifacts, "beat", "1", &[script]).expect("archive");
        let certs = erel_certs::MasterDir::new(dir.path().join("certs"));
        certs.init("bench").expect("certs");
        let connector = Connector::new(certs.client_config().expect("client config"), "bench");
        Setup {
            dir,
            artifacts,
            connector,
        }
    }

    /// Starts a master named `name` (its state directory new) on `broker`.
    fn master(
        &self,
        broker: Broker,
        name: &str,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let options = DaemonOptions {
            broker,
            state_dir: self.dir.path().join("states").join(name),
            name: name.to_string(),
            artifacts: self.artifacts.clone(),
            connector: self.connector.clone(),
            rollout: RolloutOptions::default(),
            interval: Duration::from_secs(30),
            backoff: Backoff::default(),
            metrics: None,
            trusted_key: None,
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = daemon::run(options, cancel).await {
                eprintln!("master failed: {e}");
            }
        })
    }
}

/// The config of `revision`: one group, stopped and without hosts (nothing to roll
/// out), whose archive is still checked.
fn config_text(revision: u64) -> String {
    format!(
        "revision = {revision}\n[group.bench]\nrelease = \"beat\"\nversion = \"1\"\n\
         archive = \"beat-1.tar.gz\"\nstate = \"stopped\"\n"
    )
}

/// The masters' events as they arrive, with their arrival time, once listening.
async fn watch(
    broker: &Broker,
    cancel: &CancellationToken,
) -> mpsc::UnboundedReceiver<(Instant, events::Envelope)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let ready = Arc::new(tokio::sync::Notify::new());
    let notify = ready.clone();
    let broker = broker.clone();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let _ = events::watch(
            &broker,
            &format!("bench-{}", std::process::id()),
            |envelope| {
                let _ = tx.send((Instant::now(), envelope));
            },
            |notice| {
                if let events::WatchNotice::Listening(_) = notice {
                    notify.notify_one();
                }
            },
            cancel,
        )
        .await;
    });
    ready.notified().await;
    rx
}

/// When each of `masters` masters accepted `revision`.
async fn accepted(
    events: &mut mpsc::UnboundedReceiver<(Instant, events::Envelope)>,
    revision: u64,
    masters: usize,
) -> Result<Vec<Instant>, Error> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + ACCEPT_LIMIT;
    while seen.len() < masters {
        let (at, envelope) = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| {
                format!(
                    "revision {revision}: only {} master(s) of {masters} accepted it within {ACCEPT_LIMIT:?}",
                    seen.len()
                )
            })?
            .ok_or("the watcher stopped")?;
        if let MasterEvent::RevisionRejected {
            revision: Some(rejected),
            reason,
        } = &envelope.event
        {
            if *rejected == revision {
                return Err(format!("revision {revision} rejected: {reason}").into());
            }
        }
        if envelope.event
            == (MasterEvent::RevisionAccepted {
                revision,
                publisher: Some("bench".to_string()),
            })
        {
            seen.push(at);
        }
    }
    Ok(seen)
}

/// A bare consumer of the config log: each delivery's arrival time and revision header.
struct BareReader {
    connection: Connection,
    deliveries: mpsc::UnboundedReceiver<(Instant, u64)>,
}

impl BareReader {
    /// Reads `queue` on `url` from `offset` ("first", "next"), acknowledging every half
    /// prefetch as a reader that only wants the messages does.
    async fn start(url: &str, queue: &str, offset: &str) -> Result<BareReader, Error> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(offset.into()),
        );
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("bench-floor-{}", std::process::id())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await?;
        let (tx, deliveries) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut unacked = 0;
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                let revision = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(log::HEADER_REVISION).cloned());
                if let Some(AMQPValue::LongLongInt(revision)) = revision {
                    let _ = tx.send((at, revision.unsigned_abs()));
                }
                unacked += 1;
                if unacked >= PREFETCH / 2 {
                    unacked = 0;
                    if delivery
                        .ack(BasicAckOptions { multiple: true })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            let _ = channel;
        });
        Ok(BareReader {
            connection,
            deliveries,
        })
    }

    /// When `revision` arrived.
    async fn arrival(&mut self, revision: u64) -> Result<Instant, Error> {
        let deadline = tokio::time::Instant::now() + ACCEPT_LIMIT;
        loop {
            let (at, seen) = tokio::time::timeout_at(deadline, self.deliveries.recv())
                .await
                .map_err(|_| format!("the bare reader did not see revision {revision}"))?
                .ok_or("the bare reader stopped")?;
            if seen == revision {
                return Ok(at);
            }
        }
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Per-run percentiles of publish-to-applied, and of the floor.
struct Latency {
    masters: usize,
    publishes: u64,
    /// Per run: (p50, p99, max) of erel; of the floor.
    erel: Vec<[f64; 3]>,
    floor: Vec<[f64; 3]>,
}

impl Latency {
    fn rows(&self, on: &str, rows: &mut Vec<Row>) {
        let samples = self.masters as u64 * self.publishes;
        for (index, name) in ["p50", "p99", "max"].into_iter().enumerate() {
            let erel = timing(self.erel.iter().map(|run| run[index]));
            let floor = timing(self.floor.iter().map(|run| run[index]));
            let figure = format!(
                "config publish-to-applied {name}, {} masters, {on} ({samples} samples a run)",
                self.masters
            );
            if name == "p99" {
                rows.push(Row {
                    figure: figure.clone(),
                    erel,
                    peer: "target: 50 ms".into(),
                    peer_timing: Some(fixed(LATENCY_TARGET)),
                    target: Some(1.0),
                });
            }
            rows.push(Row {
                figure,
                erel,
                peer: format!("floor: the same publish seen by a bare stream consumer, {name}"),
                peer_timing: Some(floor),
                target: None,
            });
        }
    }
}

/// Publish-to-applied with `settings.masters` masters on the broker of `urls` (each
/// master given the node list rotated, so that on a cluster they spread over the nodes).
///
/// Its queues, streams and exchange (prefix `t-bench-lat-…`) are deleted when it ends,
/// by a guard that does so also when a run panics.
async fn latency(setup: &Setup, urls: &[String], settings: &Settings) -> Result<Latency, Error> {
    let names = TestBroker::on(urls.join(","), "bench-lat", &[GROUP]);
    let prefix = names.prefix.clone();
    let broker = names.broker.clone();
    let cancel = CancellationToken::new();
    // Dropped before `names`: the masters stop before their names are deleted.
    let _stop = cancel.clone().drop_guard();
    let mut events = watch(&broker, &cancel).await;
    let masters: Vec<_> = (0..settings.masters)
        .map(|i| {
            let mut rotated = urls.to_vec();
            rotated.rotate_left(i % urls.len());
            let broker = Broker::new(rotated.join(","), prefix.clone()).expect("broker");
            setup.master(broker, &format!("lat-{prefix}-{i}"), &cancel)
        })
        .collect();
    let outcome = async {
        // Revision 1 brings every master to the end of the log (and declares it).
        log::append(&broker, &config_text(1), Some(1), "bench").await?;
        accepted(&mut events, 1, settings.masters).await?;
        let mut floor = BareReader::start(&urls[0], &broker.names().configs(), "next").await?;
        let mut result = Latency {
            masters: settings.masters,
            publishes: settings.publishes,
            erel: Vec::new(),
            floor: Vec::new(),
        };
        let mut revision = 1;
        for _ in 0..settings.runs {
            let (mut samples, mut floor_samples) = (Vec::new(), Vec::new());
            for _ in 0..settings.publishes {
                revision += 1;
                let start = Instant::now();
                log::append(&broker, &config_text(revision), Some(revision), "bench").await?;
                for at in accepted(&mut events, revision, settings.masters).await? {
                    samples.push(at - start);
                }
                floor_samples.push(floor.arrival(revision).await? - start);
            }
            result.erel.push(percentiles(samples));
            result.floor.push(percentiles(floor_samples));
        }
        floor.close().await;
        Ok::<_, Error>(result)
    }
    .await;
    cancel.cancel();
    for master in masters {
        let _ = master.await;
    }
    drop(names);
    outcome
}

/// Catch-up times of a new master, and of the floor reader, per run.
struct CatchUp {
    erel: Vec<f64>,
    floor: Vec<f64>,
}

impl CatchUp {
    fn rows(&self, log: u64, rows: &mut Vec<Row>) {
        let erel = timing(self.erel.iter().copied());
        let figure = format!("config catch-up of a new master, {log} revisions");
        rows.push(Row {
            figure: figure.clone(),
            erel,
            peer: "target: 1 s for 10,000".into(),
            peer_timing: Some(fixed(CATCH_UP_TARGET * log as f64 / 10_000.0)),
            target: Some(1.0),
        });
        rows.push(Row {
            figure,
            erel,
            peer: format!("floor: a bare consumer reading the {log} (prefetch {PREFETCH})"),
            peer_timing: Some(timing(self.floor.iter().copied())),
            target: None,
        });
    }
}

/// A new master's catch-up on a log of `settings.log` revisions, a new master (state
/// directory empty) each run. Its log (prefix `t-bench-cu-…`) is deleted when it ends,
/// by a guard that does so also when a run panics.
async fn catch_up(setup: &Setup, url: &str, settings: &Settings) -> Result<CatchUp, Error> {
    let names = TestBroker::on(url.to_string(), "bench-cu", &[GROUP]);
    let prefix = names.prefix.clone();
    let broker = names.broker.clone();
    let outcome = async {
        let filling = Instant::now();
        fill(&broker, url, settings.log).await?;
        println!(
            "config log of {} revisions filled in {:.2} s",
            settings.log,
            filling.elapsed().as_secs_f64()
        );
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let mut events = watch(&broker, &cancel).await;
        let mut result = CatchUp {
            erel: Vec::new(),
            floor: Vec::new(),
        };
        for run in 0..settings.runs {
            let start = Instant::now();
            let mut reader = BareReader::start(url, &broker.names().configs(), "first").await?;
            result
                .floor
                .push((reader.arrival(settings.log).await? - start).as_secs_f64());
            reader.close().await;

            let master_cancel = CancellationToken::new();
            let _stop_master = master_cancel.clone().drop_guard();
            let start = Instant::now();
            let master = setup.master(
                broker.clone(),
                &format!("cu-{prefix}-{run}"),
                &master_cancel,
            );
            let at = accepted(&mut events, settings.log, 1).await;
            master_cancel.cancel();
            let _ = master.await;
            result.erel.push((at?[0] - start).as_secs_f64());
        }
        cancel.cancel();
        Ok::<_, Error>(result)
    }
    .await;
    drop(names);
    outcome
}

/// Appends revisions 1 to `count`: the first through `log::append` (which declares the
/// log as every party does), the others on one channel with up to [`FILL_WINDOW`]
/// publishes awaiting their confirms, with the headers `log::append` writes.
async fn fill(broker: &Broker, url: &str, count: u64) -> Result<(), Error> {
    log::append(broker, &config_text(1), Some(1), "bench").await?;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = broker.names().configs();
    let mut in_flight = std::collections::VecDeque::new();
    for revision in 2..=count {
        let mut headers = FieldTable::default();
        headers.insert(
            log::HEADER_REVISION.into(),
            AMQPValue::LongLongInt(i64::try_from(revision)?),
        );
        headers.insert(
            log::HEADER_PUBLISHER.into(),
            AMQPValue::LongString("bench".into()),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                config_text(revision).as_bytes(),
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await?;
        in_flight.push_back(confirm);
        if in_flight.len() >= FILL_WINDOW {
            confirmed(in_flight.pop_front().expect("one in flight").await?)?;
        }
    }
    for confirm in in_flight {
        confirmed(confirm.await?)?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

fn confirmed(confirmation: Confirmation) -> Result<(), Error> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("the broker did not store a revision: {other:?}").into()),
    }
}

/// p50, p99 and max of `samples`, in seconds.
fn percentiles(mut samples: Vec<Duration>) -> [f64; 3] {
    samples.sort();
    let at = |p: f64| {
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[index.min(samples.len() - 1)].as_secs_f64()
    };
    [at(0.50), at(0.99), at(1.0)]
}

/// Median, min and max of per-run figures (seconds).
fn timing(values: impl Iterator<Item = f64>) -> Timing {
    let mut values: Vec<f64> = values.collect();
    assert!(!values.is_empty(), "no run measured");
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    Timing {
        median,
        min: values[0],
        max: values[values.len() - 1],
    }
}

/// A target as a timing, to sit in the peer's column.
fn fixed(seconds: f64) -> Timing {
    Timing {
        median: seconds,
        min: seconds,
        max: seconds,
    }
}
