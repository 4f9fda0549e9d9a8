//! The cluster file exactly as written: serde structs that refuse unknown fields.
//! Nothing here is checked beyond TOML types; [`super::validate`] turns this into a
//! [`super::Plan`] once.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub revision: u64,
    #[serde(default)]
    pub host: Vec<RawHost>,
    #[serde(default)]
    pub group: BTreeMap<String, RawGroup>,
}

/// One `[[host]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    pub id: String,
    pub addr: String,
    /// The one group of this host; `groups` names several. Neither: the host waits.
    pub group: Option<String>,
    /// The groups of this host, each running its own release.
    pub groups: Option<Vec<String>>,
    /// Variables for this host only, merged over the group's `env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One `[group.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub release: String,
    pub version: String,
    pub archive: Option<String>,
    pub sha256: Option<String>,
    #[serde(default)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub max_in_flight: Option<u32>,
    pub canaries: Option<u32>,
    pub stop_grace_secs: Option<u64>,
    pub health: Option<RawHealth>,
    pub max_failed: Option<u32>,
    pub state: Option<String>,
    pub drain: Option<RawDrain>,
    /// An RFC 3339 instant: releases running since before it are restarted.
    pub restarted_at: Option<String>,
}

/// `health = { http, path, passes, tcp, min_up_secs, deadline_secs }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub http: Option<RawPort>,
    pub path: Option<String>,
    pub passes: Option<i64>,
    pub tcp: Option<RawPort>,
    pub min_up_secs: Option<u64>,
    pub deadline_secs: Option<u64>,
}

/// `drain = { http, path, timeout_secs }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDrain {
    pub http: RawPort,
    pub path: Option<String>,
    pub timeout_secs: Option<u64>,
}

/// Only the revision, for a cheap look at a file that may have changed.
#[derive(Debug, Deserialize)]
pub(super) struct RawRevision {
    pub revision: u64,
}

/// A probe port: a number, or `"$VAR"` naming a variable of each host's env.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawPort {
    Number(i64),
    Variable(String),
}
