use std::path::Path;
use std::time::Duration;

use super::*;
use crate::digest_cache::sha256_file;
use crate::fixtures::{groups_text, HOSTS_IN_SEVERAL_GROUPS};

const FILE: &str = "cluster.toml";

/// A directory holding `beat-0.2.0.tar.gz` and a valid cluster text naming it.
struct Fixture {
    dir: tempfile::TempDir,
    sha256: Sha256,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("releases")).expect("mkdir");
        let archive = dir.path().join("releases/beat-0.2.0.tar.gz");
        write_archive(&archive, &["bin/beat", "releases/0.2.0/start.boot"], true);
        let sha256 = sha256_file(&archive).expect("hash");
        Fixture { dir, sha256 }
    }

    fn text(&self) -> String {
        format!(
            r#"
revision = 7

[[host]]
id = "web-1"
addr = "10.0.0.11:7070"
group = "web"
env = {{ BEAT_PORT = "27183" }}

[[host]]
id = "web-2"
addr = "10.0.0.12:7070"
group = "web"

[group.web]
release = "beat"
version = "0.2.0"
archive = "releases/beat-0.2.0.tar.gz"
sha256 = "{}"
argv = ["bin/beat", "foreground"]
env = {{ NODE_NAME = "beat", BEAT_PORT = "27182" }}
max_in_flight = 1
canaries = 1
health = {{ tcp = 27182, min_up_secs = 5, deadline_secs = 60 }}
"#,
            self.sha256
        )
    }

    fn lookup(&self) -> ArchiveLookup {
        ArchiveLookup::Beside(self.dir.path().to_path_buf())
    }

    fn parse(&self, text: &str) -> Result<Plan> {
        Plan::parse(text, FILE, &self.lookup())
    }

    /// The error for the valid text with `from` replaced by `to`.
    fn error_with(&self, from: &str, to: &str) -> String {
        let text = self.text();
        assert!(text.contains(from), "fixture holds {from:?}");
        match self.parse(&text.replacen(from, to, 1)) {
            Ok(_) => panic!("{from:?} -> {to:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }
}

/// A tar (gzipped when `gzip`) holding an empty file at each of `paths`.
fn write_archive(path: &Path, paths: &[&str], gzip: bool) {
    let mut builder = tar::Builder::new(Vec::new());
    for name in paths {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, std::io::empty())
            .expect("append");
    }
    let tar = builder.into_inner().expect("finish");
    let bytes = if gzip {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&tar).expect("gzip");
        encoder.finish().expect("gzip")
    } else {
        tar
    };
    std::fs::write(path, bytes).expect("write");
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(error.contains(part), "{error:?} should mention {part:?}");
    }
}

/// The words of the error `result` must be (`what` says why, should it be `Ok`).
fn refusal<T: std::fmt::Debug, E: std::fmt::Display>(
    result: std::result::Result<T, E>,
    what: &str,
) -> String {
    result.expect_err(what).to_string()
}

/// A refusal of the cluster file: it starts with the file's name and mentions `parts`.
fn assert_refusal(error: &str, parts: &[&str]) {
    assert!(error.starts_with(FILE), "{error:?} names the file");
    assert_mentions(error, parts);
}

#[test]
fn a_valid_file_becomes_a_plan() {
    let fx = Fixture::new();
    let plan = fx.parse(&fx.text()).expect("valid");
    assert_eq!(plan.revision, 7);
    assert_eq!(plan.hosts.len(), 2);
    let web = &plan.groups["web"];
    assert_eq!(web.release, "beat");
    assert_eq!(web.max_in_flight, 1);
    assert_eq!(web.canaries, 1);
    assert_eq!(web.health.tcp, Some(TcpProbe::Port(27182)));
    assert_eq!(
        web.probe_port(plan.host("web-1").expect("web-1")),
        Some(27182)
    );
    assert_eq!(web.health.min_up, Duration::from_secs(5));
    let archive = web.archive.as_ref().expect("checked");
    assert_eq!(archive.file_name, "beat-0.2.0.tar.gz");
    assert_eq!(archive.sha256, fx.sha256);
    assert_eq!(
        GroupPlan::archive_dest(archive),
        "archives/beat-0.2.0.tar.gz"
    );
    assert_eq!(web.version_dir(), "releases/beat/0.2.0");

    let host_1 = plan.host("web-1").expect("web-1");
    assert_eq!(host_1.probe_host(), "10.0.0.11");
    let start = web.start_request(host_1, "0.2.0");
    assert!(
        start.env.contains(&("BEAT_PORT".into(), "27183".into())),
        "the host's env wins: {:?}",
        start.env
    );
    assert!(start.env.contains(&("NODE_NAME".into(), "beat".into())));
    let start_2 = web.start_request(plan.host("web-2").expect("web-2"), "0.1.0");
    assert!(start_2.env.contains(&("BEAT_PORT".into(), "27182".into())));
    assert_eq!(start_2.version, "0.1.0");
    assert_eq!(start_2.argv, vec!["bin/beat", "foreground"]);
}

#[test]
fn defaults_apply_when_fields_are_left_out() {
    let fx = Fixture::new();
    // The archive is found by sha256 alone, in the file's artifacts/ directory.
    crate::fixtures::artifacts_holding(
        fx.dir.path(),
        &fx.dir.path().join("releases/beat-0.2.0.tar.gz"),
        "beat-1.tar.gz",
    );
    let text = format!(
        "revision = 1\n[[host]]\nid = \"a-1\"\naddr = \"127.0.0.1:1\"\ngroup = \"g\"\n\
         [group.g]\nrelease = \"beat\"\nversion = \"0.2.0\"\nsha256 = \"{}\"\n",
        fx.sha256
    );
    let plan = fx.parse(&text).expect("valid");
    let g = &plan.groups["g"];
    assert_eq!(g.max_in_flight, 1);
    assert_eq!(g.canaries, 1);
    assert_eq!(g.health.tcp, None);
    assert_eq!(g.health.min_up, Duration::from_secs(DEFAULT_MIN_UP_SECS));
    assert_eq!(
        g.health.deadline,
        Duration::from_secs(DEFAULT_DEADLINE_SECS)
    );
    assert!(g.argv.is_empty(), "the agent's default argv");
    // Found by sha256 alone, in the file's artifacts/ directory.
    let found = g.archive.as_ref().expect("checked");
    assert_eq!(found.file_name, "beat-1.tar.gz");
    assert_eq!(found.sha256, fx.sha256);
}

#[test]
fn an_archive_named_only_by_sha256_is_found_in_the_artifacts() {
    let fx = Fixture::new();
    let artifacts = ArchiveLookup::Artifacts(fx.dir.path().join("releases"));
    let archive_found = |(from, to): (&str, &str), origin: &str, how: &str| {
        let plan = Plan::parse(&fx.text().replace(from, to), origin, &artifacts).expect(how);
        plan.groups["web"].archive.clone().expect("checked")
    };
    let by_sha256 = ("archive = \"releases/beat-0.2.0.tar.gz\"\n", "");
    let archive = archive_found(by_sha256, "amqp revision 7", "found by sha256");
    assert_eq!(archive.file_name, "beat-0.2.0.tar.gz");

    // By file name in the artifact directory, whatever directory the config names.
    let elsewhere = ("releases/beat-0.2.0.tar.gz", "elsewhere/beat-0.2.0.tar.gz");
    let archive = archive_found(elsewhere, "amqp", "found by file name");
    assert_eq!(archive.sha256, fx.sha256);
}

#[test]
fn unchecked_lookup_does_not_open_archives() {
    let fx = Fixture::new();
    let text = fx
        .text()
        .replace("releases/beat-0.2.0.tar.gz", "missing.tar.gz");
    let plan = Plan::parse(&text, FILE, &ArchiveLookup::Unchecked).expect("valid");
    assert_eq!(plan.groups["web"].archive, None);
}

#[test]
fn load_reads_archives_beside_the_file() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("cluster.toml");
    std::fs::write(&path, fx.text()).expect("write");
    let plan = Plan::load(&path).expect("valid");
    assert_eq!(plan.origin, path.display().to_string());
    assert_eq!(Plan::read_revision(&path).expect("revision"), 7);
}

#[test]
fn every_error_names_the_file_the_field_and_the_problem() {
    let fx = Fixture::new();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "group = \"web\"\nenv",
            "group = \"db\"\nenv",
            &["host[0].group", "unknown group 'db'", "groups: web"],
        ),
        (
            "id = \"web-2\"",
            "id = \"web-1\"",
            &["host[1].id", "duplicate host id 'web-1'", "host[0]"],
        ),
        (
            "addr = \"10.0.0.12:7070\"",
            "addr = \"10.0.0.11:7070\"",
            &["host[1].addr", "duplicate address '10.0.0.11:7070'"],
        ),
        (
            "id = \"web-2\"",
            "id = \"Web_2\"",
            &["host[1].id", "bad host id 'Web_2'"],
        ),
        (
            "addr = \"10.0.0.12:7070\"",
            "addr = \"10.0.0.12\"",
            &["host[1].addr", "needs a port"],
        ),
        (
            "archive = \"releases/beat-0.2.0.tar.gz\"",
            "archive = \"releases/nope.tar.gz\"",
            &["group.web.archive", "nope.tar.gz"],
        ),
        (
            "sha256 = \"",
            "sha256 = \"00",
            &["group.web.sha256", "not 64 hex"],
        ),
        (
            "max_in_flight = 1",
            "max_in_flight = 0",
            &["group.web.max_in_flight", "at least 1"],
        ),
        (
            "canaries = 1",
            "canaries = 3",
            &["group.web.canaries", "3 canaries", "only 2 host"],
        ),
        (
            "release = \"beat\"",
            "release = \"../beat\"",
            &["group.web.release", "not a valid release name"],
        ),
        (
            "version = \"0.2.0\"",
            "version = \"0.2 0\"",
            &["group.web.version", "not a valid version"],
        ),
        (
            "deadline_secs = 60",
            "deadline_secs = 2",
            &["group.web.health.deadline_secs", "shorter than min_up_secs"],
        ),
        (
            "tcp = 27182",
            "tcp = 0",
            &["group.web.health.tcp", "port 0"],
        ),
        (
            "NODE_NAME = \"beat\"",
            "EREL_HOST_ID = \"x\"",
            &["group.web.env.EREL_HOST_ID", "set by the agent"],
        ),
        (
            "argv = [\"bin/beat\"",
            "argv = [\"/bin/sh\"",
            &["group.web.argv", "relative"],
        ),
        (
            "max_in_flight = 1",
            "max_in_flight = 1\ncolour = \"red\"",
            &["group.web.colour", "unknown field"],
        ),
        (
            "revision = 7",
            "revision = -1",
            &["revision", "line 2", "expected u64"],
        ),
        (
            "min_up_secs = 5",
            "min_up_secs = -5",
            &["group.web.health.min_up_secs", "line", "expected u64"],
        ),
        (
            "deadline_secs = 60",
            "deadline_secs = 60, passes = 99999999999",
            &["group.web.health.passes", "99999999999"],
        ),
        (
            "revision = 7",
            "revision = 9007199254740992",
            &["revision", "9007199254740992", "above the largest revision"],
        ),
        (
            "revision = 7",
            "revision = 18446744073709551615",
            &[
                "revision",
                "18446744073709551615",
                "above the largest revision",
            ],
        ),
        (
            "max_in_flight = 1",
            "max_in_flight = 4294967296",
            &["group.web.max_in_flight", "line"],
        ),
        (
            "deadline_secs = 60",
            "deadline_secs = 86401",
            &["group.web.health.deadline_secs", "86401", "one day"],
        ),
        (
            "min_up_secs = 5, deadline_secs = 60",
            "min_up_secs = 86401, deadline_secs = 90000",
            &["group.web.health.min_up_secs", "86401", "one day"],
        ),
        (
            "deadline_secs = 60",
            "deadline_secs = 18446744073709551615",
            &["group.web.health.deadline_secs", "one day"],
        ),
    ];
    for (from, to, parts) in cases {
        let error = fx.error_with(from, to);
        assert_refusal(&error, parts);
    }
}

#[test]
fn a_probe_port_may_come_from_each_hosts_env() {
    let fx = Fixture::new();
    let text = fx.text().replace("tcp = 27182", "tcp = \"$BEAT_PORT\"");
    let plan = fx.parse(&text).expect("valid");
    let web = &plan.groups["web"];
    assert_eq!(
        web.probe_port(plan.host("web-1").expect("web-1")),
        Some(27183)
    );
    assert_eq!(
        web.probe_port(plan.host("web-2").expect("web-2")),
        Some(27182)
    );

    let text = fx.text().replace("tcp = 27182", "tcp = \"$NODE_NAME\"");
    let error = refusal(fx.parse(&text), "not a port");
    assert_mentions(&error, &["host[0].env.NODE_NAME", "does not set to a port"]);
    let text = fx.text().replace("tcp = 27182", "tcp = \"port\"");
    let error = refusal(fx.parse(&text), "not a variable");
    assert_mentions(&error, &["group.web.health.tcp", "neither a port number"]);
}

#[test]
fn a_wrong_sha256_is_refused_with_both_digests() {
    let fx = Fixture::new();
    let wrong = "ab".repeat(32);
    let error = fx.error_with(&fx.sha256.to_hex(), &wrong);
    assert_mentions(
        &error,
        &["group.web.sha256", "wrong", &fx.sha256.to_hex(), &wrong],
    );
}

#[test]
fn the_largest_numbers_allowed_are_kept_exactly() {
    let fx = Fixture::new();
    let text = fx
        .text()
        .replace("revision = 7", &format!("revision = {MAX_REVISION}"))
        .replace(
            "deadline_secs = 60",
            &format!("deadline_secs = {MAX_WAIT_SECS}"),
        )
        .replace("max_in_flight = 1", "max_in_flight = 4294967295");
    let plan = fx.parse(&text).expect("valid");
    assert_eq!(plan.revision, (1 << 53) - 1);
    let web = &plan.groups["web"];
    assert_eq!(web.health.deadline, Duration::from_secs(86_400));
    assert_eq!(web.max_in_flight, 4_294_967_295);
}

#[test]
fn an_archive_not_there_yet_is_unavailable_not_invalid() {
    let fx = Fixture::new();
    let text = fx.text().replace("beat-0.2.0.tar.gz", "beat-0.3.0.tar.gz");
    let error = fx.parse(&text).expect_err("missing archive");
    assert!(
        matches!(error, Error::ArchiveUnavailable { ref field, .. } if field == "group.web.archive"),
        "{error:?}"
    );
    let wrong = "ab".repeat(32);
    let text = fx.text().replace(&fx.sha256.to_hex(), &wrong);
    let error = fx.parse(&text).expect_err("other contents");
    assert!(
        matches!(error, Error::ArchiveUnavailable { .. }),
        "{error:?}"
    );
    // A file that is wrong in itself stays a plain refusal.
    let text = fx.text().replace("max_in_flight = 1", "max_in_flight = 0");
    let error = fx.parse(&text).expect_err("invalid");
    assert!(matches!(error, Error::Cluster { .. }), "{error:?}");
}

#[test]
fn a_group_without_any_archive_is_refused() {
    let fx = Fixture::new();
    let text = fx
        .text()
        .replace("archive = \"releases/beat-0.2.0.tar.gz\"\n", "")
        .replace(&format!("sha256 = \"{}\"\n", fx.sha256), "");
    let error = refusal(fx.parse(&text), "no archive");
    assert_mentions(&error, &["group.web", "names no archive"]);

    let unknown = "cd".repeat(32);
    let text = fx
        .text()
        .replace("archive = \"releases/beat-0.2.0.tar.gz\"\n", "")
        .replace(&fx.sha256.to_hex(), &unknown);
    let error = refusal(fx.parse(&text), "unknown sha");
    assert_mentions(
        &error,
        &["group.web.sha256", "no archive with sha256", &unknown],
    );
}

#[test]
fn an_unreadable_file_names_itself() {
    let error = refusal(
        Plan::load(Path::new("/nonexistent/cluster.toml")),
        "missing",
    );
    assert_mentions(&error, &["/nonexistent/cluster.toml", "cannot read"]);
}

#[test]
fn host_arguments_resolve_through_the_cluster_file() {
    let fx = Fixture::new();
    let path = fx.dir.path().join("cluster.toml");
    std::fs::write(&path, fx.text()).expect("write");
    let host = resolve_host("web-2", Some(&path)).expect("known id");
    assert_eq!(host.addr, "10.0.0.12:7070");
    let direct = resolve_host("x-1@127.0.0.1:9", Some(&path)).expect("explicit");
    assert_eq!(direct.id, "x-1");
    let error = refusal(resolve_host("web-9", Some(&path)), "unknown");
    assert_mentions(&error, &["web-9", "no host with this id"]);
}

#[test]
fn syntax_errors_near_multibyte_text_point_at_a_character() {
    let fx = Fixture::new();
    let text = fx
        .text()
        .replacen("\"beat\"", "\"béat €🦀\"", 1)
        .replace("NODE_NAME", "NÖDE");
    let error = fx
        .parse(&text.replacen("max_in_flight = 1", "max_in_flight = é€", 1))
        .unwrap_err()
        .to_string();
    assert_mentions(&error, &["line", "column"]);
    // Garbage at every character boundary: an error or a plan, never a panic.
    for (at, _) in text.char_indices().step_by(7) {
        let mut broken = text.clone();
        broken.insert_str(at, "é\"🦀=");
        let _ = fx.parse(&broken);
    }
}

#[test]
fn max_failed_and_state_are_read_and_a_stopped_group_may_have_no_hosts() {
    let fx = Fixture::new();
    let plan = fx.parse(&fx.text()).expect("valid");
    assert_eq!(plan.groups["web"].max_failed, 0, "default");
    assert_eq!(plan.groups["web"].state, GroupState::Running, "default");

    let text = fx.text().replace(
        "canaries = 1\n",
        "canaries = 1\nmax_failed = 2\nstate = \"stopped\"\n",
    );
    let plan = fx.parse(&text).expect("valid");
    assert_eq!(plan.groups["web"].max_failed, 2);
    assert_eq!(plan.groups["web"].state, GroupState::Stopped);

    // Every host moved elsewhere: the stopped group keeps no host.
    let text = text.replace("group = \"web\"", "group = \"api\"").replace(
        "[group.web]",
        "[group.api]\nrelease = \"api\"\nversion = \"0.2.0\"\narchive = \"releases/beat-0.2.0.tar.gz\"\n\n[group.web]",
    );
    let plan = fx
        .parse(&text)
        .expect("a stopped group without hosts is valid");
    assert!(plan.hosts_in("web").is_empty());

    let error = fx.error_with("canaries = 1\n", "canaries = 1\nstate = \"paused\"\n");
    assert_mentions(&error, &[FILE, "group.web.state", "'paused'", "stopped"]);
}

/// Two groups, `web` (release beat) and `metrics` (release probe); `HOSTS` is spliced
/// in as the `[[host]]` tables.
fn parse_unchecked(text: &str) -> Result<Plan> {
    Plan::parse(text, FILE, &ArchiveLookup::Unchecked)
}

#[test]
fn a_host_may_belong_to_several_groups_and_a_host_in_none_waits() {
    let text = groups_text(HOSTS_IN_SEVERAL_GROUPS);
    let plan = parse_unchecked(&text).expect("valid");
    let ids = |group: &str| -> Vec<String> {
        plan.hosts_in(group).iter().map(|h| h.id.clone()).collect()
    };
    assert_eq!(ids("web"), ["both-1", "web-1"]);
    assert_eq!(ids("metrics"), ["both-1"]);
    let both = plan.host("both-1").expect("both-1");
    assert_eq!(both.groups, ["web", "metrics"]);
    let releases: Vec<&str> = plan
        .groups_of(both)
        .iter()
        .map(|g| g.release.as_str())
        .collect();
    assert_eq!(releases, ["beat", "probe"]);
    let spare = plan.host("spare-1").expect("spare-1");
    assert!(spare.groups.is_empty(), "waiting");
    assert!(plan.groups_of(spare).is_empty());
    assert_eq!(plan.groups["metrics"].canaries, 1);
}

#[test]
fn group_membership_refusals_name_the_host_and_the_groups() {
    let cases: &[(&str, &[&str])] = &[
        (
            "id = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroup = \"web\"\ngroups = [\"metrics\"]",
            &["host[0]", "'a-1'", "both `group` and `groups`"],
        ),
        (
            "id = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroups = [\"web\", \"metrics\", \"web\"]",
            &["host[0].groups[2]", "'a-1'", "group 'web' twice"],
        ),
        (
            "id = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroups = [\"web\", \"db\"]",
            &["host[0].groups[1]", "unknown group 'db'", "metrics, web"],
        ),
    ];
    for (host, parts) in cases {
        let text = groups_text(&format!(
            "[[host]]\n{host}\n[[host]]\nid = \"b-1\"\naddr = \"10.0.0.2:1\"\ngroups = [\"web\", \"metrics\"]\n"
        ));
        let error = refusal(parse_unchecked(&text), host);
        assert_refusal(&error, parts);
    }
}

#[test]
fn two_groups_of_one_host_may_not_run_the_same_release() {
    let text = groups_text(
        "[[host]]\nid = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroups = [\"web\", \"metrics\"]\n",
    )
    .replace("release = \"probe\"", "release = \"beat\"");
    let error = refusal(parse_unchecked(&text), "same release");
    assert_mentions(
        &error,
        &[
            FILE,
            "host[0].groups[1]",
            "groups 'web' and 'metrics'",
            "release 'beat'",
            "host 'a-1'",
        ],
    );
    // On different hosts, two groups may run the same release.
    let text = groups_text(
        "[[host]]\nid = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroup = \"web\"\n\
         [[host]]\nid = \"b-1\"\naddr = \"10.0.0.2:1\"\ngroup = \"metrics\"\n",
    )
    .replace("release = \"probe\"", "release = \"beat\"");
    parse_unchecked(&text).expect("one release per host");
}

#[test]
fn a_misspelt_group_is_reported_rather_than_the_group_it_leaves_empty() {
    let text = groups_text(
        "[[host]]\nid = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroups = [\"web\", \"metric\"]\n",
    );
    let error = refusal(parse_unchecked(&text), "misspelt");
    assert_mentions(&error, &["host[0].groups[1]", "unknown group 'metric'"]);
}

#[test]
fn a_group_no_host_names_is_refused() {
    let text = groups_text("[[host]]\nid = \"a-1\"\naddr = \"10.0.0.1:1\"\ngroup = \"web\"\n");
    let error = refusal(parse_unchecked(&text), "empty group");
    assert_mentions(
        &error,
        &[FILE, "group.metrics", "no host names group 'metrics'"],
    );
    // A stopped group may keep no host: its release is stopped wherever it still runs.
    let text = text.replace(
        "[group.metrics]\n",
        "[group.metrics]\nstate = \"stopped\"\n",
    );
    let plan = parse_unchecked(&text).expect("a stopped group without hosts");
    assert!(plan.hosts_in("metrics").is_empty());
    assert_eq!(
        plan.groups["metrics"].canaries, 0,
        "nothing to switch first"
    );
}

#[test]
fn a_version_the_archive_does_not_hold_is_refused() {
    let fx = Fixture::new();
    let error = fx.error_with("version = \"0.2.0\"", "version = \"0.3.0\"");
    assert_mentions(
        &error,
        &[
            FILE,
            "group.web.version",
            "group 'web'",
            "'0.3.0'",
            "beat-0.2.0.tar.gz",
            "version(s) found: 0.2.0",
        ],
    );
    // Not checked without archives.
    let text = fx
        .text()
        .replacen("version = \"0.2.0\"", "version = \"0.3.0\"", 1);
    Plan::parse(&text, FILE, &ArchiveLookup::Unchecked).expect("unchecked");
}

#[test]
fn what_a_master_finds_by_file_name_alone_can_pass_and_is_not_refused_for_good() {
    // A config that names its archive by file name only, without `sha256`: a master's
    // artifact directory may hold another file of that name for now (the previous
    // build, a copy under way, a directory). Its verdict is about that master's file,
    // not about the config: the revision must wait (`ArchiveUnavailable`), never be
    // refused for good by one master while the others apply it.
    let fx = Fixture::new();
    let artifacts = ArchiveLookup::Artifacts(fx.dir.path().join("releases"));
    let no_sha256 = fx
        .text()
        .replacen(&format!("sha256 = \"{}\"\n", fx.sha256), "", 1);
    assert!(!no_sha256.contains("sha256"), "{no_sha256}");
    let newer = no_sha256.replacen("version = \"0.2.0\"", "version = \"0.3.0\"", 1);
    match Plan::parse(&newer, "amqp", &artifacts) {
        Err(Error::ArchiveUnavailable { field, message, .. }) => {
            assert_eq!(field, "group.web.version");
            assert_mentions(&message, &["'0.3.0'", "version(s) found: 0.2.0"]);
        }
        other => panic!("another build under the name waits: {other:?}"),
    }
    let dir_named = no_sha256.replace("beat-0.2.0.tar.gz", "beat-0.3.0.tar.gz");
    std::fs::create_dir(fx.dir.path().join("releases/beat-0.3.0.tar.gz")).expect("mkdir");
    match Plan::parse(&dir_named, "amqp", &artifacts) {
        Err(Error::ArchiveUnavailable { field, message, .. }) => {
            assert_eq!(field, "group.web.archive");
            assert_mentions(&message, &["not a regular file"]);
        }
        other => panic!("a directory in the archive's place waits: {other:?}"),
    }
    // Found by sha256 alone under a name an archive may not have: that is this
    // master's file name, not the config's.
    let releases = fx.dir.path().join("releases");
    std::fs::rename(
        releases.join("beat-0.2.0.tar.gz"),
        releases.join("beat 0.2.0.tar.gz"),
    )
    .expect("rename");
    let by_sha256 = fx
        .text()
        .replacen("archive = \"releases/beat-0.2.0.tar.gz\"\n", "", 1);
    match Plan::parse(&by_sha256, "amqp", &artifacts) {
        Err(Error::ArchiveUnavailable { field, message, .. }) => {
            assert_eq!(field, "group.web.archive");
            assert_mentions(&message, &["'beat 0.2.0.tar.gz'"]);
        }
        other => panic!("a file name of this machine's waits: {other:?}"),
    }
    std::fs::rename(
        releases.join("beat 0.2.0.tar.gz"),
        releases.join("beat-0.2.0.tar.gz"),
    )
    .expect("rename back");
    // With `sha256`, the bytes are the config's own: a version they do not hold is
    // wrong in the config itself, for every master alike.
    let with_sha256 = fx
        .text()
        .replacen("version = \"0.2.0\"", "version = \"0.3.0\"", 1);
    match Plan::parse(&with_sha256, "amqp", &artifacts) {
        Err(Error::Cluster { field, .. }) => assert_eq!(field, "group.web.version"),
        other => panic!("refused for good: {other:?}"),
    }
}

#[test]
fn one_read_gives_the_digest_of_the_whole_file_and_its_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    for gzip in [true, false] {
        let path = dir.path().join(if gzip { "a.tar.gz" } else { "a.tar" });
        write_archive(&path, &["releases/0.3.0/start.boot", "bin/beat"], gzip);
        // Bytes after the end of the archive are part of the file and of its digest.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend(std::iter::repeat_n(7u8, 300 * 1024));
        std::fs::write(&path, &bytes).expect("write");
        let hashed = crate::digest_cache::files_hashed();
        let (sha256, versions) = contents::hash_and_list(&path).expect("readable");
        assert!(crate::digest_cache::files_hashed() > hashed, "counted");
        assert_eq!(sha256, sha256_file(&path).expect("hash"), "gzip: {gzip}");
        let versions = versions.expect("a tar stream");
        assert_eq!(
            versions,
            contents::release_versions(&path).expect("readable")
        );
        assert_eq!(versions.found, ["0.3.0"]);
    }
    // Not an archive: still a digest, and the listing's error.
    let path = dir.path().join("garbage.tar.gz");
    std::fs::write(&path, [0x1f, 0x8b, 1, 2, 3]).expect("write");
    let (sha256, versions) = contents::hash_and_list(&path).expect("readable");
    assert_eq!(sha256, sha256_file(&path).expect("hash"));
    assert!(versions.is_err());
}

#[test]
fn release_versions_are_the_directories_under_releases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("otp.tar");
    write_archive(
        &path,
        &[
            "./releases/RELEASES",
            "./releases/start_erl.data",
            "./releases/0.1.0/vm.args",
            "./releases/0.2.0/sys.config",
            "./releases/0.2.0/start.boot",
            "./lib/app-0.2.0/ebin/app.app",
        ],
        false,
    );
    let versions = contents::release_versions(&path).expect("readable");
    assert_eq!(versions.found, ["0.1.0", "0.2.0"]);
    assert!(!versions.truncated);

    // No releases/ directory: nothing to compare, the version passes.
    let fx = Fixture::new();
    write_archive(
        &fx.dir.path().join("releases/beat-0.2.0.tar.gz"),
        &["bin/beat"],
        true,
    );
    let text = fx
        .text()
        .replace(&format!("sha256 = \"{}\"\n", fx.sha256), "")
        .replacen("version = \"0.2.0\"", "version = \"9\"", 1);
    fx.parse(&text).expect("not the relx layout");

    // Not a tar stream at all: left to the agent's unpacker, which names the fault.
    std::fs::write(fx.dir.path().join("releases/beat-0.2.0.tar.gz"), b"garbage").expect("write");
    assert!(contents::release_versions(&fx.dir.path().join("releases/beat-0.2.0.tar.gz")).is_err());
    let text = fx
        .text()
        .replace(&format!("sha256 = \"{}\"\n", fx.sha256), "");
    fx.parse(&text).expect("not listed here");
}

#[test]
fn http_probes_passes_and_drain_are_read_with_their_defaults() {
    let fx = Fixture::new();
    let text = fx.text().replace(
        "health = { tcp = 27182, min_up_secs = 5, deadline_secs = 60 }",
        "health = { http = \"$BEAT_PORT\", passes = 3, min_up_secs = 5 }\n\
         drain = { http = 9000, path = \"/admin/drain?now=1\", timeout_secs = 4 }",
    );
    let plan = fx.parse(&text).expect("valid");
    let web = &plan.groups["web"];
    assert_eq!(web.health.tcp, None);
    assert_eq!(
        web.health.http,
        Some(HttpProbe {
            port: TcpProbe::Variable("BEAT_PORT".into()),
            path: DEFAULT_HEALTH_PATH.into(),
        })
    );
    assert_eq!(web.health.passes, 3);
    assert_eq!(
        web.http_port(plan.host("web-1").expect("web-1")),
        Some(27183)
    );
    assert_eq!(
        web.drain,
        Some(Drain {
            port: TcpProbe::Port(9000),
            path: "/admin/drain?now=1".into(),
            timeout: Duration::from_secs(4),
        })
    );
    assert_eq!(
        web.drain_port(plan.host("web-2").expect("web-2")),
        Some(9000)
    );

    let text = fx
        .text()
        .replace("min_up_secs = 5,", "min_up_secs = 5, http = 8080,")
        .replace("canaries = 1", "canaries = 1\ndrain = { http = 8080 }");
    let plan = fx.parse(&text).expect("valid");
    let web = &plan.groups["web"];
    assert_eq!(web.health.passes, DEFAULT_PASSES, "one pass by default");
    assert!(web.health.tcp.is_some() && web.health.http.is_some());
    let drain = web.drain.as_ref().expect("drain");
    assert_eq!(drain.path, DEFAULT_DRAIN_PATH);
    assert_eq!(
        drain.timeout,
        Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_SECS)
    );
}

#[test]
fn wrong_health_and_drain_keys_are_refused_by_name() {
    let fx = Fixture::new();
    let health = "health = { tcp = 27182, min_up_secs = 5, deadline_secs = 60 }";
    let cases: &[(&str, &[&str])] = &[
        (
            "health = { http = 70000 }",
            &["group.web.health.http", "70000 is not a port number"],
        ),
        (
            "health = { http = 8080, path = \"health\" }",
            &[
                "group.web.health.path",
                "'health' is not an absolute request path",
            ],
        ),
        (
            "health = { http = 8080, path = \"/a b\" }",
            &["group.web.health.path", "/a b"],
        ),
        (
            "health = { path = \"/health\" }",
            &["group.web.health.path", "without health.http"],
        ),
        (
            "health = { http = 8080, passes = 0 }",
            &["group.web.health.passes", "0 is not a count of at least 1"],
        ),
        (
            "health = { min_up_secs = 1, passes = 2 }",
            &["group.web.health.passes", "no health.http or health.tcp"],
        ),
        (
            "health = { http = 8080, pases = 2 }",
            &["group.web.health", "unknown field `pases`"],
        ),
        ("drain = { http = 0 }", &["group.web.drain.http", "port 0"]),
        (
            "drain = { path = \"/drain\" }",
            &["group.web.drain", "http"],
        ),
        (
            "drain = { http = 8080, timeout_secs = 0 }",
            &["group.web.drain.timeout_secs", "at least 1"],
        ),
        (
            "drain = { http = 8080, path = \"drain\" }",
            &["group.web.drain.path", "not an absolute request path"],
        ),
        (
            "drain = { http = \"$NODE_NAME\" }",
            &[
                "host[0].env.NODE_NAME",
                "group.web.drain.http",
                "does not set to a port",
            ],
        ),
        (
            "health = { http = \"$NODE_NAME\" }",
            &["host[0].env.NODE_NAME", "group.web.health.http"],
        ),
    ];
    for (to, parts) in cases {
        let error = fx.error_with(health, to);
        assert_refusal(&error, parts);
    }
}

#[test]
fn restarted_at_is_an_rfc3339_instant_not_far_ahead_of_the_clock() {
    let fx = Fixture::new();
    let plan = fx.parse(&fx.text()).expect("valid");
    assert_eq!(plan.groups["web"].restarted_at, None, "default: no restart");

    let text = fx.text().replace(
        "canaries = 1\n",
        "canaries = 1\nrestarted_at = \"2026-11-29T13:00:00+01:00\"\n",
    );
    let plan = fx.parse(&text).expect("valid");
    let at = plan.groups["web"].restarted_at.expect("read");
    assert_eq!(at.offset(), time::UtcOffset::UTC, "kept in UTC");
    assert_eq!(at.unix_timestamp(), 1_795_953_600, "2026-11-29T12:00:00Z");

    let error = fx.error_with(
        "canaries = 1\n",
        "canaries = 1\nrestarted_at = \"2026-11-29 noon\"\n",
    );
    assert_mentions(
        &error,
        &[
            FILE,
            "group.web.restarted_at",
            "'2026-11-29 noon'",
            "RFC 3339",
        ],
    );
    let error = fx.error_with(
        "canaries = 1\n",
        "canaries = 1\nrestarted_at = \"2999-01-01T00:00:00Z\"\n",
    );
    assert_mentions(
        &error,
        &[
            FILE,
            "group.web.restarted_at",
            "'2999-01-01T00:00:00Z'",
            "ahead",
        ],
    );
}

#[test]
fn restarted_at_may_be_a_few_minutes_ahead_for_clocks_apart_and_no_more() {
    let now = time::OffsetDateTime::from_unix_timestamp(1_795_953_600).expect("an instant");
    let ahead = |secs: u64| {
        let at = now + Duration::from_secs(secs);
        let text = at
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format");
        validate::restarted_at(&text, Some(now))
    };
    let limit = RESTARTED_AT_MAX_AHEAD.as_secs();
    assert!(ahead(0).is_ok(), "now");
    assert!(ahead(limit).is_ok(), "at the limit");
    let why = ahead(limit + 1).expect_err("beyond the limit");
    assert!(
        why.contains("more than 5 minutes ahead") && why.contains("2026-11-29T12:00:00Z"),
        "{why}"
    );
    let past = validate::restarted_at("2020-01-01T00:00:00Z", Some(now)).expect("the past is fine");
    assert!(past < now);
}

#[test]
fn a_request_that_could_not_fit_in_a_frame_is_refused_naming_the_field_and_sizes() {
    let fx = Fixture::new();
    let big = "x".repeat(70_000);
    // Just under the cap: the whole Start (name, version, argv, both envs) fits.
    let fits = "y".repeat(erel_proto::MAX_FRAME - 200);
    let cases: &[(&str, String, &[&str])] = &[
        (
            "env = { BEAT_PORT = \"27183\" }",
            format!("env = {{ BEAT_PORT = \"27183\", BIG = \"{big}\" }}"),
            &[
                "host[0].env.BIG",
                "group 'web' on host 'web-1'",
                "70",
                "65536-byte frame limit",
                "env.BIG is 70003 bytes",
            ],
        ),
        (
            "env = { NODE_NAME",
            format!("env = {{ BIG = \"{big}\", NODE_NAME"),
            &[
                "group.web.env.BIG",
                "on host 'web-1'",
                "65536-byte frame limit",
            ],
        ),
        (
            "argv = [\"bin/beat\", \"foreground\"]",
            format!("argv = [\"bin/beat\", \"{big}\"]"),
            &["group.web.argv", "argv[1] is 70000 bytes", "frame limit"],
        ),
        (
            "max_in_flight = 1",
            format!("user = \"{big}\"\nmax_in_flight = 1"),
            &["group.web.user", "user is 70000 bytes", "frame limit"],
        ),
        (
            "argv = [\"bin/beat\", \"foreground\"]",
            // Many small values that together are too large: the sum is what counts.
            format!(
                "argv = [\"bin/beat\", {}]",
                vec!["\"abcdefghijklmnop\""; 4_000].join(", ")
            ),
            &["group.web.argv", "would be 68056 bytes", "frame limit"],
        ),
    ];
    for (from, to, parts) in cases {
        assert_refusal(&fx.error_with(from, to), parts);
    }
    let text = fx.text().replacen(
        "env = { BEAT_PORT = \"27183\" }",
        &format!("env = {{ BEAT_PORT = \"27183\", FITS = \"{fits}\" }}"),
        1,
    );
    let plan = fx
        .parse(&text)
        .expect("a Start just under the cap is accepted");
    let start = plan.groups["web"].start_request(&plan.hosts[0], "0.2.0");
    let len = erel_proto::encode_body(&erel_proto::Request::Start(start))
        .expect("encode")
        .len();
    assert!(len <= erel_proto::MAX_FRAME && len > erel_proto::MAX_FRAME - 300);
}
