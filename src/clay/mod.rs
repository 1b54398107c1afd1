//! Talking to Clay: the inbound webhook client (with rate limiting, retries
//! and source rotation), the routines API, and `sim`, a local stand-in that
//! speaks the same protocol. Nothing here knows about Kubernetes.

pub mod error;
pub mod limiter;
pub mod rotation;
pub mod routines;
pub mod sim;
pub mod webhook;

pub use error::ClayError;

/// A request to Clay at `url` got no answer: recorded for the table's
/// ClayReachable condition, naming only the host.
fn clay_unreachable(url: &str, detail: &str) {
    crate::contact::unreachable(
        crate::contact::Peer::Clay,
        &crate::contact::host_of(url, "Clay"),
        detail,
    );
}
