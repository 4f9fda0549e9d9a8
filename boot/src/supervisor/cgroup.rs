//! One cgroup v2 per running release: creation, joining at spawn, membership, kill.
//!
//! The agent finds the cgroup v2 file system in `/proc/self/mountinfo` (it may be mounted
//! at `/sys/fs/cgroup`, or at `/sys/fs/cgroup/unified` in a hybrid layout, or anywhere
//! else), takes the parent from its settings (by default its own cgroup, the `0::` line
//! of `/proc/self/cgroup`, which systemd hands over with `Delegate=yes`), and keeps:
//!
//! ```text
//! <parent>/erel@<root, escaped as systemd-escape --path does>/   one per agent root
//!     release.<name>/                                            one per running release
//! ```
//!
//! A release's process is created inside its cgroup (`clone3(2)` with
//! `CLONE_INTO_CGROUP`, Linux 5.7; on older kernels the forked child joins it before
//! `exec` by writing `0` to `cgroup.procs`, see cgroup-v2(7) "Organizing processes"), so
//! everything it starts, `setsid` and double forks included, is born inside. Membership is
//! `cgroup.procs` less zombies, of the release's cgroup and of any cgroup the release
//! made below it; "empty" is `populated 0` in `cgroup.events`; the kill is
//! a write of `1` to `cgroup.kill` (Linux 5.14), which reaches every member at once, or
//! SIGKILL to each member on older kernels. The agent never puts processes in a cgroup
//! that has child cgroups of its making, so enabling controllers on these cgroups stays
//! possible.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::settings::CgroupParent;

use super::process;

/// Prefix of the directory that holds one agent root's release cgroups.
const AGENT_PREFIX: &str = "erel@";
/// Prefix of a release's cgroup (no controller is named `release`, so no interface
/// file can ever collide with it).
const RELEASE_PREFIX: &str = "release.";
/// Longest escaped root kept readable in a cgroup name; longer roots are hashed.
const MAX_ESCAPED: usize = 200;

/// A release's cgroup, opened for its next process (see [`Tree::prepare`]).
#[derive(Debug)]
pub(crate) struct Joining {
    /// The cgroup's directory: `clone3(2)` creates the child in it (`CLONE_INTO_CGROUP`).
    pub(crate) dir: fs::File,
    /// Its `cgroup.procs`, opened for writing: a child that was forked outside joins
    /// the cgroup by writing `0` to it.
    pub(crate) procs: fs::File,
}

/// How the releases of this agent are contained.
#[derive(Debug, Clone)]
pub(crate) enum Containment {
    /// One cgroup v2 per release.
    Cgroup(Tree),
    /// No usable cgroup v2: process groups, sessions, descendants and the environment
    /// markers the agent gives every release. The text says why.
    Fallback(String),
}

impl Containment {
    /// Finds out how releases under `root` are contained, creating the agent's cgroup
    /// directory when cgroup v2 is usable.
    pub(super) fn detect(setting: &CgroupParent, root: &Path) -> Containment {
        if *setting == CgroupParent::None {
            return Containment::Fallback("cgroups disabled by cgroup_parent = \"none\"".into());
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match Tree::locate(setting, root, &mountinfo, &own).and_then(Tree::create) {
            Ok(tree) => Containment::Cgroup(tree),
            Err(reason) => Containment::Fallback(reason),
        }
    }

    /// One line for the start-up log and `Ping`: `cgroup v2 <dir>` or
    /// `fallback to process groups (<why>)`.
    pub(super) fn describe(&self) -> String {
        match self {
            Containment::Cgroup(tree) => format!("cgroup v2 {}", tree.dir.display()),
            Containment::Fallback(why) => format!("fallback to process groups ({why})"),
        }
    }
}

/// The agent's directory in the cgroup v2 hierarchy.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    /// Absolute path of `<parent>/erel@<root>` on the mounted hierarchy.
    dir: PathBuf,
    /// The kernel offers `cgroup.kill`.
    has_kill: bool,
}

impl Tree {
    /// Where the agent's directory is, from the mount table and the agent's own cgroup.
    fn locate(
        setting: &CgroupParent,
        root: &Path,
        mountinfo: &str,
        own: &str,
    ) -> std::result::Result<PathBuf, String> {
        let parent = match setting {
            CgroupParent::Path(path) => path.clone(),
            CgroupParent::Auto | CgroupParent::None => own_cgroup(own).ok_or_else(|| {
                "this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)".to_string()
            })?,
        };
        let dir = v2_mounts(mountinfo)
            .into_iter()
            .find_map(|(mount_root, mount_point)| {
                // Component by component: `/nsother` is not below `/ns`.
                let rest = Path::new(&parent).strip_prefix(mount_root).ok()?;
                Some(mount_point.join(rest))
            })
            .ok_or_else(|| {
                format!("no cgroup v2 file system is mounted that shows the cgroup {parent}")
            })?;
        Ok(dir.join(agent_dir_name(root)))
    }

    /// Creates the agent's directory and checks it can hold release cgroups.
    fn create(dir: PathBuf) -> std::result::Result<Tree, String> {
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let procs = dir.join("cgroup.procs");
        if !procs.is_file() {
            return Err(format!("{} is not a cgroup v2 directory", dir.display()));
        }
        // A release cgroup made and removed again proves the directory is writable.
        let probe = dir.join(format!("probe.{}", std::process::id()));
        fs::create_dir(&probe)
            .map_err(|e| format!("cannot create a cgroup in {}: {e}", dir.display()))?;
        let _ = fs::remove_dir(&probe);
        let has_kill = dir.join("cgroup.kill").is_file();
        Ok(Tree { dir, has_kill })
    }

    /// The agent's directory (`<parent>/erel@<root>`).
    #[cfg(test)]
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup of release `name`.
    pub(super) fn release_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{RELEASE_PREFIX}{name}"))
    }

    /// Creates the cgroup of `name` when missing and opens it for the child: its
    /// directory, to be created in it, and its `cgroup.procs`, to join it where the
    /// kernel cannot do that (both close-on-exec, as std opens every file: the release
    /// never sees them).
    pub(super) fn prepare(&self, name: &str) -> Result<Joining> {
        let dir = self.release_dir(name);
        fs::create_dir_all(&dir).io("create cgroup", &dir)?;
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir);
        let opened = opened.io("open", &dir)?;
        let procs = dir.join("cgroup.procs");
        let file = fs::OpenOptions::new().write(true).open(&procs);
        Ok(Joining {
            dir: opened,
            procs: file.io("open", &procs)?,
        })
    }

    /// Live (non-zombie) members of release `name`'s cgroup and of every cgroup below it
    /// (a release running as root may make its own and move processes there); none when
    /// it does not exist.
    pub(super) fn members(&self, name: &str) -> Vec<u32> {
        cgroups_below(&self.release_dir(name))
            .iter()
            .flat_map(|dir| read_procs(dir))
            .filter(|&pid| process::proc_stat(pid).is_some_and(|s| !s.is_gone()))
            .collect()
    }

    /// Kills every member of release `name` at once (`cgroup.kill`), or each member with
    /// SIGKILL where the kernel has no `cgroup.kill`.
    pub(super) fn kill(&self, name: &str) -> Result<()> {
        let dir = self.release_dir(name);
        if self.has_kill {
            let path = dir.join("cgroup.kill");
            // A cgroup already gone has nothing left to kill.
            return match fs::write(&path, "1") {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io("write 1 to", &path, e)),
                _ => Ok(()),
            };
        }
        process::signal_each(&self.members(name), nix::sys::signal::Signal::SIGKILL);
        Ok(())
    }

    /// Removes the cgroup of `name` (and the cgroups below it, deepest first) once it is
    /// empty; a busy or missing one is left.
    pub(super) fn remove(&self, name: &str) {
        remove_tree(&self.release_dir(name));
    }

    /// Removes every empty release cgroup and then the agent's directory; whatever still
    /// has members stays (`rmdir` of a populated cgroup fails with `EBUSY`).
    pub(super) fn remove_if_empty(&self) {
        for cgroup in child_cgroups(&self.dir) {
            remove_tree(&cgroup);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// `dir` and every cgroup below it, parents before children; none when `dir` does not
/// exist. Cgroup directories hold only interface files and child cgroups, and the
/// kernel bounds their depth (`cgroup.max.depth`), so the walk ends.
fn cgroups_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(cgroup) = todo.pop() {
        if cgroup.is_dir() {
            todo.extend(child_cgroups(&cgroup));
            found.push(cgroup);
        }
    }
    found
}

/// The cgroups right below `dir`: its subdirectories.
fn child_cgroups(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let entries = fs::read_dir(dir).into_iter().flatten().flatten();
    let dirs = entries.filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    dirs.map(|e| e.path())
}

/// Removes the cgroup `dir` and the cgroups below it, deepest first; what is busy stays.
fn remove_tree(dir: &Path) {
    for cgroup in cgroups_below(dir).iter().rev() {
        let _ = fs::remove_dir(cgroup);
    }
}

/// Pids listed in `<dir>/cgroup.procs`; none when it cannot be read.
fn read_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// The agent's own cgroup v2 path: the `0::<path>` line of `/proc/self/cgroup`.
fn own_cgroup(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_end().to_string())
        .filter(|path| path.starts_with('/'))
}

/// Every cgroup v2 mount in a `/proc/self/mountinfo` text: (root of the mount inside the
/// hierarchy, mount point). See proc(5): the fields before ` - ` are id, parent id,
/// major:minor, root, mount point, options and optional fields; the file system type
/// follows the separator. Spaces and other odd bytes are written as `\ooo` octal.
fn v2_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            if after.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let fields: Vec<&str> = before.split_whitespace().collect();
            let root = unescape_octal(fields.get(3)?);
            let point = unescape_octal(fields.get(4)?);
            Some((root, PathBuf::from(point)))
        })
        .collect()
}

fn unescape_octal(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field.as_bytes();
    while let Some((&byte, after)) = rest.split_first() {
        // `\ooo`: three octal digits after the backslash.
        let digits = after.get(..3).and_then(|d| std::str::from_utf8(d).ok());
        let code = digits.and_then(|d| u8::from_str_radix(d, 8).ok());
        let (value, used) = match code {
            Some(value) if byte == b'\\' => (value, 4),
            _ => (byte, 1),
        };
        out.push(value);
        rest = &rest[used..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `erel@` and the root escaped as `systemd-escape --path` does (`/` becomes `-`, bytes
/// other than ASCII letters, digits, `:`, `_` and a non-leading `.` become `\xNN`); a
/// root too long for a readable name is named by its sha256 instead.
pub(crate) fn agent_dir_name(root: &Path) -> String {
    let text = root.to_string_lossy();
    let trimmed = text.trim_matches('/');
    let mut escaped = String::new();
    for (i, byte) in trimmed.bytes().enumerate() {
        match byte {
            b'/' => escaped.push('-'),
            b'.' if i > 0 => escaped.push('.'),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' => escaped.push(b as char),
            b => escaped.push_str(&format!("\\x{b:02x}")),
        }
    }
    if escaped.is_empty() {
        escaped.push('-');
    }
    if escaped.len() > MAX_ESCAPED {
        // The first 16 bytes of the digest, in hex.
        let hex = &crate::digest::of_bytes(text.as_bytes()).to_hex()[..32];
        return format!("{AGENT_PREFIX}{hex}");
    }
    format!("{AGENT_PREFIX}{escaped}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";

    #[test]
    fn the_v2_mount_is_found_wherever_it_is() {
        assert_eq!(
            v2_mounts(HYBRID),
            vec![("/".to_string(), PathBuf::from("/sys/fs/cgroup/unified"))]
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            v2_mounts(unified),
            vec![("/".to_string(), PathBuf::from("/sys/fs/cgroup"))]
        );
        let odd = "50 23 0:40 /a\\040b /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(
            v2_mounts(odd),
            vec![("/a b".to_string(), PathBuf::from("/mnt/cg two"))]
        );
        assert!(v2_mounts("35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n").is_empty());
    }

    #[test]
    fn the_agent_directory_follows_the_setting_and_the_root() {
        let root = Path::new("/var/lib/erel");
        let own = "4:memory:/x\n0::/system.slice/erel-boot.service\n";
        let dir = Tree::locate(&CgroupParent::Auto, root, HYBRID, own).expect("auto");
        assert_eq!(
            dir,
            PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/erel-boot.service/erel@var-lib-erel"
            )
        );
        let dir = Tree::locate(&CgroupParent::Path("/erel.slice".into()), root, HYBRID, own)
            .expect("path");
        assert_eq!(
            dir,
            PathBuf::from("/sys/fs/cgroup/unified/erel.slice/erel@var-lib-erel")
        );
        // A mount that shows only a subtree maps paths below it, and nothing else.
        let sub = "60 23 0:40 /ns /cg rw - cgroup2 none rw\n";
        let dir = Tree::locate(&CgroupParent::Auto, root, sub, "0::/ns/inner\n").expect("sub");
        assert_eq!(dir, PathBuf::from("/cg/inner/erel@var-lib-erel"));
        let err = Tree::locate(&CgroupParent::Auto, root, sub, "0::/nsother\n").unwrap_err();
        assert!(err.contains("/nsother"), "{err}");
        let err = Tree::locate(&CgroupParent::Auto, root, HYBRID, "1:cpu:/\n").unwrap_err();
        assert!(err.contains("no 0:: line"), "{err}");
        let err = Tree::locate(&CgroupParent::Auto, root, "", own).unwrap_err();
        assert!(err.contains("no cgroup v2 file system"), "{err}");
    }

    #[test]
    fn agent_directory_names_are_readable_and_distinct() {
        assert_eq!(
            agent_dir_name(Path::new("/tmp/.tmpAb-c/root")),
            "erel@tmp-.tmpAb\\x2dc-root"
        );
        assert_ne!(
            agent_dir_name(Path::new("/srv/a-b")),
            agent_dir_name(Path::new("/srv/a/b"))
        );
        let long = format!("/{}", "x".repeat(300));
        let name = agent_dir_name(Path::new(&long));
        assert!(name.len() < 64 && name.starts_with(AGENT_PREFIX), "{name}");
    }

    #[test]
    fn setting_none_forces_the_fallback() {
        let containment = Containment::detect(&CgroupParent::None, Path::new("/nowhere"));
        assert!(matches!(containment, Containment::Fallback(_)));
        assert!(containment.describe().starts_with("fallback"));
    }
}
