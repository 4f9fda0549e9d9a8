//! Raw cluster file → [`Plan`], once. Each check names the field it is about.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use erel_proto::text::floor_char_boundary;
use erel_proto::{Request, Sha256, WriteFile};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::contents::{hash_and_list, release_versions, Versions, MAX_ENTRIES};
use super::raw::{RawCluster, RawGroup, RawHost, RawPort};
use super::{
    Archive, ArchiveLookup, Drain, GroupPlan, GroupState, Health, HostPlan, HttpProbe, Plan,
    TcpProbe, DEFAULT_DEADLINE_SECS, DEFAULT_DRAIN_PATH, DEFAULT_DRAIN_TIMEOUT_SECS,
    DEFAULT_HEALTH_PATH, DEFAULT_MIN_UP_SECS, DEFAULT_PASSES, DEFAULT_STOP_GRACE_SECS,
    MAX_REVISION, MAX_WAIT_SECS, RESTARTED_AT_MAX_AHEAD,
};
use crate::digest_cache::sha256_file;
use crate::error::{Error, Result};
use crate::HostAddr;

/// Archive file extensions considered when a group names only a sha256.
const ARCHIVE_EXTENSIONS: [&str; 3] = [".tar.gz", ".tgz", ".tar"];

/// Builds errors for one file.
struct Fault<'a> {
    origin: &'a str,
}

impl Fault<'_> {
    /// An archive that is not (yet) usable where it is looked up.
    fn unavailable(&self, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::ArchiveUnavailable {
            file: self.origin.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn at(&self, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Cluster {
            file: self.origin.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Validates `text` (see [`Plan::parse_as_of`] for `now`).
pub(super) fn plan(
    text: &str,
    origin: &str,
    lookup: &ArchiveLookup,
    now: Option<OffsetDateTime>,
) -> Result<Plan> {
    let raw: RawCluster = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    let fault = Fault { origin };
    if raw.revision > MAX_REVISION {
        return Err(fault.at(
            "revision",
            format!(
                "{} is above the largest revision, {MAX_REVISION} (2^53 - 1)",
                raw.revision
            ),
        ));
    }

    let memberships = raw
        .host
        .iter()
        .enumerate()
        .map(|(index, host)| memberships(&fault, index, host, &raw.group))
        .collect::<Result<Vec<_>>>()?;

    let mut groups = BTreeMap::new();
    for (name, group) in &raw.group {
        let hosts = memberships
            .iter()
            .filter(|m| m.iter().any(|(_, g)| g == name))
            .count();
        groups.insert(
            name.clone(),
            group_plan(&fault, name, group, hosts, lookup, now)?,
        );
    }

    let mut hosts = Vec::with_capacity(raw.host.len());
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut addrs: HashMap<&str, usize> = HashMap::new();
    for (index, (host, member_of)) in raw.host.iter().zip(&memberships).enumerate() {
        hosts.push(host_plan(&fault, index, host, member_of, &groups)?);
        if let Some(first) = ids.insert(host.id.as_str(), index) {
            return Err(fault.at(
                format!("host[{index}].id"),
                format!("duplicate host id '{}' (also host[{first}])", host.id),
            ));
        }
        if let Some(first) = addrs.insert(host.addr.as_str(), index) {
            return Err(fault.at(
                format!("host[{index}].addr"),
                format!(
                    "duplicate address '{}' (also host[{first}], '{}')",
                    host.addr, raw.host[first].id
                ),
            ));
        }
    }

    for (index, host) in hosts.iter().enumerate() {
        for group in host.groups.iter().filter_map(|g| groups.get(g)) {
            let ports = [
                ("health.tcp", group.health.tcp.as_ref()),
                ("health.http", group.health.http.as_ref().map(|h| &h.port)),
                ("drain.http", group.drain.as_ref().map(|d| &d.port)),
            ];
            for (key, port) in ports {
                if let Some(spec @ TcpProbe::Variable(name)) = port {
                    if group.port_on(spec, host).is_none_or(|p| p == 0) {
                        return Err(fault.at(
                            format!("host[{index}].env.{name}"),
                            format!(
                                "group.{}.{key} uses ${name}, which host '{}' does not set to a port number",
                                group.name, host.id
                            ),
                        ));
                    }
                }
            }
        }
    }

    for (index, host) in hosts.iter().enumerate() {
        for group in host.groups.iter().filter_map(|g| groups.get(g)) {
            check_frames(&fault, index, host, group)?;
        }
    }

    Ok(Plan {
        origin: origin.to_string(),
        revision: raw.revision,
        hosts,
        groups,
    })
}

/// The groups a host names, each with the field that names it: `group = "g"` or
/// `groups = [...]` (not both, no group twice, each defined in the file); neither is a
/// waiting host. Checked before the groups, so that a misspelt name is reported as
/// such rather than as the group it leaves empty.
fn memberships(
    fault: &Fault<'_>,
    index: usize,
    host: &RawHost,
    defined: &BTreeMap<String, RawGroup>,
) -> Result<Vec<(String, String)>> {
    let named = named_groups(fault, index, host)?;
    for (at, name) in &named {
        if !defined.contains_key(name) {
            let known: Vec<&str> = defined.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "the file defines no [group.NAME]".to_string()
            } else {
                format!("groups: {}", known.join(", "))
            };
            return Err(fault.at(at, format!("unknown group '{name}' ({known})")));
        }
    }
    Ok(named)
}

fn named_groups(fault: &Fault<'_>, index: usize, host: &RawHost) -> Result<Vec<(String, String)>> {
    match (&host.group, &host.groups) {
        (Some(_), Some(_)) => Err(fault.at(
            format!("host[{index}]"),
            format!(
                "host '{}' sets both `group` and `groups`: use `groups = [...]` alone for several",
                host.id
            ),
        )),
        (Some(group), None) => Ok(vec![(format!("host[{index}].group"), group.clone())]),
        (None, None) => Ok(Vec::new()),
        (None, Some(names)) => {
            let mut out: Vec<(String, String)> = Vec::with_capacity(names.len());
            for (at, name) in names.iter().enumerate() {
                if out.iter().any(|(_, seen)| seen == name) {
                    return Err(fault.at(
                        format!("host[{index}].groups[{at}]"),
                        format!("host '{}' names group '{name}' twice", host.id),
                    ));
                }
                out.push((format!("host[{index}].groups[{at}]"), name.clone()));
            }
            Ok(out)
        }
    }
}

fn host_plan(
    fault: &Fault<'_>,
    index: usize,
    host: &RawHost,
    member_of: &[(String, String)],
    groups: &BTreeMap<String, GroupPlan>,
) -> Result<HostPlan> {
    let field = |name: &str| format!("host[{index}].{name}");
    erel_certs::validate_host_id(&host.id)
        .map_err(|e| fault.at(field("id"), format!("bad host id '{}': {e}", host.id)))?;
    format!("{}@{}", host.id, host.addr)
        .parse::<HostAddr>()
        .map_err(|e| match e {
            Error::InvalidHost { reason, .. } => {
                fault.at(field("addr"), format!("'{}': {reason}", host.addr))
            }
            other => fault.at(field("addr"), other.to_string()),
        })?;
    let mut releases: Vec<(&str, &GroupPlan)> = Vec::new();
    for (at, name) in member_of {
        let Some(group) = groups.get(name) else {
            // `memberships` checked every name against the file's groups.
            continue;
        };
        if let Some((_, other)) = releases.iter().find(|(_, g)| g.release == group.release) {
            return Err(fault.at(
                at,
                format!(
                    "groups '{}' and '{name}' both run release '{}' on host '{}': a host runs one version of a release",
                    other.name, group.release, host.id
                ),
            ));
        }
        releases.push((at, group));
    }
    check_env(fault, &field("env"), &host.env)?;
    Ok(HostPlan {
        id: host.id.clone(),
        addr: host.addr.clone(),
        groups: member_of.iter().map(|(_, name)| name.clone()).collect(),
        env: host.env.clone(),
    })
}

fn group_plan(
    fault: &Fault<'_>,
    name: &str,
    group: &RawGroup,
    hosts: usize,
    lookup: &ArchiveLookup,
    now: Option<OffsetDateTime>,
) -> Result<GroupPlan> {
    let field = |sub: &str| format!("group.{name}.{sub}");
    if !is_group_name(name) {
        return Err(fault.at(
            format!("group.{name}"),
            "not a valid group name: use letters, digits, '-' and '_'",
        ));
    }
    check_name(fault, &field("release"), "release name", &group.release)?;
    check_name(fault, &field("version"), "version", &group.version)?;

    let max_in_flight = group.max_in_flight.unwrap_or(1);
    if max_in_flight == 0 {
        return Err(fault.at(
            field("max_in_flight"),
            "must be at least 1 (it is the number of hosts switched at once)",
        ));
    }
    let max_failed = usize::try_from(group.max_failed.unwrap_or(0)).unwrap_or(usize::MAX);
    let state = match group.state.as_deref() {
        None | Some("running") => GroupState::Running,
        Some("stopped") => GroupState::Stopped,
        Some(other) => {
            return Err(fault.at(
                field("state"),
                format!("'{other}' is not a state: use \"running\" or \"stopped\""),
            ))
        }
    };
    // A running group with no host is a mistake (a misspelt or forgotten member); a
    // stopped one may keep no host: its release is stopped wherever it still runs.
    if hosts == 0 && state == GroupState::Running {
        return Err(fault.at(
            format!("group.{name}"),
            format!("no host names group '{name}': add it to a host's `group`/`groups`, mark it `state = \"stopped\"`, or remove the group"),
        ));
    }
    let canaries = match group.canaries {
        // A stopped group switches nothing: its canaries do not count.
        Some(_) if state == GroupState::Stopped => 0,
        Some(canaries) => {
            let canaries = usize::try_from(canaries).unwrap_or(usize::MAX);
            if canaries > hosts {
                return Err(fault.at(
                    field("canaries"),
                    format!("{canaries} canaries but the group has only {hosts} host(s)"),
                ));
            }
            canaries
        }
        None if state == GroupState::Stopped => 0,
        None => 1,
    };

    let stop_grace_secs = group.stop_grace_secs.unwrap_or(DEFAULT_STOP_GRACE_SECS);
    let limit = erel_proto::rules::MAX_STOP_GRACE.as_secs();
    if stop_grace_secs > limit {
        return Err(fault.at(
            field("stop_grace_secs"),
            format!("{stop_grace_secs} is above the agent's limit of {limit}"),
        ));
    }

    let health = health(fault, name, group)?;
    let drain = drain(fault, name, group)?;

    if let Some(first) = group.argv.first() {
        if first.is_empty() || first.starts_with('/') || first.split('/').any(|c| c == "..") {
            return Err(fault.at(
                field("argv"),
                format!("'{first}' must be a path relative to the version directory, without '..'"),
            ));
        }
    }
    check_env(fault, &field("env"), &group.env)?;
    if let Some(user) = &group.user {
        if user.is_empty() || user.contains(['\0', '/', ':']) {
            return Err(fault.at(field("user"), format!("'{user}' is not a user name")));
        }
    }

    let restarted_at = match &group.restarted_at {
        None => None,
        Some(text) => {
            Some(restarted_at(text, now).map_err(|why| fault.at(field("restarted_at"), why))?)
        }
    };

    let archive = archive(fault, name, group, lookup)?;
    Ok(GroupPlan {
        name: name.to_string(),
        release: group.release.clone(),
        version: group.version.clone(),
        archive,
        argv: group.argv.clone(),
        env: group.env.clone(),
        user: group.user.clone(),
        max_in_flight: usize::try_from(max_in_flight).unwrap_or(usize::MAX),
        canaries,
        stop_grace: Duration::from_secs(stop_grace_secs),
        health,
        max_failed,
        state,
        drain,
        restarted_at,
    })
}

/// Every request a rollout sends for `group` on host `index` fits in one frame: the
/// `Start` (argv, the merged env, user, name, version), and the `WriteFile` and
/// `Unpack` of the archive. Each is encoded as the agent would receive it
/// ([`crate::client::oversized`]); a refusal names the field with the largest value.
fn check_frames(fault: &Fault<'_>, index: usize, host: &HostPlan, group: &GroupPlan) -> Result<()> {
    let limit = erel_proto::MAX_FRAME;
    let start = group.start_request(host, &group.version);
    if let Some(len) = crate::client::oversized(&Request::Start(start.clone())) {
        let (part, part_len) = crate::client::largest_start_part(&start);
        let field = match part.strip_prefix("env.") {
            Some(key) if host.env.contains_key(key) => format!("host[{index}].env.{key}"),
            Some(key) => format!("group.{}.env.{key}", group.name),
            None if part.starts_with("argv") => format!("group.{}.argv", group.name),
            None if part == "name" => format!("group.{}.release", group.name),
            None => format!("group.{}.{part}", group.name),
        };
        return Err(fault.at(
            field,
            format!(
                "the Start request for group '{}' on host '{}' would be {len} bytes, over the agent's {limit}-byte frame limit ({part} is {part_len} bytes)",
                group.name, host.id
            ),
        ));
    }
    if let Some(archive) = &group.archive {
        let dest = GroupPlan::archive_dest(archive);
        let requests = [
            Request::WriteFile(WriteFile {
                path: dest.clone(),
                mode: 0o644,
                size: u64::MAX,
                sha256: Some(archive.sha256),
            }),
            crate::client::unpack_request(&dest, &group.version_dir(), Some(archive.sha256)),
        ];
        for request in &requests {
            if let Some(len) = crate::client::oversized(request) {
                return Err(fault.at(
                    format!("group.{}.archive", group.name),
                    format!(
                        "the {} request for '{dest}' would be {len} bytes, over the agent's {limit}-byte frame limit",
                        request.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `restarted_at`: an RFC 3339 instant (RFC 3339 section 5.6, as `time`'s `Rfc3339`
/// reads it, any offset), kept in UTC, at most [`RESTARTED_AT_MAX_AHEAD`] ahead of
/// `now` (not measured when `now` is `None`). `Err` says what is wrong with `text`.
pub(super) fn restarted_at(
    text: &str,
    now: Option<OffsetDateTime>,
) -> std::result::Result<OffsetDateTime, String> {
    let at = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        format!("'{text}' is not an RFC 3339 instant such as \"2026-11-29T12:00:00Z\": {e}")
    })?;
    let at = at.to_offset(UtcOffset::UTC);
    let Some(now) = now else {
        return Ok(at);
    };
    if at - now > RESTARTED_AT_MAX_AHEAD {
        let now = now.format(&Rfc3339).unwrap_or_else(|_| now.to_string());
        return Err(format!(
            "'{text}' is more than {} minutes ahead of {now}, the time it is judged by \
             (this machine's clock; for a config read from the log, when it was published): \
             write the instant the restart is asked at, such as the time of writing",
            RESTARTED_AT_MAX_AHEAD.as_secs() / 60
        ));
    }
    Ok(at)
}

fn health(fault: &Fault<'_>, name: &str, group: &RawGroup) -> Result<Health> {
    let field = |sub: &str| format!("group.{name}.health.{sub}");
    let Some(raw) = &group.health else {
        return Ok(Health {
            tcp: None,
            http: None,
            passes: DEFAULT_PASSES,
            min_up: Duration::from_secs(DEFAULT_MIN_UP_SECS),
            deadline: Duration::from_secs(DEFAULT_DEADLINE_SECS),
        });
    };
    let tcp = match &raw.tcp {
        None => None,
        Some(port) => Some(port_spec(fault, &field("tcp"), port)?),
    };
    let http = match &raw.http {
        None => {
            if raw.path.is_some() {
                return Err(fault.at(
                    field("path"),
                    "is set without health.http, the port it is requested on",
                ));
            }
            None
        }
        Some(port) => Some(HttpProbe {
            port: port_spec(fault, &field("http"), port)?,
            path: http_path(
                fault,
                &field("path"),
                raw.path.as_deref(),
                DEFAULT_HEALTH_PATH,
            )?,
        }),
    };
    let passes = match raw.passes {
        None => DEFAULT_PASSES,
        Some(_) if tcp.is_none() && http.is_none() => {
            return Err(fault.at(
                field("passes"),
                "counts probe passes, but the group has no health.http or health.tcp probe",
            ));
        }
        Some(n) => match u32::try_from(n) {
            Ok(n) if n >= 1 => n,
            _ => return Err(fault.at(field("passes"), format!("{n} is not a count of at least 1"))),
        },
    };
    let min_up = raw.min_up_secs.unwrap_or(DEFAULT_MIN_UP_SECS);
    at_most_a_day(fault, &field("min_up_secs"), min_up)?;
    let deadline = raw
        .deadline_secs
        .unwrap_or(DEFAULT_DEADLINE_SECS.max(min_up));
    if deadline < min_up {
        return Err(fault.at(
            field("deadline_secs"),
            format!("deadline {deadline}s is shorter than min_up_secs {min_up}s: no release could ever pass"),
        ));
    }
    if deadline == 0 {
        return Err(fault.at(field("deadline_secs"), "must be at least 1"));
    }
    at_most_a_day(fault, &field("deadline_secs"), deadline)?;
    Ok(Health {
        tcp,
        http,
        passes,
        min_up: Duration::from_secs(min_up),
        deadline: Duration::from_secs(deadline),
    })
}

/// Refuses a wait of more than [`MAX_WAIT_SECS`].
fn at_most_a_day(fault: &Fault<'_>, field: &str, secs: u64) -> Result<()> {
    if secs > MAX_WAIT_SECS {
        return Err(fault.at(
            field,
            format!("{secs} seconds is more than the limit of {MAX_WAIT_SECS} (one day)"),
        ));
    }
    Ok(())
}

fn drain(fault: &Fault<'_>, name: &str, group: &RawGroup) -> Result<Option<Drain>> {
    let field = |sub: &str| format!("group.{name}.drain.{sub}");
    let Some(raw) = &group.drain else {
        return Ok(None);
    };
    let timeout = raw.timeout_secs.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECS);
    if timeout == 0 {
        return Err(fault.at(field("timeout_secs"), "must be at least 1"));
    }
    at_most_a_day(fault, &field("timeout_secs"), timeout)?;
    Ok(Some(Drain {
        port: port_spec(fault, &field("http"), &raw.http)?,
        path: http_path(
            fault,
            &field("path"),
            raw.path.as_deref(),
            DEFAULT_DRAIN_PATH,
        )?,
        timeout: Duration::from_secs(timeout),
    }))
}

/// A port number, or `"$VAR"` / `"${VAR}"` naming a variable of each host's env.
fn port_spec(fault: &Fault<'_>, field: &str, port: &RawPort) -> Result<TcpProbe> {
    match port {
        RawPort::Number(port) => match u16::try_from(*port) {
            Ok(0) => Err(fault.at(field, "port 0 cannot be connected to")),
            Ok(port) => Ok(TcpProbe::Port(port)),
            Err(_) => Err(fault.at(field, format!("{port} is not a port number"))),
        },
        RawPort::Variable(text) => {
            let name = text
                .strip_prefix("${")
                .and_then(|t| t.strip_suffix('}'))
                .or_else(|| text.strip_prefix('$'))
                .filter(|n| {
                    !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
            match name {
                Some(name) => Ok(TcpProbe::Variable(name.to_string())),
                None => Err(fault.at(
                    field,
                    format!("'{text}' is neither a port number nor \"$VARIABLE\""),
                )),
            }
        }
    }
}

/// An HTTP request path: absolute (`/...`), printable ASCII without spaces or a
/// fragment (RFC 9112 section 3.2.1, origin-form).
fn http_path(fault: &Fault<'_>, field: &str, path: Option<&str>, default: &str) -> Result<String> {
    let path = path.unwrap_or(default);
    let printable = path.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || !printable || path.contains('#') {
        return Err(fault.at(
            field,
            format!("'{path}' is not an absolute request path (like \"/health\", printable ASCII, no spaces or '#')"),
        ));
    }
    Ok(path.to_string())
}

fn archive(
    fault: &Fault<'_>,
    name: &str,
    group: &RawGroup,
    lookup: &ArchiveLookup,
) -> Result<Option<Archive>> {
    let archive_field = format!("group.{name}.archive");
    let sha_field = format!("group.{name}.sha256");
    let expected =
        match &group.sha256 {
            Some(text) => Some(Sha256::from_hex(text).ok_or_else(|| {
                fault.at(&sha_field, format!("'{text}' is not 64 hex characters"))
            })?),
            None => None,
        };
    if group.archive.is_none() && expected.is_none() {
        return Err(fault.at(
            format!("group.{name}"),
            "names no archive: give `archive` (a path), `sha256`, or both",
        ));
    }
    if let Some(archive) = &group.archive {
        if archive.is_empty() {
            return Err(fault.at(&archive_field, "is empty"));
        }
    }
    let (search_dirs, named): (Vec<PathBuf>, Option<PathBuf>) = match lookup {
        ArchiveLookup::Unchecked => return Ok(None),
        ArchiveLookup::Beside(dir) => (
            vec![dir.clone(), dir.join("artifacts")],
            group.archive.as_ref().map(|a| dir.join(a)),
        ),
        ArchiveLookup::Artifacts(dir) => {
            let named = match &group.archive {
                Some(archive) => {
                    let file_name = Path::new(archive).file_name().ok_or_else(|| {
                        fault.at(&archive_field, format!("'{archive}' names no file"))
                    })?;
                    Some(dir.join(file_name))
                }
                None => None,
            };
            (vec![dir.clone()], named)
        }
    };

    let (path, sha256, versions) = match (named, expected) {
        (Some(path), expected) => {
            let meta = std::fs::metadata(&path).map_err(|e| {
                fault.unavailable(&archive_field, format!("{}: {e}", path.display()))
            })?;
            if !meta.is_file() {
                // What stands under that name now may yet be replaced by the archive.
                return Err(fault.unavailable(
                    &archive_field,
                    format!("{} is not a regular file", path.display()),
                ));
            }
            // One read of the archive gives both its digest and its versions.
            let (actual, versions) = hash_and_list(&path).map_err(|e| {
                fault.unavailable(
                    &archive_field,
                    format!("{}: cannot read: {e}", path.display()),
                )
            })?;
            if let Some(expected) = expected {
                if expected != actual {
                    // Possibly a copy still under way: the file may yet become right.
                    return Err(fault.unavailable(
                        &sha_field,
                        format!(
                            "wrong: {} has sha256 {actual}, the file says {expected}",
                            path.display()
                        ),
                    ));
                }
            }
            (path, actual, Some(versions))
        }
        (None, Some(expected)) => {
            let path = find_by_sha256(&search_dirs, expected).ok_or_else(|| {
                let dirs: Vec<String> = search_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                fault.unavailable(
                    &sha_field,
                    format!("no archive with sha256 {expected} in {}", dirs.join(" or ")),
                )
            })?;
            (path, expected, None)
        }
        (None, None) => {
            return Err(fault.at(format!("group.{name}"), "names no archive"));
        }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_name(fault, &archive_field, "archive file name", &file_name).map_err(|e| {
        match (e, &group.archive) {
            // Found by sha256 alone: the name is the one this machine's file has, which
            // may yet be renamed; the config names no file.
            (Error::Cluster { field, message, .. }, None) => fault.unavailable(field, message),
            (e, _) => e,
        }
    })?;
    check_version(fault, name, group, &path, versions).map_err(|e| match (e, expected) {
        // Found by name alone: the verdict is about the file that holds the name now
        // (another build, replaced later), not about the config, which names no bytes.
        (Error::Cluster { field, message, .. }, None) => fault.unavailable(field, message),
        (e, _) => e,
    })?;
    Ok(Some(Archive {
        path,
        file_name,
        sha256,
    }))
}

/// Refuses a `version` the archive's `releases/<version>/` directories do not include.
/// An archive without any (not the relx layout) says nothing and passes; so does one
/// this listing cannot read: the agent's unpacker is the authority on what it accepts
/// and refuses such an archive itself, naming the entry. `listed`: the archive's
/// versions when already listed, else the archive is read here.
fn check_version(
    fault: &Fault<'_>,
    name: &str,
    group: &RawGroup,
    path: &Path,
    listed: Option<std::io::Result<Versions>>,
) -> Result<()> {
    let listed = listed.unwrap_or_else(|| release_versions(path));
    let Ok(versions) = listed else {
        return Ok(());
    };
    if versions.found.is_empty() || versions.found.contains(&group.version) {
        return Ok(());
    }
    let among = if versions.truncated {
        format!(" among its first {MAX_ENTRIES} entries")
    } else {
        String::new()
    };
    Err(fault.at(
        format!("group.{name}.version"),
        format!(
            "group '{name}' gives version '{}' but {} holds releases/{}/{among} (version(s) found: {})",
            group.version,
            path.display(),
            versions.found.join("/, releases/"),
            versions.found.join(", ")
        ),
    ))
}

/// The first archive-like regular file in `dirs` whose content has this digest.
fn find_by_sha256(dirs: &[PathBuf], expected: Sha256) -> Option<PathBuf> {
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| ARCHIVE_EXTENSIONS.iter().any(|ext| n.ends_with(ext)))
                    && p.is_file()
            })
            .collect();
        candidates.sort();
        if let Some(found) = candidates
            .into_iter()
            .find(|p| sha256_file(p).ok() == Some(expected))
        {
            return Some(found);
        }
    }
    None
}

/// The agent's rule for release names and versions ([`erel_proto::rules`]).
fn check_name(fault: &Fault<'_>, field: &str, what: &str, name: &str) -> Result<()> {
    erel_proto::rules::check_release_name(name).map_err(|_| {
        fault.at(
            field,
            format!("'{name}' is not a valid {what}: use letters, digits, '.', '_', '-', '+'; no leading '.'"),
        )
    })
}

fn is_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

fn check_env(fault: &Fault<'_>, field: &str, env: &BTreeMap<String, String>) -> Result<()> {
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(fault.at(format!("{field}.{key}"), "not a variable name"));
        }
        if key.starts_with("EREL_") {
            return Err(fault.at(
                format!("{field}.{key}"),
                "EREL_ variables are set by the agent itself",
            ));
        }
        if value.contains('\0') {
            return Err(fault.at(format!("{field}.{key}"), "the value holds a NUL byte"));
        }
    }
    Ok(())
}

/// A TOML syntax or type error, with its line and column and the key it is about:
/// the key on the line the error points at, under the nearest `[table]` header.
pub(super) fn toml_error(origin: &str, text: &str, error: &toml::de::Error) -> Error {
    let (field, position) = match error.span() {
        Some(span) => {
            // The span is in bytes and may point inside a multi-byte character.
            let start = floor_char_boundary(text, span.start);
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
            let column = text[line_start..start].chars().count() + 1;
            let line_text = text[line_start..].lines().next().unwrap_or("");
            (
                key_at(before, line_text, start - line_start),
                format!("line {line}, column {column}: "),
            )
        }
        None => (String::new(), String::new()),
    };
    Error::Cluster {
        file: origin.to_string(),
        field,
        message: format!("{position}{}", error.message().trim()),
    }
}

/// `table.key` for the key assigned on `line`, whose table header is the last one in
/// `before`; empty when the line assigns nothing. When the error is at byte `at` of the
/// line inside an inline table's value (`health = { passes = 0 }`), the inner key is
/// added: `table.health.passes`.
fn key_at(before: &str, line: &str, at: usize) -> String {
    let Some((key, _)) = line.split_once('=') else {
        return String::new();
    };
    let mut key = key.trim().trim_matches('"').to_string();
    let upto = line.get(..at).unwrap_or(line);
    if let Some(open) = upto.find('{') {
        let inner = &upto[open + 1..];
        if let Some(eq) = inner.rfind('=') {
            // Only when the error is in that key's value, not after it.
            let name = inner[..eq]
                .rsplit([',', '{'])
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            if !name.is_empty() && !inner[eq + 1..].contains(',') {
                key = format!("{key}.{name}");
            }
        }
    }
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key,
    }
}
