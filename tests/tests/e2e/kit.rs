//! Host kits: `erel certs host ID --kit FILE` writes one archive; unpacked on a blank host
//! (a scratch prefix here) its `install.sh` installs an agent that starts with the command
//! it prints and takes a deploy, and a second run changes nothing. An existing kit is
//! never overwritten without `--force`, and a missing agent binary is named.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use erel_certs::MasterDir;

use crate::helper::fleet::beat;
use crate::helper::release::{beat_release, sha256};
use crate::helper::{
    free_port, kill_agent_and_releases, listing, output_text, wait_until_blocking, Followed, Pki,
    AGENT_BIN, PATIENCE,
};

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

    let unpacked = work_dir.join("unpacked");
    std::fs::create_dir(&unpacked).expect("mkdir");
    let out = Command::new("tar")
        .arg("xzf")
        .arg(&kit)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", output_text(&out));
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
    let kit_dir = unpacked.join("erel-host-kit-1");

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
