//! Errors a reconciliation can end with. Missing references are not errors:
//! they become status conditions.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NotNamespaced(String),
    #[error("credit ledger: {0}")]
    Ledger(#[from] super::budget::ledger::LedgerError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A one-line message for status conditions and events: the API server's
    /// own message, without the debug dump of the response.
    pub fn message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) => status.message.clone(),
            other => other.to_string(),
        }
    }
}
