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
    /// What kind of failure this is, for the reconcile error metric: the
    /// API server's answer by class, a transport failure, or the ledger.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                400 | 422 => "invalid",
                401 | 403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                429 => "throttled",
                500..=599 => "server_error",
                _ => "api_other",
            },
            Error::Kube(_) => "transport",
            Error::NotNamespaced(_) => "not_namespaced",
            Error::Ledger(_) => "ledger",
        }
    }

    /// A one-line message for status conditions and events: the API server's
    /// own message, without the debug dump of the response.
    pub fn message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) => status.message.clone(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure("refused", "Reason")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn the_api_servers_answers_are_told_apart_by_class() {
        assert_eq!(api(409).kind(), "conflict");
        assert_eq!(api(403).kind(), "forbidden");
        assert_eq!(api(422).kind(), "invalid");
        assert_eq!(api(504).kind(), "server_error");
        assert_eq!(Error::NotNamespaced("x".into()).kind(), "not_namespaced");
    }
}
