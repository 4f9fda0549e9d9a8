//! Integration tests of erel-certs: the directory layout, real mutual-TLS
//! handshakes over loopback (positive and negative), an `openssl` cross-check, and
//! an operator's own PKI made with `openssl` (intermediates, key encodings, CRLs).

mod handshake;
mod helper;
mod openssl;
mod own_pki;
mod pushed;
mod store;
