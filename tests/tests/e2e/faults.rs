//! Faults of processes, disks and clocks against real agents and real masters: an agent
//! killed (`kill -9`) during `WriteFile`, during `Unpack` and between the stop and the
//! start of a cold replacement; a master (`erel deploy`, and the file daemon `erel
//! master --cluster`) killed at each phase of a rolling deploy; an agent's disk full
//! during `WriteFile` and during `Unpack`; hosts whose clocks are minutes ahead of or
//! behind the master's. Each asserts that nothing is lost and nothing half-done is
//! visible, and that the next deploy finishes the job.
//!
//! The disk tests mount a tmpfs and need root; the clock tests preload Debian's
//! libfaketime (package `faketime`). Without either they say "skipped: why" on stderr.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::helper::fleet::Fleet;
use crate::helper::release::{beat_release, failing_beat_release, sha256, with_payload};
use crate::helper::stepping::{step_until, Stopped};
use crate::helper::tmpfs::{can_mount, Tmpfs};
use crate::helper::{
    assert_holds_all, describe_processes, listing, output_text, sessions_of, wait_until_blocking,
    AgentProc, Followed, Pki, NO_RESTART_WITHIN, PATIENCE,
};

const RELEASE: &str = "beat";
/// One host at a time, the first alone: a rolling deploy with every phase in turn.
const ONE_AT_A_TIME: &str = "max_in_flight = 1\ncanaries = 1";
/// Bytes added to the archives of the tests that need a push or an unpack to last long
/// enough to be interrupted (sent whole: the archive is an uncompressed `.tar`), in
/// files of [`PAYLOAD_FILE`] bytes.
const LARGE_PAYLOAD: u64 = 16 << 20;
const PAYLOAD_FILE: u64 = 4 << 10;

/// `erel <words> --cluster <cluster>` on `fleet`'s PKI.
fn erel_on(fleet: &Fleet, cluster: &Path, words: &[&str]) -> std::process::Command {
    let mut erel = fleet.pki.erel();
    erel.args(words).arg("--cluster").arg(cluster);
    erel
}

/// `erel deploy --json`, its events (one JSON object a line) and errors followed.
fn spawn_deploy(fleet: &Fleet, cluster: &Path) -> Followed {
    Followed::spawn_with_stdout(
        &mut erel_on(fleet, cluster, &["deploy", "--json"]),
        "erel deploy",
    )
}

/// Runs `erel deploy` to its end; (success, stdout + stderr).
fn deploy(fleet: &Fleet, cluster: &Path) -> (bool, String) {
    let out = erel_on(fleet, cluster, &["deploy"])
        .output()
        .expect("run erel deploy");
    (out.status.success(), output_text(&out))
}

/// Runs `erel deploy` and asserts that it succeeds and every host then runs `version`,
/// exactly one copy of it; `what` says which deploy this is.
fn deploy_and_expect(fleet: &Fleet, cluster: &Path, version: &str, what: &str) -> String {
    let (ok, text) = deploy(fleet, cluster);
    assert!(ok, "{what}: {text}\n{}", fleet.agent_logs());
    fleet.wait_all_run(version, PATIENCE, what, || fleet.agent_logs());
    expect_one_copy_each(fleet, what);
    text
}

/// Asserts that every host runs exactly one process of the release.
fn expect_one_copy_each(fleet: &Fleet, what: &str) {
    let pids = fleet.release_pids(RELEASE);
    assert!(
        pids.iter().all(|p| p.len() == 1),
        "{what}: one process per host: {pids:?}\n{}",
        fleet.agent_logs()
    );
}

/// Waits for a master process to exit on its own (it gives up on an agent that is
/// gone); its status.
fn exits(master: &mut Followed, what: &str) -> ExitStatus {
    master
        .exit_within(PATIENCE)
        .unwrap_or_else(|| panic!("{what} still runs after {PATIENCE:?}:\n{}", master.log()))
}

/// Every file under `dir` with its sha256 (directories with none): what a release
/// holds, to compare before and after a fault.
fn tree(dir: &Path) -> BTreeMap<String, Option<String>> {
    listing(dir, "")
        .into_iter()
        .map(|rel| {
            let path = dir.join(&rel);
            let digest = path.is_file().then(|| sha256(&path).to_hex());
            (rel, digest)
        })
        .collect()
}

/// What one host holds and runs of the release, to show it untouched by a fault.
#[derive(Debug, PartialEq)]
struct Held {
    /// The version directories under `releases/<release>/`.
    versions: Vec<String>,
    /// The files of the running version and their digests.
    files: BTreeMap<String, Option<String>>,
    /// The release's processes.
    pids: Vec<i32>,
}

impl Held {
    fn of(agent: &AgentProc, running: &str) -> Held {
        let dir = agent.root.join("releases").join(RELEASE);
        Held {
            versions: names_in(&dir),
            files: tree(&dir.join(running)),
            pids: agent.release_pids(RELEASE),
        }
    }
}

/// The names in directory `dir`, sorted; none when it does not exist.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The agent's staging files (`.erel/staging/`) with their sizes.
fn staged(agent: &AgentProc) -> Vec<(String, u64)> {
    let dir = agent.root.join(".erel/staging");
    names_in(&dir)
        .into_iter()
        .map(|name| {
            let len = std::fs::metadata(dir.join(&name))
                .map(|m| m.len())
                .unwrap_or(0);
            (name, len)
        })
        .collect()
}

/// The unpacks in progress on the agent (`.erel/unpack/`).
fn unpacking(agent: &AgentProc) -> Vec<String> {
    names_in(&agent.root.join(".erel/unpack"))
}

/// A fleet's upgrade from release 1.0.0 to a 2.0.0 whose archive is large enough to be
/// caught while it is pushed.
struct LargeUpgrade {
    /// The 2.0.0 archive's file name.
    archive: String,
    /// The 2.0.0 archive's size in bytes.
    size: u64,
    /// What the agent holds and runs once 1.0.0 is deployed.
    before: Held,
    /// The cluster config that deploys 2.0.0.
    v2: PathBuf,
}

/// Deploys release 1.0.0 to `fleet` and readies the large 2.0.0 (not yet deployed).
fn large_upgrade(fleet: &Fleet) -> LargeUpgrade {
    beat_release(fleet.dir.path(), RELEASE, "1.0.0");
    let large = with_payload(
        &beat_release(fleet.dir.path(), RELEASE, "2.0.0"),
        LARGE_PAYLOAD,
        PAYLOAD_FILE,
        false,
    );
    let archive = large
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let size = std::fs::metadata(&large).expect("archive").len();
    let v1 = fleet.write("cluster.toml", &fleet.config(1, "1.0.0", ""));
    deploy_and_expect(fleet, &v1, "1.0.0", "the first deploy");
    let before = Held::of(&fleet.agents[0], "1.0.0");
    let v2 = fleet.write("cluster.toml", &fleet.config_of(2, "2.0.0", &archive, ""));
    LargeUpgrade {
        archive,
        size,
        before,
        v2,
    }
}

/// The agent's first staging file that has received bytes, with its size; `None` before.
fn first_bytes_staged(agent: &AgentProc) -> Option<(String, u64)> {
    staged(agent).into_iter().find(|(_, len)| *len > 0)
}

/// A staging file caught receiving bytes, with its size, and its agent held stopped.
type CaughtPushing = ((String, u64), Stopped);

/// Starts a deploy of `cluster` and steps the first agent until its staging file has
/// received bytes (up to `PATIENCE`); the deploy, and that file with its size and the agent
/// held stopped at that moment (`None`: never seen).
fn deploy_until_bytes_staged(fleet: &Fleet, cluster: &Path) -> (Followed, Option<CaughtPushing>) {
    let master = spawn_deploy(fleet, cluster);
    let agent = &fleet.agents[0];
    let part = step_until(agent.pid().expect("the agent runs"), PATIENCE, || {
        first_bytes_staged(agent)
    });
    (master, part)
}

/// Steps the first agent of `fleet` until an unpack is in progress on it (up to
/// `PATIENCE`); the unpack's staging directory, with the agent held stopped.
fn step_until_unpacking(fleet: &Fleet) -> Option<(String, Stopped)> {
    let agent = &fleet.agents[0];
    step_until(agent.pid().expect("the agent runs"), PATIENCE, || {
        unpacking(agent).into_iter().next()
    })
}

/// Asserts that a push of `size` bytes was cut while staged (`part`, from
/// `deploy_until_bytes_staged`, is short of `size`) and that the deploy `master` fails.
fn expect_the_push_cut(master: &mut Followed, part: Option<(String, u64)>, size: u64) {
    let (name, len) = part.unwrap_or_else(|| panic!("no staging file:\n{}", master.log()));
    assert!(
        len < size,
        "{name}: {len} of {size} bytes: the push was over"
    );
    assert!(!exits(master, "the deploy").success(), "{}", master.log());
}

/// Asserts that `agent` still holds and runs `before` (release `version`), answers as
/// `version`, and shows nothing half-done: no other version directory, no archive
/// `archive` unless `archive_landed`, no unpack in progress.
fn expect_untouched(
    fleet: &Fleet,
    before: &Held,
    version: &str,
    (archive, archive_landed): (&str, bool),
    what: &str,
) {
    let agent = &fleet.agents[0];
    assert_eq!(&Held::of(agent, version), before, "{what}\n{}", agent.log());
    fleet.expect_beats(version);
    let archives = names_in(&agent.root.join("archives"));
    assert_eq!(
        archives.iter().any(|a| a == archive),
        archive_landed,
        "{what}: archives {archives:?}"
    );
    assert_eq!(unpacking(agent), Vec::<String>::new(), "{what}");
}

#[test]
fn an_agent_killed_during_write_file_then_during_unpack_keeps_its_release_and_the_next_deploy_finishes(
) {
    let mut fleet = Fleet::new("agentkill", &["web"]);
    let LargeUpgrade {
        archive,
        size,
        before,
        v2,
    } = large_upgrade(&fleet);

    // Killed while the archive arrives: its staging file exists and has grown.
    let (mut master, part) = deploy_until_bytes_staged(&fleet, &v2);
    fleet.agents[0].kill9();
    expect_the_push_cut(&mut master, part.map(|(part, _held)| part), size);
    fleet.agents[0].restart();
    let what = "after a kill during WriteFile";
    expect_untouched(&fleet, &before, "1.0.0", (&archive, false), what);

    // Killed while the archive is unpacked: the staging directory exists.
    let mut master = spawn_deploy(&fleet, &v2);
    let busy = step_until_unpacking(&fleet);
    fleet.agents[0].kill9();
    assert!(busy.is_some(), "no unpack seen:\n{}", master.log());
    assert!(
        !exits(&mut master, "the deploy").success(),
        "{}",
        master.log()
    );
    fleet.agents[0].restart();
    let what = "after a kill during Unpack";
    expect_untouched(&fleet, &before, "1.0.0", (&archive, true), what);

    let text = deploy_and_expect(&fleet, &v2, "2.0.0", "the deploy after the kills");
    assert!(text.contains("switched from 1.0.0"), "{text}");
    let agent = &fleet.agents[0];
    assert_eq!(staged(agent), Vec::new(), "nothing is left in staging");
    assert_eq!(unpacking(agent), Vec::<String>::new());
}

#[test]
fn an_agent_killed_between_the_stop_and_the_start_of_a_cold_replacement_keeps_the_stop_and_the_next_deploy_finishes(
) {
    let mut fleet = Fleet::new("stopkill", &["web"]);
    // The running version takes a moment to stop, long enough to kill its agent then.
    failing_beat_release(fleet.dir.path(), RELEASE, "1.0.0", "slow-stop");
    beat_release(fleet.dir.path(), RELEASE, "2.0.0");
    let v1 = fleet.write("cluster.toml", &fleet.config(1, "1.0.0", ""));
    deploy_and_expect(&fleet, &v1, "1.0.0", "the first deploy");
    let files = tree(&fleet.agents[0].root.join("releases/beat/1.0.0"));
    let old_pids = fleet.agents[0].release_pids(RELEASE);

    let v2 = fleet.write("cluster.toml", &fleet.config(2, "2.0.0", ""));
    let mut master = spawn_deploy(&fleet, &v2);
    let output = fleet.agents[0].root.join(".erel/logs/beat.log");
    // The agent stepped, and held stopped once 1.0.0 says it stops: killed before it can
    // see the stop end and start 2.0.0, however long a busy machine makes the moment.
    let pid = fleet.agents[0].pid().expect("the agent runs");
    let stopping = step_until(pid, PATIENCE, || {
        std::fs::read_to_string(&output)
            .is_ok_and(|log| log.contains("SIGTERM, stopping"))
            .then_some(())
    });
    fleet.agents[0].kill9();
    assert!(
        stopping.is_some(),
        "1.0.0 was never told to stop:\n{}",
        master.log()
    );
    assert!(
        !exits(&mut master, "the deploy").success(),
        "{}",
        master.log()
    );
    // The old version ends its stop with no agent: the host runs nothing, 2.0.0 is
    // unpacked but never started.
    let gone = wait_until_blocking(PATIENCE, || {
        fleet.agents[0].release_pids(RELEASE).is_empty()
    });
    assert!(gone, "{old_pids:?} still run");
    fleet.agents[0].restart();

    // The stop was recorded before 1.0.0 was told to stop, so the restarted agent keeps
    // it stopped: no copy of either version runs, and 1.0.0 is whole.
    let agent = &fleet.agents[0];
    assert_eq!(tree(&agent.root.join("releases/beat/1.0.0")), files);
    // Any start the agent would make (a restart on its record) comes within this.
    std::thread::sleep(NO_RESTART_WITHIN);
    let pids = agent.release_pids(RELEASE);
    assert_eq!(pids, Vec::<i32>::new(), "nothing runs\n{}", agent.log());
    assert_eq!(
        names_in(&agent.root.join("releases/beat")),
        ["1.0.0", "2.0.0"]
    );
    assert_eq!(fleet.beats(), [""]);
    deploy_and_expect(&fleet, &v2, "2.0.0", "the deploy after the kill");
}

/// Where a master is killed during a rolling deploy: a phase it reports, or (for the
/// push and the unpack, both of its `staging` phase) what the first agent shows.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A staging file of the archive exists on the first host and has grown.
    Pushing,
    /// An unpack is in progress on the first host.
    Unpacking,
    /// The master reported this phase (as its events spell it) for the first host.
    Phase(&'static str),
}

impl KillAt {
    /// Whether the moment has come, from the fleet and the master's `log`, in which
    /// `phase_line` is how the master reports a phase of a host (`host`, `phase`).
    fn reached(self, fleet: &Fleet, log: &str, phase_line: fn(&str, &str) -> String) -> bool {
        let first = &fleet.agents[0];
        match self {
            KillAt::Pushing => first_bytes_staged(first).is_some(),
            KillAt::Unpacking => !unpacking(first).is_empty(),
            KillAt::Phase(phase) => log.contains(&phase_line(&first.id, phase)),
        }
    }

    /// Whether this moment needs the archive to be large.
    fn large(self) -> bool {
        matches!(self, KillAt::Pushing | KillAt::Unpacking)
    }

    /// Waits (up to `PATIENCE`) until the moment has come, the master's log read by `log`;
    /// the first agent held stopped then, so that a moment within an operation of the
    /// agent (a push, an unpack) is still the moment when the master is killed. `None`:
    /// never reached.
    fn wait(
        self,
        fleet: &Fleet,
        log: impl Fn() -> String,
        phase_line: fn(&str, &str) -> String,
    ) -> Option<Stopped> {
        let first = fleet.agents[0].pid().expect("the first agent runs");
        step_until(first, PATIENCE, || {
            self.reached(fleet, &log(), phase_line).then_some(())
        })
        .map(|((), held)| held)
    }
}

const KILL_AT: [KillAt; 5] = [
    KillAt::Pushing,
    KillAt::Unpacking,
    KillAt::Phase("stopping"),
    KillAt::Phase("starting"),
    KillAt::Phase("verifying"),
];

/// A fleet of two hosts for [`KILL_AT`]: beat 1.0.0, then one version per moment,
/// `<n>.0.0` from 2 on (large where the moment needs it); the cluster file's path after
/// the first deploy, and the archive of each version.
fn fleet_for_master_kills(prefix: &str) -> (Fleet, PathBuf, Vec<(String, String)>) {
    let fleet = Fleet::new(prefix, &["web", "web"]);
    beat_release(fleet.dir.path(), RELEASE, "1.0.0");
    let versions = KILL_AT
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let version = format!("{}.0.0", i + 2);
            let mut archive = beat_release(fleet.dir.path(), RELEASE, &version);
            if at.large() {
                archive = with_payload(&archive, LARGE_PAYLOAD, PAYLOAD_FILE, false);
            }
            let name = archive.file_name().expect("name").to_string_lossy();
            (version, name.into_owned())
        })
        .collect();
    let text = fleet.config(1, "1.0.0", ONE_AT_A_TIME);
    let cluster = fleet.write("cluster.toml", &text);
    deploy_and_expect(&fleet, &cluster, "1.0.0", "the first deploy");
    (fleet, cluster, versions)
}

/// Asserts that no host runs two copies of the release (nor two versions) at once. A copy
/// is a session the agent started: a copy caught starting may show its start script and a
/// subshell of it, one copy.
fn at_most_one_copy_each(fleet: &Fleet, what: &str) {
    let pids = fleet.release_pids(RELEASE);
    let copies: Vec<Vec<i32>> = pids.iter().map(|p| sessions_of(p)).collect();
    assert!(
        copies.iter().all(|c| c.len() <= 1),
        "{what}: sessions {copies:?} of processes {pids:?}:\n{}",
        describe_processes(&pids.concat())
    );
}

#[test]
fn erel_deploy_killed_at_each_phase_of_a_rolling_deploy_finishes_when_run_again() {
    let (fleet, cluster, versions) = fleet_for_master_kills("deploykill");
    for (revision, (at, (version, archive))) in (2..).zip(KILL_AT.iter().zip(&versions)) {
        let what = format!("erel deploy killed at {at:?}");
        let text = fleet.config_of(revision, version, archive, ONE_AT_A_TIME);
        fleet.write("cluster.toml", &text);
        let mut master = spawn_deploy(&fleet, &cluster);
        let reached = at.wait(
            &fleet,
            || master.log(),
            |host, phase| format!("\"host\":\"{host}\",\"phase\":\"{phase}\""),
        );
        master.kill9();
        assert!(
            reached.is_some(),
            "{what}: never reached:\n{}",
            master.log()
        );
        drop(reached);
        at_most_one_copy_each(&fleet, &what);

        let text = deploy_and_expect(&fleet, &cluster, version, &what);
        assert!(!text.contains("NOT rolled back"), "{what}: {text}");
    }
}

#[test]
fn the_file_daemon_killed_at_each_phase_of_a_rolling_deploy_finishes_when_started_again() {
    let (fleet, cluster, versions) = fleet_for_master_kills("daemonkill");
    let daemon = || {
        let mut command = erel_on(&fleet, &cluster, &["master", "--interval", "1"]);
        command.stdin(std::process::Stdio::null());
        Followed::spawn(&mut command, "erel master --cluster")
    };
    for (revision, (at, (version, archive))) in (2..).zip(KILL_AT.iter().zip(&versions)) {
        let what = format!("the daemon killed at {at:?}");
        let text = fleet.config_of(revision, version, archive, ONE_AT_A_TIME);
        fleet.write("cluster.toml", &text);
        let mut master = daemon();
        let reached = at.wait(
            &fleet,
            || master.log(),
            |host, phase| format!("web/{host}: {phase}"),
        );
        master.kill9();
        assert!(
            reached.is_some(),
            "{what}: never reached:\n{}",
            master.log()
        );
        drop(reached);
        at_most_one_copy_each(&fleet, &what);

        let mut master = daemon();
        fleet.wait_all_run(version, PATIENCE, &what, || {
            format!("{}\n{}", master.log(), fleet.agent_logs())
        });
        expect_one_copy_each(&fleet, &what);
        master.kill9();
    }
}

/// Fills the file system of `tmpfs` with a file `ballast` until a write fails for lack
/// of space, leaving `keep` bytes free; the file's path.
fn fill(tmpfs: &Tmpfs, keep: u64) -> PathBuf {
    use std::io::Write;
    let ballast = tmpfs.path.join("ballast");
    let mut file = std::fs::File::create(&ballast).expect("create the ballast");
    let chunk = vec![0u8; 64 << 10];
    loop {
        let (_, free) = tmpfs.space();
        if free <= keep {
            break;
        }
        let room = (free - keep).min(chunk.len() as u64) as usize;
        match file.write(&chunk[..room]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("write the ballast: {e}"),
        }
    }
    file.sync_all().expect("sync the ballast");
    ballast
}

/// A tmpfs of `size`, and a fleet of one agent `id` on it (a reserve of 1 MiB, as the
/// disk is small); `None` when the test cannot mount. (Bound in this order, the agent
/// goes first, the tmpfs last.)
fn fleet_on_tmpfs(size: &str, id: &str) -> Option<(Tmpfs, Fleet)> {
    if !can_mount() {
        return None;
    }
    let tmpfs = Tmpfs::mount(size);
    let pki = Pki::new();
    let reserve = (1u64 << 20).to_string();
    let flags = ["--disk-reserve-bytes", &reserve];
    let agent = AgentProc::start_on_root(&pki, id, &tmpfs.path, &flags);
    Some((tmpfs, Fleet::of(pki, vec![agent], &["web"])))
}

/// Asserts that a deploy's output names the agent's lack of space.
fn names_no_space(text: &str) {
    assert!(
        text.contains("No space left on device") || text.contains("no space"),
        "the lack of space is named: {text}"
    );
}

#[test]
fn a_disk_full_during_write_file_fails_clearly_keeps_the_old_release_and_leaves_no_staging() {
    let Some((tmpfs, fleet)) = fleet_on_tmpfs("64m", "fullpush") else {
        return;
    };
    let LargeUpgrade {
        archive,
        size,
        before,
        v2,
    } = large_upgrade(&fleet);

    // The push was offered room; the disk fills while the bytes arrive (the agent held
    // still meanwhile, so that the transfer cannot end first).
    let (mut master, part) = deploy_until_bytes_staged(&fleet, &v2);
    let ballast = fill(&tmpfs, 0);
    let part = part.map(|(part, held)| {
        held.resume();
        part
    });
    expect_the_push_cut(&mut master, part, size);
    let text = master.log();
    names_no_space(&text);
    // Failed while staging: the events' way of saying "its running release was not
    // touched".
    let failed = [
        "\"host_failed\"",
        "\"host\":\"fullpush\"",
        "\"phase\":\"staging\"",
    ];
    assert_holds_all(&text, &failed);

    let what = "after the disk filled during WriteFile";
    expect_untouched(&fleet, &before, "1.0.0", (&archive, false), what);
    assert_eq!(staged(&fleet.agents[0]), Vec::new(), "{what}");

    std::fs::remove_file(ballast).expect("free the space");
    deploy_and_expect(&fleet, &v2, "2.0.0", "the deploy after space was freed");
}

#[test]
fn a_disk_full_during_unpack_fails_clearly_keeps_the_old_release_and_leaves_no_staging() {
    let Some((tmpfs, fleet)) = fleet_on_tmpfs("64m", "fullunpack") else {
        return;
    };
    beat_release(fleet.dir.path(), RELEASE, "1.0.0");
    // Small to push, large once unpacked.
    let unpacked = 24 << 20;
    let archive = with_payload(
        &beat_release(fleet.dir.path(), RELEASE, "2.0.0"),
        unpacked,
        unpacked,
        true,
    );
    let size = std::fs::metadata(&archive).expect("archive").len();
    let v1 = fleet.write("cluster.toml", &fleet.config(1, "1.0.0", ""));
    deploy_and_expect(&fleet, &v1, "1.0.0", "the first deploy");
    let before = Held::of(&fleet.agents[0], "1.0.0");

    // Room for the archive and the reserve, not for what it holds.
    let ballast = fill(&tmpfs, size + (4 << 20));
    let v2 = fleet.write("cluster.toml", &fleet.config(2, "2.0.0", ""));
    let (ok, text) = deploy(&fleet, &v2);
    assert!(!ok, "{text}");
    names_no_space(&text);
    assert_holds_all(&text, &["fullunpack", "not touched"]);

    let what = "after the disk filled during Unpack";
    expect_untouched(&fleet, &before, "1.0.0", ("beat-2.0.0.tar.gz", true), what);
    assert_eq!(staged(&fleet.agents[0]), Vec::new(), "{what}");

    std::fs::remove_file(ballast).expect("free the space");
    deploy_and_expect(&fleet, &v2, "2.0.0", "the deploy after space was freed");
}

/// Debian's libfaketime, which shifts the clock of the process that preloads it (and of
/// its children) by `FAKETIME` (`+5m`, `-2h`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// An agent `id` on `pki` whose clock is `offset` (`FAKETIME`'s syntax) from the host's.
fn agent_with_clock(pki: &Pki, id: &str, offset: &str) -> AgentProc {
    let env = [("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", offset)];
    AgentProc::start_with_env(pki, id, &env, &[])
}

/// Seconds from the master's clock to the time stamp of the agent's first log line
/// (RFC 3339, as the agent logs it).
fn agent_clock_offset(agent: &AgentProc) -> i64 {
    let log = agent.log();
    let stamp = log.split_whitespace().next().expect("a log line");
    let then = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("time stamp {stamp:?}: {e}\n{log}"));
    (then - time::OffsetDateTime::now_utc()).whole_seconds()
}

/// False, saying why, when libfaketime is not installed.
fn can_fake_clocks() -> bool {
    if Path::new(LIBFAKETIME).exists() {
        return true;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    eprintln!("skipped: {test}: {LIBFAKETIME} is missing (apt-get install faketime)");
    false
}

#[test]
fn hosts_minutes_ahead_or_behind_verify_certificates_and_are_judged_by_the_masters_clock() {
    if !can_fake_clocks() {
        return;
    }
    let pki = Pki::new();
    let agents = vec![
        agent_with_clock(&pki, "ahead-1", "+5m"),
        agent_with_clock(&pki, "behind-2", "-5m"),
    ];
    for (agent, offset) in agents.iter().zip([300, -300]) {
        let seen = agent_clock_offset(agent);
        assert!(
            (seen - offset).abs() < 60,
            "{}'s clock is {seen}s off, not {offset}s",
            agent.id
        );
    }
    let fleet = Fleet::of(pki, agents, &["web", "web"]);
    beat_release(fleet.dir.path(), RELEASE, "1.0.0");

    // Certificates made now verify on both hosts, both ways.
    let v1 = fleet.write("cluster.toml", &fleet.config(1, "1.0.0", ONE_AT_A_TIME));
    let text = deploy_and_expect(&fleet, &v1, "1.0.0", "the first deploy");
    // The health gate waits min_up_secs by the agent's up time, not by its clock.
    for agent in &fleet.agents {
        let verdict = text
            .lines()
            .find(|l| l.contains(&agent.id) && l.contains("healthy"))
            .unwrap_or_else(|| panic!("no verdict for {}: {text}", agent.id));
        let up: u64 = verdict
            .split("agent: up ")
            .nth(1)
            .and_then(|rest| rest.split('s').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no up time: {verdict}"));
        assert!((1..60).contains(&up), "{verdict}");
    }

    // A restart asked for now (the master's clock) restarts each host once: a release
    // started before it, whatever its host's clock says, and then no more.
    let before = fleet.release_pids(RELEASE);
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format now");
    let extra = format!("{ONE_AT_A_TIME}\nrestarted_at = \"{now}\"");
    let v2 = fleet.write("cluster.toml", &fleet.config(2, "1.0.0", &extra));
    deploy_and_expect(&fleet, &v2, "1.0.0", "the restart");
    let after = fleet.release_pids(RELEASE);
    for (before, after) in before.iter().zip(&after) {
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "{before:?} -> {after:?}"
        );
    }
    deploy_and_expect(&fleet, &v2, "1.0.0", "the restart repeated");
    assert_eq!(fleet.release_pids(RELEASE), after, "restarted once");
}

#[test]
fn a_host_clock_behind_by_more_than_the_documented_skew_refuses_the_master_by_name() {
    if !can_fake_clocks() {
        return;
    }
    let pki = Pki::new();
    let agent = agent_with_clock(&pki, "late-1", "-2h");
    let out = pki.erel_at("ping", &agent).output().expect("run erel ping");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert_holds_all(
        &text,
        &["refused our certificate", "not yet valid", "clocks"],
    );
    agent.log_showing_all(&["certificate not valid yet"], PATIENCE);
}
