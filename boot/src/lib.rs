//! The erel boot agent: installed once per host, never changed.
//!
//! - [`server`]: the mutual-TLS listener, the handshake and the one `match` that
//!   dispatches the five commands.
//! - `peers`: the separate, per-address budget of peers still in the TLS handshake.
//! - [`write_file`], [`unpack`]: the file-system commands, safe and atomic.
//! - [`supervisor`]: `Start`, `Stop`, restarts, crash-loop detection, adoption.
//! - [`retention`]: old versions and archives removed.
//! - [`root`]: the root directory and the rules for every path the master names.
//! - [`cli`]: the program itself (`main.rs` only calls it).
//! - [`config`]: flags and `boot.toml` validated once.
//! - [`settings`]: limits and supervision settings; [`error`]: the one error type.
//! - [`agent_lock`]: one agent per root, held for the agent's lifetime.
#![deny(missing_docs)]

pub mod agent_lock;
pub mod cli;
pub mod config;
pub mod error;
mod peers;
pub mod retention;
pub mod root;
pub mod server;
pub mod settings;
pub mod supervisor;
pub mod unpack;
pub mod write_file;

pub use error::{Error, Result};
