//! Keys rotate from the master: `erel certs rotate` and `erel certs revoke --push`.
//!
//! A frozen agent takes a new bundle only as the file `certs/bundle.toml` under its root
//! (see [`erel_certs::PushedBundle`]), written with `WriteFile`, and validates it as a
//! whole before serving with it. A rollout here goes one host at a time, in the order
//! a deploy uses (each group's hosts in file order, so its canaries first; then the
//! hosts in no group): push the bundle, then prove it with a **new** connection made
//! with the credentials that must work from then on. That connection is also what
//! confirms the bundle on the agent, which otherwise goes back to its previous bundle
//! when its probation ends. When a host does not answer or the proof fails, the
//! previous bundle is written back (if the host still answers) and the rollout stops,
//! naming the host and why.
//!
//! A CA rotation ([`rotate`]) has two rounds:
//! 1. the overlap: each host gets its certificate from the next CA, trusting both CAs,
//!    proved by a connection that trusts the next CA alone (the old master
//!    certificate still presented);
//! 2. the master switches to its new certificate; each host gets the final bundle
//!    (the next CA alone), proved with the new master certificate. The old CA is then
//!    archived.
//!
//! With `--group`, the overlap round runs on those groups' hosts only, and the switch
//! waits until every host of the cluster file holds the overlap bundle. With
//! `--keep-old-ca`, the run stops there even when every host holds it: the other masters
//! of the cluster can take the new master credentials from `next/` before the old CA is
//! retired.
//!
//! Run again after a stop, it resumes: the next CA is kept in `next/` until the switch,
//! the old one in `previous/` until the final round is done.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use erel_certs::{MasterDir, PushedBundle, PUSHED_BUNDLE, PUSHED_BUNDLE_MODE};
use erel_proto::{Ping, Pong, Request};

use crate::client::{Connector, WriteSource};
use crate::cluster::Plan;
use crate::error::{Error, ResultExt as _};
use crate::HostAddr;

/// How long each phase of a connection of the rollout may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The hosts of `plan` in rollout order: the groups named in `groups` (all when
/// empty, by name), each group's hosts in file order (its canaries first), each host
/// once; with all groups, then the hosts in none.
pub(crate) fn rollout_order(plan: &Plan, groups: &[String]) -> crate::Result<Vec<HostAddr>> {
    for group in groups {
        if !plan.groups.contains_key(group) {
            return Err(Error::Usage(format!(
                "no group '{group}' in {}",
                plan.origin
            )));
        }
    }
    let mut order: Vec<HostAddr> = Vec::new();
    let chosen = plan
        .groups
        .keys()
        .filter(|name| groups.is_empty() || groups.contains(name));
    for group in chosen {
        for host in plan.hosts_in(group) {
            if !order.iter().any(|h| h.id == host.id) {
                order.push(host.host_addr());
            }
        }
    }
    if groups.is_empty() {
        for host in &plan.hosts {
            if !order.iter().any(|h| h.id == host.id) {
                order.push(host.host_addr());
            }
        }
    }
    Ok(order)
}

/// A host's bundle, by host id.
type BundleOf<'a> = dyn Fn(&str) -> erel_certs::Result<PushedBundle> + 'a;

/// One round: the same kind of bundle pushed to each host in turn.
pub(crate) struct Round<'a> {
    /// What the round is, for messages ("overlap", "final", "new CRL").
    pub(crate) name: &'a str,
    /// Connections that push (and write back).
    pub(crate) push: Connector,
    /// The new connection that proves each host.
    pub(crate) proof: Connector,
    /// Where bundles are staged before they are sent (mode 0700, holds keys).
    pub(crate) staging: PathBuf,
}

impl Round<'_> {
    /// Pushes `bundle` to every host of `hosts`, one at a time, each proved before
    /// the next; `previous(id)` is what a host gets back when its proof fails.
    pub(crate) async fn run(
        &self,
        hosts: &[HostAddr],
        bundle: impl Fn(&str) -> erel_certs::Result<PushedBundle>,
        previous: Option<&BundleOf<'_>>,
    ) -> crate::Result<()> {
        for host in hosts {
            let new = bundle(&host.id)
                .with_context(|| format!("the {} bundle of {}", self.name, host.id))?;
            match self.push_and_prove(host, &new).await {
                Ok(()) => println!(
                    "{}: {} bundle pushed and proved with a new connection",
                    host.id, self.name
                ),
                Err(why) => {
                    let back = match previous.map(|previous| previous(&host.id)) {
                        Some(Ok(old)) => match self.push_to(host, &old).await {
                            Ok(()) => "its previous bundle was written back".to_string(),
                            Err(e) => format!("its previous bundle could not be written back ({e}); the agent goes back to it when its probation ends"),
                        },
                        Some(Err(e)) => format!("no previous bundle to write back ({e}); the agent goes back to its own when its probation ends"),
                        None => "the agent goes back to its previous bundle when its probation ends".to_string(),
                    };
                    return Err(Error::Usage(format!(
                        "{}: the {} round stopped at this host: {why}; {back}. Hosts before it hold the {} bundle; hosts after it were not touched",
                        host.id, self.name, self.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Pushes `bundle`, then proves it with a new connection (a `Ping`).
    async fn push_and_prove(&self, host: &HostAddr, bundle: &PushedBundle) -> crate::Result<()> {
        self.push_to(host, bundle).await?;
        self.prove(host).await
    }

    /// Proves what `host` serves now with a new connection of the round's proof
    /// credentials (a `Ping`).
    async fn prove(&self, host: &HostAddr) -> crate::Result<()> {
        let mut client = self.proof.connect(host).await.map_err(|e| {
            Error::Usage(format!(
                "the new connection that proves the bundle failed: {e}"
            ))
        })?;
        let _: Pong = client.command(Request::Ping(Ping {})).await?;
        client.close().await;
        Ok(())
    }

    /// Writes `bundle` to `host` as `certs/bundle.toml`.
    async fn push_to(&self, host: &HostAddr, bundle: &PushedBundle) -> crate::Result<()> {
        let file = stage(&self.staging, &host.id, bundle)?;
        let mut client = self.push.connect(host).await?;
        let source = WriteSource {
            path: file.clone(),
            sha256: None,
            sha256_of: None,
        };
        let written = client
            .write_file(&source, PUSHED_BUNDLE, PUSHED_BUNDLE_MODE, &mut |_| {})
            .await;
        let _ = std::fs::remove_file(&file);
        written?;
        client.close().await;
        Ok(())
    }
}

/// Writes `bundle` to `<staging>/<id>.toml`, mode 0600 from the start.
fn stage(staging: &Path, id: &str, bundle: &PushedBundle) -> crate::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    let file = staging.join(format!("{id}.toml"));
    let _ = std::fs::remove_file(&file);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(bundle.to_toml().as_bytes()))
        .with_context(|| format!("staging {}", file.display()))?;
    Ok(file)
}

/// A connector for `tls`.
fn connector(tls: Arc<rustls::ClientConfig>, master_name: &str) -> Connector {
    Connector::new(tls, master_name).with_connect_timeout(CONNECT_TIMEOUT)
}

/// Where bundles are staged: a hidden directory of the certificate directory.
fn staging(certs: &MasterDir) -> PathBuf {
    certs.path().join(".pushing")
}

/// Removes the staging directory once a command has pushed everything; only when empty
/// (`rmdir`), so a file left there by a failure stays for the operator to see.
fn remove_staging(certs: &MasterDir) {
    let _ = std::fs::remove_dir(staging(certs));
}

/// What `--keep-old-ca` leaves, and what the operator does next.
const KEPT_OLD_CA: &str = "overlap round done on every host: each trusts the old and the new CA and serves its certificate from the new one; the old CA is kept (--keep-old-ca). Other masters: copy ca.pem, master.pem, master.key and crl.pem of next/ in this certificate directory over theirs and restart them (every host accepts them now and after the old CA is retired); then run `erel certs rotate` again to retire the old CA";

/// What the operator copies to the other masters once a rotation is done.
const OTHER_MASTERS: &str = "other masters: copy ca.pem, master.pem, master.key and crl.pem of this certificate directory to theirs and restart them; until then they reach no host (with --keep-old-ca, a rotation lets them switch before the old CA is retired)";

/// `erel certs rotate`: rotates the cluster CA (see the module docs). `all` is every
/// host of the cluster file in rollout order, `chosen` those whose overlap round runs
/// now (all of them without `--group`). The master switches to the new CA only once
/// every host of `all` holds the overlap bundle: a host outside `chosen` counts when a
/// new connection that trusts the next CA alone proves it. Otherwise the run stops
/// after the overlap round, naming the hosts still to do, with every host reachable.
/// With `keep_old_ca`, it stops after the overlap round in any case (see
/// [`KEPT_OLD_CA`]).
pub(crate) async fn rotate(
    certs: &MasterDir,
    all: &[HostAddr],
    chosen: &[HostAddr],
    master_name: &str,
    keep_old_ca: bool,
) -> crate::Result<()> {
    if certs.switch_interrupted() {
        certs
            .switch_to_next()
            .context("finishing the interrupted switch to the next CA")?;
        println!("finished the interrupted switch: the master now presents its certificate from the new CA");
    } else if !certs.previous().path().exists() {
        let ids: Vec<&str> = chosen.iter().map(|h| h.id.as_str()).collect();
        let next = certs
            .begin_rotation(&ids)
            .context("preparing the next CA")?;
        println!("next CA ready in {}", next.path().display());
        let round = Round {
            name: "overlap",
            push: connector(certs.client_config()?, master_name),
            proof: connector(certs.next_proof_config()?, master_name),
            staging: staging(certs),
        };
        round
            .run(
                chosen,
                |id| next.overlap_bundle(certs, id),
                Some(&|id| certs.host_bundle(id)),
            )
            .await?;
        let mut missing = Vec::new();
        for host in all.iter().filter(|h| !chosen.iter().any(|c| c.id == h.id)) {
            match round.prove(host).await {
                Ok(()) => println!("{}: already holds the overlap bundle (proved)", host.id),
                Err(_) => missing.push(host.id.as_str()),
            }
        }
        if !missing.is_empty() {
            println!(
                "overlap round done on the chosen hosts; still on the old CA alone: {}. The master keeps its current certificate, and every host accepts it. Run `erel certs rotate` again without --group (or with the groups of these hosts) to finish",
                missing.join(", ")
            );
            return Ok(());
        }
        if keep_old_ca {
            println!("{KEPT_OLD_CA}");
            return Ok(());
        }
        certs.switch_to_next().context("switching to the next CA")?;
        println!("the master now presents its certificate from the new CA");
    } else {
        println!("resuming: the master already switched to the new CA");
    }
    let tls = certs.client_config()?;
    let previous = certs.previous();
    let round = Round {
        name: "final",
        push: connector(tls.clone(), master_name),
        proof: connector(tls, master_name),
        staging: staging(certs),
    };
    round
        .run(
            all,
            |id| certs.host_bundle(id),
            Some(&|id| certs.overlap_bundle(&previous, id)),
        )
        .await?;
    let archived = certs.archive_previous().context("archiving the old CA")?;
    remove_staging(certs);
    println!(
        "rotation done: every host serves the new CA alone; the old CA is archived in {}; {OTHER_MASTERS}",
        archived.display()
    );
    Ok(())
}

/// `erel certs revoke NAME --push`: after the revocation, every host of `hosts` gets
/// its bundle with the new CRL, each proved with a new connection. A revoked host
/// gets a new certificate first (its own bundle must not be revoked) and is pushed
/// before the others, over a connection that lets its revoked certificate in (see
/// [`erel_certs::MasterDir::revoked_host_push_config`]); a revoked master gets a new
/// master certificate, which makes the pushes. After a stop, running the command again
/// finishes it (the revocation is kept; the revoked host gets another certificate).
pub(crate) async fn push_revocation(
    certs: &MasterDir,
    name: &str,
    hosts: &[HostAddr],
    master_name: &str,
) -> crate::Result<()> {
    if name == "master" {
        certs
            .renew_master()
            .context("issuing a new master certificate")?;
        println!("issued a new master certificate");
    } else if certs.host_dir(name).exists() {
        certs
            .renew_host(name)
            .with_context(|| format!("issuing a new certificate for {name}"))?;
        println!("issued a new certificate for {name}");
    }
    let tls = certs.client_config()?;
    let round = |push| Round {
        name: "new CRL",
        push: connector(push, master_name),
        proof: connector(tls.clone(), master_name),
        staging: staging(certs),
    };
    // The revoked host still serves its revoked certificate (the one it was given by
    // a rotation, an earlier run or its install): it gets its new certificate, key and
    // the new CRL first, over a connection that lets that certificate in for this
    // push only, and is proved with the new CRL like the others. What a host held
    // before is revoked now, so a failed proof leaves the agent's probation to go back.
    let (revoked, others): (Vec<HostAddr>, Vec<HostAddr>) =
        hosts.iter().cloned().partition(|h| h.id == name);
    round(certs.revoked_host_push_config()?)
        .run(&revoked, |id| certs.host_bundle(id), None)
        .await
        .map_err(|e| match e {
            Error::Usage(why) => Error::Usage(format!(
                "{why}. Running `erel certs revoke {name} --push` again issues {name} another certificate and pushes it the same way"
            )),
            e => e,
        })?;
    round(tls.clone())
        .run(&others, |id| certs.host_bundle(id), None)
        .await?;
    remove_staging(certs);
    if name == "master" {
        println!("{OTHER_MASTERS}");
    }
    Ok(())
}
