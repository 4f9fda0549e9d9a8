//! `erel certs init | host | revoke | rotate`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::error::ResultExt as _;
use clap::Subcommand;

use super::kit::{self, Kit};
use super::Context;

/// Certificate commands.
#[derive(Debug, Subcommand)]
pub(super) enum CertsCommand {
    /// Creates a new cluster CA and the master's client certificate.
    Init {
        /// A name for the cluster, written into the CA's common name.
        #[arg(long = "name", default_value = "erel")]
        cluster_name: String,
    },
    /// Creates the bundle for one host: hosts/<ID>/{ca.pem,host.pem,host.key,crl.pem}.
    Host {
        /// The host id (lowercase letters, digits, '-').
        id: String,
        /// An IP address the certificate also names (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// A DNS name the certificate also names (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Replace an existing bundle of ID with a new key and certificate, and an
        /// existing --kit FILE (without it, an existing host key is never overwritten).
        #[arg(long)]
        force: bool,
        /// Also write a host kit: one archive with the agent, the bundle, a boot.toml,
        /// the systemd unit and install.sh, all a blank host needs (mode 0600).
        #[arg(long, value_name = "FILE.tar.gz")]
        kit: Option<PathBuf>,
        /// Where the host's agent listens, written into the kit's boot.toml
        /// [default: 0.0.0.0:7070].
        #[arg(long, value_name = "ADDR:PORT", requires = "kit")]
        listen: Option<SocketAddr>,
        /// The agent binary the kit ships [default: erel-boot beside this program].
        #[arg(long, value_name = "FILE", requires = "kit")]
        agent: Option<PathBuf>,
    },
    /// Adds a host's (or the master's, as "master") certificate to the CRL.
    Revoke {
        /// A host id with a bundle under hosts/, or "master".
        name: String,
        /// Then push every host of the cluster file its bundle with the new CRL (a
        /// revoked host or master gets a new certificate first), host by host, each
        /// proved with a new connection.
        #[arg(long)]
        push: bool,
    },
    /// Rotates the cluster CA on every host of the cluster file without logging in to
    /// them: overlap bundles first (both CAs), then the final ones (the new CA alone),
    /// host by host, canaries first, each proved with a new connection.
    Rotate {
        /// Only the overlap round, on the hosts of this group (repeatable; default:
        /// every host). The master switches to the new CA, and the final round runs on
        /// every host, only once every host of the cluster file holds the overlap bundle.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Stop after the overlap round, before the master switches and the old CA is
        /// retired: every host then trusts both CAs and serves its new certificate, and
        /// the new master credentials wait in `next/` for the other masters. Run again
        /// without it to finish.
        #[arg(long)]
        keep_old_ca: bool,
        /// Print the hosts in the order they would be rotated, and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a certificate command.
pub(super) async fn run(
    ctx: &Context,
    cluster: Option<&Path>,
    command: CertsCommand,
) -> crate::Result<ExitCode> {
    let dir = ctx.certs.path().display().to_string();
    match command {
        CertsCommand::Init { cluster_name } => {
            ctx.certs
                .init(&cluster_name)
                .with_context(|| format!("certs init in {dir}"))?;
            println!("created the cluster CA and the master certificate in {dir}");
        }
        CertsCommand::Host {
            id,
            ips,
            dns,
            force,
            kit,
            listen,
            agent,
        } => {
            // Everything a kit needs is checked before a key is made.
            let kit = match kit {
                Some(path) => {
                    kit::check_target(&path, force)?;
                    Some((path, kit::agent_binary(agent)?))
                }
                None => None,
            };
            let issued = if force {
                ctx.certs.replace_host(&id, &ips, &dns)
            } else {
                ctx.certs.issue_host(&id, &ips, &dns)
            };
            let bundle = issued.with_context(|| format!("certs host {id}"))?;
            println!(
                "wrote the bundle for {id} to {} (copy it to the host's --certs directory)",
                bundle.display()
            );
            if let Some((path, agent)) = kit {
                let spec = Kit {
                    id: &id,
                    bundle: &bundle,
                    agent: &agent,
                    listen: listen.unwrap_or(kit::DEFAULT_LISTEN),
                };
                kit::write(&spec, &path, force)
                    .with_context(|| format!("certs host {id} --kit {}", path.display()))?;
                println!(
                    "wrote the kit for {id} to {} (on the host: tar xzf it, then run erel-host-{id}/install.sh)",
                    path.display()
                );
            }
        }
        CertsCommand::Revoke { name, push } => {
            ctx.certs
                .revoke(&name)
                .with_context(|| format!("certs revoke {name}"))?;
            if !push {
                println!(
                    "revoked {name}: {dir}/crl.pem and every host bundle's crl.pem updated; copy them to the agents"
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("revoked {name}; pushing the new CRL");
            let hosts = cluster_hosts(cluster, &[])?;
            crate::rotate::push_revocation(&ctx.certs, &name, &hosts, &ctx.master_name()).await?;
            println!("every host serves the new CRL");
        }
        CertsCommand::Rotate {
            groups,
            dry_run,
            keep_old_ca,
        } => {
            let hosts = cluster_hosts(cluster, &groups)?;
            let all = cluster_hosts(cluster, &[])?;
            if dry_run {
                let rounds = if keep_old_ca {
                    "overlap bundle (the final round waits for a run without --keep-old-ca)"
                } else if hosts.len() == all.len() {
                    "overlap bundle, then final bundle"
                } else {
                    "overlap bundle (the final round waits until every host holds one)"
                };
                for (i, host) in hosts.iter().enumerate() {
                    println!("{}. {host}: {rounds}", i + 1);
                }
                return Ok(ExitCode::SUCCESS);
            }
            crate::rotate::rotate(&ctx.certs, &all, &hosts, &ctx.master_name(), keep_old_ca)
                .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The hosts of the cluster file, in rollout order (see `rotate`).
fn cluster_hosts(cluster: Option<&Path>, groups: &[String]) -> crate::Result<Vec<crate::HostAddr>> {
    let file = super::cluster_file(cluster);
    let plan = crate::cluster::Plan::load_with(&file, &crate::cluster::ArchiveLookup::Unchecked)?;
    crate::rotate::rollout_order(&plan, groups)
}
