//! Per-group records beside the lease: halts with their retries, and hand-over
//! requests.
//!
//! - `<prefix>.halt.<group>` (a durable quorum queue, `x-max-length: 1`): the group's latest halt
//!   state, [`HaltRecord`]. The master that halts a group at a revision
//!   ([`crate::rollout::halt`]) writes `halted`; `erel config retry --group G` writes
//!   `retry`, which ends that halt; the master that applies a newer revision writes
//!   `cleared`; whichever master holds the group next reads it,
//!   so a halt outlives the master that made it. Readers take the messages without
//!   acknowledging them and put them back (`basic.nack` with requeue), so the record
//!   stays for every reader; the newest message read wins.
//! - `<prefix>.handover.<group>` (`x-max-length: 1`, each message expiring at its
//!   deadline): a [`HandoverRequest`] from `erel deploy --take-over`. A master that
//!   holds the group, or receives its token, while a live request from someone else
//!   is there gives the token back and waits until the request is gone (taken, or
//!   expired) before it competes again ([`super::leadership`]).

use lapin::options::{BasicGetOptions, BasicNackOptions, QueuePurgeOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{amqp_error, best_effort_close, now_ms, open_channel, table, Broker, Names};
use crate::error::Result;
use crate::rollout::halt::Halt;

/// Messages read at most from one record queue (it keeps one; a requeued one may
/// briefly sit beside a newer one).
const MAX_READ: usize = 8;
/// A record another reader holds (between its `basic.get` and its requeue) is not
/// there for `basic.get`: an empty answer is asked again after each of these pauses
/// before the queue counts as empty. Together they outlast a reader's two round trips
/// on a busy broker; a queue that holds a record answers at the first try. A reader
/// that stalls while it holds the record (its process stopped, its link to the broker
/// silently cut) hides it for longer, until the broker closes that reader's connection
/// (about twice the heartbeat): only a read that takes nothing, such as the records kept
/// in a stream and read from its last offset, would close that window.
const EMPTY_RECHECKS: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(25),
    std::time::Duration::from_millis(75),
    std::time::Duration::from_millis(200),
];

/// A group's latest halt state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HaltRecord {
    /// The group is halted at a revision.
    Halted(Halt),
    /// A newer revision is being applied: the halt at an older one is over.
    Cleared {
        /// The group.
        group: String,
        /// The revision being applied.
        revision: u64,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// An operator asked to try the halted revision again.
    Retry {
        /// The group.
        group: String,
        /// Who asked (`$USER@<host name>`).
        by: String,
        /// When, in milliseconds since the Unix epoch.
        at_ms: u64,
    },
}

impl HaltRecord {
    /// The group the record is about.
    pub fn group(&self) -> &str {
        match self {
            HaltRecord::Halted(halt) => &halt.group,
            HaltRecord::Cleared { group, .. } | HaltRecord::Retry { group, .. } => group,
        }
    }
}

/// A request to hand a group over, from `erel deploy --take-over`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverRequest {
    /// The group.
    pub group: String,
    /// Who asks: the name it will hold the lease under.
    pub requester: String,
    /// Until when it waits, in milliseconds since the Unix epoch.
    pub until_ms: u64,
}

/// Declares a record queue keeping one message: `durable` ones (halts) as replicated
/// quorum queues ([`super::declare_replicated`]), so that they outlive the loss of a
/// cluster node; the others as transient classic queues, which the broker deletes with
/// a lost node and the next writer declares again.
async fn declare(channel: &Channel, queue: &str, durable: bool) -> Result<()> {
    let args = vec![("x-max-length", AMQPValue::LongLongInt(1))];
    if durable {
        super::declare_replicated(channel, queue, args, "declaring the queue").await?;
        return Ok(());
    }
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions::default(),
            table(args),
        )
        .await
        .map_err(|e| super::declare_error(queue, "declaring the queue", e))?;
    Ok(())
}

/// The newest record of `queue` (declared first, `durable` or not), left in it for the
/// next reader; `None` when the queue is empty or its record is not a `T`. An empty
/// answer is asked again after the pauses of [`EMPTY_RECHECKS`], since a record another
/// reader is peeking at that instant is not delivered to this one.
async fn peek<T: DeserializeOwned>(
    channel: &Channel,
    queue: &str,
    durable: bool,
) -> Result<Option<T>> {
    declare(channel, queue, durable).await?;
    let mut newest = None;
    let mut last = None;
    let mut rechecks = EMPTY_RECHECKS.iter();
    let mut reads = 0;
    while reads < MAX_READ {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .map_err(|e| amqp_error(queue, "reading the record", e))?;
        match got {
            Some(message) => {
                reads += 1;
                newest = Some(message.delivery.data.clone());
                last = Some(message.delivery);
            }
            None if last.is_some() => break,
            None => match rechecks.next() {
                Some(pause) => tokio::time::sleep(*pause).await,
                None => break,
            },
        }
    }
    if let Some(delivery) = last {
        delivery
            .nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await
            .map_err(|e| amqp_error(queue, "putting the record back", e))?;
    }
    Ok(newest.and_then(|body| serde_json::from_slice(&body).ok()))
}

async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    let properties = properties.with_content_type("application/json".into());
    super::publish_to_queue(channel, queue, body, properties, "publishing the record").await
}

fn encode(queue: &str, value: &impl Serialize) -> Result<Vec<u8>> {
    super::encode_json(queue, "encoding the record", value)
}

/// The group's latest halt record, if any.
pub(crate) async fn read_halt(
    channel: &Channel,
    names: &Names,
    group: &str,
) -> Result<Option<HaltRecord>> {
    peek(channel, &names.halt(group)?, true).await
}

/// Writes a halt record (persistent) to the halt queue of the group it is about.
pub(crate) async fn write_halt(
    channel: &Channel,
    names: &Names,
    record: &HaltRecord,
) -> Result<()> {
    let queue = names.halt(record.group())?;
    declare(channel, &queue, true).await?;
    let body = encode(&queue, record)?;
    publish(
        channel,
        &queue,
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
}

/// `erel config retry --group G`: writes a retry record; the halt it ends, when the
/// group was halted. While the broker answers that the halt queue's replicas are not
/// ready, it starts again on a new connection ([`Broker::on_connection`]).
pub async fn retry(broker: &Broker, group: &str, by: &str) -> Result<Option<Halt>> {
    let queue = broker.names().halt(group)?;
    let at_ms = now_ms();
    broker
        .on_connection("retry", async |connection| {
            let channel = open_channel(connection, &queue).await?;
            let current = read_halt(&channel, broker.names(), group).await?;
            let record = HaltRecord::Retry {
                group: group.to_string(),
                by: by.to_string(),
                at_ms,
            };
            write_halt(&channel, broker.names(), &record).await?;
            best_effort_close(channel.close(200, "done".into())).await;
            Ok(match current {
                Some(HaltRecord::Halted(halt)) => Some(halt),
                _ => None,
            })
        })
        .await
}

/// The halts recorded for `groups` at `revision` or later (for `erel status` and
/// `erel config holders`): a halt at an older revision is over once a newer one is
/// applied, whether or not its record was cleared yet.
pub async fn halts(broker: &Broker, groups: &[String], revision: u64) -> Result<Vec<Halt>> {
    broker
        .on_channel("halts reader", async |channel| {
            let mut halts = Vec::new();
            for group in groups {
                if let Some(HaltRecord::Halted(halt)) =
                    read_halt(channel, broker.names(), group).await?
                {
                    if halt.revision < revision {
                        continue;
                    }
                    halts.push(halt);
                }
            }
            Ok(halts)
        })
        .await
}

/// A live hand-over request for `group` from someone other than `me`.
pub(crate) async fn pending_handover(
    channel: &Channel,
    names: &Names,
    group: &str,
    me: &str,
) -> Result<Option<HandoverRequest>> {
    let request: Option<HandoverRequest> = peek(channel, &names.handover(group)?, false).await?;
    Ok(request.filter(|request| request.requester != me && request.until_ms > now_ms()))
}

/// Asks the holder of the request's group to hand it over; the message expires at the
/// request's deadline.
pub(crate) async fn request_handover(
    channel: &Channel,
    names: &Names,
    request: &HandoverRequest,
) -> Result<()> {
    let queue = names.handover(&request.group)?;
    declare(channel, &queue, false).await?;
    let body = encode(&queue, request)?;
    let ttl = request.until_ms.saturating_sub(now_ms()).max(1);
    publish(
        channel,
        &queue,
        &body,
        BasicProperties::default().with_expiration(ttl.to_string().into()),
    )
    .await
}

/// Ends the group's hand-over request (it was granted, or given up): the queue is
/// purged and a request that is no longer live (`until_ms` 0) is left in it, so that a
/// reader that held the old request unacknowledged during the purge, and puts it back,
/// still reads the newest message as over.
pub(crate) async fn clear_handover(
    channel: &Channel,
    names: &Names,
    group: &str,
    requester: &str,
) -> Result<()> {
    let queue = names.handover(group)?;
    declare(channel, &queue, false).await?;
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| amqp_error(&queue, "removing the hand-over request", e))?;
    let over = HandoverRequest {
        group: group.to_string(),
        requester: requester.to_string(),
        until_ms: 0,
    };
    let body = encode(&queue, &over)?;
    publish(channel, &queue, &body, BasicProperties::default()).await
}
