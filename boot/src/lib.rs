//! The erel boot agent: installed once per host, never changed.
//!
//! - [`server`]: the mutual-TLS listener, the handshake and the one `match` that
//!   dispatches the five commands.
//! - `peers`: the separate, per-address budget of peers still in the TLS handshake.
//! - [`write_file`], [`unpack`]: the file-system commands, safe and atomic.
//! - [`supervisor`]: `Start`, `Stop`, restarts, crash-loop detection, adoption.
//! - [`retention`]: old versions and archives removed.
//! - [`fs`]: the root directory, the rules for every path the master names, the
//!   release layout, durable writes and the agent's lock (one agent per root).
//! - [`digest`]: sha256 of a file or of its first bytes.
//! - [`cli`]: the program itself (`main.rs` only calls it).
//! - [`config`]: flags and `boot.toml` validated once.
//! - [`settings`]: limits and supervision settings; [`error`]: the one error type.
#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod digest;
pub mod error;
pub mod fs;
mod peers;
pub mod retention;
pub mod server;
pub mod settings;
pub mod supervisor;
pub mod unpack;
pub mod write_file;

pub use error::{Error, Result};
