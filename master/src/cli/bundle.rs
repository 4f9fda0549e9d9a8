//! `erel bundle keygen|create|verify|import`: sealed bundles that carry a revision and
//! its archives across an air gap (see [`crate::bundle`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::amqp::{publisher, BrokerArgs};
use crate::amqp::log;
use crate::bundle::{self, SigningKey, TrustedKey, Verified};
use crate::cluster::{ArchiveLookup, Plan};
use crate::error::Error;

/// `erel bundle …`.
#[derive(Debug, Subcommand)]
pub(super) enum BundleCommand {
    /// Makes a signing key pair (minisign's format, no password): the secret key file
    /// gets mode 0600.
    Keygen(KeygenArgs),
    /// Writes a signed bundle: a cluster file's revision and the archives it names.
    Create(CreateArgs),
    /// Checks a bundle (signature, expiry, every archive) and prints what it holds.
    Verify(VerifyArgs),
    /// Checks a bundle, copies its archives into the artifact directory and publishes
    /// its revision, signed, to the config log.
    Import(ImportArgs),
}

/// `erel bundle keygen`.
#[derive(Debug, Args)]
pub(super) struct KeygenArgs {
    /// Where the secret key is written (mode 0600); keep it on the signing machine.
    #[arg(long, value_name = "FILE")]
    secret_key: PathBuf,
    /// Where the public key is written; masters and importers trust it.
    #[arg(long, value_name = "FILE")]
    public_key: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
}

/// `erel bundle create`.
#[derive(Debug, Args)]
pub(super) struct CreateArgs {
    /// Take the archives from this artifact directory instead of beside the cluster file.
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// The secret key that signs (a password-protected minisign key reads its password
    /// from EREL_SECRET_KEY_PASSWORD, else asks for it).
    #[arg(long, value_name = "FILE")]
    secret_key: PathBuf,
    /// The bundle is refused once this long has passed, e.g. `30d`, `12h`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "expires")]
    expires_in: Option<Duration>,
    /// The bundle is refused after this instant (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    expires: Option<OffsetDateTime>,
    /// The bundle file written.
    #[arg(short = 'o', long = "output", value_name = "BUNDLE")]
    output: PathBuf,
}

/// `erel bundle verify`.
#[derive(Debug, Args)]
pub(super) struct VerifyArgs {
    /// The bundle file.
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,
    /// The public key the bundle must be signed with.
    #[arg(long, value_name = "FILE")]
    public_key: PathBuf,
}

/// `erel bundle import`.
#[derive(Debug, Args)]
pub(super) struct ImportArgs {
    /// The bundle file.
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,
    /// The public key the bundle must be signed with.
    #[arg(long, value_name = "FILE")]
    public_key: PathBuf,
    /// The masters' artifact directory, where the archives are copied.
    #[arg(long, value_name = "DIR")]
    artifacts: PathBuf,
    /// Who publishes, as the log records it [default: $USER@<host name>].
    #[arg(long, value_name = "NAME")]
    publisher: Option<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| format!("not an RFC 3339 time: {e}"))
}

/// Runs one `erel bundle` command.
/// `create` bundles the cluster file `cluster` (`--cluster FILE`, default cluster.toml).
pub(super) async fn run(command: BundleCommand, cluster: &Path) -> crate::Result<ExitCode> {
    match command {
        BundleCommand::Keygen(args) => keygen(&args),
        BundleCommand::Create(args) => {
            let cluster = cluster.to_path_buf();
            blocking(move || create(&args, &cluster)).await
        }
        BundleCommand::Verify(args) => verify(args).await,
        BundleCommand::Import(args) => import(args).await,
    }
}

/// Runs file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> crate::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Usage(format!("the bundle work failed: {e}")))?
}

fn keygen(args: &KeygenArgs) -> crate::Result<ExitCode> {
    let id = bundle::keygen(&args.secret_key, &args.public_key, args.force)?;
    println!(
        "key {id}: secret key {} (mode 0600, no password: keep it on the signing machine), \
         public key {}",
        args.secret_key.display(),
        args.public_key.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn create(args: &CreateArgs, cluster: &Path) -> crate::Result<ExitCode> {
    let key = SigningKey::load(&args.secret_key)?;
    let text = std::fs::read_to_string(cluster)
        .map_err(|e| Error::local(cluster, format!("cannot read: {e}")))?;
    // Validated exactly as `erel config publish` does; the archives it finds are bundled.
    let plan = match &args.artifacts {
        Some(dir) => Plan::load_with(cluster, &ArchiveLookup::Artifacts(dir.clone()))?,
        None => Plan::load(cluster)?,
    };
    let created = OffsetDateTime::now_utc();
    let expires = match (args.expires, args.expires_in) {
        (Some(at), _) => Some(at),
        (None, Some(after)) => Some(created + after),
        (None, None) => None,
    };
    if let Some(at) = expires.filter(|at| *at <= created) {
        // A bundle that every `verify` and `import` would refuse is no bundle to carry.
        return Err(Error::Usage(format!(
            "--expires {}: that is already past; give a later time or --expires-in",
            at.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| at.to_string())
        )));
    }
    let manifest = bundle::create(&bundle::CreateOptions {
        cluster_text: &text,
        plan: &plan,
        key: &key,
        created,
        expires,
        output: &args.output,
    })?;
    println!(
        "wrote {}: revision {}, {} archive(s), signed with key {}, expires {}",
        args.output.display(),
        manifest.revision,
        manifest.archives.len(),
        key.id(),
        manifest.expires_at.as_deref().unwrap_or("never")
    );
    Ok(ExitCode::SUCCESS)
}

/// Loads the key and checks the whole bundle.
async fn verified(bundle: &Path, public_key: &Path) -> crate::Result<(TrustedKey, Verified)> {
    let key = TrustedKey::load(public_key)?;
    let (bundle, checker) = (bundle.to_path_buf(), key.clone());
    let verified =
        blocking(move || bundle::verify(&bundle, &checker, OffsetDateTime::now_utc())).await?;
    Ok((key, verified))
}

async fn verify(args: VerifyArgs) -> crate::Result<ExitCode> {
    let (key, verified) = verified(&args.bundle, &args.public_key).await?;
    let manifest = &verified.manifest;
    println!(
        "{}: signed with key {}, every archive matches its manifest",
        args.bundle.display(),
        key.id()
    );
    println!("revision   {}", manifest.revision);
    println!("created    {}", manifest.created_at);
    println!(
        "expires    {}",
        manifest.expires_at.as_deref().unwrap_or("never")
    );
    println!(
        "cluster    {} ({} bytes, sha256 {})",
        manifest.cluster.name, manifest.cluster.size, manifest.cluster.sha256
    );
    for archive in &manifest.archives {
        println!(
            "archive    {} ({} bytes, sha256 {})",
            archive.name, archive.size, archive.sha256
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn import(args: ImportArgs) -> crate::Result<ExitCode> {
    if !args.artifacts.is_dir() {
        return Err(Error::Usage(format!(
            "--artifacts {}: not a directory",
            args.artifacts.display()
        )));
    }
    let (key, verified) = verified(&args.bundle, &args.public_key).await?;
    let revision = verified.manifest.revision;
    let origin = format!(
        "{} ({CLUSTER})",
        args.bundle.display(),
        CLUSTER = bundle::CLUSTER
    );
    Plan::parse(&verified.cluster_text, &origin, &ArchiveLookup::Unchecked)?;
    let broker = args.broker.broker()?;
    let entries = log::read_all(&broker).await?;
    let newest = log::newest(&entries).and_then(log::LogEntry::revision);
    if !log::counts_after(newest, revision) {
        return Err(Error::local(
            &args.bundle,
            format!(
                "too far ahead: the bundle holds revision {revision}, more than {} (2^32) \
                 above the newest revision in the config log {}, {}; nothing was imported",
                crate::cluster::MAX_REVISION_STEP,
                broker.names().configs(),
                newest.unwrap_or(0)
            ),
        ));
    }
    if let Some(newest) = newest {
        if revision <= newest {
            return Err(Error::local(
                &args.bundle,
                format!(
                    "not newer than the current revision: the bundle holds revision \
                     {revision}, the config log {} already has revision {newest}; \
                     nothing was imported",
                    broker.names().configs()
                ),
            ));
        }
    }
    let copied = {
        let (bundle, dir, manifest) = (
            args.bundle.clone(),
            args.artifacts.clone(),
            verified.manifest.clone(),
        );
        blocking(move || {
            let missing = bundle::missing_archives(&manifest, &dir)?;
            bundle::copy_archives(&bundle, &missing, &dir)
        })
        .await?
    };
    println!(
        "{}: signed with key {}; {copied} archive(s) copied into {} ({} already there)",
        args.bundle.display(),
        key.id(),
        args.artifacts.display(),
        verified.manifest.archives.len() - copied
    );
    // Validated as the masters will: archives found in the artifact directory.
    let plan = {
        let (text, dir) = (verified.cluster_text.clone(), args.artifacts.clone());
        blocking(move || Plan::parse(&text, &origin, &ArchiveLookup::Artifacts(dir))).await?
    };
    let publisher = args.publisher.unwrap_or_else(publisher);
    let signed = verified.signed();
    super::config::publish_plan(
        &broker,
        &plan,
        &verified.cluster_text,
        &publisher,
        Some(&signed),
    )
    .await
}
