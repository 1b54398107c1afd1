//! Errors a reconciliation can end with, naming the step that failed and the
//! object it was about. Missing references are not errors: they become
//! status conditions.

use kube::{Resource, ResourceExt};

/// What a reconciliation was doing when it failed (the `step` label of
/// `kiln_reconcile_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading what the resource refers to or what exists.
    Read,
    /// Server-side applying a child object.
    Apply,
    /// Deleting a child no longer wanted.
    Delete,
    /// Writing the resource's status.
    Status,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Read => "read",
            Step::Apply => "apply",
            Step::Delete => "delete",
            Step::Status => "status",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Step::Read => "reading",
            Step::Apply => "applying",
            Step::Delete => "deleting",
            Step::Status => "updating the status of",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} {object}: {}", step.verb(), api_message(source))]
    Kube {
        step: Step,
        /// `Kind namespace/name`.
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no namespace")]
    NotNamespaced(String),
    #[error("credit ledger: {0}")]
    Ledger(#[from] super::budget::ledger::LedgerError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The API server's own message, without the debug dump of the response.
fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// `Kind namespace/name` of an object of type `K`, for error messages.
pub fn describe<K: Resource<DynamicType = ()>>(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) => format!("{} {namespace}/{name}", K::kind(&())),
        None => format!("{} {name}", K::kind(&())),
    }
}

/// `Kind namespace/name` of `object`.
pub fn describe_object<K: Resource<DynamicType = ()>>(object: &K) -> String {
    describe::<K>(object.namespace().as_deref(), &object.name_any())
}

/// Names the step and the object of a Kubernetes API call that failed.
pub trait AtStep<T> {
    fn at(self, step: Step, object: impl FnOnce() -> String) -> Result<T>;
}

impl<T> AtStep<T> for Result<T, kube::Error> {
    fn at(self, step: Step, object: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Kube {
            step,
            object: object(),
            source,
        })
    }
}

impl Error {
    /// What kind of failure this is, for the reconcile error metric: the
    /// API server's answer by class, a transport failure, or the ledger.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => match status.code {
                400 | 422 => "invalid",
                401 | 403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                429 => "throttled",
                500..=599 => "server_error",
                _ => "api_other",
            },
            Error::Kube { .. } => "transport",
            Error::NotNamespaced(_) => "not_namespaced",
            Error::Ledger(_) => "ledger",
        }
    }

    /// The step that failed, for the reconcile error metric.
    pub fn step(&self) -> &'static str {
        match self {
            Error::Kube { step, .. } => step.as_str(),
            Error::NotNamespaced(_) => "validate",
            Error::Ledger(_) => "ledger",
        }
    }

    /// A one-line message for status conditions and events.
    pub fn message(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;

    fn api(code: u16) -> Error {
        Err::<(), _>(kube::Error::Api(
            kube::core::Status::failure("refused", "Reason")
                .with_code(code)
                .boxed(),
        ))
        .at(Step::Apply, || {
            describe::<Deployment>(Some("sales"), "leads-worker")
        })
        .unwrap_err()
    }

    #[test]
    fn the_api_servers_answers_are_told_apart_by_class() {
        assert_eq!(api(409).kind(), "conflict");
        assert_eq!(api(403).kind(), "forbidden");
        assert_eq!(api(422).kind(), "invalid");
        assert_eq!(api(504).kind(), "server_error");
        assert_eq!(Error::NotNamespaced("x".into()).kind(), "not_namespaced");
    }

    #[test]
    fn an_error_names_its_step_and_object_in_one_line() {
        let error = api(422);
        assert_eq!(error.step(), "apply");
        assert_eq!(
            error.message(),
            "applying Deployment sales/leads-worker: refused"
        );
    }
}
