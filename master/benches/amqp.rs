//! Figures for configs over RabbitMQ, against a real broker (`$EREL_BENCH_AMQP`, else
//! the local one, guest/guest):
//!
//! 1. publish-to-applied latency of a revision to 10 masters: from the moment the
//!    publisher starts sending until each master has accepted the revision and written
//!    it to its state directory (seen through the `revision_accepted` event each master
//!    publishes right after the fsync), over many revisions; p50 and p99;
//! 2. the time a new master takes, from its start, to catch up on a log of 1,000
//!    revisions (to have the newest on disk).
//!
//! The masters run in this process (the real daemon loop, one broker connection each)
//! on a config whose group has no hosts, so that only the config path is measured.
//! Run: `cargo bench -p erel-master --bench amqp`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use erel_master::amqp::daemon::{self, DaemonOptions};
use erel_master::amqp::events::{self, MasterEvent};
use erel_master::amqp::{log, Backoff, Broker};
use erel_master::client::Connector;
use erel_master::release::{write_tarball, ReleaseFile};
use erel_master::rollout::RolloutOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MASTERS: usize = 10;
const REVISIONS: u64 = 50;
const CATCH_UP_LOG: u64 = 1000;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}

struct Setup {
    _dir: tempfile::TempDir,
    artifacts: std::path::PathBuf,
    states: std::path::PathBuf,
    connector: Connector,
}

fn setup() -> Result<Setup, Error> {
    let dir = tempfile::tempdir()?;
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let script = ReleaseFile::start_script("beat", "#!\n");
    write_tarball(&artifacts, "beat", "1", &[script])?;
    let certs = erel_certs::MasterDir::new(dir.path().join("certs"));
    certs.init("bench")?;
    let connector = Connector::new(certs.client_config()?, "bench");
    Ok(Setup {
        artifacts,
        states: dir.path().join("states"),
        _dir: dir,
        connector,
    })
}

fn config(revision: u64) -> String {
    format!(
        "revision = {revision}\n[group.bench]\nrelease = \"beat\"\nversion = \"1\"\narchive = \"beat-1.tar.gz\"\n"
    )
}

fn start_master(
    setup: &Setup,
    broker: &Broker,
    name: &str,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let options = DaemonOptions {
        broker: broker.clone(),
        state_dir: setup.states.join(name),
        name: name.to_string(),
        artifacts: setup.artifacts.clone(),
        connector: setup.connector.clone(),
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

/// Events as they arrive, with their arrival time.
fn watch(
    broker: &Broker,
    cancel: &CancellationToken,
) -> (
    mpsc::UnboundedReceiver<(Instant, events::Envelope)>,
    Arc<tokio::sync::Notify>,
) {
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
    (rx, ready)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn accepted(
    events: &mut mpsc::UnboundedReceiver<(Instant, events::Envelope)>,
    revision: u64,
    masters: usize,
    limit: Duration,
) -> Result<Vec<Instant>, Error> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < masters {
        let (at, envelope) = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| {
                format!(
                    "revision {revision}: only {} master(s) accepted it",
                    seen.len()
                )
            })?
            .ok_or("the watcher stopped")?;
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

async fn bench() -> Result<(), Error> {
    let url = std::env::var("EREL_BENCH_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let setup = setup()?;
    let groups = vec!["bench".to_string()];

    // 1. Publish-to-applied latency, 10 masters.
    let broker = Broker::new(url.clone(), format!("bench-lat-{}", std::process::id()))?;
    let cancel = CancellationToken::new();
    let (mut events, ready) = watch(&broker, &cancel);
    ready.notified().await;
    let masters: Vec<_> = (0..MASTERS)
        .map(|i| start_master(&setup, &broker, &format!("lat-{i}"), &cancel))
        .collect();
    // Revision 1 brings every master up to date (and to the end of the log).
    log::append(&broker, &config(1), Some(1), "bench").await?;
    accepted(&mut events, 1, MASTERS, Duration::from_secs(30)).await?;
    let mut samples = Vec::new();
    for revision in 2..=REVISIONS {
        let start = Instant::now();
        log::append(&broker, &config(revision), Some(revision), "bench").await?;
        for at in accepted(&mut events, revision, MASTERS, Duration::from_secs(30)).await? {
            samples.push(at - start);
        }
    }
    cancel.cancel();
    for master in masters {
        let _ = master.await;
    }
    broker.delete_everything(&groups).await?;
    samples.sort();
    println!(
        "publish-to-applied, {MASTERS} masters, {} revisions ({} samples): p50 {}, p99 {}, max {}",
        REVISIONS - 1,
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&samples, 1.0)),
    );

    // 2. Catch-up of a new master on a log of 1,000 revisions.
    let broker = Broker::new(url, format!("bench-cu-{}", std::process::id()))?;
    let filling = Instant::now();
    for revision in 1..=CATCH_UP_LOG {
        log::append(&broker, &config(revision), Some(revision), "bench").await?;
    }
    let filled = filling.elapsed();
    let cancel = CancellationToken::new();
    let (mut events, ready) = watch(&broker, &cancel);
    ready.notified().await;
    let start = Instant::now();
    let master = start_master(&setup, &broker, "late", &cancel);
    let at = accepted(&mut events, CATCH_UP_LOG, 1, Duration::from_secs(60)).await?;
    let caught_up = at[0] - start;
    cancel.cancel();
    let _ = master.await;
    broker.delete_everything(&groups).await?;
    println!(
        "catch-up of a new master on a log of {CATCH_UP_LOG} revisions: {} (filling the log took {})",
        ms(caught_up),
        ms(filled)
    );
    Ok(())
}
