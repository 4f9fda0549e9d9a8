//! Bundle keys and signatures, in minisign's format (ed25519): a key pair made by
//! `erel bundle keygen` or by the `minisign` tool (`minisign -G`) works either way, and
//! a bundle's manifest can be checked with `minisign -V` too.
//!
//! `keygen` writes a secret key without a password: it is meant to live on the signing
//! machine only, in a file of mode 0600. A password-protected key made by `minisign -G`
//! is read too: its password comes from `EREL_SECRET_KEY_PASSWORD`, else it is asked for
//! on the terminal.

use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

use crate::error::{Error, Result};

/// The environment variable holding the password of a password-protected secret key.
pub const PASSWORD_VAR: &str = "EREL_SECRET_KEY_PASSWORD";

/// Why a signature is refused. Each text begins with the words an operator (and a test)
/// looks for: `signed by another key`, `bad signature`, `tampered`, `not signed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureRefusal {
    /// The signature names another key than the trusted one.
    OtherKey {
        /// The key that signed, as minisign prints key ids.
        signed_by: String,
        /// The trusted key.
        trusted: String,
    },
    /// The signed bytes were changed after signing: the digest the signature's trusted
    /// comment announces is not theirs.
    Tampered {
        /// What was signed (`the manifest`).
        what: String,
    },
    /// The signature does not verify with the trusted key (or cannot be read).
    Bad {
        /// What the verifier said.
        reason: String,
    },
}

impl std::fmt::Display for SignatureRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignatureRefusal::OtherKey { signed_by, trusted } => write!(
                f,
                "signed by another key: key id {signed_by}, the trusted key is {trusted}"
            ),
            SignatureRefusal::Tampered { what } => write!(
                f,
                "tampered: {what} was changed after it was signed (its sha256 is not the \
                 one the signature names)"
            ),
            SignatureRefusal::Bad { reason } => write!(f, "bad signature: {reason}"),
        }
    }
}

/// A minisign key id, as the `minisign` tool prints it (16 upper-case hex digits).
fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    let n = keynum.len().min(8);
    bytes[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(bytes))
}

/// Makes a new key pair without a password: the secret key is written to `secret` with
/// mode 0600, the public key to `public` (minisign's text format). Existing files are
/// replaced only with `force`. Returns the key id.
///
/// # Errors
/// [`Error::Local`] naming the file that exists (without `force`) or cannot be written.
pub fn keygen(secret: &Path, public: &Path, force: bool) -> Result<String> {
    if !force {
        for path in [secret, public] {
            if path.exists() {
                return Err(Error::local(
                    path,
                    "exists; give --force to replace it (a bundle signed with the old \
                     key no longer verifies with the new one)",
                ));
            }
        }
    }
    let pair = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| Error::local(secret, format!("cannot make a key pair: {e}")))?;
    let id = key_id(pair.pk.keynum());
    let secret_box = pair
        .sk
        .to_box(Some(&format!("erel bundle secret key {id}")))
        .map_err(|e| Error::local(secret, format!("cannot encode the secret key: {e}")))?;
    let public_box = pair
        .pk
        .to_box()
        .map_err(|e| Error::local(public, format!("cannot encode the public key: {e}")))?;
    write_key(secret, secret_box.to_string().as_bytes(), 0o600)?;
    write_key(public, public_box.to_string().as_bytes(), 0o644)?;
    Ok(id)
}

/// Writes a key file with `mode` from its creation (never readable by others first).
fn write_key(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::local(path, format!("cannot create: {e}")))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::local(path, format!("cannot write: {e}")))
}

fn read_key(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::local(path, format!("cannot read: {e}")))
}

/// A secret key that signs bundles. Its `Debug` shows the key id only.
pub struct SigningKey {
    secret: SecretKey,
    public: PublicKey,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish()
    }
}

impl SigningKey {
    /// Reads a minisign secret key file; a password-protected one is opened with
    /// [`PASSWORD_VAR`], else with a password asked for on the terminal.
    ///
    /// # Errors
    /// [`Error::Local`] naming `path`: unreadable, not a minisign secret key, or a wrong
    /// password.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = read_key(path)?;
        let not_a_key = |e: minisign::PError| {
            Error::local(path, format!("not a usable minisign secret key: {e}"))
        };
        let boxed = || SecretKeyBox::from_string(&text).map_err(not_a_key);
        let secret = match SecretKey::from_unencrypted_box(boxed()?) {
            Ok(secret) => secret,
            Err(e) if e.to_string().contains("encrypted") => {
                let password = std::env::var(PASSWORD_VAR).ok();
                SecretKey::from_box(boxed()?, password).map_err(not_a_key)?
            }
            Err(e) => return Err(not_a_key(e)),
        };
        let public = PublicKey::from_secret_key(&secret).map_err(not_a_key)?;
        let id = key_id(secret.keynum());
        Ok(SigningKey { secret, public, id })
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Signs `bytes`; `trusted_comment` (one line) is signed with them. Returns the
    /// signature in minisign's text format (a `.minisig` file's contents).
    pub(crate) fn sign(&self, bytes: &[u8], trusted_comment: &str) -> Result<String> {
        let signature = minisign::sign(
            Some(&self.public),
            &self.secret,
            Cursor::new(bytes),
            Some(trusted_comment),
            Some(&format!("signature from erel bundle key {}", self.id)),
        )
        .map_err(|e| Error::Usage(format!("cannot sign with key {}: {e}", self.id)))?;
        Ok(signature.into_string())
    }
}

/// A public key trusted to sign bundles and revisions.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    public: PublicKey,
    id: String,
}

impl TrustedKey {
    /// Reads a minisign public key file (`minisign.pub`'s format).
    ///
    /// # Errors
    /// [`Error::Local`] naming `path`: unreadable, or not a minisign public key.
    pub fn load(path: &Path) -> Result<TrustedKey> {
        let text = read_key(path)?;
        let public = PublicKeyBox::from_string(&text)
            .and_then(PublicKey::from_box)
            .map_err(|e| Error::local(path, format!("not a minisign public key: {e}")))?;
        let id = key_id(public.keynum());
        Ok(TrustedKey { public, id })
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Checks that `signature` (minisign's text format) is this key's over `bytes`.
    /// `digest` is the sha256 (hex) of `bytes`: a signature whose trusted comment names
    /// another digest is reported as [`SignatureRefusal::Tampered`] (`what` was
    /// changed), rather than as a plain bad signature.
    pub(crate) fn check(
        &self,
        bytes: &[u8],
        digest: &str,
        signature: &str,
        what: &str,
    ) -> std::result::Result<(), SignatureRefusal> {
        let signature =
            SignatureBox::from_string(signature).map_err(|e| SignatureRefusal::Bad {
                reason: format!("the signature cannot be read: {e}"),
            })?;
        let signed_by = key_id(signature.keynum());
        if signed_by != self.id {
            return Err(SignatureRefusal::OtherKey {
                signed_by,
                trusted: self.id.clone(),
            });
        }
        match minisign::verify(
            &self.public,
            &signature,
            Cursor::new(bytes),
            true,
            false,
            false,
        ) {
            Ok(()) => Ok(()),
            Err(e) => {
                let comment = signature.trusted_comment().unwrap_or_default();
                if comment_digest(&comment).is_some_and(|signed| signed != digest) {
                    Err(SignatureRefusal::Tampered {
                        what: what.to_string(),
                    })
                } else {
                    Err(SignatureRefusal::Bad {
                        reason: format!("{e} (key id {})", self.id),
                    })
                }
            }
        }
    }
}

/// The `sha256 HEX` word pair of a trusted comment, if any.
pub(crate) fn comment_digest(comment: &str) -> Option<&str> {
    let mut words = comment.split_whitespace();
    while let Some(word) = words.next() {
        if word == "sha256" {
            return words.next();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (SigningKey, TrustedKey) {
        let (secret, public) = (
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.pub")),
        );
        keygen(&secret, &public, false).expect("keygen");
        (
            SigningKey::load(&secret).expect("secret key"),
            TrustedKey::load(&public).expect("public key"),
        )
    }

    #[test]
    fn keygen_writes_a_private_secret_key_and_never_overwrites_it_without_force() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (secret, public) = (dir.path().join("k.key"), dir.path().join("k.pub"));
        let id = keygen(&secret, &public, false).expect("keygen");
        let mode = std::fs::metadata(&secret)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let before = std::fs::read(&secret).expect("read");
        let refused = keygen(&secret, &public, false)
            .expect_err("exists")
            .to_string();
        assert!(refused.contains("--force"), "{refused}");
        assert_eq!(std::fs::read(&secret).expect("read"), before);
        let again = keygen(&secret, &public, true).expect("forced");
        assert_ne!(id, again);
        assert_eq!(TrustedKey::load(&public).expect("public").id(), again);
        assert!(!format!("{:?}", SigningKey::load(&secret).expect("load")).contains("secret"));
    }

    #[test]
    fn a_signature_verifies_and_each_refusal_says_which() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (signer, trusted) = pair(dir.path(), "a");
        let (other, _) = pair(dir.path(), "b");
        let bytes = b"manifest";
        let digest = "d1";
        let signature = signer.sign(bytes, "erel sha256 d1").expect("sign");
        trusted
            .check(bytes, digest, &signature, "the manifest")
            .expect("verifies");
        let changed = trusted.check(b"manifesT", "d2", &signature, "the manifest");
        assert!(
            matches!(changed, Err(SignatureRefusal::Tampered { .. })),
            "{changed:?}"
        );
        let by_other = other.sign(bytes, "erel sha256 d1").expect("sign");
        // Same key id, a signature made over other bytes with the same comment.
        let forged = signer.sign(b"other", "erel sha256 d1").expect("sign");
        for (signature, refusal) in [
            (by_other.as_str(), "signed by another key"),
            (forged.as_str(), "bad signature"),
            ("garbage", "bad signature"),
        ] {
            let refused = trusted
                .check(bytes, digest, signature, "the manifest")
                .expect_err(refusal)
                .to_string();
            assert!(refused.starts_with(refusal), "{refused}");
        }
    }
}
