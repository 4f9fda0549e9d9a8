//! `erel master --cluster FILE [--interval SECS]`: the daemon on a local cluster file.
//! It converges the cluster, re-converges drift every `--interval` seconds, reloads the
//! file when its revision grows, logs what it does, and ends cleanly on SIGTERM.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::deploy::event_line;
use super::Context;
use crate::client::Connector;
use crate::rollout::{converge_file, ConvergeOptions, RolloutEvent};

/// `erel master`.
#[derive(Debug, Args)]
pub struct MasterArgs {
    /// Seconds between two convergence passes (drift is repaired within this).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    interval: u64,
    /// Seconds each phase of opening a connection to an agent may take: the TCP
    /// connection, then the TLS handshake with `Hello` (each phase gets the full time).
    #[arg(long, default_value_t = crate::client::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECS")]
    connect_timeout: u64,
    /// `--amqp URL --state-dir DIR --name NAME --artifacts DIR`: the AMQP config log.
    #[command(flatten)]
    amqp: super::amqp::AmqpMasterArgs,
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub async fn master(ctx: &Context, cluster: &Path, args: MasterArgs) -> crate::Result<ExitCode> {
    if args.amqp.url.is_some() {
        let interval = Duration::from_secs(args.interval.max(1));
        let connect_timeout = Duration::from_secs(args.connect_timeout.max(1));
        return super::amqp::master(ctx, args.amqp, interval, connect_timeout).await;
    }
    let connector = Connector::new(ctx.tls()?, ctx.master_name())
        .with_connect_timeout(Duration::from_secs(args.connect_timeout.max(1)));
    let options = ConvergeOptions {
        interval: Duration::from_secs(args.interval.max(1)),
        ..ConvergeOptions::default()
    };
    let cancel = CancellationToken::new();
    let signals = cancel.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        info!("terminating");
        signals.cancel();
    });
    converge_file(cluster.to_path_buf(), connector, options, log_event, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

/// Logs what changes; the quiet events of a pass with nothing to do stay at debug.
fn log_event(event: &RolloutEvent) {
    let Some(line) = event_line(event) else {
        return;
    };
    match event {
        RolloutEvent::HostFailed { .. } => error!("{line}"),
        RolloutEvent::GroupHalted { .. } => warn!("{line}"),
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
