//! Kiln: a Kubernetes operator that runs Clay data enrichment.

pub mod api;
pub mod clay;
pub mod contact;
pub mod contract;
pub mod dataplane;
pub mod devenv;
pub mod doctor;
pub mod health;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod operator;
pub mod retry;
pub mod secret;
pub mod telemetry;

/// Resolves on SIGTERM or SIGINT: every long-running process shuts down on it.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
