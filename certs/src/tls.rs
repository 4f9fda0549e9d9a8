//! rustls configurations for both ends, built from files, with the ring provider
//! and TLS 1.3 only. Neither end resumes sessions: every connection is a full,
//! fully verified handshake against the current CA and CRL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ConfigBuilder, ConfigSide, RootCertStore, ServerConfig, WantsVerifier,
    WantsVersions,
};

use crate::error::{Error, Result};
use crate::layout::{CA_PEM, CRL_PEM, HOST_KEY, HOST_PEM, MASTER_KEY, MASTER_PEM};
use crate::revocation::{self, Crls};
use crate::verify::{AgentVerifier, MasterVerifier};
use crate::{chain, keys};

/// The ring crypto provider, passed explicitly so nothing depends on a
/// process-wide default. Public with the `testing` feature, for tests that build their
/// own rustls configurations.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The master's provider: [`provider`] with `TLS_AES_128_GCM_SHA256` first among its
/// cipher suites, the others after it in ring's order (`TLS_AES_256_GCM_SHA384`, then
/// `TLS_CHACHA20_POLY1305_SHA256`).
///
/// In TLS 1.3 the client lists the suites it offers in its order of preference and the
/// server picks one (RFC 8446, section 4.1.1); rustls's server takes the first of the
/// client's list that it supports (`ServerConfig::ignore_client_order` is false), so
/// this order is what every connection to an agent uses, agents already installed
/// included. AES-128-GCM is the suite every TLS 1.3 stack must implement (RFC 8446,
/// section 9.1), first in BoringSSL's and Go's order where the CPU has AES instructions,
/// and 10 rounds of AES per block instead of AES-256's 14: every byte a push sends is
/// encrypted by the master and decrypted by the agent, so this is their cheapest
/// strong cipher on the CPUs fleets run.
fn master_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The agent's server configuration from a host bundle directory (`ca.pem`,
/// `host.pem`, `host.key`, and `crl.pem` when present).
///
/// TLS 1.3 only. A client certificate is required, must chain to a CA of `ca.pem`
/// (through the intermediates the client sends), must carry the clientAuth
/// extended key usage, and is checked against `crl.pem` as `revocation` describes:
/// the client's own certificate against the CRL of the CA that issued it. No
/// session tickets and no session cache: nothing is resumed.
///
/// The bundle is validated as a whole before it is used: `host.pem` must start
/// with the host's certificate and chain to `ca.pem` (intermediates after it in
/// `host.pem`, or in `ca.pem`); `host.key` must be its key, in PKCS#8, PKCS#1 or
/// SEC1 PEM; every CRL must come from a CA of the bundle. Each refusal is an
/// [`Error::Parse`] naming the file and the certificate at fault.
pub fn server_config(bundle_dir: &Path) -> Result<Arc<ServerConfig>> {
    server_tls(bundle_dir).map(|tls| tls.config)
}

/// [`server_config`], with the verifier of masters it was built with, to judge a
/// session's master again later ([`ServerTls::verify_master`]).
pub fn server_tls(bundle_dir: &Path) -> Result<ServerTls> {
    let read = |name: &str| {
        let path = bundle_dir.join(name);
        crate::files::read(&path).map(|pem| (path, pem))
    };
    let crl_path = bundle_dir.join(CRL_PEM);
    let crl = if crl_path.exists() {
        Some(read(CRL_PEM)?)
    } else {
        None
    };
    let key_path = bundle_dir.join(HOST_KEY);
    keys::warn_if_exposed(&key_path);
    let parts = BundleParts {
        ca: read(CA_PEM)?,
        host: read(HOST_PEM)?,
        key: read(HOST_KEY)?,
        crl,
    };
    Ok(server_parts(&parts)?.tls())
}

/// The agent's server configuration and the verifier of masters inside it (rustls
/// does not hand a configuration's verifier back), so that a master authenticated
/// under one bundle can be judged again under a newer one by the same code.
#[derive(Clone)]
pub struct ServerTls {
    /// The configuration to accept connections with.
    pub config: Arc<ServerConfig>,
    verifier: Arc<MasterVerifier>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Judges a master's certificate `chain` (its own certificate first, then the
    /// intermediates it sent) as a handshake with [`Self::config`] would judge it now:
    /// chain to a CA of the bundle, clientAuth, dates, and the CRL of its issuer
    /// (`revocation`).
    ///
    /// Errors: a sentence naming why, such as "the master's certificate was revoked
    /// (serial 1a:2b)" or "the master's certificate is no longer accepted: the peer's
    /// certificate is not signed by the cluster CA (unknown CA)".
    pub fn verify_master(&self, chain: &[CertificateDer<'_>]) -> std::result::Result<(), String> {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return Err("the master presented no certificate".into());
        };
        let now = rustls::pki_types::UnixTime::now();
        match self
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                let serial = x509_parser::parse_x509_certificate(end_entity.as_ref())
                    .map_or_else(|_| "unreadable".into(), |(_, c)| c.raw_serial_as_string());
                Err(format!(
                    "the master's certificate was revoked (serial {serial})"
                ))
            }
            Err(e) => Err(format!(
                "the master's certificate is no longer accepted: {}",
                crate::explain::explain_rustls_error(&e).unwrap_or_else(|| e.to_string())
            )),
        }
    }
}

/// The four parts of a host bundle, each as its PEM text and the path (or label)
/// that names it in messages.
pub(crate) struct BundleParts {
    /// `ca.pem`: the CAs to trust.
    pub(crate) ca: (PathBuf, Vec<u8>),
    /// `host.pem`: the host's certificate, then its intermediates.
    pub(crate) host: (PathBuf, Vec<u8>),
    /// `host.key`: its private key.
    pub(crate) key: (PathBuf, Vec<u8>),
    /// `crl.pem`, when there is one.
    pub(crate) crl: Option<(PathBuf, Vec<u8>)>,
}

/// What [`server_parts`] builds: the configuration, and what it was checked with.
pub(crate) struct ServerParts {
    /// The agent's configuration.
    pub(crate) config: Arc<ServerConfig>,
    /// Its verifier of masters.
    pub(crate) verifier: Arc<MasterVerifier>,
    /// The chain the agent sends, its own certificate first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The CRLs of the bundle (DER), authenticated.
    pub(crate) crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
}

impl ServerParts {
    /// The configuration with its verifier.
    pub(crate) fn tls(self) -> ServerTls {
        ServerTls {
            config: self.config,
            verifier: self.verifier,
        }
    }
}

/// [`server_config`] from the parts of a bundle, validated as a whole.
pub(crate) fn server_parts(parts: &BundleParts) -> Result<ServerParts> {
    let provider = provider();
    let (ca, ca_pem) = &parts.ca;
    let anchors = parse_certs(ca, ca_pem)?;
    let roots = load_roots(ca, &anchors)?;
    let (cert_path, host_pem) = &parts.host;
    let (key_path, key_pem) = &parts.key;
    let chain = chain::own_chain(cert_path, &parse_certs(cert_path, host_pem)?, ca, &anchors)?;
    let key = keys::parse_key(key_path, key_pem)?;
    let crl_path = parts.crl.as_ref().map(|(path, _)| path.as_path());
    let crls = match &parts.crl {
        Some((path, pem)) => revocation::parse(path, pem, &known_cas(&anchors, &chain))?,
        None => Crls::default(),
    };
    let roots = Arc::new(roots);
    let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.ders.clone())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|source| verifier_error(ca, crl_path, &crls, &roots, source))?;
    let verifier = Arc::new(MasterVerifier {
        inner,
        crl_issuers: crls.issuers,
    });
    let what = config_what("server", cert_path, key_path);
    let mut config = tls13_only(ServerConfig::builder_with_provider(provider), &what)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key)
        .map_err(|source| key_error(cert_path, key_path, what, source))?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(ServerParts {
        config: Arc::new(config),
        verifier,
        chain,
        crls: crls.ders,
    })
}

/// A client configuration from explicit files: trust only the CAs of `ca_pem`,
/// present `cert_pem` with `key_pem`, and check the server's certificate against
/// `crl_pem` when given.
///
/// TLS 1.3 only; resumption disabled. The server's certificate must chain to a CA
/// of `ca_pem`, carry the serverAuth extended key usage, name the
/// [`crate::server_name`] the connection is made to, and pass the revocation
/// policy of `revocation` (its own certificate checked against its issuer's CRL).
///
/// `cert_pem` is sent as it is (the certificate, then any intermediates), without
/// checking that it chains to `ca_pem`: tests use this to present odd
/// certificates, so it exists only with the `testing` feature.
/// [`crate::MasterDir::client_config`] checks the master's chain.
/// The key may be PKCS#8, PKCS#1 or SEC1 PEM; CRLs must come from a CA of
/// `ca_pem` or of `cert_pem`.
#[cfg(feature = "testing")]
pub fn client_config_from(
    ca_pem: &Path,
    cert_pem: &Path,
    key_pem: &Path,
    crl_pem: Option<&Path>,
) -> Result<Arc<ClientConfig>> {
    client_config([ca_pem, cert_pem, key_pem], crl_pem, SentChain::AsItIs)
}

/// What a client configuration sends of `cert_pem`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SentChain {
    /// The file as it is, unchecked (for tests' odd certificates).
    #[cfg(feature = "testing")]
    AsItIs,
    /// The chain from its first certificate to a CA of `ca.pem`; refused when there
    /// is none (see `chain`).
    Checked,
}

/// A client configuration from `[ca_pem, cert_pem, key_pem]` and `crl_pem`, sending
/// `sent` of `cert_pem`.
pub(crate) fn client_config(
    [ca_pem, cert_pem, key_pem]: [&Path; 3],
    crl_pem: Option<&Path>,
    sent: SentChain,
) -> Result<Arc<ClientConfig>> {
    let anchors = load_certs(ca_pem)?;
    let mut chain = load_certs(cert_pem)?;
    if sent == SentChain::Checked {
        chain = chain::own_chain(cert_pem, &chain, ca_pem, &anchors)?;
    }
    let crls = load_crls(&anchors, &chain, crl_pem)?;
    let key = keys::load_key(key_pem)?;
    client_from_parts(
        ca_pem,
        &anchors,
        chain,
        key,
        (cert_pem, key_pem),
        crls,
        crl_pem,
    )
}

/// A client configuration presenting `cert_pem` / `key_pem` (its chain checked
/// against `ca_pem`) that trusts the CAs of every file of `trust` and checks the
/// CRLs of every file of `crls`: a master during a rotation, or proving a host against
/// the next CA alone.
pub(crate) fn client_config_trusting<const T: usize, const C: usize>(
    [ca_pem, cert_pem, key_pem]: [&Path; 3],
    trust: [&Path; T],
    crls: [&Path; C],
) -> Result<Arc<ClientConfig>> {
    let concat = |paths: &[&Path]| -> Result<Vec<u8>> {
        let mut all = Vec::new();
        for path in paths {
            all.extend(crate::files::read(path)?);
            all.push(b'\n');
        }
        Ok(all)
    };
    let anchors = parse_certs(trust[0], &concat(&trust)?)?;
    let own_anchors = load_certs(ca_pem)?;
    let chain = chain::own_chain(cert_pem, &load_certs(cert_pem)?, ca_pem, &own_anchors)?;
    let crl_label = crls[0].to_path_buf();
    let crls = revocation::parse(&crl_label, &concat(&crls)?, &known_cas(&anchors, &chain))?;
    let key = keys::load_key(key_pem)?;
    client_from_parts(
        trust[0],
        &anchors,
        chain,
        key,
        (cert_pem, key_pem),
        crls,
        Some(&crl_label),
    )
}

/// The client configuration from loaded parts.
fn client_from_parts(
    ca_pem: &Path,
    anchors: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    (cert_pem, key_pem): (&Path, &Path),
    crls: Crls,
    crl_pem: Option<&Path>,
) -> Result<Arc<ClientConfig>> {
    let provider = master_provider();
    let roots = Arc::new(load_roots(ca_pem, anchors)?);
    let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.ders.clone())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|source| verifier_error(ca_pem, crl_pem, &crls, &roots, source))?;
    let verifier = Arc::new(AgentVerifier {
        inner,
        crl_issuers: crls.issuers,
    });
    let what = config_what("client", cert_pem, key_pem);
    let mut config = tls13_only(ClientConfig::builder_with_provider(provider), &what)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|source| key_error(cert_pem, key_pem, what, source))?;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The CRLs of `crl_path` when there is one, each authenticated by a CA the
/// bundle knows.
fn load_crls(
    anchors: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    crl_path: Option<&Path>,
) -> Result<Crls> {
    match crl_path {
        Some(path) => revocation::load(path, &known_cas(anchors, chain)),
        None => Ok(Crls::default()),
    }
}

/// How a configuration is named in errors: which side, from which files.
fn config_what(side: &str, cert: &Path, key: &Path) -> String {
    format!(
        "{side} configuration from {} and {}",
        cert.display(),
        key.display()
    )
}

/// A configuration builder limited to TLS 1.3.
fn tls13_only<S: ConfigSide>(
    builder: ConfigBuilder<S, WantsVersions>,
    what: &str,
) -> Result<ConfigBuilder<S, WantsVerifier>> {
    builder
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| Error::Tls {
            what: what.to_string(),
            source,
        })
}

/// The CAs a bundle knows, to authenticate CRLs: the certificates of `ca.pem` and
/// the intermediates of its own chain.
fn known_cas(
    anchors: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    anchors
        .iter()
        .chain(chain.iter().skip(1))
        .cloned()
        .collect()
}

/// A verifier that could not be built. A CRL it cannot take (an indirect or delta
/// CRL, one limited to some reasons) is the CRL file's fault, not `ca.pem`'s: the
/// error names `crl.pem` and which of its CRLs.
fn verifier_error(
    ca: &Path,
    crl_path: Option<&Path>,
    crls: &Crls,
    roots: &Arc<RootCertStore>,
    source: rustls::server::VerifierBuilderError,
) -> Error {
    let (rustls::server::VerifierBuilderError::InvalidCrl(reason), Some(crl_path)) =
        (&source, crl_path)
    else {
        return Error::Verifier {
            ca: ca.to_path_buf(),
            source,
        };
    };
    let which = crls
        .ders
        .iter()
        .position(|der| {
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .with_crls([der.clone()])
                .build()
                .is_err()
        })
        .map_or_else(|| "a CRL".to_string(), |i| format!("CRL #{}", i + 1));
    Error::parse(
        crl_path,
        format!(
            "{which} is of a kind the TLS verifier does not take ({reason:?}); erel takes complete CRLs as `openssl ca -gencrl` makes them, not indirect or delta CRLs nor CRLs limited to some reasons"
        ),
    )
}

/// A refused certificate and key: a key that does not match gets its own message.
fn key_error(cert: &Path, key: &Path, what: String, source: rustls::Error) -> Error {
    match source {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            keys::mismatch(cert, key)
        }
        source => Error::Tls { what, source },
    }
}

/// The rustls [`ServerName`] to connect to host `host_id` under: the id as a DNS
/// name, which the host certificate carries as a subject alternative name.
pub fn server_name(host_id: &str) -> Result<ServerName<'static>> {
    crate::validate_host_id(host_id)?;
    ServerName::try_from(host_id.to_string()).map_err(|_| Error::InvalidName {
        name: host_id.to_string(),
        reason: "not usable as a TLS server name".into(),
    })
}

/// The name a verified peer certificate gives itself, for logs: its subject
/// common name, or else its first DNS subject alternative name. `None` if the
/// certificate cannot be parsed or names nothing.
pub fn peer_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}

/// A cheap, comparable snapshot of the certificate files in a bundle or master
/// directory: for each of `ca.pem`, `host.pem`, `host.key`, `master.pem`,
/// `master.key` and `crl.pem` that exists, its path, length, modification time,
/// change time (ctime), inode and device. A file replaced by rename has a new inode;
/// one rewritten in place (even with its length kept and its mtime set back, as
/// `cp -p` or `rsync --inplace -t` do) has a new ctime, which no user can set back.
///
/// Take the snapshot *before* reading the files, and compare two snapshots with `==`;
/// when they differ, build a new configuration ([`server_config`]) for the
/// connections that follow.
///
/// File systems keep timestamps at a coarse granularity, so a file written twice
/// within one tick may keep every stamp. A snapshot taken less than a few seconds
/// after a change is therefore marked unsettled, and differs from the settled
/// snapshot of the same files taken later: the files are read once more after they
/// have been quiet for a while (as git does for "racy" index entries,
/// `Documentation/technical/racy-git.txt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFingerprint {
    files: Vec<FileStamp>,
    settled: bool,
}

/// How long after a change a snapshot counts as unsettled.
const RACY_WINDOW: Duration = Duration::from_secs(3);

/// One file's identity in a [`BundleFingerprint`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    inode: u64,
    device: u64,
}

impl BundleFingerprint {
    /// The files that were present, with their lengths and modification times.
    pub fn files(&self) -> impl Iterator<Item = (&Path, u64, Option<SystemTime>)> {
        self.files
            .iter()
            .map(|f| (f.path.as_path(), f.len, f.modified))
    }

    /// False when a file had changed less than a few seconds before the snapshot was
    /// taken (see the type's documentation).
    pub fn is_settled(&self) -> bool {
        self.settled
    }
}

/// Takes a [`BundleFingerprint`] of `bundle_dir`. Missing or unreadable files
/// are simply absent from it (so a file appearing or disappearing is a change).
pub fn bundle_fingerprint(bundle_dir: &Path) -> BundleFingerprint {
    use std::os::unix::fs::MetadataExt;
    let files: Vec<FileStamp> = [CA_PEM, HOST_PEM, HOST_KEY, MASTER_PEM, MASTER_KEY, CRL_PEM]
        .iter()
        .filter_map(|name| {
            let path = bundle_dir.join(name);
            let meta = std::fs::metadata(&path).ok()?;
            Some(FileStamp {
                len: meta.len(),
                modified: meta.modified().ok(),
                changed: (meta.ctime(), meta.ctime_nsec()),
                inode: meta.ino(),
                device: meta.dev(),
                path,
            })
        })
        .collect();
    let now = SystemTime::now();
    let settled = files.iter().all(|file| {
        let changed = UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(file.changed.0).unwrap_or(0),
                u32::try_from(file.changed.1).unwrap_or(0),
            ))
            .unwrap_or(UNIX_EPOCH);
        now.duration_since(changed)
            .is_ok_and(|age| age > RACY_WINDOW)
    });
    BundleFingerprint { files, settled }
}

/// Every certificate in a PEM file; at least one.
pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    parse_certs(path, &crate::files::read(path)?)
}

/// As [`load_certs`], from PEM text already read; `path` names where it came from.
pub(crate) fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(Error::parse(path, "no certificate in this file"));
    }
    Ok(certs)
}

/// The trust anchors of `ca.pem`: every certificate in it (see `chain`).
fn load_roots(path: &Path, anchors: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in anchors {
        roots
            .add(cert.clone())
            .map_err(|e| Error::parse(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

pub(crate) fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    use rustls::pki_types::pem::Error as PemError;
    match e {
        PemError::Io(io) => crate::files::not_found_or_io(path, io),
        PemError::NoItemsFound => Error::parse(path, "no usable PEM section of the expected kind"),
        other => Error::parse(path, format!("malformed PEM: {other}")),
    }
}
