//! `erel master --cluster FILE [--interval SECS]`: the daemon on a local cluster file.
//! It converges the cluster, re-converges drift every `--interval` seconds, reloads the
//! file when its revision grows, logs what it does, and ends cleanly on SIGTERM. A
//! group whose rollout failed after a switch stays halted at that revision until the
//! file has a newer one ([`crate::rollout::halt`]).
//!
//! Also what manual commands call before they act on groups a daemon may hold:
//! [`ensure_not_held`], with the flags [`HoldArgs`]; and the halted groups for
//! `erel status` ([`halted_text`]).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::amqp::utc;
use super::deploy::event_line;
use super::Context;
use crate::amqp::leadership::{self, TakeRefused, TakenLease};
use crate::amqp::Broker;
use crate::client::Connector;
use crate::error::Error;
use crate::error::ResultExt as _;
use crate::metrics::Metrics;
use crate::rollout::halt;
use crate::rollout::hold::{self, HeldLock};
use crate::rollout::{converge_file, ConvergeOptions, RolloutEvent};

/// `erel master`.
#[derive(Debug, Args)]
pub(super) struct MasterArgs {
    /// Seconds between two convergence passes (drift is repaired within this).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    interval: u64,
    /// Seconds each phase of opening a connection to an agent may take: the TCP
    /// connection, then the TLS handshake with `Hello` (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port; the
    /// address bound is printed on stderr as `metrics on ADDR`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// `--amqp URL --state-dir DIR --name NAME --artifacts DIR`: the AMQP config log.
    #[command(flatten)]
    pub(super) amqp: super::amqp::AmqpMasterArgs,
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub(super) async fn master(
    ctx: &Context,
    cluster: &Path,
    args: MasterArgs,
) -> crate::Result<ExitCode> {
    if args.amqp.broker.url_list().is_some() {
        let interval = Duration::from_secs(args.interval.max(1));
        let connect_timeout = Duration::from_secs(args.connect_timeout.max(1));
        return super::amqp::master(ctx, args.amqp, interval, connect_timeout, args.metrics).await;
    }
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    let cancel = CancellationToken::new();
    let metrics = match args.metrics {
        Some(addr) => Some(serve_metrics(addr, &cancel).await?),
        None => None,
    };
    let options = ConvergeOptions {
        interval: Duration::from_secs(args.interval.max(1)),
        metrics: metrics.clone(),
        master: ctx.master_name(),
        ..ConvergeOptions::default()
    };
    let signals = cancel.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        info!("terminating");
        signals.cancel();
    });
    let on_event = move |event: &RolloutEvent| {
        if let Some(metrics) = &metrics {
            metrics.record(event);
        }
        log_event(event);
    };
    converge_file(cluster.to_path_buf(), connector, options, on_event, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// Binds `addr`, says `metrics on ADDR` on stderr (the address bound, for port 0), and
/// serves the metrics until `cancel`.
pub(crate) async fn serve_metrics(
    addr: std::net::SocketAddr,
    cancel: &CancellationToken,
) -> crate::Result<Arc<Metrics>> {
    let what = || format!("--metrics {addr}: binding");
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(what)?;
    let bound = listener.local_addr().with_context(what)?;
    eprintln!("metrics on {bound}");
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        cancel.clone(),
    ));
    Ok(metrics)
}

/// Logs what changes; the quiet events of a pass with nothing to do stay at debug.
fn log_event(event: &RolloutEvent) {
    let Some(line) = event_line(event) else {
        return;
    };
    match event {
        RolloutEvent::HostFailed { .. } => error!("{line}"),
        // Logged once the pass is over, as the halt it is or as waiting (see
        // `halt::waiting_of`): a pass stopped before switching anything halts nothing.
        RolloutEvent::GroupHalted { .. } => tracing::debug!("{line}"),
        RolloutEvent::HostDone { .. }
        | RolloutEvent::HostVerdict { .. }
        | RolloutEvent::HostDrain { .. }
        | RolloutEvent::HostStopped { .. } => info!("{line}"),
        RolloutEvent::HostPhase { phase, .. }
            if !matches!(
                phase,
                crate::rollout::HostPhase::Pinging | crate::rollout::HostPhase::Staged
            ) =>
        {
            info!("{line}")
        }
        _ => tracing::debug!("{line}"),
    }
}

async fn wait_for_termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install the SIGTERM handler: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// What `erel status` prints about the groups the file daemon holds halted at
/// `revision` (the cluster file's) or later: one line per group with the reason and
/// how to retry; empty when none is.
pub(super) fn halted_text(cluster: &Path, revision: u64) -> String {
    match halt::load(cluster) {
        Ok(halts) => halts
            .iter()
            .filter(|halted| halted.revision >= revision)
            .map(|halted| {
                format!(
                    "HALTED: {halted} (since {}); the daemon tries it again once the \
                     cluster file has a newer revision\n",
                    utc(halted.since_ms)
                )
            })
            .collect(),
        Err(e) => format!("halted groups unknown: {e}\n"),
    }
}

/// The flags of commands that act on groups a daemon may hold (`erel deploy`, the
/// group lifecycle commands).
#[derive(Debug, Clone, Args)]
pub(super) struct HoldArgs {
    /// Take the groups over from the daemon that holds them, for this command only:
    /// wait for its pass in progress to end (file mode) or for it to hand the group's
    /// lease over (AMQP), then act; the daemon resumes afterwards.
    #[arg(long)]
    take_over: bool,
    /// Seconds `--take-over` waits for the holder before it gives up.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    take_over_wait: u64,
    /// `--amqp URL --amqp-prefix PREFIX`: the groups' leases are checked and taken on
    /// the broker instead of the daemon lock beside the cluster file.
    #[command(flatten)]
    amqp: super::amqp::OptionalBrokerArgs,
}

impl HoldArgs {
    /// Whether `--take-over` was given.
    pub(super) fn take_over(&self) -> bool {
        self.take_over
    }
}

/// What a command holds while it acts on groups; [`Hold::release`] hands it back.
#[must_use = "the hold ends when released"]
pub(super) enum Hold {
    /// The rollout lock beside the cluster file (file mode).
    File(HeldLock),
    /// Nothing: no daemon ever kept the cluster file, and its directory has no room
    /// for the lock (a read-only directory).
    Unlocked,
    /// The groups' leases (AMQP mode).
    Amqp(Vec<TakenLease>),
}

impl Hold {
    /// Hands back what was held: the daemons act again.
    pub(super) async fn release(self) {
        match self {
            Hold::File(lock) => drop(lock),
            Hold::Unlocked => {}
            Hold::Amqp(leases) => {
                for lease in leases {
                    lease.release().await;
                }
            }
        }
    }
}

/// Makes sure no daemon acts on `groups` of `cluster` while the calling command
/// (`command`, e.g. `erel deploy`, as holder records and lock files name it) does, and
/// holds them for it until [`Hold::release`].
///
/// File mode: the daemon keeping the file (its lock, [`crate::rollout::hold`]) makes
/// this a refusal naming it, unless `--take-over`; either way the command then holds
/// the rollout lock, waiting (bounded) for a pass in progress to end. AMQP mode
/// (`--amqp`): each group's lease is taken as the daemons take it; a group a master
/// holds is refused naming the master and since when, unless `--take-over`, which asks
/// it to hand the lease over and waits (bounded). What was taken over, and from whom,
/// is said on stderr.
///
/// # Errors
///
/// [`Error::Usage`] naming the holder (and the group, in AMQP mode) for a refusal or a
/// hand-over that did not come within `--take-over-wait`; broker and lock file errors.
pub(super) async fn ensure_not_held(
    cluster: &Path,
    groups: &[String],
    command: &str,
    args: &HoldArgs,
) -> crate::Result<Hold> {
    let wait = Duration::from_secs(args.take_over_wait.max(1));
    let me = format!(
        "{command} by {} (pid {})",
        super::amqp::publisher(),
        std::process::id()
    );
    match args.amqp.url_list() {
        None => hold_file(cluster, groups, &me, args.take_over, wait).await,
        Some(url) => {
            let broker = Broker::new(url, args.amqp.prefix.clone())?;
            hold_amqp(&broker, groups, &me, args.take_over, wait).await
        }
    }
}

/// [`ensure_not_held`] beside a cluster file.
async fn hold_file(
    cluster: &Path,
    groups: &[String],
    me: &str,
    take_over: bool,
    wait: Duration,
) -> crate::Result<Hold> {
    let daemon = {
        let path = cluster.to_path_buf();
        tokio::task::spawn_blocking(move || hold::daemon_holder(&path))
            .await
            .map_err(|e| Error::local(cluster, format!("checking the daemon lock failed: {e}")))??
    };
    let daemon = daemon.map(|busy| holder_words(&busy));
    if let Some(busy) = &daemon {
        if !take_over {
            return Err(Error::Usage(format!(
                "{}: group(s) {} are held by the daemon {busy}; `--take-over` hands them \
                     over to this command",
                cluster.display(),
                groups.join(", ")
            )));
        }
        eprintln!("taking over from the daemon {busy}: waiting for its pass in progress");
    }
    let lock = match hold::wait_rollout_lock(cluster, me, wait).await {
        Ok(lock) => lock,
        Err(e @ Error::Local { .. }) if daemon.is_none() => {
            eprintln!(
                "warning: {e}; going on without the rollout lock (no daemon keeps this \
                     cluster file)"
            );
            return Ok(Hold::Unlocked);
        }
        Err(e) => return Err(e),
    };
    if let Some(busy) = daemon {
        eprintln!(
            "took over group(s) {} from the daemon {busy}; it resumes when this command ends",
            groups.join(", ")
        );
    }
    Ok(Hold::File(lock))
}

/// [`ensure_not_held`] on the masters' broker.
async fn hold_amqp(
    broker: &Broker,
    groups: &[String],
    me: &str,
    take_over: bool,
    wait: Duration,
) -> crate::Result<Hold> {
    let mut leases = Vec::new();
    for group in groups {
        let refused = match leadership::take(broker, group, me, take_over, wait).await {
            Ok(Ok(lease)) => {
                if let Some(from) = &lease.from {
                    eprintln!(
                        "took over group {group} from master {} (holding it since {}); it \
                         competes again when this command ends",
                        from.master,
                        utc(from.since_ms)
                    );
                }
                leases.push(lease);
                continue;
            }
            Ok(Err(refused)) => Ok(refused),
            Err(e) => Err(e),
        };
        for lease in leases {
            lease.release().await;
        }
        return Err(match refused? {
            TakeRefused::Held(record) => Error::Usage(format!(
                "group {group} is held by master {} since {} ({}); `--take-over` \
                         hands it over to this command",
                record.master,
                utc(record.since_ms),
                broker.names().lease(group)?
            )),
            TakeRefused::NotHandedOver { from } => Error::Usage(format!(
                "group {group}: master {} did not hand it over within {} s",
                from.map_or_else(|| "?".to_string(), |r| r.master),
                wait.as_secs()
            )),
        });
    }
    Ok(Hold::Amqp(leases))
}

/// `erel@web-1 (pid 812) since 2024-05-01T12:00:00.000Z (lock …/daemon.lock)`.
fn holder_words(busy: &hold::Busy) -> String {
    match &busy.holder {
        Some(holder) => format!(
            "{} (pid {}) since {} (lock {})",
            holder.master,
            holder.pid,
            utc(holder.since_ms),
            busy.path.display()
        ),
        None => busy.to_string(),
    }
}
