//! Peers that reach the agent's TCP port without being masters: connections that never
//! speak TLS, from a chosen loopback address (127.0.0.0/8 is all loopback on Linux, so
//! each address counts as a host of its own against the agent's per-address caps).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use super::AgentProc;

/// A TCP connection to `agent` from `source` (a loopback address) that sends nothing.
pub async fn idle_peer(agent: &AgentProc, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let from: IpAddr = source.parse().expect("source address");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket.connect(agent.addr).await.expect("connect")
}

/// Reads until the agent closes `stream` (end of stream or reset), within `limit`;
/// false if it is still open.
pub async fn closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut sink = [0u8; 256];
    let drain = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, drain).await.is_ok()
}
