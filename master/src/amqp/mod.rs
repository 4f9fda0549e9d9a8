//! Configs over RabbitMQ: the only module that speaks AMQP (lapin).
//!
//! - [`log`]: the config log, a durable RabbitMQ **stream** `<prefix>.configs`; each
//!   message is a cluster file's text with its revision, publisher and time in headers.
//!   `erel config publish|show|history` read and append to it.
//! - [`state`]: the newest accepted revision on the master's disk, written atomically.
//! - [`leadership`]: one master per group, by RabbitMQ's single active consumer;
//!   `erel deploy` takes the same lease ([`leadership::take`]).
//! - [`control`]: per-group halt records (and retries), hand-over requests.
//! - [`events`]: what masters do, on the topic exchange `<prefix>.events`; `erel watch`.
//! - [`daemon`]: `erel master --amqp`: reads the log, keeps the state directory, holds
//!   leases, converges the groups it holds, survives broker restarts.
//!
//! Every name on the broker starts with a prefix (`erel` unless told otherwise), so that
//! several clusters, or several tests, share one broker without meeting:
//!
//! | name | kind | what it is for |
//! | --- | --- | --- |
//! | `<prefix>.configs` | stream queue, durable | the config log |
//! | `<prefix>.events` | topic exchange, durable | what masters do |
//! | `<prefix>.lease.<group>` | quorum queue, single active consumer | who acts on a group |
//! | `<prefix>.holder.<group>` | classic queue, transient, at most one message | who holds a group, for `erel config holders` |
//! | `<prefix>.halt.<group>` | quorum queue, at most one message | the group's halt (or retry) record |
//! | `<prefix>.handover.<group>` | classic queue, transient, at most one message | a deploy's request to take the group over |
//! | `<prefix>.watch.<tag>` | exclusive, auto-delete | one `erel watch` |
//!
//! On a RabbitMQ cluster, what must outlive a node is replicated: the config log (a
//! stream, replicated to every node by default), the leases and the halt records
//! (quorum queues, replicated to every node up to RabbitMQ's default group size). Both
//! confirm a publish once a majority of their replicas hold it. What is transient
//! lives on one node and is deleted by the broker when that node is lost; it is
//! declared again by its next writer. [`Broker`] takes a list of nodes and moves to the
//! next one when a connection fails.
//!
//! Every queue is named here: lapin cannot re-declare server-named queues after a
//! reconnection, and this module reconnects on its own (see [`daemon`]).

pub mod control;
pub mod daemon;
pub mod events;
pub(crate) mod leadership;
pub mod log;
pub(crate) mod state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::error::{Error, Result};

/// The prefix of every name on the broker unless told otherwise.
pub const DEFAULT_PREFIX: &str = "erel";
/// The longest prefix accepted (names must fit AMQP's 255-byte short strings).
pub const MAX_PREFIX_LEN: usize = 64;
/// How long opening a connection (TCP, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one attempt of [`Broker::on_connection`]'s work may take: the longest wait
/// in it (a publish waiting for the publisher lease, then reading its revision back) with
/// two connection timeouts of margin. A broker node lost mid-operation has left a publish
/// waiting on the client library with no socket and no timer left to wake it; bounded, it
/// fails with a message instead of never returning.
const ATTEMPT_LIMIT: Duration = log::PUBLISHER_LEASE_WAIT
    .saturating_add(log::READ_BACK_WAIT)
    .saturating_add(CONNECT_TIMEOUT)
    .saturating_add(CONNECT_TIMEOUT);
/// How long closing a channel or a connection may take; the close is best effort.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `work`'s outcome, or, when it has not ended within `limit`, an [`Error::Amqp`] naming
/// the broker `target` and the `role` whose work it was.
async fn within_limit<T>(
    limit: Duration,
    target: String,
    role: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(Error::Amqp {
            target,
            action: format!("the {role}'s work on one connection"),
            message: format!(
                "no answer from the broker within {} s (a node lost while it waited, \
                     say); the connection was abandoned",
                limit.as_secs()
            ),
        })
    })
}

/// How long a connection may be seen out of the connected state before the work waiting
/// on it is given up ([`unless_lost`]).
const LOST_GRACE: Duration = CLOSE_WAIT;
/// How often [`unless_lost`] looks at a connection's state.
const STATUS_POLL: Duration = Duration::from_secs(1);

/// `work`'s outcome, or an [`Error::Amqp`] naming `target` and `action` once `connection`
/// has been out of the connected state (any other state of lapin's `ConnectionStatus`:
/// connecting, reconnecting, closing, closed, errored) for [`LOST_GRACE`]; `work` is then
/// dropped, so it must be work that may stop at any await (broker work, not a local
/// change half made).
///
/// For work that waits on the AMQP client library for as long as the connection lives (a
/// consumer read, a master's session): a broker node lost mid-operation has left a future
/// of the library waiting with no socket and no timer left to wake it, while the
/// connection's state said it was gone. Missed heartbeats put a silently cut connection in
/// the error state, so this bounds that case too.
pub(crate) async fn unless_lost<T>(
    connection: &Connection,
    target: &str,
    action: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        outcome = work => outcome,
        () = lost_for(|| connection.status().connected(), LOST_GRACE, STATUS_POLL) => {
            Err(lost_error(connection, target, action))
        }
    }
}

/// What [`unless_lost`] says of `connection` found lost while `action` on `target`.
fn lost_error(connection: &Connection, target: &str, action: &str) -> Error {
    Error::Amqp {
        target: target.to_string(),
        action: action.to_string(),
        message: format!(
            "the connection to the broker was lost (the client library says it is {}) and \
             nothing reported it within {} s; the connection was abandoned",
            state_of(connection.status()),
            LOST_GRACE.as_secs()
        ),
    }
}

/// A connection's state in words, from lapin's `ConnectionStatus`.
fn state_of(status: &lapin::ConnectionStatus) -> &'static str {
    if status.connected() {
        "connected"
    } else if status.errored() {
        "in error"
    } else if status.closing() {
        "closing"
    } else if status.closed() {
        "closed"
    } else if status.reconnecting() {
        "reconnecting"
    } else if status.connecting() {
        "connecting"
    } else {
        "in an unknown state"
    }
}

/// Resolves once `connected` has answered false at every look, one each `poll`, for at
/// least `grace`; never while it answers true at least once a `grace`.
async fn lost_for(connected: impl Fn() -> bool, grace: Duration, poll: Duration) {
    let mut since: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        if connected() {
            since = None;
        } else if now.duration_since(*since.get_or_insert(now)) >= grace {
            return;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Awaits `close` (a channel's or a connection's close) for at most [`CLOSE_WAIT`],
/// ignoring its outcome: a node already gone never answers a close, and nothing waits on
/// it but the command's own end.
pub(crate) async fn best_effort_close<T>(close: impl std::future::Future<Output = T>) {
    let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
}
/// The AMQP heartbeat asked for when the URL does not say: a silently cut connection is
/// noticed within about twice this.
const DEFAULT_HEARTBEAT_SECS: u16 = 5;

/// Where the broker is and which names this cluster uses on it.
///
/// The broker may be one node or several nodes of one RabbitMQ cluster, given as a
/// list of URLs ([`Broker::new`]). Every connection goes to the node that answered last
/// (the first of the list to begin with); when it does not answer, the next ones are
/// tried in the list's order, each for at most [`CONNECT_TIMEOUT`]. A connection that
/// failed after it was open makes the next connection start at the following node
/// ([`Broker::fail_over`]). Clones share which node is current.
#[derive(Clone)]
pub struct Broker {
    nodes: Arc<[String]>,
    current: Arc<AtomicUsize>,
    names: Names,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.display_url())
            .field("prefix", &self.names.prefix)
            .finish()
    }
}

impl Broker {
    /// A broker at `urls` with names under `prefix`.
    ///
    /// `urls` is one AMQP URI (`amqp://user:password@host:port/vhost`, as the RabbitMQ
    /// URI specification writes it) or a comma-separated list of them, one per node of
    /// one RabbitMQ cluster (`amqp://h1:5672,amqp://h2:5672`); blanks around each entry
    /// are ignored, and a comma inside a password is written `%2C`.
    ///
    /// # Errors
    ///
    /// [`Error::Amqp`] for an empty list, an empty entry or an entry that is not an AMQP
    /// URI (naming it, its password hidden, and its place in the list), and for a
    /// prefix that is empty, too long, or holds anything but ASCII letters, digits, `-`,
    /// `_` and `.`.
    pub fn new(urls: impl Into<String>, prefix: impl Into<String>) -> Result<Self> {
        let urls = urls.into();
        let prefix = prefix.into();
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !prefix.chars().all(name_char) {
            return Err(Error::Amqp {
                target: redact_list(&urls),
                action: format!("using the name prefix '{prefix}'"),
                message: format!(
                    "a prefix is 1 to {MAX_PREFIX_LEN} ASCII letters, digits, '-', '_' or '.'"
                ),
            });
        }
        let nodes = parse_nodes(&urls)?;
        Ok(Broker {
            nodes: nodes.into(),
            current: Arc::new(AtomicUsize::new(0)),
            names: Names { prefix },
        })
    }

    /// The names this cluster uses on the broker.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The URLs, comma-separated, with their passwords hidden, as errors and logs
    /// show them.
    pub fn display_url(&self) -> String {
        self.nodes
            .iter()
            .map(|url| redact(url))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many nodes were given.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Opens a connection; `role` names it in the broker's connection list. Tries the
    /// current node first, then the others in the list's order; the one that answers
    /// becomes the current node.
    ///
    /// # Errors
    ///
    /// [`Error::Amqp`] when no node answers: with one node, its error; with several,
    /// every node's error in one message.
    pub(crate) async fn connect(&self, role: &str) -> Result<Connection> {
        let count = self.nodes.len();
        let start = self.current.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (start + step) % count;
            let url = &self.nodes[index];
            match connect_node(url, role).await {
                Ok(connection) => {
                    self.current.store(index, Ordering::Relaxed);
                    if count > 1 {
                        tracing::info!(node = %redact(url), role, "connected to broker node {} of {count}", index + 1);
                    }
                    return Ok(connection);
                }
                Err(e) if count == 1 => return Err(e),
                Err(e) => {
                    if step + 1 < count {
                        tracing::warn!("{e}; trying the next broker node");
                    }
                    failures.push(e.to_string());
                }
            }
        }
        Err(Error::Amqp {
            target: self.display_url(),
            action: "connecting".to_string(),
            message: format!("no broker node answered: {}", failures.join("; ")),
        })
    }

    /// Makes the next connection start at the node after the current one: for a
    /// connection to the current node that failed after it was open (the node stopped,
    /// or the network to it was cut), so that the next attempt does not wait on it.
    pub(crate) fn fail_over(&self) {
        let count = self.nodes.len();
        if count > 1 {
            let next = (self.current.load(Ordering::Relaxed) + 1) % count;
            self.current.store(next, Ordering::Relaxed);
        }
    }

    /// Runs `work` on a channel of a connection of its own, which `role` names in the
    /// broker's connection list, then closes both whatever `work` returned. While the
    /// broker answers that a queue's replicas are not ready ([`replicas_not_ready`]),
    /// `work` runs again on a new connection ([`Broker::on_connection`]).
    pub(crate) async fn on_channel<T>(
        &self,
        role: &str,
        mut work: impl AsyncFnMut(&lapin::Channel) -> Result<T>,
    ) -> Result<T> {
        self.on_connection(role, async |connection| {
            let channel = open_channel(connection, &self.display_url()).await?;
            let outcome = work(&channel).await;
            best_effort_close(channel.close(200, "done".into())).await;
            outcome
        })
        .await
    }

    /// Runs `work` on a connection of its own, which `role` names in the broker's
    /// connection list, then closes it whatever `work` returned. When `work` fails
    /// because the broker answered that a queue's replicas are not ready yet
    /// ([`replicas_not_ready`]: a stream or quorum queue just declared on a cluster
    /// whose members are still starting), it runs again on a new connection (RabbitMQ
    /// closes the connection with that answer), for up to [`REPLICAS_READY_WAIT`]
    /// ([`retry_not_ready`]). `work` must be safe to run again from its start.
    ///
    /// # Errors
    ///
    /// `work`'s error; when the broker still answered "not ready" after the wait, an
    /// [`Error::Amqp`] naming the queue and how long it waited.
    pub(crate) async fn on_connection<T>(
        &self,
        role: &str,
        mut work: impl AsyncFnMut(&Connection) -> Result<T>,
    ) -> Result<T> {
        retry_not_ready(REPLICAS_READY_WAIT, not_ready_backoff(), async || {
            let connection = self.connect(role).await?;
            let outcome =
                within_limit(ATTEMPT_LIMIT, self.display_url(), role, work(&connection)).await;
            best_effort_close(connection.close(200, "done".into())).await;
            outcome
        })
        .await
    }

    /// Deletes every queue and exchange of this prefix (the config log included) that
    /// the given groups use. For tests and for retiring a cluster; nothing of another
    /// prefix is touched.
    pub async fn delete_everything(&self, groups: &[String]) -> Result<()> {
        let mut queues = vec![self.names.configs()];
        for group in groups {
            queues.push(self.names.lease(group)?);
            queues.push(self.names.holder(group)?);
            queues.push(self.names.halt(group)?);
            queues.push(self.names.handover(group)?);
        }
        let exchange = self.names.events();
        // On a connection of its own, bounded as every such attempt is.
        self.on_channel("cleanup", async |channel| {
            for queue in &queues {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| amqp_error(queue, "deleting the queue", e))?;
            }
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| amqp_error(&exchange, "deleting the exchange", e))?;
            Ok(())
        })
        .await
    }
}

/// The names of one cluster's queues and exchanges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The config log: `<prefix>.configs`.
    pub fn configs(&self) -> String {
        format!("{}.configs", self.prefix)
    }

    /// The publisher lease: `<prefix>.publisher`, an exclusive queue that one
    /// `erel config publish` at a time holds ([`log::publish`]).
    pub fn publisher(&self) -> String {
        format!("{}.publisher", self.prefix)
    }

    /// The events exchange: `<prefix>.events`.
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// A group's lease queue: `<prefix>.lease.<group>`.
    pub fn lease(&self, group: &str) -> Result<String> {
        self.per_group("lease", group)
    }

    /// A group's holder record: `<prefix>.holder.<group>`.
    pub fn holder(&self, group: &str) -> Result<String> {
        self.per_group("holder", group)
    }

    /// A group's halt record: `<prefix>.halt.<group>`.
    pub fn halt(&self, group: &str) -> Result<String> {
        self.per_group("halt", group)
    }

    /// A group's hand-over requests: `<prefix>.handover.<group>`.
    pub fn handover(&self, group: &str) -> Result<String> {
        self.per_group("handover", group)
    }

    /// One watcher's queue: `<prefix>.watch.<tag>`.
    pub fn watch(&self, tag: &str) -> String {
        let tag: String = tag.chars().filter(|c| name_char(*c)).take(100).collect();
        format!("{}.watch.{tag}", self.prefix)
    }

    fn per_group(&self, kind: &str, group: &str) -> Result<String> {
        if group.is_empty() || group.len() > 150 || !group.chars().all(name_char) {
            return Err(Error::Amqp {
                target: format!("{}.{kind}.{group}", self.prefix),
                action: "naming a group's queue".to_string(),
                message:
                    "a group name used over AMQP is 1 to 150 ASCII letters, digits, '-', '_' or '.'"
                        .to_string(),
            });
        }
        Ok(format!("{}.{kind}.{group}", self.prefix))
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// `url` with the password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Every entry of a comma-separated `urls` list, checked to be an AMQP URI.
fn parse_nodes(urls: &str) -> Result<Vec<String>> {
    let entries: Vec<&str> = urls.split(',').map(str::trim).collect();
    let count = entries.len();
    let mut nodes = Vec::with_capacity(count);
    for (index, entry) in entries.into_iter().enumerate() {
        let place = if count == 1 {
            "parsing the URL".to_string()
        } else {
            format!("parsing broker address {} of {count}", index + 1)
        };
        if entry.is_empty() {
            return Err(Error::Amqp {
                target: redact_list(urls),
                action: place,
                message: "the address is empty (two commas in a row, or one at an end?)"
                    .to_string(),
            });
        }
        entry.parse::<AMQPUri>().map_err(|e| Error::Amqp {
            target: redact(entry),
            action: place,
            message: e,
        })?;
        nodes.push(entry.to_string());
    }
    Ok(nodes)
}

/// Opens a connection to the node at `url`, within [`CONNECT_TIMEOUT`].
async fn connect_node(url: &str, role: &str) -> Result<Connection> {
    let mut uri: AMQPUri = url.parse().map_err(|e: String| Error::Amqp {
        target: redact(url),
        action: "parsing the URL".to_string(),
        message: e,
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    let peer = format!("{}:{}", uri.authority.host, uri.authority.port);
    let properties =
        ConnectionProperties::default().with_connection_name(format!("erel {role}").into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(connect_error(url, &peer, e)),
        Err(_) => Err(Error::Amqp {
            target: redact(url),
            action: "connecting".to_string(),
            message: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// A failed connection to the node at `url` (`peer` is its `host:port`). A peer whose
/// first bytes are not an AMQP frame (the parser fails) or that names another protocol
/// version is said not to be an AMQP 0-9-1 broker, with the client's own error after:
/// the usual cause is a URL pointing at another service's port.
fn connect_error(url: &str, peer: &str, e: lapin::Error) -> Error {
    match e.kind() {
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
            Error::Amqp {
                target: redact(url),
                action: "connecting".to_string(),
                message: format!(
                    "the peer at {peer} did not answer as an AMQP 0-9-1 broker (is this the broker's port?): {e}"
                ),
            }
        }
        _ => amqp_error(redact(url), "connecting", e),
    }
}

/// A comma-separated list of URLs, each with its password hidden.
fn redact_list(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// How long an operation waits for the replicas of a queue it uses to be ready
/// ([`replicas_not_ready`]): as long as `erel config publish` waits for another
/// publish's lease ([`log::PUBLISHER_LEASE_WAIT`], 30 s). On a RabbitMQ cluster started a
/// moment before, the members of a stream just declared take a few seconds to start.
pub const REPLICAS_READY_WAIT: Duration = log::PUBLISHER_LEASE_WAIT;

/// The pauses between attempts while replicas are not ready: from 100 ms, doubling up
/// to 2 s.
fn not_ready_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
}

/// What RabbitMQ answers, with `RESOURCE_ERROR` (506, which closes the connection) or,
/// to a `basic.consume`, with `PRECONDITION_FAILED` (406, which closes the channel),
/// when a stream or quorum queue that exists is not ready to be used yet: its members
/// are still starting, as on a cluster where it was just declared, or its coordinator
/// is being elected (RabbitMQ 3.x `rabbit_channel` and `rabbit_stream_queue`).
const NOT_READY_ANSWERS: [&str; 4] = [
    "Stream not found",
    "Stream coordinator unavailable",
    "does not have a running local replica",
    "does not have a replica on the local node",
];

/// Whether `error` is the broker saying that a queue's replicas are not ready yet
/// ([`NOT_READY_ANSWERS`] after `RESOURCE_ERROR` or `PRECONDITION_FAILED`), or failing with `INTERNAL_ERROR`
/// (541, which closes the connection): RabbitMQ's answer when the channel's process
/// crashed, as it does to a publisher confirm on a stream whose members are still
/// starting on a cluster started a moment before. Both go away by themselves and are
/// worth trying again on a new connection, for a bounded time. Any other error is not.
pub(crate) fn replicas_not_ready(error: &Error) -> bool {
    match error {
        Error::Amqp { message, .. } => {
            message.contains(": INTERNAL_ERROR")
                || ["RESOURCE_ERROR - ", "PRECONDITION_FAILED - "]
                    .iter()
                    .any(|code| {
                        message.split_once(code).is_some_and(|(_, said)| {
                            NOT_READY_ANSWERS.iter().any(|a| said.contains(a))
                        })
                    })
        }
        _ => false,
    }
}

/// Runs `attempt` until it returns anything but a [`replicas_not_ready`] error, pausing
/// between attempts as `backoff` says; once `wait` has passed since the first attempt,
/// the last such error is returned, saying how long it waited.
///
/// # Errors
///
/// `attempt`'s error that is not "not ready" at once; after `wait`, an [`Error::Amqp`]
/// with the last error's target (the queue) and action, and a message that says the
/// broker's answer and how many seconds were waited.
pub(crate) async fn retry_not_ready<T>(
    wait: Duration,
    mut backoff: Backoff,
    mut attempt: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let started = tokio::time::Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let error = match attempt().await {
            Err(e) if replicas_not_ready(&e) => e,
            other => return other,
        };
        let waited = started.elapsed();
        if waited >= wait {
            return Err(match error {
                Error::Amqp {
                    target,
                    action,
                    message,
                } => Error::Amqp {
                    message: format!(
                        "{message}; the queue's replicas were still not ready after {:.1} s and {tries} attempts",
                        waited.as_secs_f64()
                    ),
                    target,
                    action,
                },
                other => other,
            });
        }
        let pause = backoff.next_delay().min(wait - waited);
        tracing::info!(
            "{error}; its replicas are not ready yet, trying again in {} ms",
            pause.as_millis()
        );
        tokio::time::sleep(pause).await;
    }
}

/// An [`Error::Amqp`] naming what was at fault (a queue, an exchange, the URL).
pub(crate) fn amqp_error(target: impl Into<String>, action: &str, e: lapin::Error) -> Error {
    Error::Amqp {
        target: target.into(),
        action: action.to_string(),
        message: e.to_string(),
    }
}

/// Opens a channel on `connection`; a failure names `target`.
pub(crate) async fn open_channel(
    connection: &lapin::Connection,
    target: &str,
) -> Result<lapin::Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| amqp_error(target, "opening a channel", e))
}

/// Declares `queue` exclusive and auto-delete (AMQP 0-9-1 `queue.declare`): it is the
/// declaring connection's alone and the broker deletes it when that connection closes.
/// While it stands, another connection's declare of the same name fails with
/// `RESOURCE_LOCKED` (405), which makes such a queue a lease. The broker's error is
/// returned as is, for the caller to tell that case apart.
pub(crate) async fn declare_exclusive(
    channel: &lapin::Channel,
    queue: &str,
) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares `queue` as a durable **quorum queue** with `args` (RabbitMQ's replicated
/// queue type, Raft-based: on a cluster it has a replica on up to every node, stays
/// available while a majority of them is up, and confirms a publish once a majority
/// holds it). Returns how many messages it holds ready. A failure is an
/// [`Error::Amqp`] naming `queue` and `action`.
pub(crate) async fn declare_replicated(
    channel: &lapin::Channel,
    queue: &str,
    mut args: Vec<(&str, AMQPValue)>,
    action: &str,
) -> Result<u32> {
    args.push(("x-queue-type", text_value("quorum")));
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            table(args),
        )
        .await
        .map_err(|e| declare_error(queue, action, e))?;
    Ok(declared.message_count())
}

/// [`amqp_error`] for a failed `queue.declare`; when the broker refused it because a
/// queue of that name exists with other settings (`PRECONDITION_FAILED - inequivalent
/// arg`), the message says how to get out of it.
pub(crate) fn declare_error(queue: &str, action: &str, e: lapin::Error) -> Error {
    let mut error = amqp_error(queue, action, e);
    if let Error::Amqp { message, .. } = &mut error {
        if message.contains("inequivalent arg") {
            message.push_str(
                " (the queue exists with other settings, such as the classic queues of an \
                 older erel: with the masters stopped, delete it and start them again)",
            );
        }
    }
    error
}

/// Queue arguments from `(key, value)` pairs.
pub(crate) fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

/// A string header or argument.
pub(crate) fn text_value(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

/// An integer header, whatever integer type the sender chose.
pub(crate) fn integer(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// A string header.
pub(crate) fn string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Exponential backoff between reconnection attempts, with a little jitter so that many
/// masters do not knock on a restarted broker in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(10));
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter_ms = u64::from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        ) % (delay.as_millis() as u64 / 4 + 1);
        delay + Duration::from_millis(jitter_ms)
    }

    /// Back to `initial`, after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
    }
}

/// Publishes `body` to `queue` through the default exchange with `properties`, and
/// waits for the broker's confirm where the channel asked for confirms (AMQP 0-9-1
/// `basic.publish`; RabbitMQ publisher confirms). A failure is an [`Error::Amqp`]
/// naming `queue` and `action`.
pub(crate) async fn publish_to_queue(
    channel: &lapin::Channel,
    queue: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
    action: &str,
) -> Result<()> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .map_err(|e| amqp_error(queue, action, e))?
        .await
        .map_err(|e| amqp_error(queue, action, e))?;
    Ok(())
}

/// `value` as JSON, the body of a record for `queue`; a failure is an [`Error::Amqp`]
/// naming `queue` and `action`.
pub(crate) fn encode_json(
    queue: &str,
    action: &str,
    value: &impl serde::Serialize,
) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Amqp {
        target: queue.to_string(),
        action: action.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_that_never_ends_fails_at_the_limit_naming_the_broker_and_the_role() {
        let limit = Duration::from_millis(50);
        let began = std::time::Instant::now();
        let never = std::future::pending::<Result<()>>();
        let error = within_limit(limit, "node-1".into(), "config publisher", never)
            .await
            .expect_err("bounded");
        assert!(began.elapsed() >= limit);
        let text = error.to_string();
        assert!(text.contains("node-1"), "{text}");
        assert!(text.contains("config publisher"), "{text}");
        assert!(text.contains("no answer from the broker within"), "{text}");

        let done = within_limit(limit, "node-1".into(), "config publisher", async { Ok(7) });
        assert_eq!(done.await.expect("within the limit"), 7);
        let failed = within_limit(limit, "node-1".into(), "config publisher", async {
            Err::<(), _>(Error::Usage("its own error".into()))
        });
        assert!(failed
            .await
            .expect_err("its own")
            .to_string()
            .contains("its own error"));
    }

    #[tokio::test]
    async fn a_close_nobody_answers_is_given_up_after_the_close_wait() {
        let began = std::time::Instant::now();
        best_effort_close(std::future::pending::<()>()).await;
        let waited = began.elapsed();
        assert!(waited >= CLOSE_WAIT, "{waited:?}");
        // A bound, not a figure: a busy machine may add to it.
        assert!(waited < CLOSE_WAIT * 4, "{waited:?}");
    }

    #[tokio::test]
    async fn a_connection_out_of_the_connected_state_for_the_grace_is_found_lost() {
        let (grace, poll) = (Duration::from_millis(200), Duration::from_millis(10));
        let began = std::time::Instant::now();
        lost_for(|| false, grace, poll).await;
        let waited = began.elapsed();
        assert!(waited >= grace, "{waited:?}");
        // A bound, not a figure: a busy machine may add to it.
        assert!(waited < grace * 20, "{waited:?}");
    }

    #[tokio::test]
    async fn a_connection_connected_again_within_the_grace_is_not_found_lost() {
        let (grace, poll) = (Duration::from_millis(200), Duration::from_millis(10));
        // Out of the connected state one look in four: each such streak is timed from its
        // own first look, and the next look ends it, however late a busy machine makes it.
        let looks = AtomicUsize::new(0);
        let flapping = || looks.fetch_add(1, Ordering::Relaxed) % 4 == 3;
        let outcome = tokio::time::timeout(grace * 5, lost_for(flapping, grace, poll)).await;
        assert!(outcome.is_err(), "found lost while it came back");
        assert!(looks.load(Ordering::Relaxed) > 4, "it kept looking");
    }

    /// Work that waits on a real broker's connection, which is then cut under it: the work
    /// is a future nothing will ever wake, as the client library's was after a node was
    /// lost. Needs RabbitMQ at `EREL_TEST_AMQP` (default `amqp://guest:guest@127.0.0.1:5672/%2f`;
    /// `scripts/test.sh` starts it).
    #[tokio::test]
    async fn work_waiting_on_a_connection_that_is_cut_ends_naming_the_target_and_the_action() {
        let url = std::env::var("EREL_TEST_AMQP")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
        let mut uri: AMQPUri = url.parse().expect("EREL_TEST_AMQP is an AMQP URL");
        let broker = format!("{}:{}", uri.authority.host, uri.authority.port);
        // A proxy in front of the broker, whose connection the test cuts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut upstream = tokio::net::TcpStream::connect(&broker)
            .await
            .unwrap_or_else(|e| panic!("this test needs RabbitMQ at {broker}: {e}"));
        let proxy = tokio::spawn(async move {
            let (mut client, _) = listener.accept().await.expect("accept");
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        uri.authority.host = addr.ip().to_string();
        uri.authority.port = addr.port();
        let connection = Connection::connect_uri(uri, ConnectionProperties::default())
            .await
            .expect("connect through the proxy");

        let work = unless_lost(
            &connection,
            "t-lost.configs",
            "reading the config log",
            std::future::pending::<Result<()>>(),
        );
        tokio::pin!(work);
        // Connected: the work goes on past the grace.
        let going = tokio::time::timeout(LOST_GRACE + STATUS_POLL * 2, &mut work).await;
        assert!(going.is_err(), "ended while connected: {going:?}");

        proxy.abort();
        let began = std::time::Instant::now();
        let ended = tokio::time::timeout(LOST_GRACE * 6, work)
            .await
            .expect("given up once the connection was cut");
        let text = ended.expect_err("the work fails").to_string();
        assert!(began.elapsed() >= LOST_GRACE, "{:?}", began.elapsed());
        for part in [
            "t-lost.configs",
            "reading the config log",
            "connection to the broker was lost",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }

    #[test]
    fn an_attempt_may_take_every_wait_a_publish_makes() {
        assert!(ATTEMPT_LIMIT > log::PUBLISHER_LEASE_WAIT + log::READ_BACK_WAIT + CONNECT_TIMEOUT);
    }

    #[test]
    fn names_carry_the_prefix() {
        let broker = Broker::new("amqp://guest:guest@127.0.0.1:5672/%2f", "t-1").expect("valid");
        let names = broker.names();
        assert_eq!(names.configs(), "t-1.configs");
        assert_eq!(names.events(), "t-1.events");
        assert_eq!(names.lease("web").expect("valid group"), "t-1.lease.web");
        assert_eq!(names.holder("web").expect("valid group"), "t-1.holder.web");
        assert!(names.lease("we b").is_err());
        assert_eq!(names.watch("m 1/x"), "t-1.watch.m1x");
    }

    #[test]
    fn bad_prefixes_and_urls_are_refused() {
        assert!(Broker::new("amqp://127.0.0.1", "").is_err());
        assert!(Broker::new("amqp://127.0.0.1", "a b").is_err());
        assert!(Broker::new("amqp://127.0.0.1", "x".repeat(65)).is_err());
        assert!(Broker::new("not a url", "erel").is_err());
    }

    #[test]
    fn a_list_of_nodes_is_read_in_order() {
        let broker = Broker::new(
            " amqp://u:pw@h1:5672/%2f , amqp://h2:5673,amqp://h3",
            "erel",
        )
        .expect("valid list");
        assert_eq!(broker.node_count(), 3);
        assert_eq!(
            broker.display_url(),
            "amqp://u:***@h1:5672/%2f,amqp://h2:5673,amqp://h3"
        );
        broker.fail_over();
        assert_eq!(broker.current.load(Ordering::Relaxed), 1);
        let clone = broker.clone();
        clone.fail_over();
        clone.fail_over();
        assert_eq!(
            broker.current.load(Ordering::Relaxed),
            0,
            "clones share the node"
        );
        let single = Broker::new("amqp://h1", "erel").expect("valid");
        single.fail_over();
        assert_eq!(single.current.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_bad_entry_in_the_list_is_named() {
        let e = Broker::new("amqp://h1,ftp://u:secret@h2", "erel")
            .expect_err("ftp is no AMQP scheme")
            .to_string();
        assert!(e.contains("broker address 2 of 2"), "{e}");
        assert!(e.contains("ftp://u:***@h2"), "{e}");
        assert!(!e.contains("secret"), "{e}");

        let e = Broker::new("amqp://h1,,amqp://h3", "erel")
            .expect_err("an empty entry")
            .to_string();
        assert!(e.contains("broker address 2 of 3"), "{e}");
        assert!(e.contains("empty"), "{e}");

        let e = Broker::new("amqp://h1,", "erel")
            .expect_err("a trailing comma")
            .to_string();
        assert!(e.contains("broker address 2 of 2"), "{e}");

        let e = Broker::new("amqp://h1:notaport", "erel")
            .expect_err("a bad port")
            .to_string();
        assert!(e.contains("parsing the URL"), "{e}");
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        let broker = Broker::new("amqp://u:pw@h/v", "erel").expect("valid");
        assert!(!format!("{broker:?}").contains("pw"));
    }

    #[test]
    fn a_queue_declared_with_other_settings_says_how_to_get_out_of_it() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
        let refusal = |text: &str| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                text.into(),
            )))
        };
        let said = declare_error(
            "erel.lease.web",
            "declaring the lease queue",
            refusal(
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue \
                 'erel.lease.web' in vhost '/': received 'quorum' but current is 'classic'",
            ),
        )
        .to_string();
        assert!(said.contains("erel.lease.web"), "{said}");
        assert!(said.contains("delete it"), "{said}");
        let other = declare_error("q", "declaring", refusal("ACCESS_REFUSED - no")).to_string();
        assert!(!other.contains("delete it"), "{other}");
    }

    /// The broker's `text`, as lapin gives a refusal of `kind`, for `t.configs`.
    fn refused(kind: lapin::protocol::AMQPErrorKind, text: &str) -> Error {
        use lapin::protocol::AMQPError;
        let e = lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
            kind,
            text.into(),
        )));
        amqp_error("t.configs", "publishing a config", e)
    }

    fn resource_error(text: &str) -> Error {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError};
        refused(AMQPErrorKind::Hard(AMQPHardError::RESOURCEERROR), text)
    }

    #[test]
    fn replicas_not_ready_is_told_from_other_refusals() {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        for text in [
            "RESOURCE_ERROR - Stream not found for queue 't.configs' in vhost '/'",
            "RESOURCE_ERROR - Stream coordinator unavailable for queue 't.configs' in vhost '/'",
            "RESOURCE_ERROR - queue 't.configs' in vhost '/' does not have a running local replica",
            "RESOURCE_ERROR - queue 't.configs' in vhost '/' does not have a replica on the local node",
        ] {
            assert!(replicas_not_ready(&resource_error(text)), "{text}");
        }
        // As a publisher confirm on a stream just declared through another node failed.
        let internal = refused(
            AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::INTERNALERROR),
            "INTERNAL_ERROR",
        );
        assert!(replicas_not_ready(&internal), "{internal}");
        // As a consume of a stream just declared on a single broker was refused.
        let consume = refused(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED - queue 'queue 't.configs' in vhost '/'' does not have a \
             replica on the local node",
        );
        assert!(replicas_not_ready(&consume), "{consume}");
        let others = [
            refused(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                "NOT_FOUND - no queue 't.configs' in vhost '/'",
            ),
            refused(
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 't.configs'",
            ),
            resource_error("RESOURCE_ERROR - cannot declare queue 't.configs': queue limit"),
            // The words alone, not from the broker's RESOURCE_ERROR, are not its answer.
            Error::ConfigRefused("Stream not found".to_string()),
            Error::Amqp {
                target: "t.configs".to_string(),
                action: "reading".to_string(),
                message: "Stream not found".to_string(),
            },
        ];
        for error in others {
            assert!(!replicas_not_ready(&error), "{error}");
        }
    }

    #[tokio::test]
    async fn not_ready_answers_are_retried_until_they_stop() {
        let fast = || Backoff::new(Duration::from_millis(10), Duration::from_millis(20));
        // Not ready twice, then done: the third attempt's answer.
        let mut attempts = 0;
        let outcome = retry_not_ready(Duration::from_secs(60), fast(), async || {
            attempts += 1;
            if attempts < 3 {
                Err(resource_error(
                    "RESOURCE_ERROR - Stream not found for queue 't.configs' in vhost '/'",
                ))
            } else {
                Ok(attempts)
            }
        })
        .await;
        assert_eq!(outcome.expect("ready on the third attempt"), 3);

        // Any other error is returned at once.
        let mut attempts = 0;
        let outcome: Result<()> = retry_not_ready(Duration::from_secs(60), fast(), async || {
            attempts += 1;
            Err(resource_error("RESOURCE_ERROR - something else"))
        })
        .await;
        assert!(outcome.is_err());
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn replicas_never_ready_give_up_after_the_wait_naming_the_queue() {
        let wait = Duration::from_millis(300);
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
        let started = std::time::Instant::now();
        let mut attempts = 0u32;
        let outcome: Result<()> = retry_not_ready(wait, backoff, async || {
            attempts += 1;
            Err(resource_error(
                "RESOURCE_ERROR - queue 't.configs' in vhost '/' does not have a running local replica",
            ))
        })
        .await;
        let took = started.elapsed();
        assert!(attempts > 2, "tried again: {attempts}");
        assert!(took >= wait, "waited the whole {wait:?}: {took:?}");
        // The last pause is cut to what is left of the wait (a busy machine may add
        // to it, never a pause of its own).
        assert!(took < wait + Duration::from_secs(5), "{took:?}");
        let error = outcome.expect_err("never ready");
        let Error::Amqp {
            target,
            action,
            message,
        } = &error
        else {
            panic!("an AMQP error: {error}");
        };
        assert_eq!(target, "t.configs");
        assert_eq!(action, "publishing a config");
        assert!(
            message.contains("does not have a running local replica"),
            "{message}"
        );
        assert!(message.contains("still not ready after "), "{message}");
        assert!(
            message.contains(&format!("{attempts} attempts")),
            "{message}"
        );
    }

    #[test]
    fn integers_of_any_width_are_read() {
        assert_eq!(integer(&AMQPValue::LongLongInt(7)), Some(7));
        assert_eq!(integer(&AMQPValue::LongInt(-1)), None);
        assert_eq!(integer(&text_value(" 12 ")), Some(12));
        assert_eq!(integer(&AMQPValue::Boolean(true)), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(126));
        let second = backoff.next_delay();
        assert!(second >= Duration::from_millis(200));
        let third = backoff.next_delay();
        assert!(third >= Duration::from_millis(350) && third <= Duration::from_millis(438));
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(130));
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TCP server on a free port that answers every connection as an HTTP server
    /// answers a request it cannot read; its address.
    async fn http_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_peer_that_is_not_an_amqp_broker_is_named_as_such() {
        let addr = http_server().await;
        let broker =
            Broker::new(format!("amqp://guest:secret@{addr}/%2f"), "t-http").expect("valid URL");
        let error = broker.connect("test").await.expect_err("HTTP is not AMQP");
        let text = error.to_string();
        assert!(
            text.contains(&format!(
                "the peer at {addr} did not answer as an AMQP 0-9-1 broker"
            )),
            "{text}"
        );
        assert!(!text.contains("secret"), "the password is hidden: {text}");

        // In a list of nodes, the same words name the node at fault.
        let other = http_server().await;
        let list = format!("amqp://guest:guest@{addr}/%2f,amqp://guest:guest@{other}/%2f");
        let broker = Broker::new(list, "t-http").expect("valid list");
        let text = broker
            .connect("test")
            .await
            .expect_err("no node is a broker")
            .to_string();
        for peer in [addr, other] {
            assert!(
                text.contains(&format!(
                    "the peer at {peer} did not answer as an AMQP 0-9-1 broker"
                )),
                "{text}"
            );
        }
    }
}
