//! The static agent (`scripts/build-agent.sh`) and its Debian package
//! (`scripts/build-deb.sh`): one executable that needs no shared library and no NSS
//! module, so it serves from a chroot that holds nothing but itself, its certificate
//! bundle, its root, `/dev/null`, a `/proc` (mounted in a mount namespace of its own) and,
//! for a release run as a user, a minimal `/etc/passwd` and `/etc/group`.
//!
//! The chroot and package tests need root (chroot, mounts, device nodes, files owned by
//! root): without it they print a `skipped: ...` line and pass.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use erel_master::release::{write_tarball, ReleaseFile};
use erel_master::{AgentClient, HostAddr};
use erel_proto::{ReleaseState, Start};

use crate::helper::install::push_and_unpack;
use crate::helper::systemctl::StandInSystemctlRoot;
use crate::helper::{
    fast_supervision, output_text, poll_until, processes_with_env, wait_until, AgentCommands,
    Followed, Pki, PATIENCE,
};

/// The size the static agent must stay under.
const MAX_AGENT_BYTES: u64 = 4 * 1024 * 1024;
/// The agent's root inside the chroot.
const CHROOT_ROOT: &str = "/var/lib/erel";
/// The agent's bundle inside the chroot.
const CHROOT_CERTS: &str = "/etc/erel/certs";
/// The agent's drain bound after SIGTERM (fixed in the agent), and a margin to exit.
const AGENT_EXIT: Duration = Duration::from_secs(40);

/// The workspace's root directory.
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the tests crate")
}

/// Runs `scripts/<script> ARGS..` and returns the path its last line prints.
fn script_output(script: &str, args: &[&Path]) -> PathBuf {
    let out = Command::new("bash")
        .arg(workspace().join("scripts").join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        output_text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let path = PathBuf::from(last.trim());
    assert!(path.is_file(), "{script} printed {last:?}, not a file");
    path
}

/// The static agent, built once per test binary.
fn static_agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| script_output("build-agent.sh", &[]))
}

/// True when running as root; otherwise prints why `test` is skipped.
pub(super) fn root_or_skip(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        println!("skipped: {test} needs root (chroot, mounts, device nodes)");
    }
    root
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

#[test]
fn the_static_agent_is_one_static_executable_under_4_mib() {
    let agent = static_agent();
    let file = output_text(&run(Command::new("file").arg("-b").arg(agent)));
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "file(1) says {file}"
    );
    assert!(!file.contains("interpreter"), "file(1) says {file}");
    // ldd exits non-zero on a static executable; what it prints is what counts.
    let ldd = output_text(&run(Command::new("ldd").arg(agent)));
    assert!(
        ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
        "ldd says {ldd}"
    );
    let size = std::fs::metadata(agent).expect("agent").len();
    assert!(
        size < MAX_AGENT_BYTES,
        "{} is {size} bytes, not under {MAX_AGENT_BYTES}",
        agent.display()
    );
}

/// A directory for `chroot` holding the static agent, `id`'s bundle, an empty root,
/// `/dev/null` and a `/proc` mount point; `passwd` and `group` in `/etc` when given.
struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    fn new(pki: &Pki, id: &str, accounts: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |path: &str| dir.path().join(path.trim_start_matches('/'));
        // The chroot's `/` is searchable by the users releases run as.
        set_mode(dir.path(), 0o755);
        for path in ["/proc", "/dev", CHROOT_ROOT, CHROOT_CERTS] {
            std::fs::create_dir_all(at(path)).expect("create a chroot directory");
            set_mode(&at(path), 0o755);
        }
        std::fs::copy(static_agent(), at("/erel-boot")).expect("copy the agent");
        for entry in std::fs::read_dir(pki.bundle(id)).expect("bundle") {
            let entry = entry.expect("bundle entry");
            let to = at(CHROOT_CERTS).join(entry.file_name());
            std::fs::copy(entry.path(), to).expect("copy the bundle");
        }
        nix::sys::stat::mknod(
            &at("/dev/null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .expect("mknod /dev/null");
        set_mode(&at("/dev/null"), 0o666);
        if let Some((passwd, group)) = accounts {
            std::fs::create_dir_all(at("/etc")).expect("create /etc");
            std::fs::write(at("/etc/passwd"), passwd).expect("write /etc/passwd");
            std::fs::write(at("/etc/group"), group).expect("write /etc/group");
        }
        Chroot { dir }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The static agent for host `id` serving from a [`Chroot`], in a mount namespace of its
/// own where `/proc` is mounted. Dropped: the agent, its releases and their output
/// writers are killed, and the chroot is removed.
struct ChrootAgent {
    id: String,
    addr: SocketAddr,
    process: Followed,
    chroot: Chroot,
}

impl ChrootAgent {
    async fn start(id: &str, chroot: Chroot) -> Self {
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--mount-proc=/proc"])
            .arg(format!("--root={}", chroot.dir.path().display()))
            .args(["/erel-boot", "--listen", "127.0.0.1:0"])
            .args(["--root", CHROOT_ROOT, "--certs", CHROOT_CERTS])
            // The chroot holds no /sys: releases are tracked without cgroups.
            .args(["--cgroup-parent", "none"])
            .args(fast_supervision())
            .env_clear()
            .env("EREL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let process = Followed::spawn(&mut command, "the static agent in a chroot");
        let log = process.log_showing("listen=", PATIENCE).await;
        let addr = log
            .split_whitespace()
            .find_map(|word| word.strip_prefix("listen=")?.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in the agent's log:\n{log}"));
        ChrootAgent {
            id: id.to_string(),
            addr,
            process,
            chroot,
        }
    }

    fn host(&self) -> HostAddr {
        HostAddr {
            id: self.id.clone(),
            addr: self.addr.to_string(),
        }
    }

    async fn connect(&self, pki: &Pki) -> AgentClient {
        erel_master::client::Connector::new(pki.client_config(), "test-master")
            .connect(&self.host())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}\nagent log:\n{}", self.process.log()))
    }

    /// Live processes of the agent's releases (this host id, this root).
    fn release_pids(&self) -> Vec<i32> {
        processes_with_env(&[
            format!("EREL_HOST_ID={}", self.id),
            format!("EREL_ROOT={CHROOT_ROOT}"),
        ])
    }
}

impl Drop for ChrootAgent {
    fn drop(&mut self) {
        let exited = self.process.terminate_within(AGENT_EXIT);
        let pids = self.release_pids();
        for pid in &pids {
            let pid = nix::unistd::Pid::from_raw(*pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // The output writers end with their releases' output; nothing of this chroot
        // may be left running once it is removed.
        let root = std::fs::canonicalize(self.chroot.dir.path()).expect("chroot");
        let gone = crate::helper::poll_until_blocking(PATIENCE, || {
            processes_in_chroot(&root).is_empty().then_some(())
        });
        if !std::thread::panicking() {
            assert!(
                exited,
                "the agent did not exit cleanly:\n{}",
                self.process.log()
            );
            assert!(gone.is_some(), "processes left in the chroot: {pids:?}");
        }
    }
}

/// Live processes whose root directory is `root`.
fn processes_in_chroot(root: &Path) -> Vec<i32> {
    let entries = std::fs::read_dir("/proc").expect("/proc");
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let link = std::fs::read_link(format!("/proc/{pid}/root"));
            link.is_ok_and(|link| link == root)
        })
        .collect()
}

/// A fresh PKI and the static agent for host `id` in a [`Chroot`] with `accounts`;
/// `None` (and `test` said to be skipped) when not running as root.
async fn pki_and_chroot_agent(
    test: &str,
    id: &str,
    accounts: Option<(&str, &str)>,
) -> Option<(Pki, ChrootAgent)> {
    if !root_or_skip(test) {
        return None;
    }
    let pki = Pki::new();
    let chroot = Chroot::new(&pki, id, accounts);
    let agent = ChrootAgent::start(id, chroot).await;
    Some((pki, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_agent_serves_from_a_chroot_holding_only_itself() {
    let test = "the_static_agent_serves_from_a_chroot_holding_only_itself";
    let Some((pki, agent)) = pki_and_chroot_agent(test, "static-1", None).await else {
        return;
    };
    let out = run(pki.erel().arg("ping").arg(agent.host().to_string()));
    let text = output_text(&out);
    assert!(out.status.success(), "erel ping: {text}");
    assert!(text.contains("static-1") && text.contains(" ok "), "{text}");
}

/// A program that only waits, linked statically, so that it runs in the chroot.
fn idle_program(dir: &Path) -> PathBuf {
    let source = dir.join("idle.c");
    let mut file = std::fs::File::create(&source).expect("create idle.c");
    writeln!(
        file,
        "#include <unistd.h>\nint main(void) {{ for (;;) pause(); }}"
    )
    .expect("write idle.c");
    let program = dir.join("idle");
    let out = run(Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(&program)
        .arg(&source));
    assert!(out.status.success(), "cc -static: {}", output_text(&out));
    program
}

/// The `Name:` line of `/proc/<pid>/status`, its values split.
fn status_line(pid: u32, name: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} line in:\n{status}"));
    line.split_whitespace()
        .map(|v| v.parse().expect("a number"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_in_the_chroot_runs_as_a_user_of_its_passwd_file() {
    let test = "a_release_in_the_chroot_runs_as_a_user_of_its_passwd_file";
    let passwd = "# only what the release needs\nroot:x:0:0:root:/:/erel-boot\n\
                  app:x:4242:4242:the release:/var/lib/erel/data/idle:/nonexistent\n";
    let group = "root:x:0:\napp:x:4242:\nkeys:x:4343:other,app\nnot-app:x:4444:application\n";
    let accounts = Some((passwd, group));
    let Some((pki, agent)) = pki_and_chroot_agent(test, "static-2", accounts).await else {
        return;
    };

    let work = tempfile::tempdir().expect("tempdir");
    let files = [
        ReleaseFile::program("bin/idle", &idle_program(work.path())).expect("program"),
        ReleaseFile::marker("idle", "1"),
    ];
    let tarball = write_tarball(work.path(), "idle", "1", &files).expect("tarball");
    let mut client = agent.connect(&pki).await;
    push_and_unpack(&mut client, &tarball, "idle", "1").await;
    let start = |user: &str| Start {
        name: "idle".into(),
        version: "1".into(),
        argv: vec!["bin/idle".into()],
        env: Vec::new(),
        user: Some(user.into()),
    };
    let refused = client.start(start("nobody-here")).await;
    let refusal = format!("{:?}", refused.expect_err("an unknown user is refused"));
    assert!(refusal.contains("unknown user 'nobody-here'"), "{refusal}");
    client.start(start("app")).await.expect("start as app");

    let pid = poll_until(PATIENCE, || async {
        let pong = agent.connect(&pki).await.ping().await.ok()?;
        let idle = pong.releases.into_iter().find(|r| r.name == "idle")?;
        (idle.state == ReleaseState::Running)
            .then_some(idle.pid)
            .flatten()
    })
    .await
    .unwrap_or_else(|| panic!("idle never ran:\n{}", agent.process.log()));
    assert_eq!(status_line(pid, "Uid"), [4242; 4]);
    assert_eq!(status_line(pid, "Gid"), [4242; 4]);
    assert_eq!(status_line(pid, "Groups"), [4242, 4343]);
    assert!(
        wait_until(PATIENCE, || async { agent.release_pids() == [pid as i32] }).await,
        "the release is found by its environment"
    );
}

/// A scratch root for `dpkg --root`: its administrative directory, empty.
fn dpkg_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let admin = root.path().join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir)).expect("create the dpkg admin directory");
    }
    std::fs::write(admin.join("status"), "").expect("status");
    root
}

/// `dpkg --root ROOT ARGS..`, its maintainer scripts run outside a chroot with
/// `$DPKG_ROOT` set; panics with its output when it fails.
fn dpkg(root: &Path, args: &[&str]) -> String {
    let out = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--log=/dev/null"])
        .args(args));
    let text = output_text(&out);
    assert!(out.status.success(), "dpkg {args:?}: {text}");
    text
}

#[test]
fn the_debian_package_installs_keeps_configuration_and_removes_cleanly() {
    if !root_or_skip("the_debian_package_installs_keeps_configuration_and_removes_cleanly") {
        return;
    }
    let deb = script_output("build-deb.sh", &[static_agent()]);
    let shows = [
        (
            "--info",
            &[
                "Package: erel-boot",
                "Architecture: amd64",
                "conffiles",
                "postinst",
            ],
        ),
        (
            "--contents",
            &[
                "-rwxr-xr-x root/root",
                "./usr/sbin/erel-boot",
                "./lib/systemd/system/erel-boot.service",
                "./etc/erel/boot.toml",
            ],
        ),
    ];
    for (what, needles) in shows {
        let text = output_text(&run(Command::new("dpkg-deb").arg(what).arg(&deb)));
        for needle in needles {
            assert!(
                text.contains(needle),
                "{needle:?} not in dpkg-deb {what}:\n{text}"
            );
        }
    }

    let root = dpkg_root();
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    // A configuration written before the package (by provisioning, say) is kept.
    let mine = "listen = \"127.0.0.1:7171\"\n";
    std::fs::create_dir_all(at("/etc/erel")).expect("create /etc/erel");
    std::fs::write(at("/etc/erel/boot.toml"), mine).expect("write boot.toml");
    let deb_arg = deb.to_str().expect("utf-8 path");
    dpkg(root.path(), &["--force-confold", "--install", deb_arg]);
    let read = |path: &str| std::fs::read(at(path)).unwrap_or_default();
    assert_eq!(
        read("/usr/sbin/erel-boot"),
        std::fs::read(static_agent()).expect("agent")
    );
    let unit = String::from_utf8(read("/lib/systemd/system/erel-boot.service")).expect("unit");
    assert!(
        unit.contains("\nExecStart=/usr/sbin/erel-boot --config /etc/erel/boot.toml\n"),
        "{unit}"
    );
    assert_eq!(read("/etc/erel/boot.toml"), mine.as_bytes());
    let mode = |path: &str| {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(at(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        (meta.mode() & 0o7777, meta.uid())
    };
    assert_eq!(mode("/var/lib/erel"), (0o755, 0));
    assert_eq!(mode("/etc/erel/certs"), (0o700, 0));

    // Installed again, the package's boot.toml unchanged: the edited one stays, unasked.
    dpkg(root.path(), &["--install", deb_arg]);
    assert_eq!(read("/etc/erel/boot.toml"), mine.as_bytes());

    // Keys are never removed; a root the package made and nothing filled goes on purge.
    std::fs::write(at("/etc/erel/certs/host.key"), "key").expect("write host.key");
    dpkg(root.path(), &["--remove", "erel-boot"]);
    assert!(!at("/usr/sbin/erel-boot").exists());
    assert!(!at("/lib/systemd/system/erel-boot.service").exists());
    assert_eq!(read("/etc/erel/boot.toml"), mine.as_bytes());
    assert!(at("/var/lib/erel").is_dir() && at("/etc/erel/certs/host.key").is_file());
    dpkg(root.path(), &["--purge", "erel-boot"]);
    assert!(!at("/etc/erel/boot.toml").exists());
    assert!(!at("/var/lib/erel").exists(), "the empty root is purged");
    assert_eq!(read("/etc/erel/certs/host.key"), b"key");
    let status = read("/var/lib/dpkg/status");
    assert!(
        !String::from_utf8_lossy(&status).contains("Package: erel-boot"),
        "dpkg still knows the package"
    );
}

#[test]
fn on_a_systemd_host_the_packages_scripts_enable_on_first_install_only_and_restart_what_runs() {
    let test =
        "on_a_systemd_host_the_packages_scripts_enable_on_first_install_only_and_restart_what_runs";
    if !root_or_skip(test) {
        return;
    }
    // The maintainer scripts the package ships (scripts/build-deb.sh copies them as they
    // are), run as dpkg runs them on the host.
    let host = StandInSystemctlRoot::new();
    std::fs::create_dir(host.at("/debian")).expect("mkdir");
    for script in ["postinst", "prerm", "postrm"] {
        std::fs::copy(
            workspace().join("boot/debian").join(script),
            host.at(&format!("/debian/{script}")),
        )
        .expect("copy a maintainer script");
    }
    let script = |argv: &[&str]| host.run_ok(&[&["/bin/sh"], argv].concat());
    let unit = "erel-boot.service";
    let mode = |path: &str| {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(host.at(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        (meta.mode() & 0o7777, meta.uid())
    };

    // The first install, no bundle yet: enabled, not started, and it says what to do.
    let text = script(&["/debian/postinst", "configure", ""]);
    assert_eq!(
        host.calls(),
        ["daemon-reload".to_string(), format!("enable {unit}")]
    );
    assert_eq!(host.unit(), (true, false));
    assert!(text.contains("put the host bundle"), "{text}");
    assert_eq!(mode("/var/lib/erel"), (0o755, 0));
    assert_eq!(mode("/etc/erel/certs"), (0o700, 0));

    // An upgrade with the bundle in place: restarted on the new binary, not re-enabled.
    std::fs::write(host.at("/etc/erel/certs/host.pem"), "a certificate").expect("write");
    script(&["/debian/postinst", "configure", "0.1.0"]);
    assert_eq!(
        host.calls(),
        [
            "daemon-reload".to_string(),
            format!("is-enabled --quiet {unit}"),
            format!("restart {unit}")
        ]
    );
    assert_eq!(host.unit(), (true, true));

    // The administrator disabled and stopped it: an upgrade leaves it so.
    host.set_unit(false, false);
    script(&["/debian/postinst", "configure", "0.1.0"]);
    assert_eq!(
        host.calls(),
        [
            "daemon-reload".to_string(),
            format!("is-enabled --quiet {unit}"),
            format!("is-active --quiet {unit}")
        ]
    );
    assert_eq!(host.unit(), (false, false));

    // Removed: stopped, its enablement kept for a reinstall; purged: enablement gone.
    host.set_unit(true, true);
    script(&["/debian/prerm", "remove"]);
    assert_eq!(host.calls(), [format!("stop {unit}")]);
    script(&["/debian/postrm", "remove"]);
    assert_eq!(host.calls(), ["daemon-reload"]);
    let wants = host.at("/etc/systemd/system/multi-user.target.wants/erel-boot.service");
    std::fs::create_dir_all(wants.parent().expect("dir")).expect("mkdir");
    std::os::unix::fs::symlink("/lib/systemd/system/erel-boot.service", &wants).expect("symlink");
    script(&["/debian/postrm", "purge"]);
    assert_eq!(host.calls(), ["daemon-reload"]);
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "enablement kept"
    );
    // A bundle directory holding a certificate stays; the empty root goes.
    assert!(host.at("/etc/erel/certs/host.pem").is_file());
    assert!(!host.at("/var/lib/erel").exists());
}
