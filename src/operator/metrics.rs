//! The operator's Prometheus metrics (reconciles, budgets).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    /// What failed, from [`super::error::Error::kind`].
    pub kind: &'static str,
    /// Where it failed (read, apply, delete, status, ledger), from
    /// [`super::error::Error::step`].
    pub step: &'static str,
}

/// Labels of per-budget metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub namespace: String,
    pub budget: String,
    /// `data_credits` or `actions`.
    pub meter: &'static str,
}

/// The operator's own metrics.
pub struct OperatorMetrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub is_leader: Gauge,
    pub budget_used: Family<BudgetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub budget_reserved: Family<BudgetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub budget_remaining: Family<BudgetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Lease asks refused, per budget (meter label "all").
    pub budget_denials: Family<BudgetLabels, Gauge>,
    /// Live credit leases per budget (meter label "all").
    pub budget_leases: Family<BudgetLabels, Gauge>,
    /// Callback costs charged at the row's worst case because they were not
    /// believable (negative, not a number, far above creditsPerRow).
    pub implausible_costs: Counter,
    /// 0 Closed, 1 HalfOpen, 2 Open (meter label "all").
    pub breaker_state: Family<BudgetLabels, Gauge>,
    /// Size of each budget's status as written, in bytes (meter label "all").
    pub budget_status_bytes: Family<BudgetLabels, Gauge>,
    /// Requests the ledger applied per status write.
    pub ledger_batch_size: Histogram,
    /// Time the ledger took to apply a batch: read, book, write.
    pub ledger_batch_seconds: Histogram,
}

impl OperatorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 12))
            }),
            is_leader: Gauge::default(),
            budget_used: Family::default(),
            budget_reserved: Family::default(),
            budget_remaining: Family::default(),
            budget_denials: Family::default(),
            budget_leases: Family::default(),
            implausible_costs: Counter::default(),
            breaker_state: Family::default(),
            budget_status_bytes: Family::default(),
            ledger_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            ledger_batch_seconds: Histogram::new(exponential_buckets(0.002, 2.0, 12)),
        };
        registry.register(
            "kiln_reconciles",
            "Reconciliations by controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "kiln_reconcile_errors",
            "Failed reconciliations by controller, kind of error and the step that failed",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "kiln_reconcile_duration_seconds",
            "Reconciliation duration by controller",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "kiln_operator_leader",
            "1 while this replica holds the leader lease",
            metrics.is_leader.clone(),
        );
        registry.register(
            "kiln_budget_used",
            "Credits spent this period",
            metrics.budget_used.clone(),
        );
        registry.register(
            "kiln_budget_reserved",
            "Credits held by credit leases",
            metrics.budget_reserved.clone(),
        );
        registry.register(
            "kiln_budget_remaining",
            "Credits left under the limit this period",
            metrics.budget_remaining.clone(),
        );
        registry.register(
            "kiln_budget_denials",
            "Lease asks refused this period",
            metrics.budget_denials.clone(),
        );
        registry.register(
            "kiln_budget_leases",
            "Live credit leases",
            metrics.budget_leases.clone(),
        );
        registry.register(
            "kiln_ledger_implausible_costs",
            "Callback costs not believed and charged at the row's worst case",
            metrics.implausible_costs.clone(),
        );
        registry.register(
            "kiln_budget_breaker_state",
            "Circuit breaker: 0 Closed, 1 HalfOpen, 2 Open",
            metrics.breaker_state.clone(),
        );
        registry.register(
            "kiln_budget_status_bytes",
            "Size of the budget's status as the ledger last wrote it",
            metrics.budget_status_bytes.clone(),
        );
        registry.register(
            "kiln_ledger_batch_size",
            "Lease requests the ledger applied in one status write",
            metrics.ledger_batch_size.clone(),
        );
        registry.register(
            "kiln_ledger_batch_duration_seconds",
            "Time the ledger took to apply a batch (read, book, write)",
            metrics.ledger_batch_seconds.clone(),
        );
        metrics
    }

    /// Publishes a budget's ledger state.
    pub fn observe_budget(
        &self,
        namespace: &str,
        budget: &str,
        status: &crate::api::CreditBudgetStatus,
    ) {
        let labels = |meter: &'static str| BudgetLabels {
            namespace: namespace.to_string(),
            budget: budget.to_string(),
            meter,
        };
        for (meter, used, reserved, remaining) in [
            (
                "data_credits",
                status.used.data_credits,
                status.reserved.data_credits,
                status.remaining.data_credits,
            ),
            (
                "actions",
                status.used.actions as f64,
                status.reserved.actions as f64,
                status.remaining.actions as f64,
            ),
        ] {
            self.budget_used.get_or_create(&labels(meter)).set(used);
            self.budget_reserved
                .get_or_create(&labels(meter))
                .set(reserved);
            self.budget_remaining
                .get_or_create(&labels(meter))
                .set(remaining);
        }
        self.budget_denials
            .get_or_create(&labels("all"))
            .set(status.denials as i64);
        self.budget_leases
            .get_or_create(&labels("all"))
            .set(status.leases.len() as i64);
        let bytes = serde_json::to_vec(status).map_or(0, |b| b.len());
        self.budget_status_bytes
            .get_or_create(&labels("all"))
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let breaker = match status.breaker.state {
            crate::api::budget::BreakerState::Closed => 0,
            crate::api::budget::BreakerState::HalfOpen => 1,
            crate::api::budget::BreakerState::Open => 2,
        };
        self.breaker_state
            .get_or_create(&labels("all"))
            .set(breaker);
    }

    /// Records one reconciliation; `failed` is the error's kind and step
    /// when it failed.
    pub fn observe(
        &self,
        controller: &'static str,
        elapsed: Duration,
        failed: Option<(&'static str, &'static str)>,
    ) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        if let Some((kind, step)) = failed {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller,
                    kind,
                    step,
                })
                .inc();
        }
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}
