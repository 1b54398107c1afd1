//! Kiln: a Kubernetes operator that runs Clay data enrichment.

pub mod api;
pub mod devenv;
pub mod operator;
pub mod telemetry;
