//! The pushed bundle: `certs/bundle.toml` under the root, the one place a master can
//! change this agent's certificates without anyone logging in to the host.
//!
//! The master writes it with `WriteFile` (mode 0600), as [`erel_certs::PushedBundle`]
//! describes. When the file appears or changes, the next connection (or a session's next
//! request) finds it and the agent judges it as a whole ([`erel_certs::PushedBundle::validate`]: key, chain,
//! validity, revocation, same host id, and that one of the last
//! [`RECENT_MASTERS`] masters that authenticated here would still be accepted):
//!
//! * refused: the agent keeps serving with what it served, logs a warning naming the
//!   check, and renames the file to `bundle.toml.refused` (the master sees that its new
//!   connection fails; the file stays for the operator);
//! * taken: new connections are served with it, on probation. The first master that
//!   authenticates with it confirms it, and its sha256 is recorded in
//!   `.erel/bundle.confirmed`, so an agent restarted later takes it again at once; a
//!   copy of it is kept in `.erel/bundle.confirmed.toml` (mode 0600). If
//!   no master authenticates within the probation (setting `bundle_probation_secs`),
//!   the agent goes back to the bundle it served before and renames the file to
//!   `bundle.toml.reverted`. The probation is checked when a connection arrives or a
//!   session sends a request: a master that comes late is served with the previous
//!   bundle.
//!
//! Without the file (or once it is renamed away, also across a restart) the agent
//! serves with the confirmed copy, judged again as a whole, and without a copy that
//! passes, with its `--certs` directory, as before. A master can never write under
//! `.erel/`, so a push cannot replace the copy. To go back to the `--certs` directory by
//! hand, remove both the file and the copy.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use erel_certs::{Expected, PushedBundle, ServerTls, PUSHED_BUNDLE};
use rustls::pki_types::CertificateDer;
use tracing::{info, warn};

use crate::fs::{Root, STATE_DIR};

/// How many of the masters that authenticated last are kept, to check that a pushed
/// bundle would not lock them all out.
pub(crate) const RECENT_MASTERS: usize = 4;
/// The record of the confirmed bundle's sha256, under the state directory.
const CONFIRMED: &str = "bundle.confirmed";
/// The copy of the confirmed bundle, under the state directory.
const CONFIRMED_COPY: &str = "bundle.confirmed.toml";

/// The pushed bundle's state on this agent.
pub(crate) struct Pushed {
    /// `root/certs/bundle.toml`.
    file: PathBuf,
    /// `root/.erel/bundle.confirmed`.
    confirmed: PathBuf,
    /// `root/.erel/bundle.confirmed.toml`.
    copy: PathBuf,
    host_id: String,
    probation: Duration,
    state: Mutex<State>,
}

/// What the agent serves with, and what it last saw of the file.
#[derive(Default)]
struct State {
    /// The file's identity when last looked at; `None` when it was absent.
    seen: Option<Stamp>,
    /// The pushed bundle served; `None`: the `--certs` directory.
    serving: Option<Taken>,
    /// Set while the bundle served waits for a master to confirm it.
    probation: Option<Probation>,
    /// Chains of the masters that authenticated last, newest first.
    masters: VecDeque<Vec<CertificateDer<'static>>>,
}

/// A pushed bundle taken.
#[derive(Clone)]
struct Taken {
    tls: ServerTls,
    sha256: String,
    /// The file's text, kept as a copy once confirmed.
    text: Arc<str>,
}

/// A bundle on probation: until when, and what to go back to.
struct Probation {
    until: Instant,
    previous: Option<Taken>,
}

/// Identity of the file: a `WriteFile` renames a new inode into place.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    device: u64,
    len: u64,
    changed: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: meta.ino(),
        device: meta.dev(),
        len: meta.len(),
        changed: (meta.ctime(), meta.ctime_nsec()),
    })
}

impl Pushed {
    /// The pushed bundle of `root` for host `host_id`, with a probation of `probation`.
    /// The confirmed copy, when one passes, serves first; a file already there is then
    /// judged: taken at once when it is the confirmed one, else on probation (no master
    /// has authenticated yet, so none can be locked out), going back to the copy.
    pub(crate) fn open(root: &Root, host_id: &str, probation: Duration) -> Self {
        let state = root.path().join(STATE_DIR);
        let pushed = Pushed {
            file: root.path().join(PUSHED_BUNDLE),
            confirmed: state.join(CONFIRMED),
            copy: state.join(CONFIRMED_COPY),
            host_id: host_id.to_string(),
            probation,
            state: Mutex::new(State::default()),
        };
        {
            let mut state = pushed.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.serving = pushed.confirmed_copy(&state);
        }
        pushed.config();
        pushed
    }

    /// The configuration to serve a new connection with: the pushed bundle's, or `None`
    /// for the `--certs` directory. Ends an expired probation and judges a changed file
    /// first.
    pub(crate) fn config(&self) -> Option<ServerTls> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if state.probation.as_ref().is_some_and(|p| now >= p.until) {
            let previous = state.probation.take().and_then(|p| p.previous);
            state.serving = previous;
            let to = self.set_aside(&mut state, "reverted");
            warn!(file = %to.display(), probation_secs = self.probation.as_secs(), "pushed certificate bundle reverted: no master authenticated with it within its probation; serving with the previous bundle");
        }
        let seen = stamp(&self.file);
        if seen != state.seen {
            state.seen = seen.clone();
            if seen.is_none() {
                state.probation = None;
                let copy = self.confirmed_copy(&state);
                if std::mem::replace(&mut state.serving, copy).is_some() {
                    match &state.serving {
                        Some(_) => {
                            info!(file = %self.file.display(), copy = %self.copy.display(), "pushed certificate bundle removed; serving with its confirmed copy")
                        }
                        None => {
                            info!(file = %self.file.display(), "pushed certificate bundle removed; serving with the --certs directory")
                        }
                    }
                }
            } else {
                self.judge(&mut state, now);
            }
        }
        state.serving.as_ref().map(|taken| taken.tls.clone())
    }

    /// A master authenticated on a connection served with `config` and presented
    /// `chain`: remembered, and a bundle on probation served with `config` is confirmed.
    pub(crate) fn authenticated(
        &self,
        config: &Arc<rustls::ServerConfig>,
        chain: &[CertificateDer<'_>],
    ) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let chain: Vec<CertificateDer<'static>> =
            chain.iter().map(|c| c.clone().into_owned()).collect();
        state.masters.retain(|known| known.first() != chain.first());
        state.masters.push_front(chain);
        state.masters.truncate(RECENT_MASTERS);
        let Some(serving) = &state.serving else {
            return;
        };
        if state.probation.is_none() || !Arc::ptr_eq(&serving.tls.config, config) {
            return;
        }
        let sha256 = serving.sha256.clone();
        let text = serving.text.clone();
        state.probation = None;
        // The copy first: a record naming a bundle without its copy would leave a restart
        // after a refused push on the --certs directory.
        let kept = crate::fs::write_atomic(&self.copy, text.as_bytes(), 0o600)
            .and_then(|()| crate::fs::write_atomic(&self.confirmed, sha256.as_bytes(), 0o600));
        match kept {
            Ok(()) => {
                info!(file = %self.file.display(), %sha256, "pushed certificate bundle confirmed: a master authenticated with it")
            }
            Err(e) => {
                warn!(file = %self.file.display(), error = %e, "pushed certificate bundle confirmed, but not recorded: a restart will put it on probation again")
            }
        }
    }

    /// Judges the file as it is now: takes it (on probation unless it is the confirmed
    /// one) or refuses it.
    fn judge(&self, state: &mut State, now: Instant) {
        match self.read(&self.file, state) {
            Ok(taken) => {
                let confirmed = std::fs::read_to_string(&self.confirmed)
                    .is_ok_and(|record| record.trim() == taken.sha256);
                let previous = state.serving.replace(taken.clone());
                if confirmed {
                    state.probation = None;
                    info!(file = %self.file.display(), sha256 = %taken.sha256, "serving with the confirmed pushed certificate bundle");
                } else {
                    // A bundle replacing one still on probation goes back, if it must,
                    // to what was served before either.
                    let previous = match state.probation.take() {
                        Some(earlier) => earlier.previous,
                        None => previous,
                    };
                    state.probation = Some(Probation {
                        until: now + self.probation,
                        previous,
                    });
                    info!(file = %self.file.display(), sha256 = %taken.sha256, probation_secs = self.probation.as_secs(), "pushed certificate bundle taken, on probation until a master authenticates with it");
                }
            }
            Err(reason) => {
                let to = self.set_aside(state, "refused");
                warn!(file = %to.display(), %reason, "pushed certificate bundle refused; serving with the previous bundle");
            }
        }
    }

    /// Reads the bundle at `path` and validates it as a whole against this host and the
    /// masters of `state`; the refusal names the check, or what could not be read.
    fn read(&self, path: &Path, state: &State) -> Result<Taken, String> {
        let masters: Vec<_> = state.masters.iter().cloned().collect();
        let expected = Expected {
            host_id: &self.host_id,
            masters: &masters,
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        let bundle = PushedBundle::parse(path, &text).map_err(|e| e.to_string())?;
        let tls = bundle
            .validate(path, &expected)
            .map_err(|e| e.to_string())?;
        let sha256 = crate::digest::of_bytes(text.as_bytes()).to_hex();
        Ok(Taken {
            tls,
            sha256,
            text: text.into(),
        })
    }

    /// The confirmed copy, judged again as a whole; `None` when there is none or it is
    /// refused (logged, naming the check): the `--certs` directory then serves.
    fn confirmed_copy(&self, state: &State) -> Option<Taken> {
        if !self.copy.exists() {
            return None;
        }
        match self.read(&self.copy, state) {
            Ok(taken) => {
                info!(copy = %self.copy.display(), sha256 = %taken.sha256, "serving with the confirmed copy of the pushed certificate bundle");
                Some(taken)
            }
            Err(reason) => {
                warn!(copy = %self.copy.display(), %reason, "confirmed copy of the pushed certificate bundle refused; serving with the --certs directory");
                None
            }
        }
    }

    /// Renames the file to `bundle.toml.<suffix>` and returns that name; what is seen
    /// of the file is then its absence.
    fn set_aside(&self, state: &mut State, suffix: &str) -> PathBuf {
        let mut to = self.file.clone().into_os_string();
        to.push(format!(".{suffix}"));
        let to = PathBuf::from(to);
        if let Err(e) = crate::fs::rename_durably(&self.file, &to) {
            warn!(file = %self.file.display(), error = %e, "could not rename the pushed certificate bundle");
        }
        state.seen = stamp(&self.file);
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use erel_certs::MasterDir;
    use rustls::pki_types::pem::PemObject;

    /// A root, a cluster with host `web-1`, and the bundle directory of `web-1`.
    struct Fixture {
        _dir: tempfile::TempDir,
        root: Root,
        certs: MasterDir,
        host: PathBuf,
    }

    fn fixture() -> Fixture {
        let (dir, root) = crate::fs::temp_root();
        let certs = MasterDir::new(dir.path().join("master"));
        certs.init("test").expect("init");
        let host = certs.issue_host("web-1", &[], &[]).expect("host");
        Fixture {
            _dir: dir,
            root,
            certs,
            host,
        }
    }

    impl Fixture {
        fn push(&self, bundle: &PushedBundle) {
            let file = self.root.path().join(PUSHED_BUNDLE);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            crate::fs::write_atomic(&file, bundle.to_toml().as_bytes(), 0o600).expect("push");
        }

        fn own_bundle(&self) -> PushedBundle {
            PushedBundle::from_dir(&self.host).expect("bundle")
        }

        fn master_chain(&self) -> Vec<CertificateDer<'static>> {
            CertificateDer::pem_file_iter(self.certs.master_pem())
                .expect("master.pem")
                .collect::<Result<_, _>>()
                .expect("PEM")
        }

        fn set_aside(&self, suffix: &str) -> PathBuf {
            self.root.path().join(format!("{PUSHED_BUNDLE}.{suffix}"))
        }
    }

    /// A long probation: these tests end it only when they mean to.
    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn without_a_pushed_file_the_certs_directory_serves() {
        let f = fixture();
        assert!(Pushed::open(&f.root, "web-1", LONG).config().is_none());
    }

    #[test]
    fn a_confirmed_bundle_is_recorded_and_taken_at_once_after_a_restart() {
        let f = fixture();
        let pushed = Pushed::open(&f.root, "web-1", LONG);
        f.push(&f.own_bundle());
        let config = pushed.config().expect("taken").config;
        assert!(pushed.state.lock().unwrap().probation.is_some());
        pushed.authenticated(&config, &f.master_chain());
        assert!(pushed.state.lock().unwrap().probation.is_none());
        let record = f.root.path().join(STATE_DIR).join(CONFIRMED);
        let text = std::fs::read_to_string(record).expect("record");
        assert_eq!(text.len(), 64, "a sha256 in hex: {text}");

        let restarted = Pushed::open(&f.root, "web-1", Duration::from_millis(1));
        assert!(restarted.config().is_some());
        assert!(restarted.state.lock().unwrap().probation.is_none());
    }

    #[test]
    fn a_bundle_never_confirmed_reverts_after_its_probation() {
        let f = fixture();
        let probation = Duration::from_millis(300);
        let pushed = Pushed::open(&f.root, "web-1", probation);
        f.push(&f.own_bundle());
        assert!(pushed.config().is_some(), "taken on probation");
        assert!(
            crate::wait::until_blocking(probation * 50, || pushed.config().is_none()),
            "still served after its probation"
        );
        assert!(f.set_aside("reverted").is_file());
        assert!(!f.root.path().join(PUSHED_BUNDLE).exists());
    }

    /// Pushes `bundle` over a confirmed one and checks that it is refused naming
    /// `check`, and that the confirmed one still serves.
    fn refused_over_confirmed(f: &Fixture, bundle: &PushedBundle, check: &str) {
        let pushed = Pushed::open(&f.root, "web-1", LONG);
        f.push(&f.own_bundle());
        let good = pushed.config().expect("taken").config;
        pushed.authenticated(&good, &f.master_chain());
        f.push(bundle);
        let served = pushed.config().expect("still the confirmed bundle").config;
        assert!(Arc::ptr_eq(&served, &good), "the refused bundle serves");
        let refused = f.set_aside("refused");
        assert!(refused.is_file(), "{} missing", refused.display());
        let judged = PushedBundle::read(&refused).and_then(|b| {
            let masters = [f.master_chain()];
            let expected = Expected {
                host_id: "web-1",
                masters: &masters,
            };
            b.validate(&refused, &expected)
        });
        match judged {
            Err(erel_certs::Error::Refused { check: named, .. }) => assert_eq!(named, check),
            other => panic!("expected a refusal by {check}, got {other:?}"),
        }
    }

    #[test]
    fn a_key_that_does_not_match_is_refused_and_the_previous_bundle_serves() {
        let f = fixture();
        let other = f.certs.issue_host("web-2", &[], &[]).expect("web-2");
        let own = f.own_bundle();
        let other_key = std::fs::read_to_string(other.join("host.key")).expect("key");
        let bundle = PushedBundle::new(own.ca.clone(), own.certificate.clone(), other_key, own.crl);
        refused_over_confirmed(&f, &bundle, "key");
    }

    #[test]
    fn a_bundle_for_another_host_is_refused() {
        let f = fixture();
        let other = f.certs.issue_host("web-2", &[], &[]).expect("web-2");
        let bundle = PushedBundle::from_dir(&other).expect("bundle");
        refused_over_confirmed(&f, &bundle, "same host");
    }

    #[test]
    fn a_bundle_that_would_lock_out_the_master_is_refused() {
        let f = fixture();
        let next = MasterDir::new(f.certs.path().with_file_name("next"));
        next.init("next").expect("init");
        let dir = next.issue_host("web-1", &[], &[]).expect("host");
        let bundle = PushedBundle::from_dir(&dir).expect("bundle");
        refused_over_confirmed(&f, &bundle, "master kept");
    }

    /// Confirms the host's own bundle on a fresh agent and returns its sha256.
    fn confirm_own(f: &Fixture) -> String {
        let pushed = Pushed::open(&f.root, "web-1", LONG);
        f.push(&f.own_bundle());
        let config = pushed.config().expect("taken").config;
        pushed.authenticated(&config, &f.master_chain());
        let sha256 = pushed
            .state
            .lock()
            .unwrap()
            .serving
            .as_ref()
            .expect("served")
            .sha256
            .clone();
        sha256
    }

    /// The sha256 a restarted agent serves with, with no probation pending.
    fn served_after_restart(f: &Fixture) -> String {
        let restarted = Pushed::open(&f.root, "web-1", LONG);
        assert!(restarted.config().is_some(), "the --certs directory serves");
        let state = restarted.state.lock().unwrap();
        assert!(state.probation.is_none());
        state.serving.as_ref().expect("served").sha256.clone()
    }

    #[test]
    fn a_confirmed_bundle_is_copied_under_the_state_directory() {
        let f = fixture();
        confirm_own(&f);
        let copy = f.root.path().join(STATE_DIR).join(CONFIRMED_COPY);
        let pushed = std::fs::read(f.root.path().join(PUSHED_BUNDLE)).expect("pushed");
        assert_eq!(std::fs::read(&copy).expect("copy"), pushed);
        let mode = std::fs::metadata(&copy).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }

    #[test]
    fn after_a_refused_push_a_restart_serves_the_confirmed_copy() {
        let f = fixture();
        let other = f.certs.issue_host("web-2", &[], &[]).expect("web-2");
        refused_over_confirmed(
            &f,
            &PushedBundle::from_dir(&other).expect("bundle"),
            "same host",
        );
        assert!(!f.root.path().join(PUSHED_BUNDLE).exists());
        let own = crate::digest::of_bytes(f.own_bundle().to_toml().as_bytes()).to_hex();
        assert_eq!(served_after_restart(&f), own);
    }

    #[test]
    fn after_a_reverted_push_a_restart_serves_the_confirmed_copy() {
        let f = fixture();
        let good = confirm_own(&f);
        let probation = Duration::from_millis(300);
        let pushed = Pushed::open(&f.root, "web-1", probation);
        // The same bundle written differently: another file, never confirmed.
        let text = format!("{}\n# pushed again\n", f.own_bundle().to_toml());
        let file = f.root.path().join(PUSHED_BUNDLE);
        crate::fs::write_atomic(&file, text.as_bytes(), 0o600).expect("push");
        pushed.config().expect("taken on probation");
        assert!(
            crate::wait::until_blocking(probation * 50, || {
                pushed.config();
                f.set_aside("reverted").is_file()
            }),
            "not reverted after its probation"
        );
        assert_eq!(served_after_restart(&f), good);
    }

    #[test]
    fn a_refused_bundle_at_start_up_leaves_the_certs_directory_serving() {
        let f = fixture();
        let other = f.certs.issue_host("web-2", &[], &[]).expect("web-2");
        f.push(&PushedBundle::from_dir(&other).expect("bundle"));
        assert!(Pushed::open(&f.root, "web-1", LONG).config().is_none());
        assert!(f.set_aside("refused").is_file());
    }
}
