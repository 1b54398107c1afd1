//! What a table's references (budget, Secrets, autoscaler) let it do.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::table::CreditCost;
use crate::api::{CreditBudget, EnrichmentTable};
use crate::contact::Contact;
use crate::operator::table::{counters, volume};

/// What dereferencing the table's references found.
#[derive(Clone, Debug, PartialEq)]
pub struct References {
    /// None when the budget exists and can pay for a row; otherwise the
    /// reason and why it is unusable.
    pub budget_problem: Option<(&'static str, String)>,
    /// Human-readable problems with Secret references, empty when all resolve.
    pub secret_problems: Vec<String>,
    /// This table's spend in the budget's current period, from the ledger.
    pub credits_this_period: CreditCost,
    /// Row counters and enrichment times read from the table's store, when
    /// it could be reached.
    pub rows: Option<counters::StoreReading>,
    /// Why the table's Redis could not be read, when it could not.
    pub redis_problem: Option<String>,
    /// Tier Event: why brokers could not be reached (empty when all were).
    pub kafka_problems: Option<Vec<String>>,
    /// Whether `spec.workers.autoscaling` is in effect.
    pub autoscaling: Option<Autoscaling>,
    /// RefreshSchedules of this table, by name (their runs use its Role).
    pub schedules: Vec<String>,
    /// Of those, the ones whose last run was skipped for the budget.
    pub schedules_skipping_for_budget: Vec<String>,
    /// The table's share of Clay's rate, when its processes hold one.
    pub rate: Option<crate::operator::rate::TableRate>,
    /// The table's traffic as the leader observed it, when there was any.
    pub volume: Option<volume::VolumeView>,
    /// Whether the table's processes reach Clay, Redis and Kafka, as they
    /// last reported.
    pub clay_contact: Option<Contact>,
    pub store_contact: Option<Contact>,
    pub kafka_contact: Option<Contact>,
}

/// The state of lag-based worker autoscaling.
#[derive(Clone, Debug, PartialEq)]
pub enum Autoscaling {
    /// A KEDA ScaledObject scales the workers.
    Applied { min: i32, max: i32, lag: u32 },
    /// KEDA's ScaledObject CRD is not installed: replicas stay fixed.
    KedaNotInstalled,
}

impl References {
    pub fn resolved(&self) -> bool {
        self.budget_problem.is_none() && self.secret_problems.is_empty()
    }
}

/// Why the budget can never pay for one of this table's rows, if so: a
/// row's worst case (spec.clay.creditsPerRow) above the budget's whole limit.
pub fn budget_too_small(table: &EnrichmentTable, budget: &CreditBudget) -> Option<String> {
    let row = &table.spec.clay.credits_per_row;
    let limits = &budget.spec.limits;
    let data = limits
        .data_credits
        .filter(|limit| row.data_credits > *limit)
        .map(|limit| {
            format!(
                "{} data credits against a limit of {limit}",
                row.data_credits
            )
        });
    let actions = limits
        .actions
        .filter(|limit| row.actions > *limit)
        .map(|limit| format!("{} actions against a limit of {limit}", row.actions));
    let over: Vec<String> = data.into_iter().chain(actions).collect();
    (!over.is_empty()).then(|| {
        format!(
            "spec.clay.creditsPerRow ({}) is more than CreditBudget {:?} allows in a whole period: no row could ever be sent; lower creditsPerRow or raise the budget's limits",
            over.join(", "),
            budget.metadata.name.as_deref().unwrap_or_default()
        )
    })
}

/// Checks every Secret reference against the Secrets that exist, given as
/// name → set of keys. Values are never looked at.
pub fn secret_problems(
    table: &EnrichmentTable,
    existing: &BTreeMap<String, BTreeMap<String, bool>>,
) -> Vec<String> {
    let mut problems = BTreeSet::new();
    for reference in table.spec.secret_refs() {
        match existing
            .get(&reference.name)
            .map(|keys| keys.get(&reference.key))
        {
            None => {
                problems.insert(format!("Secret {:?} not found", reference.name));
            }
            Some(None) => {
                problems.insert(format!(
                    "Secret {:?} has no key {:?}",
                    reference.name, reference.key
                ));
            }
            // An empty token would switch authentication off.
            Some(Some(false)) => {
                problems.insert(format!(
                    "Secret {:?} key {:?} is empty or only whitespace",
                    reference.name, reference.key
                ));
            }
            Some(Some(true)) => {}
        }
    }
    let headers = table
        .spec
        .sink
        .as_ref()
        .and_then(|s| s.http.as_ref())
        .and_then(|h| h.headers_secret_name.as_ref());
    if let Some(name) = headers
        && !existing.contains_key(name)
    {
        problems.insert(format!(
            "Secret {name:?} (spec.sink.http.headersSecretName) not found"
        ));
    }
    problems.into_iter().collect()
}
