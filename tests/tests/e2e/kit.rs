//! Host kits: `erel certs host ID --kit FILE` writes one archive; unpacked on a blank host
//! (a scratch prefix here) its `install.sh` installs an agent that starts with the command
//! it prints and takes a deploy, and a second run changes nothing. An install killed by a
//! signal leaves whole files and no temporary one, and the next run completes it; a host
//! with the Debian package is refused. On a host that runs systemd (a chroot with a
//! stand-in `systemctl` here, as root) the first install enables and starts the unit and
//! later ones keep what the administrator chose. An existing kit is never overwritten
//! without `--force`, and a missing agent binary is named.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use erel_certs::MasterDir;
use nix::sys::signal::Signal;

use crate::helper::fleet::beat;
use crate::helper::release::{beat_release, sha256};
use crate::helper::systemctl::StandInSystemctlRoot;
use crate::helper::{
    free_port, kill_agent_and_releases, listing, output_text, wait_until_blocking, Followed, Pki,
    AGENT_BIN, PATIENCE,
};
use crate::static_agent::root_or_skip;

/// A cluster CA and master certificate made with the master program itself.
fn pki_from_the_cli() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki {
        master: MasterDir::new(dir.path().join("certs")),
        dir,
    };
    let out = pki
        .erel()
        .args(["certs", "init"])
        .output()
        .expect("run erel");
    assert!(out.status.success(), "certs init: {}", output_text(&out));
    pki
}

/// `erel certs host ID --ip 127.0.0.1 --kit KIT` with `extra` flags.
pub(super) fn certs_host_kit(pki: &Pki, id: &str, kit: &Path, extra: &[&str]) -> Output {
    pki.erel()
        .args(["certs", "host", id, "--ip", "127.0.0.1", "--kit"])
        .arg(kit)
        .args(extra)
        .output()
        .expect("run erel certs host")
}

/// Unpacks `kit` into `dir` (created); the kit's directory.
fn unpack(kit: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir(dir).expect("mkdir");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(kit)
        .arg("-C")
        .arg(dir)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", output_text(&out));
    let mut entries = std::fs::read_dir(dir).expect("read").flatten();
    let top = entries.next().expect("the kit's directory").path();
    assert!(
        entries.next().is_none(),
        "one directory in {}",
        kit.display()
    );
    top
}

/// A kit for `id` (with the agent under test) written and unpacked under `work`; the
/// kit's directory.
fn unpacked_kit(pki: &Pki, id: &str, work: &Path) -> PathBuf {
    let kit = work.join(format!("{id}.tar.gz"));
    let out = certs_host_kit(pki, id, &kit, &["--agent", AGENT_BIN]);
    assert!(
        out.status.success(),
        "certs host --kit: {}",
        output_text(&out)
    );
    unpack(&kit, &work.join("unpacked"))
}

/// Runs an unpacked kit's `install.sh --prefix PREFIX`; its stdout lines, after asserting
/// it succeeded.
pub(super) fn install(kit_dir: &Path, prefix: &Path) -> Vec<String> {
    let out = Command::new(kit_dir.join("install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .output()
        .expect("run install.sh");
    assert!(out.status.success(), "install.sh: {}", output_text(&out));
    String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every path under `prefix` but the agent's root, with its mode, owner, modification
/// time and, for a file, the sha256 of its contents.
fn snapshot(prefix: &Path) -> Vec<String> {
    listing(prefix, "")
        .into_iter()
        .filter(|rel| rel != "var/lib/erel" && !rel.starts_with("var/lib/erel/"))
        .map(|rel| {
            let path = prefix.join(&rel);
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let digest = meta.is_file().then(|| sha256(&path));
            let mtime = meta.modified().expect("mtime");
            format!(
                "{rel} {:o} {}:{} {mtime:?} {digest:?}",
                meta.mode(),
                meta.uid(),
                meta.gid()
            )
        })
        .collect()
}

/// The agent an installed kit runs, stopped with everything it started when dropped.
pub(super) struct InstalledAgent {
    pub(super) process: Followed,
    pub(super) root: PathBuf,
}

impl Drop for InstalledAgent {
    fn drop(&mut self) {
        kill_agent_and_releases(&mut self.process, &self.root);
    }
}

impl InstalledAgent {
    /// Runs `start`, the command an `install.sh` printed, for the agent on `root`, and
    /// waits until `host` (`ID@ADDR:PORT`) answers a ping.
    pub(super) fn start(pki: &Pki, start: &str, root: &Path, host: &str) -> Self {
        let argv: Vec<&str> = start.split_whitespace().collect();
        let mut command = Command::new(argv[0]);
        command
            .args(&argv[1..])
            .env("EREL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut agent = InstalledAgent {
            process: Followed::spawn(&mut command, "the installed agent"),
            root: root.to_path_buf(),
        };
        let answered = wait_until_blocking(PATIENCE, || {
            let ping = pki.erel().args(["ping", host]).output().expect("run ping");
            ping.status.success() || !agent.process.running()
        });
        assert!(
            answered && agent.process.running(),
            "the installed agent does not answer:\n{}",
            agent.process.log()
        );
        agent
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn a_kit_installs_an_agent_on_a_blank_host_that_takes_a_deploy_and_a_second_install_changes_nothing(
) {
    let pki = pki_from_the_cli();
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = std::fs::canonicalize(work.path()).expect("canonical");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let kit = work_dir.join("kit-1.tar.gz");
    let out = certs_host_kit(
        &pki,
        "kit-1",
        &kit,
        &["--listen", &listen, "--agent", AGENT_BIN],
    );
    assert!(
        out.status.success(),
        "certs host --kit: {}",
        output_text(&out)
    );
    assert!(output_text(&out).contains("wrote the kit for kit-1"));
    assert_eq!(mode(&kit), 0o600, "the kit holds a host key");

    let kit_dir = unpack(&kit, &work_dir.join("unpacked"));
    let unpacked = work_dir.join("unpacked");
    assert_eq!(
        listing(&unpacked, ""),
        [
            "erel-host-kit-1",
            "erel-host-kit-1/README.md",
            "erel-host-kit-1/boot.toml",
            "erel-host-kit-1/certs",
            "erel-host-kit-1/certs/ca.pem",
            "erel-host-kit-1/certs/crl.pem",
            "erel-host-kit-1/certs/host.key",
            "erel-host-kit-1/certs/host.pem",
            "erel-host-kit-1/erel-boot",
            "erel-host-kit-1/erel-boot.service",
            "erel-host-kit-1/install.sh",
        ]
    );

    // A blank host: nothing under the prefix yet.
    let prefix = work_dir.join("host");
    let lines = install(&kit_dir, &prefix);
    let bin = prefix.join("usr/local/bin/erel-boot");
    let conf = prefix.join("etc/erel/boot.toml");
    let certs = prefix.join("etc/erel/certs");
    let root = prefix.join("var/lib/erel");
    let unit = prefix.join("etc/systemd/system/erel-boot.service");
    let start = format!("{} --config {}", bin.display(), conf.display());
    assert_eq!(lines.last(), Some(&start), "{lines:#?}");
    for path in [&bin, &conf, &unit] {
        let line = format!("installed {}", path.display());
        assert!(lines.contains(&line), "{line} not in {lines:#?}");
    }
    assert_eq!(
        std::fs::read(&bin).expect("agent"),
        std::fs::read(AGENT_BIN).expect("built agent")
    );
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        (mode(&certs), mode(&certs.join("host.key"))),
        (0o700, 0o600)
    );
    // Searchable by the users releases run as: the agent refuses a start whose user
    // cannot reach its program.
    assert_eq!(mode(&root), 0o755);
    let owner = nix::unistd::geteuid().as_raw();
    assert_eq!(std::fs::metadata(&root).expect("root").uid(), owner);
    let config = std::fs::read_to_string(&conf).expect("boot.toml");
    for line in [
        format!("listen = \"{listen}\""),
        format!("root = \"{}\"", root.display()),
        format!("certs = \"{}\"", certs.display()),
    ] {
        assert!(config.lines().any(|l| l == line), "{line} not in\n{config}");
    }
    // The shipped unit, but for where the agent and its configuration are.
    let shipped = std::fs::read_to_string(kit_dir.join("erel-boot.service")).expect("unit");
    assert_eq!(
        std::fs::read_to_string(&unit).expect("installed unit"),
        shipped.replace(
            "ExecStart=/usr/local/bin/erel-boot --config /etc/erel/boot.toml",
            &format!("ExecStart={start}")
        )
    );

    let host = format!("kit-1@{listen}");
    let mut agent = InstalledAgent::start(&pki, &start, &root, &host);

    let releases = work_dir.join("site/releases");
    std::fs::create_dir_all(&releases).expect("mkdir");
    let archive = beat_release(&releases, "beat", "1");
    let beat_port = free_port();
    let cluster = work_dir.join("site/cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "revision = 1\n[[host]]\nid = \"kit-1\"\naddr = \"{listen}\"\ngroup = \"web\"\n\
             env = {{ BEAT_PORT = \"{beat_port}\" }}\n\
             [group.web]\nrelease = \"beat\"\nversion = \"1\"\narchive = \"releases/{}\"\n\
             stop_grace_secs = 5\n\
             health = {{ tcp = \"$BEAT_PORT\", min_up_secs = 1, deadline_secs = 15 }}\n",
            archive.file_name().expect("name").to_string_lossy()
        ),
    )
    .expect("write cluster file");
    let out = pki
        .erel()
        .arg("deploy")
        .arg("--cluster")
        .arg(&cluster)
        .output()
        .expect("run erel deploy");
    assert!(
        out.status.success(),
        "deploy: {}\nagent log:\n{}",
        output_text(&out),
        agent.process.log()
    );
    let serving = || beat(beat_port) == "beat 1 kit-1";
    assert!(
        wait_until_blocking(PATIENCE, serving),
        "{}",
        beat(beat_port)
    );
    assert!(
        root.join("releases/beat/1").is_dir(),
        "under the installed root"
    );

    // Again, with the agent running: nothing is rewritten, and it says what it kept.
    let before = snapshot(&prefix);
    let again = install(&kit_dir, &prefix);
    assert_eq!(snapshot(&prefix), before);
    assert_eq!(again.last(), Some(&start));
    let kept = ["ca.pem", "host.pem", "crl.pem", "host.key"].map(|name| certs.join(name));
    let expected = kept
        .iter()
        .chain([&conf])
        .map(|path| format!("kept existing {}", path.display()))
        .chain([&bin, &unit].map(|path| format!("unchanged {}", path.display())));
    for line in expected {
        assert!(again.contains(&line), "{line} not in {again:#?}");
    }
    let wrote: Vec<&String> = again
        .iter()
        .filter(|l| l.starts_with("installed") || l.starts_with("created"))
        .collect();
    assert!(wrote.is_empty(), "{wrote:?}");
    assert!(serving(), "the release still runs: {}", beat(beat_port));
    assert!(agent.process.running(), "{}", agent.process.log());
}

#[test]
fn an_existing_kit_is_refused_without_force_and_a_missing_agent_is_named() {
    let pki = pki_from_the_cli();
    let work = tempfile::tempdir().expect("tempdir");
    let agent = work.path().join("erel-boot");
    std::fs::write(&agent, "#!/bin/sh\n").expect("write a stand-in agent");
    let agent_arg = agent.to_str().expect("utf8");

    let kit = work.path().join("kit-2.tar.gz");
    std::fs::write(&kit, "an earlier kit").expect("write");
    let out = certs_host_kit(&pki, "kit-2", &kit, &["--agent", agent_arg]);
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&kit.display().to_string()) && text.contains("--force"),
        "{text}"
    );
    assert_eq!(std::fs::read(&kit).expect("kit"), b"an earlier kit");
    assert!(
        !pki.master.host_dir("kit-2").exists(),
        "no bundle issued for a refused kit"
    );

    let out = certs_host_kit(&pki, "kit-2", &kit, &["--agent", agent_arg, "--force"]);
    assert!(out.status.success(), "--force: {}", output_text(&out));
    assert_eq!(mode(&kit), 0o600);
    assert_ne!(std::fs::read(&kit).expect("kit"), b"an earlier kit");

    let missing = work.path().join("no-such-dir/erel-boot");
    let out = certs_host_kit(
        &pki,
        "kit-3",
        &work.path().join("kit-3.tar.gz"),
        &["--agent", missing.to_str().expect("utf8")],
    );
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&missing.display().to_string()) && text.contains("scripts/build-agent.sh"),
        "{text}"
    );
    assert!(!pki.master.host_dir("kit-3").exists());
    assert!(!work.path().join("kit-3.tar.gz").exists());
}

/// Every regular file under `dir`: its relative path, mode and contents.
fn files(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    listing(dir, "")
        .into_iter()
        .filter(|rel| dir.join(rel).is_file())
        .map(|rel| {
            let path = dir.join(&rel);
            let contents = std::fs::read(&path).expect("read");
            (rel, (mode(&path), contents))
        })
        .collect()
}

/// A stand-in for sync(1) first on `PATH`: counts its calls in `$SYNC_CALLS` and, at call
/// `$KILL_AT`, sends `$KILL_WITH` to its parent (the installer) instead of syncing.
const STAND_IN_SYNC: &str = r#"#!/bin/sh
n=$(($(cat "$SYNC_CALLS" 2>/dev/null || echo 0) + 1))
echo "$n" >"$SYNC_CALLS"
if [ "$n" = "${KILL_AT:-0}" ]; then
    kill -"$KILL_WITH" "$PPID"
    exit 0
fi
exec /usr/bin/sync "$@"
"#;

#[test]
fn an_install_killed_at_any_file_leaves_no_part_and_no_temporary_file_and_a_second_run_completes() {
    let pki = pki_from_the_cli();
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = std::fs::canonicalize(work.path()).expect("canonical");
    let kit_dir = unpacked_kit(&pki, "kit-4", &work_dir);
    let stand_in = work_dir.join("stand-in");
    std::fs::create_dir(&stand_in).expect("mkdir");
    std::fs::write(stand_in.join("sync"), STAND_IN_SYNC).expect("write");
    std::fs::set_permissions(stand_in.join("sync"), PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let calls = work_dir.join("sync-calls");
    let tmp = work_dir.join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir");
    let prefix = work_dir.join("host");
    let path = format!(
        "{}:{}",
        stand_in.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |kill_at: usize, signal: Signal| {
        let _ = std::fs::remove_file(&calls);
        Command::new(kit_dir.join("install.sh"))
            .arg("--prefix")
            .arg(&prefix)
            .env("PATH", &path)
            .env("TMPDIR", &tmp)
            .env("SYNC_CALLS", &calls)
            .env("KILL_AT", kill_at.to_string())
            .env("KILL_WITH", &signal.as_str()[3..])
            .stdin(Stdio::null())
            .output()
            .expect("run install.sh")
    };

    let out = run(0, Signal::SIGTERM);
    assert!(out.status.success(), "install.sh: {}", output_text(&out));
    let complete = files(&prefix);
    // The agent, boot.toml, four bundle files and the unit: each fsynced, then its
    // directory once it is renamed.
    assert_eq!(complete.len(), 7, "{:?}", complete.keys());
    let syncs: usize = std::fs::read_to_string(&calls)
        .expect("sync calls")
        .trim()
        .parse()
        .expect("a count");
    assert_eq!(syncs, 2 * complete.len());
    std::fs::remove_dir_all(&prefix).expect("remove");

    let signals = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];
    for kill_at in 1..=syncs {
        let signal = signals[kill_at % signals.len()];
        let out = run(kill_at, signal);
        assert_eq!(
            out.status.signal(),
            Some(signal as i32),
            "killed at sync {kill_at} by {signal}: {}",
            output_text(&out)
        );
        let temporary: Vec<String> = listing(&prefix, "")
            .into_iter()
            .filter(|rel| rel.contains(".install-tmp."))
            .collect();
        assert!(temporary.is_empty(), "at sync {kill_at}: {temporary:?}");
        assert_eq!(listing(&tmp, ""), Vec::<String>::new(), "at sync {kill_at}");
        // Only whole files, the ones renamed before the signal.
        let partial = files(&prefix);
        assert_eq!(partial.len(), kill_at / 2, "at sync {kill_at}");
        for (rel, file) in &partial {
            assert_eq!(Some(file), complete.get(rel), "{rel} at sync {kill_at}");
        }

        let out = run(0, signal);
        assert!(
            out.status.success(),
            "again after sync {kill_at}: {}",
            output_text(&out)
        );
        assert!(files(&prefix) == complete, "again after sync {kill_at}");
        std::fs::remove_dir_all(&prefix).expect("remove");
    }
}

#[test]
fn a_kit_is_not_installed_over_the_debian_package() {
    let pki = pki_from_the_cli();
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = std::fs::canonicalize(work.path()).expect("canonical");
    let kit_dir = unpacked_kit(&pki, "kit-6", &work_dir);
    let prefix = work_dir.join("host");
    let packaged = prefix.join("usr/sbin/erel-boot");
    std::fs::create_dir_all(packaged.parent().expect("dir")).expect("mkdir");
    std::fs::write(&packaged, "the package's agent").expect("write");
    let out = Command::new(kit_dir.join("install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .output()
        .expect("run install.sh");
    let text = output_text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&packaged.display().to_string()) && text.contains("upgrade it with dpkg"),
        "{text}"
    );
    assert_eq!(
        listing(&prefix, ""),
        ["usr", "usr/sbin", "usr/sbin/erel-boot"]
    );
}

/// A stand-in systemd host (see `StandInSystemctlRoot`) with a kit for `id` unpacked at
/// its `/kit`; the host and the temporary directory the kit was written in.
fn systemd_host_with_kit(id: &str) -> (StandInSystemctlRoot, tempfile::TempDir) {
    let pki = pki_from_the_cli();
    let work = tempfile::tempdir().expect("tempdir");
    let work_dir = std::fs::canonicalize(work.path()).expect("canonical");
    let kit_dir = unpacked_kit(&pki, id, &work_dir);
    let host = StandInSystemctlRoot::new();
    let out = Command::new("cp")
        .arg("-a")
        .arg(&kit_dir)
        .arg(host.at("/kit"))
        .output()
        .expect("run cp");
    assert!(out.status.success(), "cp: {}", output_text(&out));
    (host, work)
}

#[test]
fn on_a_systemd_host_install_sh_enables_the_unit_once_and_keeps_the_administrators_choice() {
    let test =
        "on_a_systemd_host_install_sh_enables_the_unit_once_and_keeps_the_administrators_choice";
    if !root_or_skip(test) {
        return;
    }
    let (host, _work) = systemd_host_with_kit("kit-5");
    let install = || host.run_ok(&["/kit/install.sh"]);
    let change = |path: &str, more: &[u8]| {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(host.at(path))
            .expect("open");
        file.write_all(more).expect("append");
    };
    let unit = "erel-boot.service";

    // A blank host: installed where a binary installed by hand belongs, the unit
    // pointing at it, enabled and started.
    let text = install();
    assert_eq!(
        text.lines().last(),
        Some("/usr/local/bin/erel-boot --config /etc/erel/boot.toml"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(host.at("/usr/local/bin/erel-boot")).expect("agent"),
        std::fs::read(AGENT_BIN).expect("built agent")
    );
    let installed_unit =
        std::fs::read_to_string(host.at("/etc/systemd/system/erel-boot.service")).expect("unit");
    assert!(
        installed_unit
            .contains("\nExecStart=/usr/local/bin/erel-boot --config /etc/erel/boot.toml\n"),
        "{installed_unit}"
    );
    assert_eq!(
        host.calls(),
        ["daemon-reload".to_string(), format!("enable --now {unit}")]
    );
    assert_eq!(host.unit(), (true, true));

    // Nothing changed: systemd is not touched.
    install();
    assert_eq!(host.calls(), Vec::<String>::new());

    // The administrator disabled and stopped it: a new agent binary leaves it so.
    host.set_unit(false, false);
    change("/kit/erel-boot", b"\n");
    let text = install();
    assert_eq!(host.calls(), [format!("is-active --quiet {unit}")]);
    assert_eq!(host.unit(), (false, false));
    assert!(text.contains("as it was"), "{text}");

    // Running: a new binary restarts it, a new unit is reloaded first.
    host.set_unit(true, true);
    change("/kit/erel-boot", b"\n");
    install();
    assert_eq!(
        host.calls(),
        [
            format!("is-active --quiet {unit}"),
            format!("restart {unit}")
        ]
    );
    change("/kit/erel-boot.service", b"# changed\n");
    install();
    assert_eq!(
        host.calls(),
        [
            "daemon-reload".to_string(),
            format!("is-active --quiet {unit}"),
            format!("restart {unit}")
        ]
    );
    assert_eq!(host.unit(), (true, true));
}

#[test]
fn on_a_systemd_host_an_install_cut_off_before_it_enabled_the_unit_is_completed_by_a_rerun() {
    let test =
        "on_a_systemd_host_an_install_cut_off_before_it_enabled_the_unit_is_completed_by_a_rerun";
    if !root_or_skip(test) {
        return;
    }
    let (host, _work) = systemd_host_with_kit("kit-6");
    let unit = "erel-boot.service";

    // The first install writes the unit, then stops where `systemctl enable` fails.
    host.fail_next_enable();
    let out = host.run(&["/kit/install.sh"]);
    assert!(
        !out.status.success(),
        "an install whose enable failed must fail: {}",
        output_text(&out)
    );
    assert!(host.at("/etc/systemd/system/erel-boot.service").exists());
    assert_eq!(host.unit(), (false, false));
    host.calls();

    // The rerun finds the unit in place but never enabled: it enables and starts it.
    let text = host.run_ok(&["/kit/install.sh"]);
    assert_eq!(host.calls(), [format!("enable --now {unit}")], "{text}");
    assert_eq!(host.unit(), (true, true));

    // From then on the administrator's choice holds.
    host.set_unit(false, false);
    host.run_ok(&["/kit/install.sh"]);
    assert_eq!(host.calls(), Vec::<String>::new());
    assert_eq!(host.unit(), (false, false));
}
