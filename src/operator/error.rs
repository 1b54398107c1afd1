//! Errors a reconciliation can end with. Missing references are not errors:
//! they become status conditions.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NotNamespaced(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
