//! File names of the master's certificate directory and of a host bundle.
//!
//! ```text
//! <certs>/ca.pem            cluster CA certificate                  0644
//! <certs>/ca.key            cluster CA private key                  0600
//! <certs>/master.pem        master client certificate (clientAuth)  0644
//! <certs>/master.key        its private key                         0600
//! <certs>/crl.pem           certificate revocation list             0644
//! <certs>/hosts/<ID>/       one bundle per host, copied to the host (0700):
//!     ca.pem  host.pem (serverAuth)  host.key (0600)  crl.pem
//! ```
//!
//! With an operator's own CA the same names hold its files: `ca.pem` may hold
//! intermediates besides the root, `host.pem` and `master.pem` the certificate
//! followed by its intermediates, `crl.pem` one CRL per issuing CA (see the
//! crate's "PKI options"); `ca.key` and `hosts/` are then not needed.

/// The cluster CA certificate, in the master directory and in every host bundle.
pub const CA_PEM: &str = "ca.pem";
/// The cluster CA private key (master directory only).
pub const CA_KEY: &str = "ca.key";
/// The master's client certificate.
pub const MASTER_PEM: &str = "master.pem";
/// The master's private key.
pub const MASTER_KEY: &str = "master.key";
/// The certificate revocation list, in the master directory and in every host bundle.
pub const CRL_PEM: &str = "crl.pem";
/// The directory holding one bundle per host.
pub(crate) const HOSTS_DIR: &str = "hosts";
/// A host's server certificate, in its bundle.
pub const HOST_PEM: &str = "host.pem";
/// A host's private key, in its bundle.
pub const HOST_KEY: &str = "host.key";
/// The name [`crate::MasterDir::revoke`] takes for the master's own certificate.
pub(crate) const MASTER_NAME: &str = "master";
/// Common name of the master's client certificate.
pub(crate) const MASTER_COMMON_NAME: &str = "erel-master";
