//! Retention: old versions of a release, and the archives they came from, are removed.
//!
//! Versions are the directories under `releases/<name>/`, ordered by modification time
//! (the time they were unpacked into place). [`prune`] keeps the versions it is told to
//! keep (the running or desired one) and the newest few others. A version is removed
//! by renaming it into `.erel/trash/` first, so it disappears at once and never half,
//! then deleting it there; its unpack marker goes with it, and so does the archive it
//! was unpacked from, unless another version still refers to that archive or the file
//! at that path no longer holds that archive's content. What a crash leaves in the
//! trash is removed by [`sweep_trash`].

use std::fs;
use std::sync::Arc;

use erel_proto::rules;

use crate::error::{IoContext, Result};
use crate::fs::{remove_if_present, sync_dir, unique_name, PathLock, Root, State};
use crate::server::{blocking, Agent};
use crate::unpack::{self, Marker};

/// After a successful start of release `name`, removes its versions beyond the kept
/// ones, in the background: the `Started` answer does not wait for the removal (a
/// directory tree, a sync, and a hash of each archive that goes with it), while no
/// other start or stop of that release runs until it is done, so a version being
/// started again is never the one removed.
pub(crate) fn prune_after_start(agent: &Arc<Agent>, name: &str) {
    let (agent, name) = (agent.clone(), name.to_string());
    tokio::spawn(async move {
        let pruned = prune_release(&agent, &name);
        agent.supervisor.exclusively(&name, pruned).await;
    });
}

/// Removes versions of release `name` beyond the kept ones (see [`prune`]), logging what
/// was removed or why nothing could be.
async fn prune_release(agent: &Arc<Agent>, name: &str) {
    let keep: Vec<String> = agent
        .supervisor
        .statuses()
        .await
        .into_iter()
        .filter(|status| status.name == name)
        .filter_map(|status| status.version)
        .collect();
    let agent = agent.clone();
    let release = name.to_string();
    let keep_newest = agent.supervisor.keep_versions();
    let outcome = blocking(move || prune(&agent.root, &release, &keep, keep_newest)).await;
    match outcome {
        Ok(removed) if !removed.is_empty() => {
            let removed = crate::supervisor::comma_separated(&removed);
            tracing::info!(release = %name, %removed, "removed old versions")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(release = %name, error = %e, "could not remove old versions"),
    }
}

/// Removes versions of release `name` beyond the `keep_newest` newest (by modification
/// time) that are not in `keep`, with the archives they were unpacked from when nothing
/// else refers to them. Returns the versions removed, sorted. Blocking.
pub(crate) fn prune(
    root: &Root,
    name: &str,
    keep: &[String],
    keep_newest: usize,
) -> Result<Vec<String>> {
    let all = root.versions(name);
    let others: Vec<&String> = all.iter().filter(|v| !keep.contains(v)).collect();
    let doomed = &others[..others.len().saturating_sub(keep_newest)];
    let trash = root.state(State::Trash);
    let mut removed = Vec::new();
    let mut archives: Vec<Marker> = Vec::new();
    for version in doomed {
        let dir = root.version_dir(name, version)?;
        // An unpack into this very directory is under way: leave it for the next prune.
        let Ok(_lock) = PathLock::acquire(dir.clone(), version) else {
            continue;
        };
        let grave = trash.join(unique_name());
        fs::rename(&dir, &grave).io("move to trash", &dir)?;
        let marker_file = unpack::marker_path(root, &rules::version_dir(name, version));
        if let Some(marker) = unpack::read_marker(&marker_file) {
            archives.push(marker);
        }
        remove_if_present(&marker_file)?;
        if let Err(e) = fs::remove_dir_all(&grave) {
            // Left for `sweep_trash`; the version is gone from where it counts.
            tracing::warn!(path = %grave.display(), error = %e, "could not empty the trash");
        }
        removed.push((*version).clone());
    }
    if !removed.is_empty() {
        if let Some(parent) = root.release_dir(name).ok().filter(|d| d.exists()) {
            sync_dir(&parent)?;
        }
    }
    let still_named: Vec<String> = unpack::markers_in_use(root)
        .into_iter()
        .map(|m| m.archive)
        .collect();
    for marker in archives
        .iter()
        .filter(|m| !still_named.contains(&m.archive))
    {
        remove_archive(root, marker)?;
    }
    removed.sort();
    Ok(removed)
}

/// Removes the archive a marker names, if the file there still has the marker's digest.
fn remove_archive(root: &Root, marker: &Marker) -> Result<()> {
    let Ok(path) = root.resolve(&marker.archive) else {
        return Ok(());
    };
    if !fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_file())
        // Replaced by other content since: someone may still need it.
        || crate::digest::of_file(&path)?.to_hex() != marker.sha256
    {
        return Ok(());
    }
    remove_if_present(&path)
}

/// Empties `.erel/trash/`: what a prune interrupted by a crash left there. Run at startup.
pub(crate) fn sweep_trash(root: &Root) -> Result<()> {
    crate::fs::empty_dir(&root.state(State::Trash))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use erel_proto::Unpack;

    use super::*;
    use crate::settings::Limits;

    use crate::fs::temp_root as root;

    fn tar_with(version: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(version.len() as u64);
        builder
            .append_data(&mut header, "VERSION", version.as_bytes())
            .expect("append");
        builder.into_inner().expect("tar")
    }

    /// Pushes `archive` (unless present) and unpacks it as `version`, `age` seconds old.
    fn install(root: &Root, version: &str, archive: &str, age: u64) {
        let path = root.path().join(archive);
        if !path.exists() {
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, tar_with(archive)).expect("write");
        }
        let request = Unpack {
            archive: archive.into(),
            dest: format!("releases/beat/{version}"),
            sha256: None,
        };
        crate::unpack::unpack(root, &request, &Limits::default()).expect("unpack");
        let when = UNIX_EPOCH + Duration::from_secs(1_700_000_000 - age);
        fs::File::open(root.path().join("releases/beat").join(version))
            .and_then(|dir| dir.set_modified(when))
            .expect("set mtime");
    }

    #[test]
    fn keeps_the_running_and_the_newest_and_removes_the_rest() {
        let (_dir, root) = root();
        for (version, age) in [
            ("0.1.0", 500),
            ("0.2.0", 400),
            ("0.3.0", 300),
            ("0.4.0", 200),
        ] {
            install(&root, version, &format!("archives/beat-{version}.tar"), age);
        }
        install(&root, "0.5.0", "archives/beat-0.5.0.tar", 100);
        assert_eq!(
            root.versions("beat"),
            ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0"]
        );
        assert_eq!(root.release_names(), ["beat"]);

        let removed = prune(&root, "beat", &["0.2.0".to_string()], 2).expect("prune");
        assert_eq!(removed, ["0.1.0", "0.3.0"]);
        assert_eq!(root.versions("beat"), ["0.2.0", "0.4.0", "0.5.0"]);
        for gone in ["0.1.0", "0.3.0"] {
            assert!(!root
                .path()
                .join(format!("archives/beat-{gone}.tar"))
                .exists());
            let marker = crate::unpack::marker_path(&root, &format!("releases/beat/{gone}"));
            assert!(!marker.exists(), "{gone}");
        }
        for kept in ["0.2.0", "0.4.0", "0.5.0"] {
            assert!(root
                .path()
                .join(format!("archives/beat-{kept}.tar"))
                .exists());
        }
        assert!(fs::read_dir(root.state(State::Trash))
            .expect("list")
            .next()
            .is_none());

        // Nothing more to do.
        assert!(prune(&root, "beat", &["0.2.0".to_string()], 2)
            .expect("prune")
            .is_empty());
        // Keeping none besides the running one.
        assert_eq!(
            prune(&root, "beat", &["0.5.0".to_string()], 0).expect("prune"),
            ["0.2.0", "0.4.0"]
        );
        assert_eq!(root.versions("beat"), ["0.5.0"]);
    }

    #[test]
    fn an_archive_still_in_use_is_kept() {
        let (_dir, root) = root();
        for (version, archive, age) in [
            ("a", "shared", 300),
            ("b", "shared", 200),
            ("c", "other", 100),
        ] {
            install(&root, version, &format!("archives/{archive}.tar"), age);
        }
        let removed = prune(&root, "beat", &["c".to_string()], 1).expect("prune");
        assert_eq!(removed, ["a"]);
        assert!(root.path().join("archives/shared.tar").exists());
        let removed = prune(&root, "beat", &["c".to_string()], 0).expect("prune");
        assert_eq!(removed, ["b"]);
        assert!(!root.path().join("archives/shared.tar").exists());
    }

    #[test]
    fn an_archive_replaced_since_is_kept() {
        let (_dir, root) = root();
        install(&root, "a", "archives/beat.tar", 200);
        install(&root, "b", "archives/b.tar", 100);
        fs::write(root.path().join("archives/beat.tar"), b"newer content").expect("write");
        assert_eq!(prune(&root, "beat", &[], 1).expect("prune"), ["a"]);
        assert!(root.path().join("archives/beat.tar").exists());
    }

    #[test]
    fn unknown_release_and_stray_files_are_ignored() {
        let (_dir, root) = root();
        assert!(root.versions("nothing").is_empty());
        assert!(root.versions("../etc").is_empty());
        assert!(prune(&root, "nothing", &[], 0).expect("prune").is_empty());
        fs::create_dir_all(root.path().join("releases/beat")).expect("mkdir");
        fs::write(root.path().join("releases/beat/notes.txt"), b"x").expect("write");
        fs::write(root.path().join("releases/file"), b"x").expect("write");
        assert!(root.versions("beat").is_empty());
        assert_eq!(root.release_names(), ["beat"]);
    }

    #[test]
    fn sweep_empties_the_trash() {
        let (_dir, root) = root();
        fs::create_dir_all(root.state(State::Trash).join("x/y")).expect("mkdir");
        fs::write(root.state(State::Trash).join("x/y/z"), b"z").expect("write");
        sweep_trash(&root).expect("sweep");
        assert!(fs::read_dir(root.state(State::Trash))
            .expect("list")
            .next()
            .is_none());
    }
}
