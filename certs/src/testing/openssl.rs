//! An operator's own PKI, made with the `openssl` command line as a site would
//! make it: a root CA, an intermediate CA under it, leaf certificates issued by the
//! intermediate with keys in the encoding the test asks for, and CRLs made and
//! updated with `openssl ca`.
//!
//! Every file lives under the directory the caller gives. `openssl` must be on
//! `PATH`; when it is not, [`Pki::new`] fails saying so.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// The key a certificate gets, and how its file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048, PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`, `openssl genrsa -traditional`).
    RsaPkcs1,
    /// RSA 2048, PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    RsaPkcs8,
    /// ECDSA P-256, SEC1 PEM (`BEGIN EC PRIVATE KEY`, after `BEGIN EC PARAMETERS`).
    EcP256Sec1,
    /// ECDSA P-256, PKCS#8 PEM.
    EcP256Pkcs8,
    /// ECDSA P-384, SEC1 PEM.
    EcP384Sec1,
    /// Ed25519, PKCS#8 PEM (RFC 8410).
    Ed25519,
    /// ECDSA P-521, PKCS#8 PEM: valid, but not a curve erel can sign with.
    EcP521Pkcs8,
}

impl KeyKind {
    fn openssl_args(self) -> Vec<&'static str> {
        let genpkey = |algorithm, options: &[&'static str]| {
            let mut args = vec!["genpkey", "-algorithm", algorithm];
            for option in options {
                args.extend(["-pkeyopt", option]);
            }
            args
        };
        match self {
            KeyKind::RsaPkcs1 => vec!["genrsa", "-traditional", "2048"],
            KeyKind::RsaPkcs8 => genpkey("RSA", &["rsa_keygen_bits:2048"]),
            KeyKind::EcP256Sec1 => vec!["ecparam", "-name", "prime256v1", "-genkey"],
            KeyKind::EcP256Pkcs8 => genpkey("EC", &["ec_paramgen_curve:P-256"]),
            KeyKind::EcP384Sec1 => vec!["ecparam", "-name", "secp384r1", "-genkey"],
            KeyKind::Ed25519 => genpkey("ed25519", &[]),
            KeyKind::EcP521Pkcs8 => genpkey("EC", &["ec_paramgen_curve:P-521"]),
        }
    }

    /// The digest to sign with when this is an issuer's key (none for Ed25519).
    fn digest(self) -> Option<&'static str> {
        match self {
            KeyKind::Ed25519 => None,
            KeyKind::EcP384Sec1 => Some("-sha384"),
            _ => Some("-sha256"),
        }
    }
}

/// A CA of the PKI: its certificate, key, and the `openssl ca` database that its
/// CRL is made from.
#[derive(Debug, Clone)]
pub struct Authority {
    /// Its certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// Its subject, as given to openssl (`/O=…/CN=…`).
    pub subject: String,
    /// The `openssl ca` configuration (database, CRL number) of this CA.
    config: PathBuf,
    /// The digest it signs with.
    digest: Option<&'static str>,
}

/// A leaf certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate alone, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM, in the encoding asked for.
    pub key: PathBuf,
}

/// A root CA (ECDSA P-384) and an intermediate CA under it (RSA 2048), both named
/// after the prefix given to [`Pki::new`].
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    /// The self-signed root.
    pub root: Authority,
    /// The intermediate, issued by the root; it issues the leaves.
    pub intermediate: Authority,
}

impl Pki {
    /// Makes the root and the intermediate under `dir` (created if needed), named
    /// "`<prefix>` Root CA" and "`<prefix>` Intermediate CA", organisation `<prefix>`.
    pub fn new(dir: &Path, prefix: &str) -> Result<Pki> {
        crate::files::create_dir_private(dir)?;
        write(&dir.join("openssl.cnf"), OPENSSL_CNF)?;
        let root = self_signed_root(dir, prefix)?;
        let intermediate = issue_ca(
            dir,
            &root,
            "intermediate",
            &format!("/O={prefix}/CN={prefix} Intermediate CA"),
            KeyKind::RsaPkcs8,
        )?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            root,
            intermediate,
        })
    }

    /// Issues a host certificate for `id` (CN and DNS name `id`, IP 127.0.0.1,
    /// serverAuth) by `issuer`, with a new key of `kind`. Files `<id>.pem`, `<id>.key`.
    pub fn issue_host(&self, issuer: &Authority, id: &str, kind: KeyKind) -> Result<Leaf> {
        let ext = format!(
            "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature{}\nextendedKeyUsage = serverAuth\nsubjectAltName = DNS:{id}, IP:127.0.0.1\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
            rsa_extra(kind)
        );
        self.issue_leaf(issuer, id, &format!("/O=Example/CN={id}"), &ext, kind)
    }

    /// Issues a master certificate (CN `erel-master`, clientAuth) by `issuer`, with
    /// a new key of `kind`. Files `<stem>.pem`, `<stem>.key`.
    pub fn issue_master(&self, issuer: &Authority, stem: &str, kind: KeyKind) -> Result<Leaf> {
        let ext = format!(
            "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature{}\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
            rsa_extra(kind)
        );
        self.issue_leaf(issuer, stem, "/O=Example/CN=erel-master", &ext, kind)
    }

    /// Issues a host certificate as [`Pki::issue_host`] does, but signed with the
    /// openssl digest `digest` (`-sha1`, `-sha512`) rather than the issuer's usual one.
    pub fn issue_host_signed_with(
        &self,
        issuer: &Authority,
        id: &str,
        kind: KeyKind,
        digest: &'static str,
    ) -> Result<Leaf> {
        let issuer = Authority {
            digest: Some(digest),
            ..issuer.clone()
        };
        self.issue_host(&issuer, id, kind)
    }

    /// Another intermediate CA under the root, with subject `subject` (`/O=…/CN=…`)
    /// and a P-256 key (for sites where hosts and masters come from different ones).
    pub fn issue_intermediate(&self, stem: &str, subject: &str) -> Result<Authority> {
        issue_ca(&self.dir, &self.root, stem, subject, KeyKind::EcP256Pkcs8)
    }

    /// Adds `leaf` to the revocations of `ca` (`openssl ca -revoke`); the next
    /// [`Pki::crl`] of `ca` lists it.
    pub fn revoke(&self, ca: &Authority, leaf: &Leaf) -> Result<()> {
        openssl(&[
            "ca",
            "-config",
            path(&ca.config)?,
            "-revoke",
            path(&leaf.cert)?,
        ])
        .map(drop)
    }

    /// A fresh CRL of `ca` (`openssl ca -gencrl`), PEM, valid 30 days.
    pub fn crl(&self, ca: &Authority) -> Result<String> {
        self.gencrl(ca, &ca.config, "", &["-crldays", "30"])
    }

    /// A fresh CRL of `ca` as [`Pki::crl`] makes it, but signed with the openssl
    /// digest `md` (`sha1`, `sha512`).
    pub fn crl_signed_with(&self, ca: &Authority, md: &str) -> Result<String> {
        self.gencrl(
            ca,
            &ca.config,
            &format!("-{md}"),
            &["-crldays", "30", "-md", md],
        )
    }

    /// A CRL of `ca` as [`Pki::crl`] makes it, but issued on 1 January 2020 with a
    /// nextUpdate a month later: long past.
    pub fn expired_crl(&self, ca: &Authority) -> Result<String> {
        let dates = [
            "-crl_lastupdate",
            "20200101000000Z",
            "-crl_nextupdate",
            "20200201000000Z",
        ];
        self.gencrl(ca, &ca.config, "-expired", &dates)
    }

    /// A CRL of `ca` that says it is indirect (an issuingDistributionPoint with
    /// indirectCRL): valid, but not a kind the TLS verifier takes.
    pub fn indirect_crl(&self, ca: &Authority) -> Result<String> {
        let config = self.dir.join(format!("{}-indirect.cnf", stem_of(&ca.cert)));
        let mut text = crate::files::read_to_string(&ca.config)?;
        // The CRL extensions' section is the last one of the file.
        text.push_str("issuingDistributionPoint = critical, @idp\n[ idp ]\nindirectCRL = TRUE\n");
        write(&config, &text)?;
        self.gencrl(ca, &config, "-indirect", &[])
    }

    /// `openssl ca -gencrl` for `ca` with its configuration `config` and the
    /// options `extra`, into `<ca's stem><suffix>.crl.pem`; returns the PEM.
    fn gencrl(
        &self,
        ca: &Authority,
        config: &Path,
        suffix: &str,
        extra: &[&str],
    ) -> Result<String> {
        let out = self
            .dir
            .join(format!("{}{suffix}.crl.pem", stem_of(&ca.cert)));
        let mut args = vec!["ca", "-config", path(config)?, "-gencrl"];
        args.extend_from_slice(extra);
        args.extend(["-out", path(&out)?]);
        openssl(&args)?;
        crate::files::read_to_string(&out)
    }

    fn issue_leaf(
        &self,
        issuer: &Authority,
        stem: &str,
        subject: &str,
        ext: &str,
        kind: KeyKind,
    ) -> Result<Leaf> {
        let key = self.dir.join(format!("{stem}.key"));
        let cert = self.dir.join(format!("{stem}.pem"));
        let ext_file = self.dir.join(format!("{stem}.ext"));
        write(&ext_file, ext)?;
        generate_key(&key, kind)?;
        sign(&self.dir, issuer, &key, subject, &ext_file, &cert)?;
        Ok(Leaf { cert, key })
    }
}

/// The bytes of `files` one after the other, for a bundle file that holds several
/// PEM sections (a certificate and its intermediates, several CAs, several CRLs).
pub fn concat(files: &[&Path]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for file in files {
        let bytes = crate::files::read(file)?;
        out.extend_from_slice(&bytes);
        if !bytes.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    Ok(out)
}

const OPENSSL_CNF: &str = "[ req ]
distinguished_name = dn
prompt = no
[ dn ]
CN = unused
[ v3_root ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
";

fn rsa_extra(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::RsaPkcs1 | KeyKind::RsaPkcs8 => ", keyEncipherment",
        _ => "",
    }
}

fn self_signed_root(dir: &Path, prefix: &str) -> Result<Authority> {
    let kind = KeyKind::EcP384Sec1;
    let key = dir.join("root.key");
    let cert = dir.join("root.pem");
    let subject = format!("/O={prefix}/CN={prefix} Root CA");
    generate_key(&key, kind)?;
    let cnf = dir.join("openssl.cnf");
    let mut args = vec![
        "req",
        "-x509",
        "-new",
        "-config",
        path(&cnf)?,
        "-extensions",
        "v3_root",
        "-key",
        path(&key)?,
        "-subj",
        &subject,
        "-days",
        "3650",
        "-out",
        path(&cert)?,
    ];
    args.extend(kind.digest());
    openssl(&args)?;
    authority(dir, "root", cert, key, subject, kind)
}

fn issue_ca(
    dir: &Path,
    issuer: &Authority,
    stem: &str,
    subject: &str,
    kind: KeyKind,
) -> Result<Authority> {
    let key = dir.join(format!("{stem}.key"));
    let cert = dir.join(format!("{stem}.pem"));
    let ext_file = dir.join(format!("{stem}.ext"));
    write(
        &ext_file,
        "basicConstraints = critical, CA:TRUE, pathlen:0\nkeyUsage = critical, keyCertSign, cRLSign, digitalSignature\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n",
    )?;
    generate_key(&key, kind)?;
    sign(dir, issuer, &key, subject, &ext_file, &cert)?;
    authority(dir, stem, cert, key, subject.to_string(), kind)
}

/// Sets up the `openssl ca` database of a CA, for revocations and CRLs.
fn authority(
    dir: &Path,
    stem: &str,
    cert: PathBuf,
    key: PathBuf,
    subject: String,
    kind: KeyKind,
) -> Result<Authority> {
    let db = dir.join(format!("{stem}-db"));
    crate::files::create_dir_private(&db)?;
    write(&db.join("index.txt"), "")?;
    write(&db.join("crlnumber"), "1000\n")?;
    let mut config = String::new();
    let _ = write!(
        config,
        "[ ca ]\ndefault_ca = this\n[ this ]\ndatabase = {db}/index.txt\ncrlnumber = {db}/crlnumber\ncertificate = {cert}\nprivate_key = {key}\ndefault_md = {md}\ndefault_crl_days = 30\ncrl_extensions = crl_ext\n[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n",
        db = db.display(),
        cert = cert.display(),
        key = key.display(),
        md = kind.digest().map(|d| &d[1..]).unwrap_or("default"),
    );
    let config_path = db.join("ca.cnf");
    write(&config_path, &config)?;
    Ok(Authority {
        cert,
        key,
        subject,
        config: config_path,
        digest: kind.digest(),
    })
}

/// A certificate request for `key` and `subject`, signed by `issuer` with the
/// extensions in `ext_file`.
fn sign(
    dir: &Path,
    issuer: &Authority,
    key: &Path,
    subject: &str,
    ext_file: &Path,
    out: &Path,
) -> Result<()> {
    let csr = out.with_extension("csr");
    let cnf = dir.join("openssl.cnf");
    openssl(&[
        "req",
        "-new",
        "-config",
        path(&cnf)?,
        "-key",
        path(key)?,
        "-subj",
        subject,
        "-out",
        path(&csr)?,
    ])?;
    let serial = issuer.cert.with_extension("srl");
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        path(&csr)?,
        "-CA",
        path(&issuer.cert)?,
        "-CAkey",
        path(&issuer.key)?,
        "-CAserial",
        path(&serial)?,
        "-CAcreateserial",
        "-extfile",
        path(ext_file)?,
        "-days",
        "365",
        "-out",
        path(out)?,
    ];
    args.extend(issuer.digest);
    openssl(&args).map(drop)
}

fn generate_key(out: &Path, kind: KeyKind) -> Result<()> {
    let mut args = kind.openssl_args();
    if kind == KeyKind::RsaPkcs1 {
        // genrsa takes the size last.
        let bits = args.pop().unwrap_or("2048");
        args.extend(["-out", path(out)?, bits]);
    } else {
        args.extend(["-out", path(out)?]);
    }
    openssl(&args)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(out, fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(out, e))
}

/// Runs `openssl` with `args`; its output when it succeeds, else an error with
/// what it printed.
fn openssl(args: &[&str]) -> Result<Vec<u8>> {
    let output = Command::new("openssl").args(args).output().map_err(|e| {
        Error::io(
            "openssl",
            std::io::Error::new(
                e.kind(),
                format!("cannot run the openssl command ({e}); install openssl"),
            ),
        )
    })?;
    if !output.status.success() {
        return Err(Error::io(
            "openssl",
            std::io::Error::other(format!(
                "openssl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )),
        ));
    }
    Ok(output.stdout)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn path(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::parse(path, "not a UTF-8 path"))
}

fn stem_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
