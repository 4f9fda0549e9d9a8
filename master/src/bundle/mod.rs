//! Sealed bundles: one file that carries a cluster revision and the archives it names
//! across an air gap, signed with an ed25519 key in minisign's format ([`keys`]).
//!
//! A bundle is a plain tar file whose members come in this order:
//!
//! - `manifest.json`: the [`Manifest`]: the revision, the cluster file's and each
//!   archive's name, size and sha256, when it was made and when it expires;
//! - `manifest.json.minisig`: a minisign signature over `manifest.json`'s bytes, its
//!   trusted comment naming the revision and the manifest's sha256 (so `minisign -V`
//!   checks it too);
//! - `cluster.toml`: the cluster file's text, as published;
//! - `archives/<name>`: each archive, once.
//!
//! The signature covers the manifest and the manifest's digests bind every other
//! member, so [`verify`] checks the signature, then the expiry, then every member's size
//! and sha256; a member the manifest does not name, or one it names that is missing, is
//! tampering too. A revision published from a bundle carries the manifest and its
//! signature in the config log ([`crate::amqp::log::Signed`]), and a master told to
//! trust a key checks them before it applies the revision
//! ([`check_signed_revision`]). Expiry bounds when a bundle may be imported, not how
//! long a revision it brought stays valid: masters do not check it.

pub mod keys;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use keys::{keygen, SignatureRefusal, SigningKey, TrustedKey};

use crate::amqp::log::{LogEntry, MAX_CONFIG_BYTES};
use crate::cluster::Plan;
use crate::digest_cache::hash_into;
use crate::error::{Error, Result};

/// The manifest's `format`.
pub const FORMAT: &str = "erel-bundle/1";
/// The manifest's member name.
pub const MANIFEST: &str = "manifest.json";
/// The signature's member name.
pub const SIGNATURE: &str = "manifest.json.minisig";
/// The cluster file's member name.
pub const CLUSTER: &str = "cluster.toml";
/// The folder of the archives' members.
pub const ARCHIVES: &str = "archives/";
/// The largest manifest accepted: it travels in a config log header, which must fit in
/// one AMQP frame.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// The largest signature accepted (a minisign signature is under 400 bytes).
const MAX_SIGNATURE_BYTES: usize = 4096;

/// What a bundle holds, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The cluster file's revision.
    pub revision: u64,
    /// The cluster file (`name` is [`CLUSTER`]).
    pub cluster: Member,
    /// Every archive the cluster file names, by file name, sorted.
    pub archives: Vec<Member>,
    /// When the bundle was made (RFC 3339, UTC).
    pub created_at: String,
    /// After this instant (RFC 3339, UTC) the bundle is refused; `None`: never.
    pub expires_at: Option<String>,
}

/// One member of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its file name (an archive's name in the artifact directory).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lower-case hex.
    pub sha256: String,
}

impl Manifest {
    /// The manifest as written in a bundle: pretty JSON and a newline.
    pub fn to_text(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Reads a manifest and checks its shape: the format, plain member names, each
    /// archive once, readable times. The error says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| format!("not a bundle manifest: {e}"))?;
        if manifest.format != FORMAT {
            return Err(format!(
                "format {:?}, this erel reads {FORMAT:?}",
                manifest.format
            ));
        }
        if manifest.cluster.name != CLUSTER {
            return Err(format!("the cluster member is {:?}", manifest.cluster.name));
        }
        let mut names = std::collections::BTreeSet::new();
        for archive in &manifest.archives {
            if !plain_name(&archive.name) {
                return Err(format!(
                    "archive name {:?} is not a file name",
                    archive.name
                ));
            }
            if !names.insert(&archive.name) {
                return Err(format!("archive {} is named twice", archive.name));
            }
        }
        parse_time(&manifest.created_at)?;
        manifest.expiry()?;
        Ok(manifest)
    }

    /// When it expires, `None` for never.
    pub fn expiry(&self) -> std::result::Result<Option<OffsetDateTime>, String> {
        self.expires_at.as_deref().map(parse_time).transpose()
    }

    /// The archive named `name`.
    fn archive(&self, name: &str) -> Option<&Member> {
        self.archives.iter().find(|a| a.name == name)
    }
}

/// The trusted comment signed with a manifest: the revision and the manifest's sha256.
fn trusted_comment(revision: u64, digest: &str) -> String {
    format!("erel bundle revision {revision} manifest sha256 {digest}")
}

fn parse_time(text: &str) -> std::result::Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| format!("time {text:?}: {e}"))
}

/// An instant as manifests write it: RFC 3339, UTC, whole seconds.
pub fn format_time(at: OffsetDateTime) -> String {
    let at = at
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_default()
}

/// A file name without folders: not empty, no `/`, not `.` or `..`.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".." && !name.contains('\0')
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(sha2::Sha256::digest(bytes))
}

/// A reader that hashes and counts what goes through it.
struct Hashing<R> {
    inner: R,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
        }
    }

    /// The size and sha256 (hex) of what was read.
    fn finish(self) -> (u64, String) {
        (self.bytes, hex(self.hasher.finalize()))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// What [`create`] needs.
#[derive(Debug)]
pub struct CreateOptions<'a> {
    /// The cluster file's text, as read.
    pub cluster_text: &'a str,
    /// Its validated plan (archives checked: their files are bundled).
    pub plan: &'a Plan,
    /// The signing key.
    pub key: &'a SigningKey,
    /// When the bundle is made.
    pub created: OffsetDateTime,
    /// When it expires, if ever.
    pub expires: Option<OffsetDateTime>,
    /// The bundle file written.
    pub output: &'a Path,
}

/// Writes a signed bundle of `plan`'s revision and archives to `output`, durably (a
/// temporary file beside it, fsynced, renamed into place, the folder fsynced). Returns
/// its manifest.
///
/// # Errors
/// [`Error::Local`] naming the archive or file at fault: two archives with one file
/// name and different contents, an archive that changed since it was checked, a
/// manifest too large, a write that failed.
pub fn create(options: &CreateOptions<'_>) -> Result<Manifest> {
    let mut archives: BTreeMap<&str, &crate::cluster::Archive> = BTreeMap::new();
    for archive in options
        .plan
        .groups
        .values()
        .filter_map(|g| g.archive.as_ref())
    {
        if let Some(seen) = archives.insert(&archive.file_name, archive) {
            if seen.sha256 != archive.sha256 {
                return Err(Error::local(
                    &archive.path,
                    format!(
                        "two archives are named {} ({} too) with different contents; a \
                         bundle holds archives by file name",
                        archive.file_name,
                        seen.path.display()
                    ),
                ));
            }
        }
    }
    let mut members = Vec::new();
    for archive in archives.values() {
        let size = std::fs::metadata(&archive.path)
            .map_err(|e| Error::local(&archive.path, format!("cannot read: {e}")))?
            .len();
        members.push(Member {
            name: archive.file_name.clone(),
            size,
            sha256: archive.sha256.to_hex(),
        });
    }
    let text = options.cluster_text.as_bytes();
    let manifest = Manifest {
        format: FORMAT.to_string(),
        revision: options.plan.revision,
        cluster: Member {
            name: CLUSTER.to_string(),
            size: text.len() as u64,
            sha256: sha256_hex(text),
        },
        archives: members,
        created_at: format_time(options.created),
        expires_at: options.expires.map(format_time),
    };
    let manifest_text = manifest.to_text();
    if manifest_text.len() > MAX_MANIFEST_BYTES {
        return Err(Error::local(
            options.output,
            format!(
                "the manifest would be {} bytes, more than the {MAX_MANIFEST_BYTES} a \
                 bundle's may have (too many archives)",
                manifest_text.len()
            ),
        ));
    }
    let digest = sha256_hex(manifest_text.as_bytes());
    let signature = options.key.sign(
        manifest_text.as_bytes(),
        &trusted_comment(manifest.revision, &digest),
    )?;
    write_bundle(options, &manifest, &manifest_text, &signature, &archives)?;
    Ok(manifest)
}

fn write_bundle(
    options: &CreateOptions<'_>,
    manifest: &Manifest,
    manifest_text: &str,
    signature: &str,
    archives: &BTreeMap<&str, &crate::cluster::Archive>,
) -> Result<()> {
    let output = options.output;
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".to_string());
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| Error::local(&dir, format!("cannot create a temporary file: {e}")))?;
    let failed = |e: std::io::Error| Error::local(output, format!("cannot write: {e}"));
    let mtime = options.created.unix_timestamp().max(0) as u64;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(staging.as_file()));
    for (member, bytes) in [
        (MANIFEST, manifest_text.as_bytes()),
        (SIGNATURE, signature.as_bytes()),
        (CLUSTER, options.cluster_text.as_bytes()),
    ] {
        tar.append_data(&mut header(bytes.len() as u64, mtime), member, bytes)
            .map_err(failed)?;
    }
    for member in &manifest.archives {
        let archive = archives[member.name.as_str()];
        let file = std::fs::File::open(&archive.path)
            .map_err(|e| Error::local(&archive.path, format!("cannot read: {e}")))?;
        let mut reader = Hashing::new(file.take(member.size));
        tar.append_data(
            &mut header(member.size, mtime),
            format!("{ARCHIVES}{}", member.name),
            &mut reader,
        )
        .map_err(failed)?;
        if reader.finish() != (member.size, member.sha256.clone()) {
            return Err(Error::local(
                &archive.path,
                "changed while the bundle was written; make the bundle again",
            ));
        }
    }
    let mut writer = tar.into_inner().map_err(failed)?;
    writer.flush().map_err(failed)?;
    drop(writer);
    staging.as_file().sync_all().map_err(failed)?;
    staging
        .persist(output)
        .map_err(|e| Error::local(output, format!("cannot rename into place: {}", e.error)))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::local(&dir, format!("cannot sync the directory: {e}")))
}

/// A tar header for a regular file of `size` bytes, mode 0644.
fn header(size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

/// A bundle whose every check passed.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Its manifest.
    pub manifest: Manifest,
    /// The manifest's text, as signed.
    pub manifest_text: String,
    /// The signature, in minisign's text format.
    pub signature: String,
    /// The cluster file's text.
    pub cluster_text: String,
}

impl Verified {
    /// The manifest and signature, as the config log record carries them.
    pub fn signed(&self) -> crate::amqp::log::Signed {
        crate::amqp::log::Signed {
            manifest: self.manifest_text.clone(),
            signature: self.signature.clone(),
        }
    }
}

/// Reads the whole bundle at `path` and checks it (blocking): the signature with `key`,
/// the expiry against `now`, every member's size and sha256, no member missing or
/// extra. Nothing is written.
///
/// # Errors
/// [`Error::Local`] naming `path`, its message beginning with which check failed:
/// `tampered: …`, `expired: …`, `signed by another key: …`, `bad signature: …`; or
/// why the file cannot be read.
pub fn verify(path: &Path, key: &TrustedKey, now: OffsetDateTime) -> Result<Verified> {
    let refused = |message: String| Error::local(path, message);
    let file = std::fs::File::open(path).map_err(|e| refused(format!("cannot read: {e}")))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut entries = tar
        .entries()
        .map_err(|e| refused(format!("not a bundle (a tar file): {e}")))?;
    let mut next = |expected: &str, limit: usize| -> Result<String> {
        let mut entry = match entries.next() {
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(refused(format!("not a bundle (a tar file): {e}"))),
            None => return Err(refused(format!("tampered: it holds no {expected}"))),
        };
        let name = entry_name(&entry);
        if name != expected {
            return Err(refused(format!(
                "tampered: {name} where {expected} must be (a bundle begins with \
                 {MANIFEST} and {SIGNATURE})"
            )));
        }
        read_bounded(&mut entry, limit).map_err(|e| refused(format!("tampered: {expected}: {e}")))
    };
    let manifest_text = next(MANIFEST, MAX_MANIFEST_BYTES)?;
    let signature = next(SIGNATURE, MAX_SIGNATURE_BYTES)?;
    let digest = sha256_hex(manifest_text.as_bytes());
    key.check(
        manifest_text.as_bytes(),
        &digest,
        &signature,
        "the manifest",
    )
    .map_err(|refusal| refused(refusal.to_string()))?;
    let manifest = Manifest::parse(&manifest_text).map_err(|e| {
        refused(format!(
            "bad signature: a signed manifest that cannot be used: {e}"
        ))
    })?;
    if let Some(expiry) = manifest.expiry().map_err(refused)? {
        if now > expiry {
            return Err(refused(format!(
                "expired: the bundle of revision {} expired at {} (it is now {})",
                manifest.revision,
                format_time(expiry),
                format_time(now)
            )));
        }
    }
    let mut cluster_text = None;
    let mut seen = std::collections::BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| refused(format!("tampered: the tar is damaged: {e}")))?;
        let name = entry_name(&entry);
        let member = if name == CLUSTER {
            Some(&manifest.cluster)
        } else {
            name.strip_prefix(ARCHIVES)
                .and_then(|n| manifest.archive(n))
        };
        let Some(member) = member else {
            return Err(refused(format!(
                "tampered: it holds {name}, which the manifest does not name"
            )));
        };
        if entry.header().entry_type() != tar::EntryType::Regular || !seen.insert(name.clone()) {
            return Err(refused(format!("tampered: {name} is not one regular file")));
        }
        let found = if name == CLUSTER {
            let text = read_bounded(&mut entry, MAX_CONFIG_BYTES)
                .map_err(|e| refused(format!("tampered: {CLUSTER}: {e}")))?;
            let found = (text.len() as u64, sha256_hex(text.as_bytes()));
            cluster_text = Some(text);
            found
        } else {
            let mut hasher = sha2::Sha256::new();
            let size = hash_into(&mut hasher, &mut (&mut entry).take(member.size + 1))
                .map_err(|e| refused(format!("tampered: {name}: cannot be read: {e}")))?;
            (size, hex(hasher.finalize()))
        };
        check_member(member, &name, &found).map_err(refused)?;
    }
    for name in std::iter::once(CLUSTER.to_string()).chain(
        manifest
            .archives
            .iter()
            .map(|a| format!("{ARCHIVES}{}", a.name)),
    ) {
        if !seen.contains(&name) {
            return Err(refused(format!(
                "tampered: {name}, which the manifest names, is missing"
            )));
        }
    }
    Ok(Verified {
        manifest,
        manifest_text,
        signature,
        cluster_text: cluster_text.unwrap_or_default(),
    })
}

/// Whether a member read as `found` (size, sha256) is the one `member` describes.
fn check_member(
    member: &Member,
    name: &str,
    found: &(u64, String),
) -> std::result::Result<(), String> {
    if found.0 != member.size || found.1 != member.sha256 {
        return Err(format!(
            "tampered: {name} does not match the manifest ({} bytes, sha256 {}; the \
             manifest says {} bytes, sha256 {})",
            found.0, found.1, member.size, member.sha256
        ));
    }
    Ok(())
}

fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> String {
    entry
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "(an unreadable name)".to_string())
}

/// Reads a member of at most `limit` bytes as UTF-8 text.
fn read_bounded(reader: &mut impl Read, limit: usize) -> std::result::Result<String, String> {
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() > limit {
        return Err(format!("more than the {limit} bytes it may have"));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())
}

/// The archives of `manifest` that the artifact directory `dir` lacks; one it holds
/// with other contents is refused, naming it. Nothing is written.
///
/// # Errors
/// [`Error::Local`] naming the archive in `dir` that differs, or that cannot be read.
pub fn missing_archives<'m>(manifest: &'m Manifest, dir: &Path) -> Result<Vec<&'m Member>> {
    let mut missing = Vec::new();
    for member in &manifest.archives {
        let path = dir.join(&member.name);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(member);
                continue;
            }
            Err(e) => return Err(Error::local(&path, format!("cannot read: {e}"))),
        };
        let mut hasher = sha2::Sha256::new();
        let size = hash_into(&mut hasher, &mut std::io::BufReader::new(file))
            .map_err(|e| Error::local(&path, format!("cannot read: {e}")))?;
        let found = (size, hex(hasher.finalize()));
        if found != (member.size, member.sha256.clone()) {
            return Err(Error::local(
                &path,
                format!(
                    "exists with other contents ({} bytes, sha256 {}) than the bundle's \
                     archive ({} bytes, sha256 {}); an archive is never replaced: remove \
                     or rename it first",
                    found.0, found.1, member.size, member.sha256
                ),
            ));
        }
    }
    Ok(missing)
}

/// Copies the archives `wanted` from the bundle at `path` into the artifact directory
/// `dir` (blocking): each to a temporary file there, checked against the manifest and
/// fsynced, then all renamed into place without replacing any file, and the directory
/// fsynced. Returns how many were copied.
///
/// # Errors
/// [`Error::Local`] naming the bundle (a member that no longer matches) or the file
/// that cannot be written or already exists; then no archive is renamed into place.
pub fn copy_archives(path: &Path, wanted: &[&Member], dir: &Path) -> Result<usize> {
    let refused = |message: String| Error::local(path, message);
    let file = std::fs::File::open(path).map_err(|e| refused(format!("cannot read: {e}")))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut staged = Vec::new();
    for entry in tar
        .entries()
        .map_err(|e| refused(format!("cannot read: {e}")))?
    {
        let entry = entry.map_err(|e| refused(format!("cannot read: {e}")))?;
        let name = entry_name(&entry);
        let Some(member) = name
            .strip_prefix(ARCHIVES)
            .and_then(|n| wanted.iter().find(|m| m.name == n))
        else {
            continue;
        };
        let mut staging = tempfile::Builder::new()
            .prefix(&format!(".{}.", member.name))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| Error::local(dir, format!("cannot create a temporary file: {e}")))?;
        let mut reader = Hashing::new(entry.take(member.size + 1));
        std::io::copy(&mut reader, staging.as_file_mut())
            .and_then(|_| staging.as_file().sync_all())
            .map_err(|e| Error::local(staging.path(), format!("cannot write: {e}")))?;
        check_member(member, &name, &reader.finish()).map_err(refused)?;
        staged.push((staging, dir.join(&member.name)));
    }
    if staged.len() != wanted.len() {
        return Err(refused(
            "tampered: an archive the manifest names is missing".to_string(),
        ));
    }
    let count = staged.len();
    for (staging, target) in staged {
        staging.persist_noclobber(&target).map_err(|e| {
            Error::local(
                &target,
                format!("cannot put the archive in place: {}", e.error),
            )
        })?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::local(dir, format!("cannot sync the directory: {e}")))?;
    Ok(count)
}

/// Checks that a config log entry is a revision signed with `key` whose manifest binds
/// its text and the archives `plan` found (by name and sha256). The error is the
/// reason, for the master's log, naming the revision.
pub(crate) fn check_signed_revision(
    key: &TrustedKey,
    entry: &LogEntry,
    plan: &Plan,
) -> std::result::Result<(), String> {
    let revision = plan.revision;
    let Some(signed) = &entry.signed else {
        return Err(format!(
            "revision {revision} is not signed, and this master accepts only revisions \
             signed by key {} (publish it from a bundle: erel bundle import)",
            key.id()
        ));
    };
    let digest = sha256_hex(signed.manifest.as_bytes());
    key.check(
        signed.manifest.as_bytes(),
        &digest,
        &signed.signature,
        "the manifest",
    )
    .map_err(|refusal| format!("revision {revision}: {refusal}"))?;
    let manifest = Manifest::parse(&signed.manifest).map_err(|e| {
        format!("revision {revision}: bad signature: the signed manifest cannot be used: {e}")
    })?;
    if manifest.revision != revision {
        return Err(format!(
            "revision {revision}: tampered: its signature is for revision {}",
            manifest.revision
        ));
    }
    if sha256_hex(&entry.body) != manifest.cluster.sha256 {
        return Err(format!(
            "revision {revision}: tampered: its text is not the one signed"
        ));
    }
    for archive in plan.groups.values().filter_map(|g| g.archive.as_ref()) {
        let found = archive.sha256.to_hex();
        match manifest.archive(&archive.file_name) {
            Some(member) if member.sha256 == found => {}
            Some(member) => {
                return Err(format!(
                    "revision {revision}: tampered: archive {} in the artifact directory \
                     has sha256 {found}, the signed one {}",
                    archive.file_name, member.sha256
                ))
            }
            None => {
                return Err(format!(
                    "revision {revision}: tampered: archive {} is not in the signed manifest",
                    archive.file_name
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
