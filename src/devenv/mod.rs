//! Local, real infrastructure for tests and the demo: a Kubernetes control
//! plane built from Go modules, Redis and Kafka, each started as a child
//! process on loopback in a work directory. Nothing here is used in a cluster.

pub mod certs;
pub mod controlplane;
pub mod demo;
pub mod process;

use std::net::TcpListener;

/// A loopback port that was free a moment ago. The socket is closed before the
/// port is handed out, so a rare race with another process is possible; callers
/// start their servers right away.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
