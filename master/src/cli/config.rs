//! `erel config publish|show|history|holders|retry`: the config log on RabbitMQ, who
//! holds which group, and the retry of a halted group.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::error::ResultExt as _;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::amqp::{publisher, utc, BrokerArgs};
use crate::amqp::log::{self, LogEntry};
use crate::amqp::{control, leadership};
use crate::cluster::{ArchiveLookup, Plan};

/// `erel config …`.
#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Publishes a cluster file as a new revision of the config log.
    Publish(PublishArgs),
    /// Prints the newest revision in the config log.
    Show(ShowArgs),
    /// Lists the revisions in the config log, with time and publisher.
    History(HistoryArgs),
    /// Which master holds which group, and which groups are halted.
    Holders(HoldersArgs),
    /// Tries a halted group's revision again (the master holding it does so at its
    /// next pass).
    Retry(RetryArgs),
}

/// `erel config retry --group G`.
#[derive(Debug, Args)]
pub(super) struct RetryArgs {
    /// The halted group.
    #[arg(long, value_name = "G")]
    group: String,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// `erel config publish FILE`.
#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// The cluster file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Check archives in this artifact directory (as masters do) instead of beside FILE.
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Who publishes, as the log records it [default: $USER@<host name>].
    #[arg(long, value_name = "NAME")]
    publisher: Option<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// `erel config show`.
#[derive(Debug, Args)]
pub(super) struct ShowArgs {
    /// Print the revision, its metadata and text as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// `erel config history`.
#[derive(Debug, Args)]
pub(super) struct HistoryArgs {
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// `erel config holders`.
#[derive(Debug, Args)]
pub(super) struct HoldersArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Runs one `erel config` command.
pub(super) async fn run(command: ConfigCommand) -> crate::Result<ExitCode> {
    match command {
        ConfigCommand::Publish(args) => publish(args).await,
        ConfigCommand::Show(args) => show(args).await,
        ConfigCommand::History(args) => history(args).await,
        ConfigCommand::Holders(args) => holders(args).await,
        ConfigCommand::Retry(args) => retry(args).await,
    }
}

async fn retry(args: RetryArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let ended = control::retry(&broker, &args.group, &publisher()).await?;
    match ended {
        Some(halt) => println!(
            "retry of group {} written to {}: the master holding it tries revision {} again \
             at its next pass (it was {halt})",
            args.group,
            broker.names().halt(&args.group)?,
            halt.revision
        ),
        None => println!(
            "retry of group {} written to {}; no halt was recorded for it",
            args.group,
            broker.names().halt(&args.group)?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

async fn publish(args: PublishArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("{}: cannot read", args.file.display()))?;
    // Validated exactly as `erel deploy` does (or as a master will, with --artifacts).
    let plan = match &args.artifacts {
        Some(dir) => Plan::load_with(&args.file, &ArchiveLookup::Artifacts(dir.clone()))?,
        None => Plan::load(&args.file)?,
    };
    let publisher = args.publisher.unwrap_or_else(publisher);
    publish_plan(&broker, &plan, &text, &publisher, None).await
}

/// Publishes a validated config (signed when `signed` is given) and prints what was
/// done: `erel config publish` and `erel bundle import` both publish this way.
pub(super) async fn publish_plan(
    broker: &crate::amqp::Broker,
    plan: &Plan,
    text: &str,
    publisher: &str,
    signed: Option<&log::Signed>,
) -> crate::Result<ExitCode> {
    let published = log::publish(broker, plan, text, publisher, signed).await?;
    match published.previous {
        Some(previous) => println!(
            "published revision {} to {} (previous newest: {previous}); confirmed by the broker",
            published.revision,
            broker.names().configs()
        ),
        None => println!(
            "published revision {} to {} (the first in the log); confirmed by the broker",
            published.revision,
            broker.names().configs()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// An entry as `show --json` and `history --json` print it.
#[derive(Serialize)]
struct EntryJson<'a> {
    revision: Option<u64>,
    offset: Option<u64>,
    publisher: Option<&'a str>,
    published_at_ms: Option<u64>,
    published_at: Option<String>,
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

fn entry_json(entry: &LogEntry, with_text: bool) -> EntryJson<'_> {
    EntryJson {
        revision: entry.revision(),
        offset: entry.offset,
        publisher: entry.publisher.as_deref(),
        published_at_ms: entry.published_at_ms,
        published_at: entry.published_at_ms.map(utc),
        bytes: entry.body.len(),
        text: if with_text { entry.text() } else { None },
    }
}

async fn show(args: ShowArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let entries = log::read_all(&broker).await?;
    let Some(newest) = log::newest(&entries) else {
        if args.json {
            println!("null");
        }
        eprintln!("the config log {} is empty", broker.names().configs());
        return Ok(ExitCode::FAILURE);
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entry_json(newest, true))
                .context("encoding the config")?
        );
    } else {
        println!(
            "# revision {} published by {} at {} (offset {})",
            newest
                .revision()
                .map_or_else(|| "?".to_string(), |r| r.to_string()),
            newest.publisher.as_deref().unwrap_or("?"),
            newest.published_at_ms.map_or_else(|| "?".to_string(), utc),
            newest
                .offset
                .map_or_else(|| "?".to_string(), |o| o.to_string()),
        );
        print!("{}", newest.text().unwrap_or("(not UTF-8 text)\n"));
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(args: HistoryArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let entries = log::read_all(&broker).await?;
    if args.json {
        for entry in &entries {
            println!(
                "{}",
                serde_json::to_string(&entry_json(entry, false)).context("encoding the config")?
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<9} {:<25} {:<24} {:>7} {:>8}",
        "REVISION", "PUBLISHED (UTC)", "PUBLISHER", "OFFSET", "BYTES"
    );
    for entry in &entries {
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        println!(
            "{:<9} {:<25} {:<24} {:>7} {:>8}",
            show(entry.revision()),
            entry.published_at_ms.map_or_else(|| "?".to_string(), utc),
            entry.publisher.as_deref().unwrap_or("?"),
            show(entry.offset),
            entry.body.len()
        );
    }
    if entries.is_empty() {
        eprintln!("the config log {} is empty", broker.names().configs());
    }
    Ok(ExitCode::SUCCESS)
}

async fn holders(args: HoldersArgs) -> crate::Result<ExitCode> {
    let broker = args.broker.broker()?;
    let entries = log::read_all(&broker).await?;
    let newest = log::newest(&entries);
    let groups: Vec<String> = newest
        .and_then(|e| {
            e.validate(&broker.names().configs(), &ArchiveLookup::Unchecked)
                .ok()
        })
        .map(|plan| plan.groups.keys().cloned().collect())
        .unwrap_or_default();
    // A halt at a revision older than the log's newest is over.
    let revision = newest.and_then(|e| e.revision()).unwrap_or(0);
    let records = leadership::holders(&broker, &groups).await?;
    let halts = control::halts(&broker, &groups, revision).await?;
    if args.json {
        let rows = holder_rows(&groups, &records, &halts);
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("encoding the holders")?
        );
    } else {
        print!("{}", holders_table(&groups, &records));
        print!("{}", halts_text(&halts));
    }
    Ok(ExitCode::SUCCESS)
}

/// The holders table for `groups`, read from the broker at `url`, and the groups
/// halted at `revision` or later (for `erel status`).
pub(super) async fn holders_text(
    url: &str,
    prefix: &str,
    groups: &[String],
    revision: u64,
) -> crate::Result<String> {
    let broker = crate::amqp::Broker::new(url, prefix)?;
    let records = leadership::holders(&broker, groups).await?;
    let halts = control::halts(&broker, groups, revision).await?;
    Ok(format!(
        "{}{}",
        holders_table(groups, &records),
        halts_text(&halts)
    ))
}

/// One line per halt, with the reason and how to retry.
fn halts_text(halts: &[crate::rollout::halt::Halt]) -> String {
    halts
        .iter()
        .map(|halt| {
            format!(
                "HALTED: {halt} (since {}); `erel config retry --group {}` tries it again\n",
                utc(halt.since_ms),
                halt.group
            )
        })
        .collect()
}

/// The holders of `groups`, read from the broker at `url`, as `config holders --json`
/// prints them, and the halts of those groups at `revision` or later the broker keeps
/// (for `erel status --json`).
pub(super) async fn holders_json(
    url: &str,
    prefix: &str,
    groups: &[String],
    revision: u64,
) -> crate::Result<(Vec<serde_json::Value>, Vec<crate::rollout::halt::Halt>)> {
    let broker = crate::amqp::Broker::new(url, prefix)?;
    let records = leadership::holders(&broker, groups).await?;
    let halts = control::halts(&broker, groups, revision).await?;
    Ok((holder_rows(groups, &records, &halts), halts))
}

/// One JSON object per group: `group`, and `master`, `since_ms`, `heartbeat_ms` (each
/// `null` when no master holds it; times in milliseconds since the Unix epoch), and
/// `halted`: the group's halt record, `null` when it is not halted.
fn holder_rows(
    groups: &[String],
    records: &[leadership::HolderRecord],
    halts: &[crate::rollout::halt::Halt],
) -> Vec<serde_json::Value> {
    groups
        .iter()
        .map(|group| {
            let record = records.iter().find(|r| &r.group == group);
            serde_json::json!({
                "group": group,
                "master": record.map(|r| r.master.clone()),
                "since_ms": record.map(|r| r.since_ms),
                "heartbeat_ms": record.map(|r| r.heartbeat_ms),
                "halted": halts.iter().find(|h| &h.group == group),
            })
        })
        .collect()
}

/// The `GROUP MASTER SINCE` table of [`leadership::holders`]' records.
fn holders_table(groups: &[String], records: &[leadership::HolderRecord]) -> String {
    let mut out = format!("{:<20} {:<30} {:<25}\n", "GROUP", "HELD BY", "SINCE (UTC)");
    for group in groups {
        match records.iter().find(|r| &r.group == group) {
            Some(record) => out.push_str(&format!(
                "{:<20} {:<30} {:<25}\n",
                group,
                record.master,
                utc(record.since_ms)
            )),
            None => out.push_str(&format!("{group:<20} {:<30} {:<25}\n", "-", "-")),
        }
    }
    out
}
