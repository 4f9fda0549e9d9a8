//! End-to-end tests: real `erel-boot` processes, real mutual TLS on loopback, real
//! release tarballs and real OTP releases.

mod helper;

mod agent;
mod amqp;
mod broker_cluster;
mod bundle;
mod certs_cli;
mod config_path;
mod containment;
mod daemon;
mod deploy;
mod faults;
mod fleet;
mod health;
mod inputs;
mod kit;
mod lifecycle;
mod load;
mod logs;
mod manners;
mod network;
mod one_agent;
mod otp;
mod output;
mod peers;
mod pki;
mod push_content;
mod records;
mod recover;
mod rotate;
mod static_agent;
