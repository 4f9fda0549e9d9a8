//! Connections as the master opens them: a [`Connector`] holds what every connection
//! needs (TLS, this master's name, a timeout per phase), and a [`HostSession`] is one
//! host's connection, opened on first use, whose commands are tried again as
//! [`RetryPolicy`] says (every agent command is safe to repeat).

use std::sync::Arc;
use std::time::Duration;

use erel_proto::{Ping, Pong, Request, Sha256, Start, Started, Stopped, Unpacked, Written};

use super::budget::answer_budget;
use super::retry::{Retry, RetryPolicy};
use super::{
    gave_up, stop_request, unpack_request, AgentClient, Answer, HostAddr, PhaseTimeouts, SharedFile,
};
use crate::error::{Error, Result};

/// How long each phase of opening a connection (TCP; TLS and `Hello`) may take by
/// default: the one default, for a rollout, where an unreachable host must not hold up
/// its group, and for every other command alike.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Opens authenticated connections to agents.
#[derive(Clone)]
pub struct Connector {
    /// The master's TLS client configuration.
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// The name this master gives in `Hello`.
    pub(crate) master_name: String,
    /// How long each phase of opening a connection may take.
    pub(crate) timeouts: PhaseTimeouts,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("master_name", &self.master_name)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl Connector {
    /// A connector with [`DEFAULT_CONNECT_TIMEOUT`] for each phase of a connection.
    pub fn new(tls: Arc<rustls::ClientConfig>, master_name: impl Into<String>) -> Self {
        Connector {
            tls,
            master_name: master_name.into(),
            timeouts: PhaseTimeouts::both(DEFAULT_CONNECT_TIMEOUT),
        }
    }

    /// The same, with `limit` for each phase of opening a connection.
    pub fn with_connect_timeout(mut self, limit: Duration) -> Self {
        self.timeouts = PhaseTimeouts::both(limit);
        self
    }

    /// Connects to `host`, each phase within its timeout.
    pub async fn connect(&self, host: &HostAddr) -> Result<AgentClient> {
        AgentClient::connect_within(host, self.tls.clone(), &self.master_name, self.timeouts).await
    }
}

/// A host's connection, reopened as needed.
#[derive(Debug)]
pub(crate) struct HostSession {
    host: HostAddr,
    connector: Connector,
    client: Option<AgentClient>,
}

/// Runs `$call` with a connected client, tried again as [`RetryPolicy`] says: on the
/// same connection while the agent is busy, on a new one after a connection problem.
macro_rules! retrying {
    ($session:ident, |$client:ident| $call:expr) => {
        retrying!($session, RetryPolicy::new(), |$client| $call)
    };
    ($session:ident, $policy:expr, |$client:ident| $call:expr) => {{
        let began = tokio::time::Instant::now();
        let mut policy = $policy;
        loop {
            let outcome = match $session.connected().await {
                Ok($client) => $call.await,
                Err(e) => Err(e),
            };
            let error = match outcome {
                Ok(value) => break Ok(value),
                Err(error) => error,
            };
            match policy.after(&error, began.elapsed()) {
                Retry::Again(pause) => tokio::time::sleep(pause).await,
                Retry::Reconnect(pause) => {
                    $session.client = None;
                    tokio::time::sleep(pause).await;
                }
                Retry::GiveUp => {
                    if error.is_transient() {
                        $session.client = None;
                    }
                    break Err(gave_up(error, began.elapsed()));
                }
            }
        }
    }};
}

impl HostSession {
    /// A session for `host`; nothing is opened yet.
    pub(crate) fn new(host: HostAddr, connector: Connector) -> Self {
        HostSession {
            host,
            connector,
            client: None,
        }
    }

    /// The host.
    pub(crate) fn host(&self) -> &HostAddr {
        &self.host
    }

    async fn connected(&mut self) -> Result<&mut AgentClient> {
        if self.client.is_none() {
            self.client = Some(self.connector.connect(&self.host).await?);
        }
        self.client.as_mut().ok_or_else(|| Error::Protocol {
            host: self.host.id.clone(),
            message: "no connection".to_string(),
        })
    }

    /// One command, answered within the bound it has outside a rollout
    /// ([`answer_budget`]).
    pub(crate) async fn command<A: Answer>(&mut self, request: Request) -> Result<A> {
        let limit = answer_budget(&request);
        retrying!(self, |client| client.exchange(request.clone(), limit))
    }

    /// `Ping`, answered within `limit`.
    pub(crate) async fn ping(&mut self, limit: Duration) -> Result<Pong> {
        retrying!(self, |client| client
            .exchange(Request::Ping(Ping {}), limit))
    }

    /// `WriteFile` of an archive whose digest is known, pushed to many hosts at once and
    /// read once for all of them ([`SharedFile`]): nothing is sent when present, an
    /// interrupted transfer resumes.
    pub(crate) async fn push(&mut self, shared: &SharedFile, dest: &str) -> Result<Written> {
        // Another master may be pushing the same file: as patient as `erel push`.
        retrying!(self, RetryPolicy::for_push(), |client| client
            .write_shared(shared, dest, 0o644))
    }

    /// `Unpack`, answered within `limit`.
    pub(crate) async fn unpack(
        &mut self,
        archive: &str,
        dest: &str,
        sha256: Sha256,
        limit: Duration,
    ) -> Result<Unpacked> {
        let request = unpack_request(archive, dest, Some(sha256));
        retrying!(self, |client| client.exchange(request.clone(), limit))
    }

    /// `Start`, answered within `limit`.
    pub(crate) async fn start(&mut self, start: &Start, limit: Duration) -> Result<Started> {
        retrying!(self, |client| client
            .exchange(Request::Start(start.clone()), limit))
    }

    /// `Stop`, answered within `limit`.
    pub(crate) async fn stop(
        &mut self,
        name: &str,
        grace: Duration,
        limit: Duration,
    ) -> Result<Stopped> {
        let request = stop_request(name, grace);
        retrying!(self, |client| client.exchange(request.clone(), limit))
    }
}
