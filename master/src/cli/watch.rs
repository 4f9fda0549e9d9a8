//! `erel watch --amqp URL [--json]`: prints what masters do, live.

use std::process::ExitCode;

use clap::Args;

use super::amqp::{cancel_on_termination, utc, BrokerArgs};
use crate::amqp::events::{self, WatchNotice};

/// `erel watch`.
#[derive(Debug, Args)]
pub(super) struct WatchArgs {
    /// Print each event as a JSON line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Prints events until SIGTERM or Ctrl-C.
pub(super) async fn watch(args: WatchArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let tag = format!("{}-{}", super::amqp::publisher(), std::process::id());
    let json = args.json;
    events::watch(
        &broker,
        &tag,
        |envelope| {
            if json {
                if let Ok(line) = serde_json::to_string(&envelope) {
                    println!("{line}");
                }
            } else {
                println!("{} {envelope}", utc(envelope.time_ms));
            }
        },
        |notice| match notice {
            WatchNotice::Listening(queue) => eprintln!("watching events on {queue}"),
            WatchNotice::Retrying(reason, delay) => {
                eprintln!("{reason}; retrying in {} ms", delay.as_millis())
            }
        },
        cancel_on_termination(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
