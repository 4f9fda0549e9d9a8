//! Paths and links that must stay inside the destination.
//!
//! An entry's name is refused on an absolute path, a `..` component, a NUL byte, a
//! component over `NAME_MAX` or a path over `PATH_MAX` once under the staging tree.
//! Nothing is written through a symlink or into a non-directory, and nothing is written
//! twice. A symlink that is absolute or leads outside the destination is refused,
//! checked lexically as each link arrives, then once more at the end by resolving every
//! link through the links the archive created. A hard link must name a file or symlink
//! extracted before, reached without passing a symlink.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use erel_proto::text::quote;

use crate::error::{Error, IoContext, Result};
use crate::fs::MAX_NAME_LEN;

/// Most symlinks followed while checking where one symlink leads (as Linux does).
const MAX_LINK_EXPANSIONS: u32 = 40;

/// Longest path a system call takes, in bytes, without its terminating NUL: Linux's
/// `PATH_MAX` (4096, `<linux/limits.h>`) less one. Also the longest symlink target.
const MAX_SYSTEM_PATH: usize = 4095;

/// The normal components of an entry's path; `.` components are dropped.
pub(super) fn entry_path(name: &str, raw: &[u8]) -> Result<Vec<OsString>> {
    let refuse = |reason: String| Err(Error::unsafe_entry(name, reason));
    if raw.is_empty() {
        return refuse("empty path".into());
    }
    if raw[0] == b'/' {
        return refuse("absolute path".into());
    }
    if raw.contains(&0) {
        // GNU tar stops a name at its first NUL; a file system name cannot hold one.
        return Err(Error::unsafe_entry(
            name.escape_default().to_string(),
            "path contains a NUL byte",
        ));
    }
    let mut out = Vec::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) if part.len() > MAX_NAME_LEN => {
                return refuse(format!(
                    "a component of {} bytes, above the file-system limit of {MAX_NAME_LEN} \
                     bytes (NAME_MAX)",
                    part.len(),
                ));
            }
            Component::Normal(part) => out.push(part.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return refuse("path contains '..'".into()),
            Component::RootDir | Component::Prefix(_) => return refuse("absolute path".into()),
        }
    }
    Ok(out)
}

/// One step of a symlink target.
enum Step {
    Up,
    Name(OsString),
}

/// The steps of a relative symlink target; `None` for an absolute one.
fn steps(target: &[u8]) -> Option<Vec<Step>> {
    let mut out = Vec::new();
    for component in Path::new(OsStr::from_bytes(target)).components() {
        match component {
            Component::Normal(part) => out.push(Step::Name(part.to_os_string())),
            Component::CurDir => {}
            Component::ParentDir => out.push(Step::Up),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The staging tree an archive is unpacked into, and the symlinks written in it.
pub(super) struct Tree {
    path: PathBuf,
    /// Symlinks written: entry name and path components under the tree.
    symlinks: Vec<(String, Vec<OsString>)>,
}

impl Tree {
    pub(super) fn new(path: &Path) -> Self {
        Tree {
            path: path.to_path_buf(),
            symlinks: Vec::new(),
        }
    }

    /// Where the entry at `rel` goes and what is there already, after walking its
    /// parents (created when missing; none a symlink or a non-directory).
    pub(super) fn place(
        &self,
        name: &str,
        rel: &[OsString],
    ) -> Result<(PathBuf, Option<Metadata>)> {
        let Some((last, parents)) = rel.split_last() else {
            return Err(Error::unsafe_entry(name, "names the archive's root"));
        };
        let mut path = self.path.clone();
        for component in parents {
            path.push(component);
            match self.inspect(name, &path)? {
                Some(meta) if meta.is_dir() => {}
                Some(meta) => {
                    let what = match meta.file_type().is_symlink() {
                        true => "a symlink; writing through links is refused",
                        false => "not a directory",
                    };
                    let shown = path.strip_prefix(&self.path).unwrap_or(&path).display();
                    let reason = format!("its parent {shown} is {what}");
                    return Err(Error::unsafe_entry(name, reason));
                }
                None => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .io("create directory", &path)?,
            }
        }
        path.push(last);
        let meta = self.inspect(name, &path)?;
        Ok((path, meta))
    }

    /// The staging path for an entry that creates something new: nothing is there yet.
    pub(super) fn new_path(&self, name: &str, rel: &[OsString]) -> Result<PathBuf> {
        match self.place(name, rel)? {
            (path, None) => Ok(path),
            (_, Some(_)) => Err(Error::unsafe_entry(
                name,
                "appears twice in the archive; overwriting is refused",
            )),
        }
    }

    /// What is at `path`, after refusing a path longer than the system takes (the kernel
    /// would answer `ENAMETOOLONG`), naming the limit.
    fn inspect(&self, name: &str, path: &Path) -> Result<Option<Metadata>> {
        let len = path.as_os_str().len();
        if len > MAX_SYSTEM_PATH {
            return Err(Error::unsafe_entry(
                name,
                format!(
                    "its path while unpacking would be {len} bytes, above the system's limit \
                     of {MAX_SYSTEM_PATH} bytes (PATH_MAX)"
                ),
            ));
        }
        match fs::symlink_metadata(path) {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("inspect", path, e)),
        }
    }

    /// Checks a symlink's target lexically, from where the link sits, and notes the
    /// link for [`Tree::check_symlinks`]; returns the target to write.
    pub(super) fn symlink(
        &mut self,
        name: &str,
        rel: &[OsString],
        target: Option<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let refuse = |reason: String| Err(Error::unsafe_entry(name, reason));
        let Some(target) = target.filter(|t| !t.is_empty()) else {
            return refuse("symlink without a target".into());
        };
        if target.len() > MAX_SYSTEM_PATH {
            return refuse(format!(
                "symlink target of {} bytes, above the system's limit of {MAX_SYSTEM_PATH} \
                 bytes (PATH_MAX)",
                target.len()
            ));
        }
        let shown = quote(&String::from_utf8_lossy(&target)).into_owned();
        if target.contains(&0) {
            let shown = shown.escape_default();
            return refuse(format!("symlink target {shown} contains a NUL byte"));
        }
        let Some(steps) = steps(&target) else {
            return refuse(format!("symlink to the absolute path {shown}"));
        };
        let mut depth = rel.len().saturating_sub(1);
        for step in &steps {
            match step {
                Step::Up if depth == 0 => {
                    return refuse(format!("symlink to {shown} leads outside the destination"));
                }
                Step::Up => depth -= 1,
                Step::Name(_) => depth += 1,
            }
        }
        self.symlinks.push((name.to_string(), rel.to_vec()));
        Ok(target)
    }

    /// The path of a hard link's target: a file or symlink extracted before (GNU tar
    /// uses `link(2)`, which links a symlink itself), reached through no symlink. A
    /// linked symlink is noted to be checked from its new place like any other.
    pub(super) fn link_source(
        &mut self,
        name: &str,
        rel: &[OsString],
        target: Option<Vec<u8>>,
    ) -> Result<PathBuf> {
        let Some(target) = target.filter(|t| !t.is_empty()) else {
            return Err(Error::unsafe_entry(name, "hard link without a target"));
        };
        let shown = quote(&String::from_utf8_lossy(&target)).into_owned();
        let refuse = |reason: &str| {
            Err(Error::unsafe_entry(
                name,
                format!("hard link to {shown}{reason}"),
            ))
        };
        let target_rel = entry_path(&shown, &target).map_err(|e| match e {
            Error::UnsafeArchive { reason, .. } => {
                Error::unsafe_entry(name, format!("hard link to {shown}: {reason}"))
            }
            other => other,
        })?;
        let mut source = self.path.clone();
        let mut last = None;
        for component in &target_rel {
            if last
                .as_ref()
                .is_some_and(|m: &Metadata| m.file_type().is_symlink())
            {
                return refuse(" passes through a symlink");
            }
            source.push(component);
            last = self.inspect(name, &source)?;
            if last.is_none() {
                return refuse(", which the archive has not extracted before");
            }
        }
        match last {
            Some(meta) if meta.is_file() => Ok(source),
            Some(meta) if meta.file_type().is_symlink() => {
                self.symlinks.push((name.to_string(), rel.to_vec()));
                Ok(source)
            }
            _ => refuse(", which is not a regular file or a symlink"),
        }
    }

    /// Resolves every symlink through the links the archive created, now that all
    /// exist; refuses any that leads outside the tree.
    pub(super) fn check_symlinks(&self) -> Result<()> {
        for (name, rel) in &self.symlinks {
            self.confined(rel)
                .map_err(|reason| Error::unsafe_entry(name, reason))?;
        }
        Ok(())
    }

    /// Follows the symlink at `rel` the way the kernel would, expanding links met on
    /// the way; `Err` says why it leads outside the tree.
    fn confined(&self, rel: &[OsString]) -> std::result::Result<(), String> {
        let join = |stack: &[OsString]| self.path.join(stack.iter().collect::<PathBuf>());
        let (_, parents) = rel.split_last().ok_or("symlink at the archive's root")?;
        let first = fs::read_link(join(rel)).map_err(|e| format!("cannot read it back: {e}"))?;
        let shown = first.display().to_string();
        let mut stack: Vec<OsString> = parents.to_vec();
        let mut queue: VecDeque<Step> = steps(first.as_os_str().as_bytes())
            .ok_or_else(|| format!("symlink to the absolute path {shown}"))?
            .into();
        let mut expansions = 0;
        while let Some(step) = queue.pop_front() {
            let part = match step {
                Step::Up if stack.pop().is_none() => {
                    return Err(format!(
                        "symlink to {shown} leads outside the destination through the links \
                         it passes"
                    ));
                }
                Step::Up => continue,
                Step::Name(part) => part,
            };
            let here = join(&stack).join(&part);
            if !fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink()) {
                stack.push(part);
                continue;
            }
            expansions += 1;
            if expansions > MAX_LINK_EXPANSIONS {
                return Err(format!(
                    "symlink to {shown} passes more than {MAX_LINK_EXPANSIONS} links (a loop?)"
                ));
            }
            let next =
                fs::read_link(&here).map_err(|e| format!("cannot read {}: {e}", here.display()))?;
            let more = steps(next.as_os_str().as_bytes())
                .ok_or_else(|| format!("symlink to {shown} passes a link to an absolute path"))?;
            queue = more.into_iter().chain(queue).collect();
        }
        Ok(())
    }
}
