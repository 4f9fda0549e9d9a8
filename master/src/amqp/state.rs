//! The master's state directory: the newest accepted config, `config.toml`, exactly as
//! it was published. Written to a temporary name, fsynced, renamed over the old one,
//! and the directory fsynced, so a crash at any instant leaves the old revision or the
//! new one, never a mix. The revision is the one written in the text.

use std::path::PathBuf;

use crate::cluster::{ArchiveLookup, Plan};
use crate::durable;
use crate::error::{Error, Result};

/// The file holding the newest accepted config.
pub(crate) const CONFIG_FILE: &str = "config.toml";

/// What the state directory holds.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The revision held: nothing older or equal is applied.
    pub revision: u64,
    /// The validated plan, unless it no longer validates (an archive removed from the
    /// artifact directory): then the revision still counts, and nothing is converged
    /// until a newer one arrives.
    pub plan: Option<Plan>,
}

/// A master's state directory.
#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory `dir` (created on first write).
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    /// Where the config is kept.
    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The config held, if any. A file that cannot be read as a revision is an error;
    /// one whose revision reads but whose plan does not validate is held without a plan
    /// (the validation error is returned beside it: [`Error::ArchiveUnavailable`] when
    /// only an archive is missing, which may pass).
    pub(crate) fn load(&self, lookup: &ArchiveLookup) -> Result<Option<(Held, Option<Error>)>> {
        let path = self.config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::local(&path, format!("cannot read: {e}"))),
        };
        let origin = path.display().to_string();
        // Accepted once already: what depends on a clock is not judged again (a
        // `restarted_at` ahead of this clock takes effect once the clock reaches it).
        match Plan::parse_as_of(&text, &origin, lookup, None) {
            Ok(plan) => Ok(Some((
                Held {
                    revision: plan.revision,
                    plan: Some(plan),
                },
                None,
            ))),
            Err(e) => {
                let revision = super::log::text_revision(&text).ok_or_else(|| {
                    Error::local(&path, format!("holds no readable revision: {e}"))
                })?;
                Ok(Some((
                    Held {
                        revision,
                        plan: None,
                    },
                    Some(e),
                )))
            }
        }
    }

    /// Writes `text` as the config held, atomically.
    pub(crate) fn store(&self, text: &str) -> Result<()> {
        durable::write(&self.dir, CONFIG_FILE, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "revision = 4\n";

    #[test]
    fn an_empty_directory_holds_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        assert!(state
            .load(&ArchiveLookup::Unchecked)
            .expect("loads")
            .is_none());
    }

    #[test]
    fn a_stored_config_is_loaded_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path().join("state"));
        state.store(CONFIG).expect("store");
        state.store("revision = 5\n").expect("store again");
        let (held, problem) = state
            .load(&ArchiveLookup::Unchecked)
            .expect("loads")
            .expect("holds one");
        assert_eq!(held.revision, 5);
        assert!(held.plan.is_some(), "{problem:?}");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![CONFIG_FILE.to_string()]);
    }

    #[test]
    fn a_config_that_no_longer_validates_still_holds_its_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let text = "revision = 9\n[[host]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\ngroup = \"nope\"\n";
        state.store(text).expect("store");
        let (held, problem) = state
            .load(&ArchiveLookup::Unchecked)
            .expect("loads")
            .expect("holds one");
        assert_eq!(held.revision, 9);
        assert!(held.plan.is_none());
        assert!(problem.is_some());
    }

    #[test]
    fn a_held_restart_ahead_of_this_clock_keeps_its_plan_after_a_restart() {
        // Accepted from the log by its publish time; this master's clock is behind.
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let text = format!(
            "revision = 3\n[[host]]\nid = \"a\"\naddr = \"127.0.0.1:1\"\ngroup = \"web\"\n\
             [group.web]\nrelease = \"beat\"\nversion = \"1.0.0\"\nsha256 = \"{}\"\n\
             restarted_at = \"2999-01-01T00:00:00Z\"\n",
            "0".repeat(64)
        );
        state.store(&text).expect("store");
        let (held, problem) = state
            .load(&ArchiveLookup::Unchecked)
            .expect("loads")
            .expect("holds one");
        assert_eq!(held.revision, 3);
        assert!(held.plan.is_some(), "{problem:?}");
    }

    #[test]
    fn a_file_without_a_revision_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CONFIG_FILE), "garbage [").expect("write");
        assert!(StateDir::new(dir.path())
            .load(&ArchiveLookup::Unchecked)
            .is_err());
    }
}
