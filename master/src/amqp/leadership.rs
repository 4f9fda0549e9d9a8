//! One master per group, by RabbitMQ's **single active consumer**.
//!
//! Each group has a durable queue `<prefix>.lease.<group>` declared with
//! `x-single-active-consumer: true`, holding a *token* message. Every master that wants
//! the group consumes that queue with a prefetch of 1 and never acknowledges the token:
//! the broker delivers to one consumer at a time, so the one that received the token
//! (and keeps it unacknowledged) holds the group. When its connection dies (process
//! killed, broker restarted, network cut noticed by the heartbeat) the broker requeues
//! the token and makes the next consumer active, which receives it and takes over
//! within a moment. A master that lets a group go closes its channel, which requeues the
//! token the same way.
//!
//! Why this and not an exclusive queue used as a lock: with an exclusive queue every
//! waiting master polls (`RESOURCE_LOCKED`, retry), and the hand-over takes as long as
//! the polling period; with a single active consumer the broker itself queues the
//! waiters and hands the token over at once, in the order they came.
//!
//! Tokens: a master that finds the lease queue empty when it declares it publishes one
//! (an unacknowledged token is not counted, so one may be added while a holder exists).
//! Duplicates are harmless, since everything goes to the one active consumer and a
//! prefetch of 1 gives it only one; `x-max-length: 1` keeps at most one token waiting.
//!
//! Who holds what: while it holds a group, a master puts a small record (group, master,
//! since, heartbeat time) every [`HEARTBEAT`] into `<prefix>.holder.<group>`, a queue
//! that keeps only the latest record (`x-max-length: 1`) and only for [`HOLDER_TTL`].
//! [`holders`] reads them without consuming them (`erel config holders`).
//!
//! Hand-over: `erel deploy` takes the same lease for the groups it rolls out
//! ([`take`]), so it never switches hosts while a master does. With `--take-over` it
//! first leaves a hand-over request ([`super::control`]); the holder, at its next
//! heartbeat once its pass in progress has ended, gives the token back, and every
//! master that receives it while the request is live passes it on, until the deploy
//! has it. A command holding a lease never hands it over: a second deploy waits for
//! the first to end. The masters compete again
//! once the request is gone; the deploy hands the token back when it ends, and the
//! next master converges from the state the deploy left.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control::{self, HandoverRequest};
use super::{
    amqp_error, best_effort_close, now_ms, open_channel, table, unless_lost, Broker, Names,
};
use crate::error::{Error, Result};

/// How often a holder renews its holder record.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a holder record outlives the last heartbeat.
pub(crate) const HOLDER_TTL: Duration = Duration::from_secs(8);

/// Who holds a group, as its holder last said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HolderRecord {
    /// The group.
    pub group: String,
    /// The master's name (`--name`).
    pub master: String,
    /// When it took the group (ms since the Unix epoch).
    pub since_ms: u64,
    /// Its last heartbeat (ms since the Unix epoch).
    pub heartbeat_ms: u64,
}

/// The lease queue: one token, one active consumer (the holder); a quorum queue, so
/// that on a RabbitMQ cluster it lives on a majority of the nodes and outlives the
/// loss of any minority of them (its consumers on the lost node are gone with their
/// connections, and the token goes to the next consumer). Returns how many messages
/// it holds ready.
async fn declare_lease(channel: &Channel, queue: &str) -> Result<u32> {
    let args = vec![
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-max-length", AMQPValue::LongLongInt(1)),
    ];
    super::declare_replicated(channel, queue, args, "declaring the lease queue").await
}

/// The holder record: the newest holder only, forgotten after [`HOLDER_TTL`]. A
/// transient classic queue: on a cluster, when its node is lost the broker deletes it,
/// and the next holder's heartbeat declares it again on a node that is up.
async fn declare_holder(channel: &Channel, queue: &str) -> Result<()> {
    let args = vec![
        ("x-max-length", AMQPValue::LongLongInt(1)),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(HOLDER_TTL.as_millis() as i64),
        ),
    ];
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::default(), table(args))
        .await
        .map_err(|e| super::declare_error(queue, "declaring the holder record", e))?;
    Ok(())
}

/// Competes for `group` on `connection` until `cancel` fires or the connection fails:
/// `holding` is set to true once the token arrives, and back to false when it is lost
/// or handed over to a deploy (then it competes again once the request is gone).
///
/// `handover`: `Some(busy)` for a master, which hands the group over on request once
/// `busy` (a pass in progress) is false; `None` for a command (`erel deploy`), which
/// keeps the lease until it is done.
/// Returns `Ok` only when cancelled (the token is handed back); any broker problem is
/// an error, and the group is then no longer held.
pub(crate) async fn hold(
    connection: Arc<Connection>,
    names: Names,
    group: String,
    master: String,
    holding: watch::Sender<bool>,
    handover: Option<watch::Receiver<bool>>,
    cancel: CancellationToken,
) -> Result<()> {
    // Bounded by the connection's state: a future of the client library that a lost
    // node left waiting cannot keep the group held by a master that no longer acts.
    let competing = async {
        loop {
            let round = compete(
                &connection,
                &names,
                &group,
                &master,
                &holding,
                handover.as_ref(),
                &cancel,
            );
            match round.await {
                Ok(Competed::Cancelled) => break Ok(()),
                Ok(Competed::HandedOver(request)) => {
                    holding.send_replace(false);
                    tracing::info!(group, to = %request.requester, "group handed over on request");
                    if let Err(e) =
                        wait_for_handover(&connection, &names, &group, &master, &cancel).await
                    {
                        break Err(e);
                    }
                    if cancel.is_cancelled() {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        }
    };
    let lease = names.lease(&group).unwrap_or_else(|_| group.clone());
    let action = format!("competing for group {group}");
    let outcome = unless_lost(&connection, &lease, &action, competing).await;
    holding.send_replace(false);
    outcome
}

/// How one round of competing ended.
enum Competed {
    Cancelled,
    HandedOver(HandoverRequest),
}

/// Waits until no live hand-over request for `group` is left.
async fn wait_for_handover(
    connection: &Connection,
    names: &Names,
    group: &str,
    master: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let queue = names.handover(group)?;
    let channel = open_channel(connection, &queue).await?;
    let outcome = loop {
        match control::pending_handover(&channel, names, group, master).await {
            Ok(Some(_)) => {}
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = tokio::time::sleep(HANDOVER_POLL) => {}
        }
    };
    best_effort_close(channel.close(200, "done".into())).await;
    outcome
}

/// How often a master that handed a group over looks whether the request is gone.
const HANDOVER_POLL: Duration = Duration::from_millis(500);

/// A hand-over request this master must follow now: only a master's (`handover` is
/// `Some`), and only between passes.
async fn must_hand_over(
    channel: &Channel,
    names: &Names,
    group: &str,
    master: &str,
    handover: Option<&watch::Receiver<bool>>,
) -> Result<Option<HandoverRequest>> {
    match handover {
        Some(busy) if !*busy.borrow() => {
            control::pending_handover(channel, names, group, master).await
        }
        _ => Ok(None),
    }
}

async fn compete(
    connection: &Connection,
    names: &Names,
    group: &str,
    master: &str,
    holding: &watch::Sender<bool>,
    handover: Option<&watch::Receiver<bool>>,
    cancel: &CancellationToken,
) -> Result<Competed> {
    let lease = names.lease(group)?;
    let holder = names.holder(group)?;
    let channel = open_channel(connection, &lease).await?;
    let close = |channel: Channel| async move {
        // Closing the channel requeues the token for the next master.
        best_effort_close(channel.close(200, "released".into())).await;
    };
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| amqp_error(&lease, "setting the prefetch", e))?;
    if declare_lease(&channel, &lease).await? == 0 {
        super::publish_to_queue(
            &channel,
            &lease,
            b"token",
            BasicProperties::default().with_delivery_mode(2),
            "publishing",
        )
        .await?;
    }
    declare_holder(&channel, &holder).await?;
    let mut consumer = channel
        .basic_consume(
            lease.as_str().into(),
            format!("{master}-{}", std::process::id()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&lease, "consuming the lease queue", e))?;
    let token: Delivery = tokio::select! {
        _ = cancel.cancelled() => {
            close(channel).await;
            return Ok(Competed::Cancelled);
        }
        next = consumer.next() => delivered(next, &lease, "waiting for the token")?,
    };
    let mut since_ms = None;
    loop {
        // Before holding, and after each heartbeat: a hand-over asked for goes first.
        if let Some(request) = must_hand_over(&channel, names, group, master, handover).await? {
            drop(token);
            close(channel).await;
            return Ok(Competed::HandedOver(request));
        }
        let since_ms = *since_ms.get_or_insert_with(|| {
            let since_ms = now_ms();
            holding.send_replace(true);
            tracing::info!(group, lease = %lease, "holding the group");
            since_ms
        });
        let record = HolderRecord {
            group: group.to_string(),
            master: master.to_string(),
            since_ms,
            heartbeat_ms: now_ms(),
        };
        let body = super::encode_json(&holder, "encoding the holder record", &record)?;
        super::publish_to_queue(
            &channel,
            &holder,
            &body,
            BasicProperties::default().with_content_type("application/json".into()),
            "publishing",
        )
        .await?;
        tokio::select! {
            _ = cancel.cancelled() => {
                drop(token);
                close(channel).await;
                tracing::info!(group, "group handed back");
                return Ok(Competed::Cancelled);
            }
            _ = tokio::time::sleep(HEARTBEAT) => {}
            next = consumer.next() => {
                // Only a duplicate token can come (prefetch 1 makes it unlikely); it
                // stays unacknowledged too and goes back with the channel.
                let _duplicate = delivered(next, &lease, "holding the token")?;
            }
        }
    }
}

/// What the lease queue's consumer gave while `action`: a delivery, or the error that
/// ends the round (the consumer ended: the lease is lost).
fn delivered(
    next: Option<std::result::Result<Delivery, lapin::Error>>,
    lease: &str,
    action: &str,
) -> Result<Delivery> {
    match next {
        Some(Ok(delivery)) => Ok(delivery),
        Some(Err(e)) => Err(amqp_error(lease, action, e)),
        None => Err(lost(lease)),
    }
}

/// A group's lease held by a command (`erel deploy`), until [`TakenLease::release`].
pub(crate) struct TakenLease {
    /// The master that held it when the command asked, if one did.
    pub from: Option<HolderRecord>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    connection: Arc<Connection>,
}

impl TakenLease {
    /// Hands the lease back to the masters.
    pub(crate) async fn release(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        best_effort_close(self.connection.close(200, "done".into())).await;
    }
}

/// Why [`take`] did not take a lease.
#[derive(Debug)]
pub(crate) enum TakeRefused {
    /// A master holds the group and no take-over was asked for.
    Held(HolderRecord),
    /// The holder did not hand the group over within the wait.
    NotHandedOver {
        /// Who held it, when known.
        from: Option<HolderRecord>,
    },
}

/// Takes `group`'s lease as `requester` for a command that acts on the group. When a
/// master holds it: refused with [`TakeRefused::Held`], unless `take_over`, which asks
/// the holder to hand it over and waits up to `wait` for the token.
///
/// The lease is a replicated queue: on a cluster where it was just declared, its replicas
/// may not be ready for a moment, which is retried for [`super::REPLICAS_READY_WAIT`]
/// ([`super::retry_not_ready`]), each attempt on a new connection.
///
/// # Errors
///
/// [`Error::Amqp`] for any broker problem.
pub(crate) async fn take(
    broker: &Broker,
    group: &str,
    requester: &str,
    take_over: bool,
    wait: Duration,
) -> Result<std::result::Result<TakenLease, TakeRefused>> {
    super::retry_not_ready(
        super::REPLICAS_READY_WAIT,
        super::not_ready_backoff(),
        async || take_once(broker, group, requester, take_over, wait).await,
    )
    .await
}

/// One attempt of [`take`].
async fn take_once(
    broker: &Broker,
    group: &str,
    requester: &str,
    take_over: bool,
    wait: Duration,
) -> Result<std::result::Result<TakenLease, TakeRefused>> {
    let from = holders(broker, &[group.to_string()])
        .await?
        .into_iter()
        .next();
    if let (Some(record), false) = (&from, take_over) {
        return Ok(Err(TakeRefused::Held(record.clone())));
    }
    let connection = Arc::new(broker.connect(&format!("lease for {requester}")).await?);
    let names = broker.names().clone();
    let asked = async {
        let channel = open_channel(&connection, &names.handover(group)?).await?;
        if from.is_some() {
            let request = HandoverRequest {
                group: group.to_string(),
                requester: requester.to_string(),
                until_ms: now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX / 2),
            };
            control::request_handover(&channel, &names, &request).await?;
        }
        Ok(channel)
    };
    let handover = names.handover(group)?;
    let asked = unless_lost(&connection, &handover, "asking for a hand-over", asked);
    let channel = match asked.await {
        Ok(channel) => channel,
        Err(e) => {
            best_effort_close(connection.close(200, "done".into())).await;
            return Err(e);
        }
    };
    let (holding_tx, mut holding) = watch::channel(false);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(hold(
        connection.clone(),
        names.clone(),
        group.to_string(),
        requester.to_string(),
        holding_tx,
        None,
        cancel.clone(),
    ));
    let got = tokio::time::timeout(wait, holding.wait_for(|held| *held)).await;
    let clear = control::clear_handover(&channel, &names, group, requester);
    let _ = unless_lost(
        &connection,
        &handover,
        "clearing the hand-over request",
        clear,
    )
    .await;
    best_effort_close(channel.close(200, "done".into())).await;
    let taken = TakenLease {
        from: from.clone(),
        cancel,
        task,
        connection,
    };
    match got {
        Ok(Ok(_)) => Ok(Ok(taken)),
        Ok(Err(_)) => {
            // The holding task ended: a broker problem.
            taken.cancel.cancel();
            let outcome = taken.task.await;
            best_effort_close(taken.connection.close(200, "done".into())).await;
            match outcome {
                Ok(Err(e)) => Err(e),
                _ => Err(lost(&names.lease(group)?)),
            }
        }
        Err(_) => {
            taken.release().await;
            Ok(Err(TakeRefused::NotHandedOver { from }))
        }
    }
}

fn lost(lease: &str) -> Error {
    Error::Amqp {
        target: lease.to_string(),
        action: "holding the group".to_string(),
        message: "the broker ended the consumer (queue deleted or connection lost)".to_string(),
    }
}

/// The latest holder record of each group that has a live one.
pub(crate) async fn holders(broker: &Broker, groups: &[String]) -> Result<Vec<HolderRecord>> {
    broker
        .on_channel("holders reader", async |channel| {
            let mut records = Vec::new();
            for group in groups {
                let queue = broker.names().holder(group)?;
                declare_holder(channel, &queue).await?;
                let got = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await
                    .map_err(|e| amqp_error(&queue, "reading the holder record", e))?;
                if let Some(message) = got {
                    let record = serde_json::from_slice::<HolderRecord>(&message.delivery.data);
                    // Put it back for the next reader.
                    let _ = message
                        .delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await;
                    if let Ok(record) = record {
                        records.push(record);
                    }
                }
            }
            Ok(records)
        })
        .await
}
