//! State shared by the controllers: the client, configuration, metrics,
//! the event recorder and per-object retry backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};

use super::error::{Error, Result};
use super::metrics::OperatorMetrics;
use super::table::build::BuildConfig;

pub struct Context {
    pub client: Client,
    /// Only objects in this namespace are watched; all namespaces when None.
    pub watch_namespace: Option<String>,
    pub build: BuildConfig,
    pub metrics: Arc<OperatorMetrics>,
    /// The credit ledger; the only writer of CreditBudget status.
    pub ledger: super::budget::ledger::Ledger,
    /// Shares of Clay's rate leased with the credits (leader only, in memory).
    pub rates: Mutex<super::rate::RateShares>,
    /// Each table's traffic, from its processes' lease requests.
    pub volumes: Mutex<super::table::volume::Volumes>,
    /// Tables whose processes reported news (traffic after a quiet hour,
    /// Clay reachable or not any more): the table controller reconciles
    /// them at once (its resync while idle is long).
    pub tables_to_look_at: futures::channel::mpsc::UnboundedSender<TableRef>,
    tables_to_look_at_rx: Mutex<Option<futures::channel::mpsc::UnboundedReceiver<TableRef>>>,
    /// The period each budget's exhaustion forecast was last announced for
    /// (one Warning Event per budget and period).
    pub forecasts_announced: Mutex<std::collections::HashMap<String, String>>,
    /// What the table controller reads, once its watches started.
    pub table_caches: std::sync::OnceLock<super::table::TableCaches>,
    /// The refresh controller's CronJobs, once its watch started.
    pub cronjobs: std::sync::OnceLock<Arc<super::refresh::CronJobs>>,
    /// Replaced now and then: kube's recorder keeps every event it
    /// published until it publishes again more than 6 minutes later.
    recorder: std::sync::RwLock<Recorder>,
    reporter: Reporter,
    failures: RetryDelays,
    /// When each object's counters were last written to status.
    counter_writes: Mutex<HashMap<String, std::time::Instant>>,
}

/// A table, as the controller's queue names it.
pub type TableRef = ObjectRef<crate::api::EnrichmentTable>;

/// First retry delay after a failed reconciliation; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Retry delay ceiling.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Context {
    pub fn new(
        client: Client,
        watch_namespace: Option<String>,
        build: BuildConfig,
        metrics: Arc<OperatorMetrics>,
        ledger: super::budget::ledger::Ledger,
        instance: String,
        succession: super::leader::Succession,
    ) -> Self {
        let (tables_to_look_at, tables_to_look_at_rx) = futures::channel::mpsc::unbounded();
        let reporter = Reporter {
            controller: "kiln-operator".into(),
            instance: Some(instance),
        };
        Self {
            recorder: std::sync::RwLock::new(Recorder::new(client.clone(), reporter.clone())),
            reporter,
            client,
            watch_namespace,
            build,
            metrics,
            ledger,
            rates: Mutex::new(super::rate::RateShares::new(
                std::time::Instant::now(),
                succession,
            )),
            volumes: Mutex::default(),
            tables_to_look_at,
            tables_to_look_at_rx: Mutex::new(Some(tables_to_look_at_rx)),
            forecasts_announced: Mutex::default(),
            table_caches: std::sync::OnceLock::new(),
            cronjobs: std::sync::OnceLock::new(),
            failures: RetryDelays::default(),
            counter_writes: Mutex::new(HashMap::new()),
        }
    }

    /// The tables to look at now (see `tables_to_look_at`); taken once, by
    /// the table controller.
    pub fn take_tables_to_look_at(
        &self,
    ) -> Option<futures::channel::mpsc::UnboundedReceiver<TableRef>> {
        self.tables_to_look_at_rx.lock().unwrap().take()
    }

    /// An Api over the watched namespace(s), for controllers and their watches.
    pub fn watched<K>(&self) -> kube::Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.watch_namespace {
            Some(namespace) => kube::Api::namespaced(self.client.clone(), namespace),
            None => kube::Api::all(self.client.clone()),
        }
    }

    /// Publishes an Event about `object`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let recorder = self.recorder.read().unwrap().clone();
        if let Err(error) = recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "publishing an event failed");
        }
    }

    /// Drops what the event recorder remembers of recent events (kept to
    /// count repeats of one event as a series): a repeat after this starts
    /// a new Event instead of counting on the old one.
    pub fn forget_recent_events(&self) {
        let fresh = Recorder::new(self.client.clone(), self.reporter.clone());
        *self.recorder.write().unwrap() = fresh;
    }

    /// The delay before retrying `key` after its latest failure.
    pub fn next_backoff(&self, key: &str) -> Duration {
        self.failures.next(key)
    }

    /// True when a counters-only status update of `key` may be written now:
    /// at most one every `every`, so busy tables do not flood the API server.
    pub fn counters_write_due(&self, key: &str, every: Duration) -> bool {
        let mut writes = self.counter_writes.lock().unwrap();
        let due = writes.get(key).is_none_or(|at| at.elapsed() >= every);
        if due {
            writes.insert(key.to_string(), std::time::Instant::now());
        }
        due
    }

    /// Forgets `key`'s failures after a successful reconciliation.
    pub fn reset_backoff(&self, key: &str) {
        self.failures.reset(key);
    }
}

/// Each failing object's retry delays, cleared when it succeeds.
#[derive(Default)]
struct RetryDelays(Mutex<HashMap<String, ExponentialBackoff>>);

impl RetryDelays {
    /// Doubling from [`BACKOFF_BASE`], each delay stretched by up to itself
    /// at random (so objects that failed together, in an API server outage,
    /// do not retry together), never above [`BACKOFF_MAX`].
    fn next(&self, key: &str) -> Duration {
        let mut failing = self.0.lock().unwrap();
        let delays = failing.entry(key.to_string()).or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(BACKOFF_BASE)
                .with_max_delay(BACKOFF_MAX / 2)
                .with_jitter()
                .without_max_times()
                .build()
        });
        delays.next().unwrap_or(BACKOFF_MAX)
    }

    fn reset(&self, key: &str) {
        self.0.lock().unwrap().remove(key);
    }
}

/// Runs one reconciliation with metrics and backoff bookkeeping.
pub async fn instrumented<K, F>(
    ctx: &Context,
    controller: &'static str,
    object: &K,
    reconcile: F,
) -> Result<Action>
where
    K: Resource<DynamicType = ()> + kube::runtime::reflector::Lookup<DynamicType = ()>,
    F: std::future::Future<Output = Result<Action>>,
{
    use tracing::Instrument as _;
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        controller,
        object = %ObjectRef::from_obj(object),
        generation = object.meta().generation.unwrap_or_default(),
    );
    let result = reconcile.instrument(span).await;
    ctx.metrics.observe(
        controller,
        started.elapsed(),
        result.as_ref().err().map(|e| (e.kind(), e.step())),
    );
    if result.is_ok() {
        ctx.reset_backoff(&ObjectRef::from_obj(object).to_string());
    }
    result
}

/// The error policy of every controller: retry with per-object exponential backoff.
pub fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: kube::runtime::reflector::Lookup<DynamicType = ()>,
{
    let key = ObjectRef::from_obj(&*object).to_string();
    let delay = ctx.next_backoff(&key);
    tracing::warn!(object = %key, %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_per_failure_up_to_the_ceiling_and_reset_on_success() {
        let delays = RetryDelays::default();
        let first = delays.next("sales/leads");
        assert!(
            first >= BACKOFF_BASE && first < BACKOFF_BASE * 2,
            "{first:?}"
        );
        let second = delays.next("sales/leads");
        assert!(second >= BACKOFF_BASE * 2, "{second:?}");
        assert!(
            delays.next("sales/other") < BACKOFF_BASE * 2,
            "each object has its own delays"
        );
        let mut last = second;
        for _ in 0..20 {
            last = delays.next("sales/leads");
        }
        assert!(last >= BACKOFF_MAX / 2 && last <= BACKOFF_MAX, "{last:?}");
        delays.reset("sales/leads");
        assert!(delays.next("sales/leads") < BACKOFF_BASE * 2);
    }
}
