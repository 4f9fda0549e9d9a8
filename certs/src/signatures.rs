//! Signature algorithms: which ones a handshake can verify.
//!
//! The peer verifiers check certificate and CRL signatures with the ring
//! provider's algorithms (rustls-webpki): RSA PKCS#1 v1.5 or PSS with SHA-256,
//! SHA-384 or SHA-512, ECDSA P-256 or P-384 with SHA-256 or SHA-384, and Ed25519.
//! An operator's CA may sign with others (SHA-1, ECDSA with SHA-512, PSS with
//! unusual parameters). Such a signature would refuse every handshake that needs
//! it, with an error that names neither the file nor the certificate; checking
//! the same list when the files are loaded names both.

use x509_parser::x509::AlgorithmIdentifier;

/// What the TLS verifier accepts, for error messages.
pub(crate) const ACCEPTED: &str = "erel verifies RSA PKCS#1 v1.5 or PSS with SHA-256, SHA-384 or SHA-512, ECDSA P-256 or P-384 with SHA-256 or SHA-384, and Ed25519";

/// Whether the signature of `der`, a certificate or a CRL (both a SEQUENCE of the
/// signed data, the signature algorithm and the signature), uses an algorithm the
/// peer verifiers accept. Unparsable DER counts as not verifiable.
pub(crate) fn verifiable(der: &[u8]) -> bool {
    let Some(algorithm) = signature_algorithm(der) else {
        return false;
    };
    crate::tls::provider()
        .signature_verification_algorithms
        .all
        .iter()
        .any(|alg| alg.signature_alg_id().as_ref() == algorithm)
}

/// The algorithm's name as openssl shows it (`ecdsa-with-SHA512`,
/// `sha1WithRSAEncryption`), or its dotted OID; PSS is marked as such since its
/// parameters decide.
pub(crate) fn describe(algorithm: &AlgorithmIdentifier<'_>) -> String {
    let oid = &algorithm.algorithm;
    let name = x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map(str::to_string)
        .unwrap_or_else(|_| oid.to_id_string());
    if *oid == x509_parser::oid_registry::OID_PKCS1_RSASSAPSS {
        format!("{name} (RSA-PSS) with parameters the TLS verifier does not accept (salt length equal to the hash length and MGF1 with the same hash)")
    } else {
        name
    }
}

/// The contents of the signatureAlgorithm AlgorithmIdentifier of a signed
/// structure, as rustls-webpki compares them.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (outer, _) = tlv(der, 0x30)?;
    let (_, rest) = tlv(outer, 0x30)?; // the signed data
    let (algorithm, _) = tlv(rest, 0x30)?;
    Some(algorithm)
}

/// One DER TLV of tag `tag` at the start of `input`: its contents and what follows.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let count = usize::from(len & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_reads_short_and_long_lengths_and_refuses_truncation() {
        assert_eq!(
            tlv(&[0x30, 2, 1, 2, 9], 0x30),
            Some((&[1u8, 2][..], &[9u8][..]))
        );
        let mut long = vec![0x30, 0x81, 200];
        long.extend(std::iter::repeat_n(7u8, 200));
        assert_eq!(
            tlv(&long, 0x30).map(|(c, r)| (c.len(), r.len())),
            Some((200, 0))
        );
        assert_eq!(tlv(&[0x30, 5, 1], 0x30), None);
        assert_eq!(tlv(&[0x31, 0], 0x30), None);
    }
}
