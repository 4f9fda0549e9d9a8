//! One typed call per agent command, for tests that talk to an agent over one
//! connection: each builds its request and goes through [`AgentClient::command`], the
//! path the master's own commands take (the bound per command, `Busy` asked again).

use std::time::Duration;

use erel_master::client::{stop_request, unpack_request};
use erel_master::{AgentClient, Result};
use erel_proto::{Ping, Pong, Request, Sha256, Start, Started, Stopped, Unpacked};

/// `Ping`, `Unpack`, `Start` and `Stop` on an [`AgentClient`].
pub trait AgentCommands {
    /// `Ping`: the agent's live state.
    async fn ping(&mut self) -> Result<Pong>;
    /// `Unpack`: unpacks `archive` into `dest` on the agent.
    async fn unpack(
        &mut self,
        archive: &str,
        dest: &str,
        sha256: Option<Sha256>,
    ) -> Result<Unpacked>;
    /// `Start`: runs a release version, supervised.
    async fn start(&mut self, start: Start) -> Result<Started>;
    /// `Stop`: SIGTERM to the release's group, SIGKILL after `grace`.
    async fn stop(&mut self, name: &str, grace: Duration) -> Result<Stopped>;
}

impl AgentCommands for AgentClient {
    async fn ping(&mut self) -> Result<Pong> {
        self.command(Request::Ping(Ping {})).await
    }

    async fn unpack(
        &mut self,
        archive: &str,
        dest: &str,
        sha256: Option<Sha256>,
    ) -> Result<Unpacked> {
        self.command(unpack_request(archive, dest, sha256)).await
    }

    async fn start(&mut self, start: Start) -> Result<Started> {
        self.command(Request::Start(start)).await
    }

    async fn stop(&mut self, name: &str, grace: Duration) -> Result<Stopped> {
        self.command(stop_request(name, grace)).await
    }
}
