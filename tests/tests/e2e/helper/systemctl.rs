//! A scratch root for `chroot` in which a script's systemd branch runs without systemd:
//! `/run/systemd/system` exists (what sd_booted(3) and the scripts check) and the
//! `systemctl` first on `PATH` is a stand-in that records its calls and keeps one unit's
//! enabled and active state in two files. Nothing is started: the tests check which calls
//! a script makes, not what systemd would do with them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::output_text;

/// The stand-in `systemctl`, in the scratch root's `/stand-in/`.
const STAND_IN_SYSTEMCTL: &str = r#"#!/bin/sh
# A stand-in for systemctl(1), not systemd: records each call in /systemctl.calls and
# keeps one unit's state in /systemctl.enabled and /systemctl.active. While
# /systemctl.fail-enable exists, `enable` fails (once: it removes the file).
echo "$*" >>/systemctl.calls
if [ "$1" = enable ] && [ -e /systemctl.fail-enable ]; then
    rm -f /systemctl.fail-enable
    echo "stand-in systemctl: enable failed as the test asked" >&2
    exit 1
fi
case "$1" in
is-enabled) [ -e /systemctl.enabled ] ;;
is-active) [ -e /systemctl.active ] ;;
enable)
    : >/systemctl.enabled
    [ "$2" != --now ] || : >/systemctl.active
    ;;
disable) rm -f /systemctl.enabled ;;
start | restart) : >/systemctl.active ;;
stop) rm -f /systemctl.active ;;
daemon-reload) ;;
*)
    echo "stand-in systemctl: unexpected call: $*" >&2
    exit 1
    ;;
esac
"#;

/// The host directories bound read-only into the scratch root, with `/bin`, `/sbin`,
/// `/lib` and `/lib64` as symlinks to them (a merged-/usr layout). `/usr/local` stays a
/// directory of the scratch root, so that what a script installs there lands in it.
const BOUND: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// A scratch root with a stand-in `systemctl`; see the module's documentation. Its bind
/// mounts live in a mount namespace of each run's own, gone when the run ends.
pub struct StandInSystemctlRoot {
    dir: tempfile::TempDir,
}

impl StandInSystemctlRoot {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = Self { dir };
        for usr in BOUND {
            std::fs::create_dir_all(root.at(&format!("/usr/{usr}"))).expect("mkdir");
            std::os::unix::fs::symlink(format!("usr/{usr}"), root.at(&format!("/{usr}")))
                .expect("symlink");
        }
        for dir in ["/usr/local", "/etc", "/dev", "/var", "/run/systemd/system"] {
            std::fs::create_dir_all(root.at(dir)).expect("mkdir");
        }
        std::fs::create_dir(root.at("/tmp")).expect("mkdir /tmp");
        std::fs::set_permissions(root.at("/tmp"), PermissionsExt::from_mode(0o1777))
            .expect("chmod /tmp");
        for file in ["/etc/passwd", "/etc/group"] {
            std::fs::copy(file, root.at(file)).expect("copy accounts");
        }
        std::fs::write(root.at("/dev/null"), "").expect("mount point for /dev/null");
        std::fs::create_dir(root.at("/stand-in")).expect("mkdir");
        std::fs::write(root.at("/stand-in/systemctl"), STAND_IN_SYSTEMCTL).expect("write");
        std::fs::set_permissions(
            root.at("/stand-in/systemctl"),
            PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        root
    }

    /// `path` (absolute inside the root) as seen from outside.
    pub fn at(&self, path: &str) -> PathBuf {
        self.dir.path().join(path.trim_start_matches('/'))
    }

    /// Runs `argv` inside the root, as root, with a bare environment and `PATH` starting at
    /// the stand-in; its output.
    pub fn run(&self, argv: &[&str]) -> Output {
        let mounts = BOUND
            .map(|d| format!("mount --bind -o ro /usr/{d} \"$0/usr/{d}\""))
            .join(" && ");
        let script = format!(
            "set -e; {mounts}; mount --bind /dev/null \"$0/dev/null\"; exec chroot \"$0\" \
             /usr/bin/env -i PATH=/stand-in:/usr/sbin:/usr/bin:/sbin:/bin \"$@\""
        );
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(self.dir.path())
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("run unshare")
    }

    /// Runs `argv` inside the root and returns its output after asserting it succeeded.
    pub fn run_ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        let text = output_text(&out);
        assert!(out.status.success(), "{argv:?} in the scratch root: {text}");
        text
    }

    /// The stand-in's calls since the last look, one per line, and forgets them.
    pub fn calls(&self) -> Vec<String> {
        let path = self.at("/systemctl.calls");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        text.lines().map(str::to_string).collect()
    }

    /// Makes the next `systemctl enable` fail, as a cut-off install would stop there.
    pub fn fail_next_enable(&self) {
        std::fs::write(self.at("/systemctl.fail-enable"), "").expect("write switch");
    }

    /// Sets the unit's state as an administrator's `systemctl enable/disable` and
    /// `start/stop` would.
    pub fn set_unit(&self, enabled: bool, active: bool) {
        for (name, on) in [
            ("/systemctl.enabled", enabled),
            ("/systemctl.active", active),
        ] {
            if on {
                std::fs::write(self.at(name), "").expect("write state");
            } else {
                let _ = std::fs::remove_file(self.at(name));
            }
        }
    }

    /// The unit's state: (enabled, active).
    pub fn unit(&self) -> (bool, bool) {
        (
            self.at("/systemctl.enabled").exists(),
            self.at("/systemctl.active").exists(),
        )
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for StandInSystemctlRoot {
    fn drop(&mut self) {
        // The binds never outlive a run; should one show here, removing the directory
        // would reach into the host's /usr: leave it.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.dir.path().to_string_lossy().into_owned();
        if mounts.contains(&dir) {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("left {} in place: something is mounted under it", dir);
            let _ = kept.keep();
        }
    }
}
