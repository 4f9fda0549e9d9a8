//! The config log: a durable RabbitMQ stream, `<prefix>.configs`.
//!
//! Each message is one cluster file's text, as published, with headers:
//! `erel-revision` (its revision), `erel-publisher` (who published it) and
//! `erel-published-at-ms` (when, in milliseconds since the Unix epoch); a revision
//! published from a signed bundle also carries `erel-manifest` and `erel-signature`
//! ([`Signed`]; records without them stay readable). The broker adds
//! `x-stream-offset` to every delivery: the message's position in the log.
//!
//! A stream keeps its messages after they are read, so a master that starts late, or
//! was down during publishes, reads the log from its start and reaches the newest
//! revision even when no other master is alive. Retention is bounded by size
//! ([`STREAM_MAX_BYTES`]); the broker only drops whole old segments, never the one the
//! newest message is in.
//!
//! On a RabbitMQ cluster the stream is replicated to every node ([`declare`]), and
//! every party given the cluster's nodes moves to another one when its node is lost.
//!
//! A stream never says "that was the last message", so a reader that wants the log as
//! it is now (`publish`, `show`, `history`) reads from the start until nothing more has
//! arrived for [`SETTLE`]. The daemon does not need to know: it keeps consuming.
//! `publish` does not rely on that read alone: it holds the publisher lease
//! (`<prefix>.publisher`) and, after appending, reads the log up to its own message.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use serde::Serialize;

use super::{
    amqp_error, best_effort_close, declare_exclusive, integer, now_ms, open_channel, string, table,
    text_value, Backoff, Broker, Names,
};
use crate::cluster::{ArchiveLookup, Plan, MAX_REVISION, MAX_REVISION_STEP};
use crate::error::{Error, Result};

/// The largest config accepted, published or received.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;
/// The stream's retention: old segments go once the log is larger than this.
pub const STREAM_MAX_BYTES: i64 = 256 * 1024 * 1024;
/// The stream's segment size (retention drops whole segments).
const STREAM_SEGMENT_BYTES: i64 = 8 * 1024 * 1024;
/// A reader that wants the log as it is now stops once nothing arrived for this long.
pub const SETTLE: Duration = Duration::from_millis(300);
/// ... and waits this long for the first message of a log that may be empty.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_millis(1000);
/// How long `publish` waits for each message while it reads the log back up to the one
/// it appended.
pub(crate) const READ_BACK_WAIT: Duration = Duration::from_secs(10);
/// How long `publish` waits for another publish to hand the publisher lease back.
pub const PUBLISHER_LEASE_WAIT: Duration = Duration::from_secs(30);
/// Unacknowledged deliveries a log reader allows (a stream consumer must set one); it
/// bounds a reader's memory at this many configs (each at most 1 MiB).
pub(crate) const PREFETCH: u16 = 100;

/// Header: the config's revision.
pub const HEADER_REVISION: &str = "erel-revision";
/// Header: who published it.
pub const HEADER_PUBLISHER: &str = "erel-publisher";
/// Header: when, in milliseconds since the Unix epoch.
pub const HEADER_PUBLISHED_AT: &str = "erel-published-at-ms";
/// Header of a signed revision: its bundle's manifest, as signed.
pub const HEADER_MANIFEST: &str = "erel-manifest";
/// Header of a signed revision: the manifest's signature (minisign's text format).
pub const HEADER_SIGNATURE: &str = "erel-signature";
/// Header the broker sets on stream deliveries: the message's offset in the log.
const HEADER_OFFSET: &str = "x-stream-offset";

/// One message of the config log.
#[derive(Clone, Serialize)]
pub struct LogEntry {
    /// Its offset in the stream.
    pub offset: Option<u64>,
    /// The revision its header gives (the text's own is checked against it).
    pub revision: Option<u64>,
    /// Who published it.
    pub publisher: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    pub published_at_ms: Option<u64>,
    /// The AMQP `message-id` its publisher gave it (unique per publish).
    #[serde(skip)]
    pub message_id: Option<String>,
    /// The config text, as published.
    #[serde(skip)]
    pub body: Vec<u8>,
    /// The signed manifest that binds it, for a revision published from a bundle.
    #[serde(skip)]
    pub signed: Option<Signed>,
}

/// A revision's signature, as the config log record carries it
/// (see [`crate::bundle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The bundle's manifest, as signed (its digests bind the text and the archives).
    pub manifest: String,
    /// The manifest's signature, in minisign's text format.
    pub signature: String,
}

impl std::fmt::Debug for LogEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogEntry")
            .field("offset", &self.offset)
            .field("revision", &self.revision)
            .field("publisher", &self.publisher)
            .field("published_at_ms", &self.published_at_ms)
            .field("bytes", &self.body.len())
            .field("signed", &self.signed.is_some())
            .finish()
    }
}

impl LogEntry {
    pub(crate) fn from_delivery(delivery: &Delivery) -> LogEntry {
        let headers = delivery.properties.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name));
        LogEntry {
            offset: header(HEADER_OFFSET).and_then(integer),
            revision: header(HEADER_REVISION).and_then(integer),
            publisher: header(HEADER_PUBLISHER).and_then(string),
            published_at_ms: header(HEADER_PUBLISHED_AT).and_then(integer),
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_string()),
            body: delivery.data.clone(),
            signed: header(HEADER_MANIFEST)
                .and_then(string)
                .zip(header(HEADER_SIGNATURE).and_then(string))
                .map(|(manifest, signature)| Signed {
                    manifest,
                    signature,
                }),
        }
    }

    /// The revision: the header's, else the one written in the text.
    pub fn revision(&self) -> Option<u64> {
        self.revision
            .or_else(|| std::str::from_utf8(&self.body).ok().and_then(text_revision))
    }

    /// The text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }

    /// When it was published, by its publisher's clock (`None` without a readable
    /// header).
    pub fn published_at(&self) -> Option<time::OffsetDateTime> {
        let ms = i128::from(self.published_at_ms?);
        time::OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000).ok()
    }

    /// Validates this entry as a config, archives found as `lookup` says: it must be
    /// UTF-8, small enough, a valid cluster file, and carry the revision its header
    /// announces. What depends on a clock (`restarted_at`) is judged as of its publish
    /// time ([`LogEntry::published_at`]), as `publish` judged it, never by the reading
    /// master's clock: every master gives one record one verdict. A record without a
    /// publish time (not written by `publish`) has no such bound. The error's text is the
    /// reason, for the log.
    pub(crate) fn validate(&self, log: &str, lookup: &ArchiveLookup) -> Result<Plan> {
        if self.body.len() > MAX_CONFIG_BYTES {
            return Err(Error::ConfigRefused(format!(
                "{} bytes, more than the {MAX_CONFIG_BYTES} a config may have",
                self.body.len()
            )));
        }
        let text = self
            .text()
            .ok_or_else(|| Error::ConfigRefused("the config is not UTF-8 text".into()))?;
        let origin = match self.offset {
            Some(offset) => format!("{log}@{offset}"),
            None => log.to_string(),
        };
        let plan = Plan::parse_as_of(text, &origin, lookup, self.published_at())?;
        if let Some(header) = self.revision {
            if header != plan.revision {
                return Err(Error::ConfigRefused(format!(
                    "its header says revision {header} but its text says revision {}",
                    plan.revision
                )));
            }
        }
        Ok(plan)
    }
}

/// The revision written in a cluster file's text, without validating the rest.
pub fn text_revision(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct RevisionOnly {
        revision: u64,
    }
    toml::from_str::<RevisionOnly>(text)
        .ok()
        .map(|r| r.revision)
}

/// Declares the config log (idempotent; every party declares it the same way).
///
/// No `x-initial-cluster-size` is given: on a RabbitMQ cluster the broker then places a
/// replica of the stream on every node (its default, which the cluster test checks), its leader on the node
/// the declaring client is connected to; a publish is confirmed once a majority of the
/// replicas hold it, so a confirmed revision outlives the loss of any minority of the
/// nodes.
pub(crate) async fn declare(channel: &Channel, names: &Names) -> Result<()> {
    let queue = names.configs();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            table(vec![
                ("x-queue-type", text_value("stream")),
                (
                    "x-max-length-bytes",
                    AMQPValue::LongLongInt(STREAM_MAX_BYTES),
                ),
                (
                    "x-stream-max-segment-size-bytes",
                    AMQPValue::LongLongInt(STREAM_SEGMENT_BYTES),
                ),
            ]),
        )
        .await
        .map_err(|e| amqp_error(&queue, "declaring the config log", e))?;
    Ok(())
}

/// Where a log consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum From {
    /// The first message still in the log.
    First,
    /// This offset (the one after the last message seen).
    Offset(u64),
}

/// Starts consuming the config log on `channel` (prefetch set, manual acks).
pub(crate) async fn consume(
    channel: &Channel,
    names: &Names,
    tag: &str,
    from: From,
) -> Result<Consumer> {
    let queue = names.configs();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(|e| amqp_error(&queue, "setting the prefetch", e))?;
    let offset = match from {
        From::First => text_value("first"),
        From::Offset(offset) => AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
    };
    channel
        .basic_consume(
            queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            table(vec![("x-stream-offset", offset)]),
        )
        .await
        .map_err(|e| amqp_error(&queue, "consuming the config log", e))
}

/// Every entry of the config log, oldest first, as it is now (see [`SETTLE`]). While
/// the broker answers that the log's replicas are not ready (a log just declared on a
/// cluster), the read starts again, for up to [`super::REPLICAS_READY_WAIT`].
pub async fn read_all(broker: &Broker) -> Result<Vec<LogEntry>> {
    broker
        .on_connection("config reader", async |connection| {
            read_all_on(broker, connection).await
        })
        .await
}

async fn read_all_on(broker: &Broker, connection: &lapin::Connection) -> Result<Vec<LogEntry>> {
    read_on(broker, connection, SETTLE, |_| false).await
}

/// The entries of the log from its start, oldest first, until `last` says an entry is
/// the last one wanted, or nothing more arrived for `settle`.
async fn read_on(
    broker: &Broker,
    connection: &lapin::Connection,
    settle: Duration,
    last: impl Fn(&LogEntry) -> bool,
) -> Result<Vec<LogEntry>> {
    let names = broker.names();
    let queue = names.configs();
    let channel = open_channel(connection, &queue).await?;
    declare(&channel, names).await?;
    let tag = format!("read-{}-{}", std::process::id(), now_ms());
    let mut consumer = consume(&channel, names, &tag, From::First).await?;
    let mut entries = Vec::new();
    let mut unacked = 0u16;
    loop {
        let wait = if entries.is_empty() {
            FIRST_MESSAGE_WAIT.max(settle)
        } else {
            settle
        };
        let delivery = match tokio::time::timeout(wait, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => return Err(amqp_error(&queue, "reading the config log", e)),
            Ok(Some(Ok(delivery))) => delivery,
        };
        let entry = LogEntry::from_delivery(&delivery);
        let done = last(&entry);
        entries.push(entry);
        if done {
            break;
        }
        unacked += 1;
        if unacked >= PREFETCH / 2 {
            delivery
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(|e| amqp_error(&queue, "acknowledging", e))?;
            unacked = 0;
        }
    }
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    best_effort_close(channel.close(200, "done".into())).await;
    Ok(entries)
}

/// The entry with the highest revision in the log, if any; of duplicates, the first
/// (the one masters accepted: a later duplicate is not newer, so they ignore it).
/// Entries are taken in log order, and a revision that does not count
/// ([`counts_after`]: above [`MAX_REVISION`], or more than [`MAX_REVISION_STEP`]
/// above the newest revision before it) is skipped: every master refuses it, and it
/// must not stop later revisions from being published.
pub fn newest(entries: &[LogEntry]) -> Option<&LogEntry> {
    let mut newest: Option<&LogEntry> = None;
    for entry in entries {
        let Some(revision) = entry.revision() else {
            continue;
        };
        let before = newest.and_then(LogEntry::revision);
        if counts_after(before, revision) && before.is_none_or(|before| revision > before) {
            newest = Some(entry);
        }
    }
    newest
}

/// Whether `revision` may follow `newest`, the newest revision before it in the log
/// (`None`: none): it is at most [`MAX_REVISION`] and at most [`MAX_REVISION_STEP`]
/// above `newest` (above 0 for the first). A revision that may not is refused by
/// `publish` and by every master, so no single message can bring the log near
/// [`MAX_REVISION`], after which no later revision could be published: getting there
/// takes at least 2^21 publishes.
pub fn counts_after(newest: Option<u64>, revision: u64) -> bool {
    revision <= MAX_REVISION && revision <= newest.unwrap_or(0).saturating_add(MAX_REVISION_STEP)
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The revision published.
    pub revision: u64,
    /// The newest revision the log held before.
    pub previous: Option<u64>,
}

/// Publishes a validated config, with its signature when it is `signed`: takes the
/// publisher lease ([`take_publisher_lease`]), refuses the config unless its revision
/// is greater than every revision in the log ([`Error::RevisionNotNewer`], naming who
/// published the newest), appends it, waits for the broker's confirm, and reads the log
/// back up to it ([`check_appended`]). The lease is held from the read to the read-back,
/// so of two publishes of the same next revision one is confirmed and the other
/// refused; the read-back makes sure a confirmed publish is one that masters apply.
///
/// While the broker answers that the log's replicas are not ready (a log just declared
/// on a cluster whose members are still starting), the publish starts again on a new
/// connection, for up to [`super::REPLICAS_READY_WAIT`]. Every attempt gives the
/// message the same id, and one that finds it in the log already does not append it
/// again: the message is in the log at most once.
pub async fn publish(
    broker: &Broker,
    plan: &Plan,
    text: &str,
    publisher: &str,
    signed: Option<&Signed>,
) -> Result<Published> {
    let now = now_ms();
    let id = message_id(now);
    let message = Message {
        text,
        revision: Some(plan.revision),
        publisher,
        signed,
        id: &id,
        now,
    };
    broker
        .on_connection("config publisher", async |connection| {
            publish_on(broker, connection, plan, &message).await
        })
        .await
}

/// One attempt of [`publish`] on `connection`: appends `message` unless the log holds
/// it already (an earlier attempt's). Closing the connection ends the lease (the broker
/// deletes the exclusive queue).
async fn publish_on(
    broker: &Broker,
    connection: &lapin::Connection,
    plan: &Plan,
    message: &Message<'_>,
) -> Result<Published> {
    take_publisher_lease(connection, broker.names()).await?;
    let mut entries = read_all_on(broker, connection).await?;
    // An earlier attempt's append the broker stored: what precedes it decides.
    let appended = entries
        .iter()
        .position(|e| e.message_id.as_deref() == Some(message.id));
    if let Some(own) = appended {
        entries.truncate(own);
    }
    let newest_entry = newest(&entries);
    let previous = newest_entry.and_then(LogEntry::revision);
    if !counts_after(previous, plan.revision) {
        return Err(Error::ConfigRefused(format!(
            "{}: revision {} is more than {MAX_REVISION_STEP} (2^32) above the newest \
             revision in the log, {}; a revision may be at most that much newer",
            plan.origin,
            plan.revision,
            previous.unwrap_or(0)
        )));
    }
    if let Some(newest) = previous {
        if plan.revision <= newest {
            return Err(Error::RevisionNotNewer {
                origin: plan.origin.clone(),
                revision: plan.revision,
                newest,
                by: newest_entry.and_then(|e| e.publisher.clone()),
                log: broker.names().configs(),
            });
        }
    }
    if appended.is_none() {
        append_on(broker, connection, message).await?;
    }
    check_appended(broker, connection, plan, message.id).await?;
    Ok(Published {
        revision: plan.revision,
        previous,
    })
}

/// Reads the log back up to the message `id` just appended, and refuses the publish
/// when a revision as new or newer precedes it (one that the first read missed, or that
/// a publisher not holding the lease appended): masters ignore the new message then, so
/// it must not be reported as published. The log is ordered, so once the message itself
/// is read, everything before it has been.
///
/// # Errors
///
/// [`Error::RevisionNotNewer`] naming who published the revision that wins;
/// [`Error::Amqp`] when the message cannot be read back within [`READ_BACK_WAIT`].
async fn check_appended(
    broker: &Broker,
    connection: &lapin::Connection,
    plan: &Plan,
    id: &str,
) -> Result<()> {
    let queue = broker.names().configs();
    let entries = read_on(broker, connection, READ_BACK_WAIT, |e| {
        e.message_id.as_deref() == Some(id)
    })
    .await?;
    let Some((own, before)) = entries.split_last() else {
        return Err(not_read_back(&queue, plan.revision));
    };
    if own.message_id.as_deref() != Some(id) {
        return Err(not_read_back(&queue, plan.revision));
    }
    match newest(before) {
        Some(winner) if winner.revision().is_some_and(|r| r >= plan.revision) => {
            Err(Error::RevisionNotNewer {
                origin: plan.origin.clone(),
                revision: plan.revision,
                newest: winner.revision().unwrap_or(plan.revision),
                by: winner.publisher.clone(),
                log: queue,
            })
        }
        _ => Ok(()),
    }
}

fn not_read_back(queue: &str, revision: u64) -> Error {
    Error::Amqp {
        target: queue.to_string(),
        action: format!("reading revision {revision} back"),
        message: format!(
            "the broker confirmed it but it was not read back within {}s; \
             check `erel config history`",
            READ_BACK_WAIT.as_secs()
        ),
    }
}

/// Takes the publisher lease on `connection`: declares `<prefix>.publisher` as an
/// exclusive queue, which the broker lets one connection own at a time and deletes
/// when that connection closes (AMQP 0-9-1 `queue.declare`, `exclusive`; another
/// connection's declare fails with `405 RESOURCE_LOCKED`). Waits for another
/// publisher's lease up to [`PUBLISHER_LEASE_WAIT`], trying again with backoff.
///
/// # Errors
///
/// [`Error::Amqp`] naming the lease queue when another publisher held it for the whole
/// wait, or for any other broker problem.
async fn take_publisher_lease(connection: &lapin::Connection, names: &Names) -> Result<()> {
    let queue = names.publisher();
    let deadline = tokio::time::Instant::now() + PUBLISHER_LEASE_WAIT;
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    loop {
        let channel = open_channel(connection, &queue).await?;
        let declared = declare_exclusive(&channel, &queue).await;
        match declared {
            Ok(_) => {
                best_effort_close(channel.close(200, "done".into())).await;
                return Ok(());
            }
            Err(e) if is_resource_locked(&e) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Amqp {
                        target: queue,
                        action: "taking the publisher lease".to_string(),
                        message: format!(
                            "another publish held it for {}s; try again",
                            PUBLISHER_LEASE_WAIT.as_secs()
                        ),
                    });
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(amqp_error(&queue, "taking the publisher lease", e)),
        }
    }
}

/// Whether the broker refused with `405 RESOURCE_LOCKED` (an exclusive queue owned by
/// another connection).
fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)
    )
}

/// Appends a text to the log as is, with `revision` in its header (when given), and
/// returns once the broker has confirmed it. Nothing is checked: [`publish`] is the
/// checked way; this one exists to put arbitrary messages in the log (tests, repairs).
///
/// While the broker answers that the log's replicas are not ready (a log just declared
/// on a cluster whose members are still starting), the append is tried again on a new
/// connection, for up to [`super::REPLICAS_READY_WAIT`]. An append retried after the
/// broker failed its confirm (`INTERNAL_ERROR`) may be in the log twice; [`publish`]
/// checks its message's id and never appends it twice.
///
/// # Errors
///
/// [`Error::Amqp`] naming the log: a text larger than [`MAX_CONFIG_BYTES`], a broker
/// that returned or refused the message, replicas still not ready after the wait, or
/// any other broker problem.
pub async fn append(
    broker: &Broker,
    text: &str,
    revision: Option<u64>,
    publisher: &str,
) -> Result<()> {
    let now = now_ms();
    let id = message_id(now);
    let message = Message {
        text,
        revision,
        publisher,
        signed: None,
        id: &id,
        now,
    };
    broker
        .on_connection("config publisher", async |connection| {
            append_on(broker, connection, &message).await
        })
        .await
}

/// One message to append to the log.
struct Message<'a> {
    /// The config text.
    text: &'a str,
    /// Its revision header, when given.
    revision: Option<u64>,
    /// Who publishes it.
    publisher: &'a str,
    /// Its signature, for a revision published from a bundle.
    signed: Option<&'a Signed>,
    /// Its AMQP `message-id` ([`message_id`]).
    id: &'a str,
    /// When it is published, in ms since the Unix epoch.
    now: u64,
}

async fn append_on(
    broker: &Broker,
    connection: &lapin::Connection,
    message: &Message<'_>,
) -> Result<()> {
    let Message {
        text,
        revision,
        publisher,
        signed,
        id,
        now,
    } = *message;
    let names = broker.names();
    let queue = names.configs();
    if text.len() > MAX_CONFIG_BYTES {
        return Err(Error::Amqp {
            target: queue,
            action: "publishing a config".to_string(),
            message: format!(
                "{} bytes, more than the {MAX_CONFIG_BYTES} a config may have",
                text.len()
            ),
        });
    }
    let channel = open_channel(connection, &queue).await?;
    declare(&channel, names).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error(&queue, "enabling publisher confirms", e))?;
    let mut headers = FieldTable::default();
    if let Some(revision) = revision {
        headers.insert(
            HEADER_REVISION.into(),
            AMQPValue::LongLongInt(i64::try_from(revision).unwrap_or(i64::MAX)),
        );
    }
    headers.insert(HEADER_PUBLISHER.into(), text_value(publisher));
    if let Some(signed) = signed {
        headers.insert(HEADER_MANIFEST.into(), text_value(&signed.manifest));
        headers.insert(HEADER_SIGNATURE.into(), text_value(&signed.signature));
    }
    headers.insert(
        HEADER_PUBLISHED_AT.into(),
        AMQPValue::LongLongInt(i64::try_from(now).unwrap_or(i64::MAX)),
    );
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_content_type("application/toml".into())
        .with_app_id("erel".into())
        .with_message_id(id.into())
        .with_timestamp(now / 1000);
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            text.as_bytes(),
            properties,
        )
        .await
        .map_err(|e| amqp_error(&queue, "publishing a config", e))?
        .await
        .map_err(|e| amqp_error(&queue, "waiting for the broker's confirmation", e))?;
    best_effort_close(channel.close(200, "done".into())).await;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::Amqp {
            target: queue,
            action: "publishing a config".to_string(),
            message: format!("the broker returned it: {}", returned.reply_text),
        }),
        Confirmation::Nack(_) => Err(Error::Amqp {
            target: queue,
            action: "publishing a config".to_string(),
            message: "the broker refused to store it (nack)".to_string(),
        }),
        Confirmation::NotRequested => Err(Error::Amqp {
            target: queue,
            action: "publishing a config".to_string(),
            message: "the broker did not confirm it".to_string(),
        }),
    }
}

/// A message id no other publish uses: the host name, the process id and the time in
/// nanoseconds.
fn message_id(now_ms: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{host}.{}.{now_ms}.{nanos:09}", std::process::id())
}

/// The entries of one batch that may be applied over `held`, newest revision first,
/// and how many were ignored as not newer.
pub(crate) fn newer_than(
    held: Option<u64>,
    batch: &[LogEntry],
) -> (Vec<&LogEntry>, Vec<&LogEntry>) {
    let (mut newer, older): (Vec<&LogEntry>, Vec<&LogEntry>) =
        batch.iter().partition(|e| match (e.revision(), held) {
            (Some(revision), Some(held)) => revision > held,
            (Some(_), None) => true,
            (None, _) => true,
        });
    newer.sort_by_key(|e| std::cmp::Reverse((e.revision(), e.offset)));
    (newer, older)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, revision: Option<u64>, text: &str) -> LogEntry {
        LogEntry {
            offset: Some(offset),
            revision,
            publisher: Some("me".to_string()),
            published_at_ms: Some(1),
            message_id: None,
            body: text.as_bytes().to_vec(),
            signed: None,
        }
    }

    /// Entries at offsets 0, 1, … with these revision headers; one without a header
    /// holds text that is not a config.
    fn entries(revisions: &[Option<u64>]) -> Vec<LogEntry> {
        (0..)
            .zip(revisions)
            .map(|(offset, revision)| match revision {
                Some(_) => entry(offset, *revision, ""),
                None => entry(offset, None, "garbage"),
            })
            .collect()
    }

    #[test]
    fn the_revision_comes_from_the_header_else_the_text() {
        assert_eq!(entry(0, Some(4), "revision = 3").revision(), Some(4));
        assert_eq!(
            entry(0, None, "revision = 3\n[group.x]\n").revision(),
            Some(3)
        );
        assert_eq!(entry(0, None, "not toml at all [").revision(), None);
    }

    #[test]
    fn newest_is_the_highest_revision_not_the_last_message() {
        let log = entries(&[Some(1), Some(3), Some(2), Some(3)]);
        assert_eq!(newest(&log).and_then(|e| e.offset), Some(1));
        assert!(newest(&[]).is_none());
    }

    #[test]
    fn a_revision_above_the_largest_does_not_block_later_ones() {
        let log = entries(&[Some(1), Some(MAX_REVISION + 1), Some(u64::MAX), Some(2)]);
        assert_eq!(newest(&log).and_then(|e| e.offset), Some(3));
        // The largest revision counts only once the log is within a step of it.
        let log = entries(&[Some(1), Some(MAX_REVISION)]);
        assert_eq!(newest(&log).and_then(|e| e.offset), Some(0));
    }

    #[test]
    fn a_revision_counts_only_within_a_step_of_the_newest_before_it() {
        let step = MAX_REVISION_STEP;
        // (newest before, revision, counts)
        let table = [
            (None, 1, true),
            (None, step, true),
            (None, step + 1, false),
            (Some(5), 5 + step, true),
            (Some(5), 6 + step, false),
            (Some(5), MAX_REVISION, false),
            (Some(MAX_REVISION - 1), MAX_REVISION, true),
            (Some(MAX_REVISION), MAX_REVISION + 1, false),
            (Some(MAX_REVISION), u64::MAX, false),
        ];
        for (before, revision, counts) in table {
            assert_eq!(
                counts_after(before, revision),
                counts,
                "{revision} after {before:?}"
            );
        }
        // A jump does not count, and what follows is measured from before the jump.
        let log = entries(&[Some(1), Some(2 + step), Some(3), Some(3 + step)]);
        assert_eq!(newest(&log).and_then(|e| e.offset), Some(3));
    }

    #[test]
    fn a_batch_is_split_into_newer_first_and_ignored() {
        let batch = entries(&[Some(1), Some(5), Some(3), Some(5), None]);
        let (newer, older) = newer_than(Some(3), &batch);
        let offsets: Vec<_> = newer.iter().map(|e| e.offset).collect();
        // Unknown revision sorts last: it is tried only if nothing else validates.
        assert_eq!(offsets, vec![Some(3), Some(1), Some(4)]);
        assert_eq!(older.len(), 2);
        let (newer, older) = newer_than(None, &batch);
        assert_eq!(newer.len(), 5);
        assert!(older.is_empty());
    }

    /// A config with `restarted_at` a few minutes ahead of its publisher's clock, as
    /// `entry` publishes it: `publish` judged it by that clock.
    fn restart_config(published_at: time::OffsetDateTime, ahead_secs: u64) -> LogEntry {
        let at = (published_at + Duration::from_secs(ahead_secs))
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format");
        let text = format!(
            "revision = 2\n[[host]]\nid = \"a\"\naddr = \"127.0.0.1:7070\"\ngroup = \"web\"\n\
             [group.web]\nrelease = \"beat\"\nversion = \"1.0.0\"\n\
             sha256 = \"{}\"\nrestarted_at = \"{at}\"\n",
            "0".repeat(64)
        );
        let published_at_ms =
            u64::try_from(published_at.unix_timestamp()).expect("after 1970") * 1000;
        LogEntry {
            published_at_ms: Some(published_at_ms),
            ..entry(7, Some(2), &text)
        }
    }

    #[test]
    fn every_master_judges_restarted_at_by_the_publishers_clock_not_its_own() {
        let limit = crate::cluster::RESTARTED_AT_MAX_AHEAD.as_secs();
        // A publisher whose clock is ten minutes ahead of this master's (or a master ten
        // minutes behind) published a restart asked for four minutes after its now:
        // every master must hold it, whatever its own clock says.
        let publisher_now = time::OffsetDateTime::now_utc() + Duration::from_secs(600);
        let entry = restart_config(publisher_now, limit - 60);
        let plan = entry
            .validate("t.configs", &ArchiveLookup::Unchecked)
            .expect("a revision publish accepted is accepted by every master");
        assert!(plan.groups["web"].restarted_at.is_some());
        // A record whose restart is further ahead of its own publish time than `publish`
        // allows is refused by every master alike, whatever their clocks.
        let past = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let why = restart_config(past, limit + 1)
            .validate("t.configs", &ArchiveLookup::Unchecked)
            .expect_err("too far ahead of its publish time")
            .to_string();
        assert!(
            why.contains("restarted_at") && why.contains("ahead"),
            "{why}"
        );
    }

    #[test]
    fn a_config_whose_header_disagrees_with_its_text_is_rejected() {
        let text = "revision = 2\n";
        let e = entry(9, Some(3), text);
        let reason = e
            .validate("t.configs", &ArchiveLookup::Unchecked)
            .expect_err("mismatch")
            .to_string();
        assert!(reason.contains("header says revision 3"), "{reason}");
        let big = entry(0, Some(1), &"#".repeat(MAX_CONFIG_BYTES + 1));
        assert!(big
            .validate("t.configs", &ArchiveLookup::Unchecked)
            .expect_err("too big")
            .to_string()
            .contains("bytes"));
        let binary = LogEntry {
            body: vec![0xff, 0xfe],
            ..entry(0, Some(1), "")
        };
        assert!(binary
            .validate("t.configs", &ArchiveLookup::Unchecked)
            .is_err());
    }
}
