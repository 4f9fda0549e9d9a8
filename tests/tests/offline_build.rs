//! `scripts/offline-build.sh` builds `erel` and `erel-boot` inside a network namespace
//! that has no route anywhere (not even a loopback that is up), with an empty
//! `CARGO_HOME`: every crate comes from the vendored copy, nothing from a registry.
//!
//! Its own test binary: the build it runs is long and CPU-bound, so it runs after the
//! end-to-end tests rather than beside them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    /// Creates one, or says why it cannot.
    fn create() -> Result<Netns, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("creating a network namespace needs root".into());
        }
        let name = format!("erel-offline-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("ip netns add: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Netns(name))
    }

    fn exec(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

#[test]
fn both_binaries_build_from_the_vendored_crates_in_a_namespace_without_a_route() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => {
            eprintln!("skipped: the offline build test needs a network namespace: {why}");
            return;
        }
    };
    // The namespace reaches nothing: no route of either family, no interface up.
    for family in ["-4", "-6"] {
        let routes = run(netns.exec().args(["ip", family, "route", "show"]));
        assert!(
            routes.stdout.is_empty(),
            "the namespace has routes: {}",
            String::from_utf8_lossy(&routes.stdout)
        );
    }
    let links = run(netns.exec().args(["ip", "-brief", "link", "show", "up"]));
    assert!(
        links.stdout.is_empty(),
        "interfaces are up in the namespace: {}",
        String::from_utf8_lossy(&links.stdout)
    );

    let scratch = tempfile::tempdir().expect("scratch directory");
    let vendor = scratch.path().join("vendor");
    let script = workspace().join("scripts/offline-build.sh");

    // With the network: the vendored copy of exactly what Cargo.lock names.
    run(Command::new("bash")
        .arg(&script)
        .arg("vendor")
        .arg(&vendor)
        .current_dir(workspace()));
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).expect("Cargo.lock");
    let from_registry = lock
        .lines()
        .filter(|line| line.starts_with("source = \"registry+"))
        .count();
    let vendored = std::fs::read_dir(&vendor)
        .expect("the vendored copy")
        .filter(|entry| entry.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count();
    assert_eq!(
        vendored, from_registry,
        "one vendored directory per registry crate of Cargo.lock"
    );

    // Without it: an empty CARGO_HOME, so no registry cache can stand in for the copy.
    let cargo_home = scratch.path().join("cargo-home");
    std::fs::create_dir(&cargo_home).expect("empty CARGO_HOME");
    let target = scratch.path().join("target");
    let cargo = run(Command::new("rustup").args(["which", "cargo"]));
    let cargo_bin = Path::new(String::from_utf8_lossy(&cargo.stdout).trim())
        .parent()
        .expect("the toolchain's bin directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        cargo_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let built = run(netns
        .exec()
        .arg("env")
        .arg(format!("PATH={path}"))
        .arg(format!("CARGO_HOME={}", cargo_home.display()))
        .arg(format!("CARGO_TARGET_DIR={}", target.display()))
        // A debug build without debug info: the same crates, compiled sooner.
        .args([
            "PROFILE=dev",
            "CARGO_PROFILE_DEV_DEBUG=0",
            "CARGO_INCREMENTAL=0",
        ])
        .args(["RUSTFLAGS=", "CARGO_BUILD_RUSTFLAGS="])
        .arg("bash")
        .arg(&script)
        .arg("build")
        .arg(&vendor)
        .current_dir(workspace()));
    let stdout = String::from_utf8_lossy(&built.stdout);
    let out_dir = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("the script names its output")
            .trim(),
    );
    assert_eq!(
        out_dir,
        target.join("debug"),
        "the last line names the binaries' directory"
    );
    for (bin, flag) in [("erel", "--version"), ("erel-boot", "--help")] {
        let answer = run(Command::new(out_dir.join(bin)).arg(flag));
        assert!(
            !answer.stdout.is_empty(),
            "{bin} {flag} printed nothing after the offline build"
        );
    }
    // Nothing was fetched: the empty CARGO_HOME holds no registry.
    assert!(
        !cargo_home.join("registry").exists(),
        "the offline build reached for a registry: {}",
        cargo_home.join("registry").display()
    );
}
