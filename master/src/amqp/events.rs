//! What masters do, published to the topic exchange `<prefix>.events` as JSON, with the
//! routing key `<event>.<group>` (`-` when no group is concerned), e.g.
//! `host_failed.web` or `revision_accepted.-`. `erel watch` binds its own named,
//! exclusive, auto-deleted queue to `#` and prints them live.
//!
//! Events are a view, not a record: they are published without confirms, and those
//! of a master that is not connected at the moment are dropped.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    amqp_error, best_effort_close, declare_exclusive, now_ms, open_channel, unless_lost, Backoff,
    Broker, Names,
};
use crate::error::{Error, Result};
use crate::rollout::RolloutEvent;

/// One event as published: who, when, what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The master's name.
    pub master: String,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: MasterEvent,
}

/// What a master did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MasterEvent {
    /// A revision was accepted and written to the state directory.
    RevisionAccepted {
        /// The revision.
        revision: u64,
        /// Who published it.
        publisher: Option<String>,
    },
    /// A revision from the log was rejected; nothing of it was applied.
    RevisionRejected {
        /// The revision, when it could be read.
        revision: Option<u64>,
        /// Why.
        reason: String,
    },
    /// This master now acts on a group.
    GroupAcquired {
        /// The group.
        group: String,
    },
    /// This master no longer acts on a group.
    GroupReleased {
        /// The group.
        group: String,
    },
    /// A rollout of a group begins (a pass that changes something).
    RolloutStarted {
        /// The group.
        group: String,
        /// The revision being applied.
        revision: u64,
        /// Release name.
        release: String,
        /// Desired version.
        version: String,
    },
    /// A host runs the desired version, healthy, after a switch.
    HostDone {
        /// The group.
        group: String,
        /// Host id.
        host: String,
        /// The version it runs now.
        version: String,
    },
    /// A host failed and was (or could not be) rolled back; the group halts.
    HostFailed {
        /// The group.
        group: String,
        /// Host id.
        host: String,
        /// What went wrong.
        reason: String,
        /// Whether the host was returned to its previous state.
        rolled_back: bool,
        /// Whether the failure came after the host's running release was touched
        /// (absent from older masters' events: assumed so).
        #[serde(default = "touched_by_default")]
        host_changed: bool,
    },
    /// A group's rollout failed after a switch: the group stays halted at the revision
    /// until a newer one arrives or an operator asks for a retry.
    GroupHalted {
        /// The group.
        group: String,
        /// The revision not tried again.
        revision: u64,
        /// The first host that failed.
        host: String,
        /// Why it failed.
        reason: String,
    },
    /// A halted group is tried again on an operator's request.
    GroupRetried {
        /// The group.
        group: String,
        /// The revision tried again.
        revision: u64,
        /// Who asked.
        by: String,
    },
    /// A revision is applied to a group: every host runs the desired version.
    RevisionApplied {
        /// The group.
        group: String,
        /// The revision.
        revision: u64,
        /// Hosts switched in this pass.
        switched: usize,
    },
}

impl MasterEvent {
    /// The routing key: `<event>.<group>`, or `<event>.-`.
    pub fn routing_key(&self) -> String {
        let (kind, group) = match self {
            MasterEvent::RevisionAccepted { .. } => ("revision_accepted", None),
            MasterEvent::RevisionRejected { .. } => ("revision_rejected", None),
            MasterEvent::GroupAcquired { group } => ("group_acquired", Some(group)),
            MasterEvent::GroupReleased { group } => ("group_released", Some(group)),
            MasterEvent::RolloutStarted { group, .. } => ("rollout_started", Some(group)),
            MasterEvent::HostDone { group, .. } => ("host_done", Some(group)),
            MasterEvent::HostFailed { group, .. } => ("host_failed", Some(group)),
            MasterEvent::RevisionApplied { group, .. } => ("revision_applied", Some(group)),
            MasterEvent::GroupHalted { group, .. } => ("group_halted", Some(group)),
            MasterEvent::GroupRetried { group, .. } => ("group_retried", Some(group)),
        };
        format!("{kind}.{}", group.map_or("-", String::as_str))
    }

    /// The events worth publishing from a rollout's own: rollout started (when a host
    /// actually starts switching), host done, host failed. `revision` is the plan's.
    pub fn from_rollout(event: &RolloutEvent) -> Option<MasterEvent> {
        match event {
            RolloutEvent::HostDone {
                group,
                host,
                version,
                ..
            } => Some(MasterEvent::HostDone {
                group: group.clone(),
                host: host.clone(),
                version: version.clone(),
            }),
            RolloutEvent::HostFailed {
                group,
                host,
                failure,
                ..
            } => Some(MasterEvent::HostFailed {
                group: group.clone(),
                host: host.clone(),
                reason: failure.reason.clone(),
                rolled_back: failure.rolled_back,
                host_changed: failure.phase.changes_host(),
            }),
            _ => None,
        }
    }
}

fn touched_by_default() -> bool {
    true
}

impl std::fmt::Display for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.master)?;
        match &self.event {
            MasterEvent::RevisionAccepted {
                revision,
                publisher,
            } => write!(
                f,
                "revision {revision} accepted (published by {})",
                publisher.as_deref().unwrap_or("?")
            ),
            MasterEvent::RevisionRejected { revision, reason } => match revision {
                Some(revision) => write!(f, "revision {revision} rejected: {reason}"),
                None => write!(f, "config rejected: {reason}"),
            },
            MasterEvent::GroupAcquired { group } => write!(f, "{group}: now held by this master"),
            MasterEvent::GroupReleased { group } => write!(f, "{group}: released"),
            MasterEvent::RolloutStarted {
                group,
                revision,
                release,
                version,
            } => write!(
                f,
                "{group}: rollout of {release} {version} started (revision {revision})"
            ),
            MasterEvent::HostDone {
                group,
                host,
                version,
            } => write!(f, "{group}/{host}: done, runs {version}"),
            MasterEvent::HostFailed {
                group,
                host,
                reason,
                rolled_back,
                host_changed,
            } => {
                let rolled = crate::rollout::rollback_words(*rolled_back, *host_changed);
                write!(f, "{group}/{host}: FAILED, {rolled}: {reason}")
            }
            MasterEvent::GroupHalted {
                group,
                revision,
                host,
                reason,
            } => write!(
                f,
                "{group}: HALTED at revision {revision} ({host}: {reason}); not tried again \
                 until a newer revision or `erel config retry --group {group}`"
            ),
            MasterEvent::GroupRetried {
                group,
                revision,
                by,
            } => write!(
                f,
                "{group}: revision {revision} tried again (asked by {by})"
            ),
            MasterEvent::RevisionApplied {
                group,
                revision,
                switched,
            } => write!(
                f,
                "{group}: revision {revision} applied ({switched} host(s) switched)"
            ),
        }
    }
}

/// Declares the events exchange.
pub(crate) async fn declare(channel: &Channel, names: &Names) -> Result<()> {
    let exchange = names.events();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&exchange, "declaring the events exchange", e))
}

/// Publishes one event (no confirm: events are a view).
pub(crate) async fn publish(channel: &Channel, names: &Names, envelope: &Envelope) -> Result<()> {
    let exchange = names.events();
    let body = serde_json::to_vec(envelope).map_err(|e| Error::Amqp {
        target: exchange.clone(),
        action: "encoding an event".to_string(),
        message: e.to_string(),
    })?;
    channel
        .basic_publish(
            exchange.as_str().into(),
            envelope.event.routing_key().as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .map_err(|e| amqp_error(&exchange, "publishing an event", e))?;
    Ok(())
}

/// Wraps an event with the master's name and the time.
pub fn envelope(master: &str, event: MasterEvent) -> Envelope {
    Envelope {
        master: master.to_string(),
        time_ms: now_ms(),
        event,
    }
}

/// What [`watch`] tells its caller besides events.
#[derive(Debug, Clone)]
pub enum WatchNotice {
    /// Listening (again) on this queue.
    Listening(String),
    /// The connection failed; retrying after the delay.
    Retrying(String, Duration),
}

/// Prints events live: binds `<prefix>.watch.<tag>` to every event and calls `on_event`
/// for each until `cancel` fires. Reconnects with backoff when the broker goes away,
/// to the next node of a cluster's list (events published meanwhile are missed).
pub async fn watch(
    broker: &Broker,
    tag: &str,
    mut on_event: impl FnMut(Envelope),
    mut on_notice: impl FnMut(WatchNotice),
    cancel: CancellationToken,
) -> Result<()> {
    let names = broker.names();
    let queue = names.watch(tag);
    let mut backoff = Backoff::default();
    loop {
        let outcome = async {
            let connection = broker.connect("watch").await?;
            // Bounded by the connection's state: a future of the client library that a
            // lost node left waiting cannot silence the watch for good.
            let watching = async {
                let channel = open_channel(&connection, &queue).await?;
                declare(&channel, names).await?;
                declare_exclusive(&channel, &queue)
                    .await
                    .map_err(|e| amqp_error(&queue, "declaring the watch queue", e))?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        names.events().as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| amqp_error(&queue, "binding to the events exchange", e))?;
                let mut consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "watch".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| amqp_error(&queue, "consuming", e))?;
                on_notice(WatchNotice::Listening(queue.clone()));
                backoff.reset();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            drop(consumer);
                            best_effort_close(channel.close(200, "done".into())).await;
                            best_effort_close(connection.close(200, "done".into())).await;
                            return Ok(());
                        }
                        next = consumer.next() => match next {
                            Some(Ok(delivery)) => {
                                if let Ok(envelope) = serde_json::from_slice::<Envelope>(&delivery.data) {
                                    on_event(envelope);
                                }
                            }
                            Some(Err(e)) => return Err(amqp_error(&queue, "watching", e)),
                            None => return Err(Error::Amqp {
                                target: queue.clone(),
                                action: "watching".to_string(),
                                message: "the broker ended the consumer".to_string(),
                            }),
                        },
                    }
                }
            };
            unless_lost(&connection, &queue, "watching", watching).await
        }
        .await;
        match outcome {
            Ok(()) => return Ok(()),
            // Cancelled while the watch was ending: no retry to announce.
            Err(_) if cancel.is_cancelled() => return Ok(()),
            Err(e) => {
                // Its node may be gone: the next attempt starts at the next one.
                broker.fail_over();
                let delay = backoff.next_delay();
                on_notice(WatchNotice::Retrying(e.to_string(), delay));
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json_with_their_routing_key() {
        let envelope = envelope(
            "m1",
            MasterEvent::HostFailed {
                group: "web".to_string(),
                host: "web-1".to_string(),
                reason: "no answer on port 1".to_string(),
                rolled_back: true,
                host_changed: true,
            },
        );
        let json = serde_json::to_string(&envelope).expect("encode");
        assert!(json.contains("\"event\":\"host_failed\""), "{json}");
        let back: Envelope = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, envelope);
        assert_eq!(back.event.routing_key(), "host_failed.web");
        assert!(back.to_string().contains("web/web-1: FAILED, rolled back"));
        let accepted = MasterEvent::RevisionAccepted {
            revision: 3,
            publisher: None,
        };
        assert_eq!(accepted.routing_key(), "revision_accepted.-");
    }

    #[test]
    fn a_halt_is_an_event_that_says_how_to_retry() {
        let halted = envelope(
            "m1",
            MasterEvent::GroupHalted {
                group: "web".to_string(),
                revision: 2,
                host: "web-1".to_string(),
                reason: "2.0.0: exited with code 3, rolled back".to_string(),
            },
        );
        assert_eq!(halted.event.routing_key(), "group_halted.web");
        let json = serde_json::to_string(&halted).expect("encode");
        assert!(json.contains("\"event\":\"group_halted\""), "{json}");
        let text = halted.to_string();
        assert!(
            text.contains("web: HALTED at revision 2 (web-1: 2.0.0: exited with code 3")
                && text.contains("erel config retry --group web"),
            "{text}"
        );
    }
}
