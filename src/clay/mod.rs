//! Talking to Clay: the inbound webhook client (with rate limiting, retries
//! and source rotation), the routines API, and `sim`, a local stand-in that
//! speaks the same protocol. Nothing here knows about Kubernetes.

pub mod contact;
pub mod error;
pub mod limiter;
pub mod retry;
pub mod rotation;
pub mod routines;
pub mod secret;
pub mod sim;
pub mod webhook;

pub use error::ClayError;
pub use secret::SecretString;
