//! Making keys, certificates and CRLs (rcgen), and reading them back (x509-parser).
//!
//! Everything here works on PEM strings in memory; `store` decides where they live.
//!
//! * Keys: ECDSA P-256 (`PKCS_ECDSA_P256_SHA256`), PKCS#8 PEM.
//! * CA: [`CA_VALIDITY`], basic constraints CA (unconstrained), key usages
//!   keyCertSign, cRLSign and digitalSignature.
//! * Leaf certificates: [`LEAF_VALIDITY`], digitalSignature, one extended key usage
//!   (clientAuth for the master, serverAuth for hosts), a random 128-bit serial.
//! * CRL: signed by the CA, carrying every earlier entry forward, its number
//!   incremented on each change.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::pem::{PemObject, SectionKind};
use time::{Duration, OffsetDateTime};
use x509_parser::num_bigint::BigUint;

use crate::error::{Error, Result};
use crate::files;

/// How long the cluster CA is valid: 20 years.
pub(crate) const CA_VALIDITY: Duration = Duration::days(20 * 365 + 5);
/// How long master and host certificates are valid: 5 years.
pub(crate) const LEAF_VALIDITY: Duration = Duration::days(5 * 365 + 1);
/// How long a CRL claims to be current (its nextUpdate): as long as the CA.
///
/// The CRL is only re-signed when something is revoked, and rustls does not
/// enforce nextUpdate by default, so this mostly keeps `openssl verify -crl_check` happy.
pub(crate) const CRL_VALIDITY: Duration = CA_VALIDITY;
/// Certificates start to be valid this long before they are made, to tolerate clock skew.
pub(crate) const BACKDATE: Duration = Duration::hours(1);

/// A CA able to sign certificates and CRLs.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub(crate) cert_pem: String,
    /// The CA certificate, DER (to check CRL signatures).
    cert_der: Vec<u8>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_without_key(f, "Ca", ("issuer", &self.issuer), "key")
    }
}

impl Ca {
    /// A new self-signed CA named `common_name`.
    pub(crate) fn generate(common_name: &str) -> Result<Ca> {
        let what = "the cluster CA";
        let key = KeyPair::generate().map_err(|e| Error::rcgen(what, e))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| Error::rcgen(what, e))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key files.
    pub(crate) fn load(cert_path: &Path, key_path: &Path) -> Result<Ca> {
        let cert_pem = files::read_to_string(cert_path).map_err(|e| match e {
            Error::Missing { path } => Error::MissingCa { path },
            e => e,
        })?;
        let cert_der = first_pem_der(cert_path, &cert_pem, SectionKind::Certificate)?;
        let key_pem = files::read_to_string(key_path)?;
        let key = ca_key(key_path, &key_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
            .map_err(|e| Error::parse(cert_path, format!("not a usable CA certificate: {e}")))?;
        if issuer.key().subject_public_key_info() != spki_of(cert_path, &cert_der)? {
            return Err(Error::parse(
                key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        Ok(Ca {
            issuer,
            cert_pem,
            cert_der,
        })
    }

    /// The CA's private key, PKCS#8 PEM. Only for writing it to its 0600 file.
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs a leaf certificate described by `spec`.
    pub(crate) fn issue(&self, spec: &LeafSpec<'_>) -> Result<Issued> {
        let what = format!("certificate for {}", spec.common_name);
        let key = KeyPair::generate().map_err(|e| Error::rcgen(&what, e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(spec.common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = spec.extended_key_usages.clone();
        params.subject_alt_names = sans(spec)?;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| Error::rcgen(&what, e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a CRL numbered `number` listing `revoked`.
    pub(crate) fn sign_crl(
        &self,
        number: &BigUint,
        revoked: Vec<RevokedCertParams>,
    ) -> Result<String> {
        let what = "the certificate revocation list";
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_VALIDITY,
            crl_number: SerialNumber::from_slice(&number.to_bytes_be()),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| Error::rcgen(what, e))?;
        crl.pem().map_err(|e| Error::rcgen(what, e))
    }

    /// Reads the CRL at `path`, checking it was signed by this CA.
    pub(crate) fn read_crl(&self, path: &Path) -> Result<CrlState> {
        let pem = files::read_to_string(path)?;
        let der = first_pem_der(path, &pem, SectionKind::Crl)?;
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| Error::parse(path, format!("not a valid CRL: {e}")))?;
        let (_, ca) = x509_parser::parse_x509_certificate(&self.cert_der)
            .map_err(|e| Error::parse(path, format!("CA certificate unreadable: {e}")))?;
        crl.verify_signature(ca.public_key())
            .map_err(|_| Error::parse(path, "this CRL is not signed by the cluster CA (ca.pem)"))?;
        let number = crl.crl_number().cloned().unwrap_or_default();
        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&r.serial().to_bytes_be()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        Ok(CrlState { number, revoked })
    }
}

/// The CA's signing key from `ca.key`: rcgen signs with a PKCS#8 key only, so a
/// key in PKCS#1 or SEC1 (as an operator's own CA may keep it) is refused with the
/// command that converts it.
fn ca_key(key_path: &Path, key_pem: &str) -> Result<KeyPair> {
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(key_pem.as_bytes()) {
        let (kind, der) =
            section.map_err(|e| Error::parse(key_path, format!("malformed PEM: {e}")))?;
        match kind {
            SectionKind::PrivateKey => {
                let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
                return KeyPair::try_from(&rustls::pki_types::PrivateKeyDer::Pkcs8(der))
                    .map_err(|e| {
                        Error::parse(
                            key_path,
                            format!("not a usable CA key ({e}): erel signs with RSA, ECDSA P-256/P-384 or Ed25519"),
                        )
                    });
            }
            SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                return Err(Error::parse(
                    key_path,
                    "the CA key is in PKCS#1 or SEC1 form; `erel certs` signs with a PKCS#8 key: convert it with `openssl pkcs8 -topk8 -nocrypt -in ca.key -out ca.key.new` and move ca.key.new to ca.key (mode 0600)",
                ))
            }
            _ => {}
        }
    }
    Err(Error::parse(
        key_path,
        "no unencrypted PKCS#8 private key (\"BEGIN PRIVATE KEY\") in this file",
    ))
}

/// What a CRL says: its number and the certificates it lists.
#[derive(Debug, Clone)]
pub(crate) struct CrlState {
    /// The CRL number (0 when absent).
    pub(crate) number: BigUint,
    /// Every revoked certificate, in order.
    pub(crate) revoked: Vec<RevokedCertParams>,
}

impl CrlState {
    /// Whether `serial` is listed.
    pub(crate) fn contains(&self, serial: &BigUint) -> bool {
        self.revoked
            .iter()
            .any(|r| BigUint::from_bytes_be(r.serial_number.as_ref()) == *serial)
    }
}

/// What a leaf certificate should say.
#[derive(Debug, Clone)]
pub(crate) struct LeafSpec<'a> {
    /// Subject common name.
    pub(crate) common_name: &'a str,
    /// DNS subject alternative names.
    pub(crate) dns: Vec<String>,
    /// IP subject alternative names.
    pub(crate) ips: Vec<IpAddr>,
    /// Extended key usages.
    pub(crate) extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    /// Start of validity.
    pub(crate) not_before: OffsetDateTime,
    /// End of validity.
    pub(crate) not_after: OffsetDateTime,
}

impl<'a> LeafSpec<'a> {
    /// A certificate valid from now (less [`BACKDATE`]) for [`LEAF_VALIDITY`].
    pub(crate) fn new(common_name: &'a str, eku: ExtendedKeyUsagePurpose) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name,
            dns: Vec::new(),
            ips: Vec::new(),
            extended_key_usages: vec![eku],
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
        }
    }
}

/// A freshly issued certificate and its key.
pub(crate) struct Issued {
    /// The certificate, PEM.
    pub(crate) cert_pem: String,
    /// The private key, PKCS#8 PEM. Never logged.
    pub(crate) key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_without_key(f, "Issued", ("cert_pem", &self.cert_pem), "key_pem")
    }
}

/// `Debug` for a holder of a private key: its public part shown, the key elided.
fn debug_without_key(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    (field, value): (&str, &dyn fmt::Debug),
    key_field: &str,
) -> fmt::Result {
    f.debug_struct(name)
        .field(field, value)
        .field(key_field, &"[secret key elided]")
        .finish()
}

/// The serial number of the certificate in the PEM file at `path`.
pub(crate) fn cert_serial(path: &Path) -> Result<BigUint> {
    let pem = files::read_to_string(path)?;
    let der = first_pem_der(path, &pem, SectionKind::Certificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::parse(path, format!("not a valid certificate: {e}")))?;
    Ok(cert.tbs_certificate.serial.clone())
}

/// The DER contents of the first PEM section of `kind` in `pem`.
fn first_pem_der(path: &Path, pem: &str, kind: SectionKind) -> Result<Vec<u8>> {
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        let (found, der) =
            section.map_err(|e| Error::parse(path, format!("malformed PEM: {e}")))?;
        if found == kind {
            return Ok(der);
        }
    }
    let label = match kind {
        SectionKind::Crl => "X509 CRL",
        _ => "CERTIFICATE",
    };
    Err(Error::parse(path, format!("no \"{label}\" PEM section")))
}

/// The DER SubjectPublicKeyInfo of a certificate.
fn spki_of(path: &Path, cert_der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| Error::parse(path, format!("not a valid certificate: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn sans(spec: &LeafSpec<'_>) -> Result<Vec<SanType>> {
    let mut out = Vec::new();
    for name in &spec.dns {
        let ia5 = name.clone().try_into().map_err(|_| Error::InvalidName {
            name: name.clone(),
            reason: "not an ASCII DNS name".into(),
        })?;
        let san = SanType::DnsName(ia5);
        if !out.contains(&san) {
            out.push(san);
        }
    }
    for ip in &spec.ips {
        let san = SanType::IpAddress(*ip);
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Error::Random {
            what: "a certificate serial number",
        })?;
    // Positive and exactly 16 bytes long: no sign bit, no leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
