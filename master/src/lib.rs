//! The erel master, as a library the `erel` binary and the tests share.
//!
//! - [`amqp`]: configs over RabbitMQ: the config log, the AMQP daemon, leases, events.
//! - [`cli`]: the `erel` program (`main.rs` only calls it).
//! - [`client`]: the client for one agent: each command with its typed answer, the
//!   resumable `WriteFile`, the one retry policy.
//! - [`bundle`]: sealed bundles for air gaps: a signed revision and its archives.
//! - [`cluster`]: the cluster file, validated once into a [`cluster::Plan`].
//! - [`rollout`]: the rolling cold deploy: pure decisions, one I/O driver, the daemon loop.
//! - [`release`]: release tarballs built on the spot (the demo's beat release).
//! - [`digest_cache`]: remembered sha256 digests of local files.
//! - [`error`]: the one error type.
//! - [`started`]: the record of releases this master started, for `status`'s argv/env.
//! - [`metrics`]: the daemon's Prometheus metrics and the endpoint that serves them.
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod amqp;
pub mod bundle;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod digest_cache;
mod durable;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod release;
pub mod rollout;
mod rotate;
pub mod started;

pub use client::{AgentClient, HostAddr};
pub use error::{Error, Result};
