//! End-to-end tests: real `erel-boot` processes, real mutual TLS on loopback, real
//! release tarballs and real OTP releases.

mod helper;

mod agent;
mod amqp;
mod certs_cli;
mod deploy;
mod otp;
mod peers;
mod pki;
