//! Integration tests of erel-certs: the directory layout, real mutual-TLS
//! handshakes over loopback (positive and negative), and an `openssl` cross-check.

mod handshake;
mod helper;
mod openssl;
mod store;
