//! Tables enriched through a Clay routine: one run per row, recorded before
//! it starts so a restarted receiver polls it instead of starting another.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use super::{Answer, Direct};
use crate::clay::ClayError;
use crate::clay::routines::{RoutineItem, RoutinesClient};
use crate::dataplane::TableRuntime;
use crate::dataplane::rows::{Callback, RowStore};
use crate::dataplane::store::PendingRow;
use crate::ledger::lease::CreditLease;

/// How often a routine run's results are polled.
const ROUTINE_POLL: Duration = Duration::from_millis(500);
/// A Clay routine and the client that runs it.
pub struct Routine {
    pub client: RoutinesClient,
    pub routine_id: String,
}

impl Routine {
    /// From the table's `clay.routine`, if it has one; runs go through the
    /// lease's share of the workspace's rate like webhook rows.
    pub fn from_runtime(runtime: &TableRuntime, lease: &CreditLease) -> Option<Self> {
        let spec = runtime.table.spec.clay.routine.as_ref()?;
        Some(Self {
            client: RoutinesClient::new(
                reqwest::Client::new(),
                &spec.api_url,
                runtime.routine_api_key.clone()?,
                lease.rate_limiter(&runtime.table.spec.clay.rate_limit),
                crate::retry::RetryPolicy::default(),
            ),
            routine_id: spec.routine_id.clone(),
        })
    }
}

impl Direct {
    /// Runs one row through the table's routine (or, after a restart, polls
    /// the run it already started) and claims its result. A run is never
    /// started twice for a row: Clay's runs have no idempotency key.
    pub(super) async fn run_routine(
        &self,
        routine: &Routine,
        pending: &PendingRow,
        run_id: Option<String>,
    ) -> Answer {
        let runtime = self.attempts.runtime();
        let spec = &runtime.table.spec;
        let run_id = match run_id {
            // A previous process may have started a run it did not record.
            Some(run_id) if run_id.is_empty() => {
                return self.give_up(pending, "OutcomeUnknown", true).await;
            }
            Some(run_id) => run_id,
            None => {
                let item = RoutineItem {
                    id: pending.row_id.clone(),
                    inputs: pending.row.clone(),
                };
                if let Err(error) = self.store.mark_started(&pending.row_id).await {
                    tracing::warn!(%error, "recording a routine run failed");
                    return self.give_up(pending, "StoreUnavailable", false).await;
                }
                match routine.client.run(&routine.routine_id, &[item], None).await {
                    Ok(run_id) => {
                        if let Err(error) = self.store.set_run(&pending.row_id, &run_id).await {
                            tracing::warn!(%error, row = %pending.row_id, "recording the run id failed");
                        }
                        run_id
                    }
                    Err(ClayError::OutcomeUnknown(_)) => {
                        return self.give_up(pending, "OutcomeUnknown", true).await;
                    }
                    // Clay refused the run: nothing was charged.
                    Err(error) => return self.give_up(pending, error.reason(), false).await,
                }
            }
        };
        let timeout: Duration = spec.clay.result_timeout.into();
        let item = match routine
            .client
            .wait_for(&run_id, ROUTINE_POLL, timeout)
            .await
        {
            Ok(results) => results.into_iter().find(|r| r.id == pending.row_id),
            Err(error) => {
                tracing::warn!(%error, row = %pending.row_id, "the routine run did not finish");
                return self.give_up(pending, "ResultTimeout", true).await;
            }
        };
        let Some(found) = item
            .filter(|i| i.status == "complete")
            .and_then(|i| i.result)
        else {
            return self.give_up(pending, "RoutineItemFailed", true).await;
        };
        let mut result = pending.row.clone();
        if let (Some(result), Value::Object(found)) = (result.as_object_mut(), found) {
            result.extend(found);
        }
        result["kiln_row_id"] = Value::String(pending.row_id.clone());
        let reported = result
            .pointer(&spec.clay.cost_pointer)
            .and_then(Value::as_f64);
        // The claim records the settlement; the receiver's sweep makes it.
        let callback = Callback {
            row_id: &pending.row_id,
            result: &result,
            reported,
        };
        match self.store.claim_callback(&runtime, &callback).await {
            Ok(_) => Answer::Enriched {
                row_id: pending.row_id.clone(),
                result,
                deduplicated: false,
            },
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "storing a routine result failed");
                Answer::Refused {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    reason: "StoreUnavailable".into(),
                    message: "the row store is unavailable; retry".into(),
                }
            }
        }
    }
}
