//! What every command may need: the certificate directory and this master's name.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::ResultExt as _;
use erel_certs::MasterDir;

use crate::client::Connector;

/// What every command may need.
#[derive(Debug)]
pub(crate) struct Context {
    /// The master's certificate directory.
    pub certs: MasterDir,
}

impl Context {
    /// Builds the context for a certificate directory.
    pub(crate) fn new(certs: PathBuf) -> Self {
        Context {
            certs: MasterDir::new(certs),
        }
    }

    /// The TLS client configuration, from the certificate directory.
    pub(crate) fn tls(&self) -> crate::Result<Arc<rustls::ClientConfig>> {
        self.certs.client_config().with_context(|| {
            format!(
                "loading the master's certificates from {} (run `erel certs init` first?)",
                self.certs.path().display()
            )
        })
    }

    /// The name this master gives in `Hello`: `erel@` and the machine's host name.
    pub(crate) fn connector(&self) -> crate::Result<Connector> {
        Ok(Connector::new(self.tls()?, self.master_name()))
    }

    /// The name this master gives in `Hello`.
    pub(crate) fn master_name(&self) -> String {
        master_name()
    }
}

/// `erel@<host name>`, the name a master gives in `Hello`.
pub(super) fn master_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| format!("erel@{name}"))
        .unwrap_or_else(|| "erel".to_string())
}
