//! The health probes a verdict is made of: a TCP connection to the release's port.

use std::time::Duration;

/// Connects to `host:port` once; `Err` says why not.
pub(crate) async fn probe_tcp(
    host: &str,
    port: u16,
    limit: Duration,
) -> std::result::Result<(), String> {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("{host}:{port}: {e}")),
        Err(_) => Err(format!(
            "{host}:{port}: no answer within {}s",
            limit.as_secs_f32()
        )),
    }
}
