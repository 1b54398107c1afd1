//! The ledger: one task per CreditBudget (on the leader) that applies lease
//! requests in small batches and records them in the budget's status with a
//! resourceVersion precondition, so a grant is durable before it is
//! answered. The task sleeps until a lease can expire or the breaker's
//! cooldown ends, and stops when its budget is gone or it has been idle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::{mpsc, oneshot};

use super::book::{self, BookError};
use super::breaker::Breaker;
use super::status;
use crate::api::budget::{BreakerState, BreakerStatus};
use crate::api::{CreditBudget, CreditBudgetStatus};
use crate::ledger::{Denial, LeaseAnswer, LeaseRequest};
use crate::operator::labels::FIELD_MANAGER;

/// Least time between two batch writes: bounds the ledger's writes to a few
/// per second per budget under any load. A request arriving after a quiet
/// spell is written at once (group commit), so an idle ledger adds one
/// write's latency, not a window.
const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// Largest batch.
const BATCH_MAX: usize = 1000;
/// Longest sleep of a book with nothing due (rollover is the controller's).
const SWEEP_AT_MOST: Duration = Duration::from_secs(60);
/// A book with no requests and nothing due for this long stops; the next
/// request or reconcile starts it again from status.
const IDLE_STOP: Duration = Duration::from_secs(600);
/// Attempts of one batch against write conflicts.
const CAS_ATTEMPTS: usize = 10;

/// The current time; tests skew it to cross period boundaries.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Why a ledger request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("{}", .0.message)]
    Denied(Denial),
    #[error("CreditBudget {0} not found")]
    BudgetNotFound(String),
    #[error(transparent)]
    Book(#[from] BookError),
    #[error("the ledger could not record the change: {0}")]
    Unavailable(String),
}

enum Command {
    Lease(
        Box<LeaseRequest>,
        oneshot::Sender<Result<LeaseAnswer, LedgerError>>,
    ),
    /// Recompute period, rollover and state (the controller's reconcile).
    Refresh(oneshot::Sender<Result<(CreditBudgetStatus, CreditBudgetStatus), LedgerError>>),
}

/// (namespace, name) of a budget.
type BudgetKey = (String, String);

/// Handle to every budget's book; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    client: kube::Client,
    clock: Clock,
    metrics: Option<Arc<crate::operator::metrics::OperatorMetrics>>,
    books: Arc<Mutex<HashMap<BudgetKey, mpsc::Sender<Command>>>>,
}

impl Ledger {
    pub fn new(
        client: kube::Client,
        clock: Clock,
        metrics: Option<Arc<crate::operator::metrics::OperatorMetrics>>,
    ) -> Self {
        Self {
            client,
            clock,
            metrics,
            books: Arc::default(),
        }
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    fn book(&self, namespace: &str, name: &str) -> mpsc::Sender<Command> {
        let mut books = self.books.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        if let Some(sender) = books.get(&key).filter(|s| !s.is_closed()) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(4096);
        let api = Api::<CreditBudget>::namespaced(self.client.clone(), namespace);
        tokio::spawn(run_book(
            api,
            namespace.to_string(),
            name.to_string(),
            self.clock.clone(),
            self.metrics.clone(),
            receiver,
        ));
        books.insert(key, sender.clone());
        sender
    }

    async fn call<T>(
        &self,
        namespace: &str,
        name: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, LedgerError>>) -> Command,
    ) -> Result<T, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.book(namespace, name)
            .send(make(reply))
            .await
            .map_err(|_| LedgerError::Unavailable("the budget's book stopped".into()))?;
        answer
            .await
            .map_err(|_| LedgerError::Unavailable("the budget's book dropped the request".into()))?
    }

    /// Applies a lease request (validated by the caller).
    pub async fn lease(&self, request: LeaseRequest) -> Result<LeaseAnswer, LedgerError> {
        let (namespace, budget) = (request.namespace.clone(), request.budget.clone());
        self.call(&namespace, &budget, |reply| {
            Command::Lease(Box::new(request), reply)
        })
        .await
    }

    /// Brings the budget's status up to date; returns (before, after).
    pub async fn refresh(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(CreditBudgetStatus, CreditBudgetStatus), LedgerError> {
        self.call(namespace, name, Command::Refresh).await
    }
}

/// A command's answer, computed while applying a batch and sent after the write.
enum Answer {
    Lease(Result<LeaseAnswer, LedgerError>),
    Refreshed(Box<(CreditBudgetStatus, CreditBudgetStatus)>),
}

fn mismatched() -> LedgerError {
    LedgerError::Unavailable("internal: answer does not match the request".into())
}

impl Answer {
    fn into_lease(self) -> Result<LeaseAnswer, LedgerError> {
        match self {
            Answer::Lease(result) => result,
            _ => Err(mismatched()),
        }
    }
    fn into_refreshed(self) -> Result<(CreditBudgetStatus, CreditBudgetStatus), LedgerError> {
        match self {
            Answer::Refreshed(pair) => Ok(*pair),
            _ => Err(mismatched()),
        }
    }
}

async fn run_book(
    api: Api<CreditBudget>,
    namespace: String,
    name: String,
    clock: Clock,
    metrics: Option<Arc<crate::operator::metrics::OperatorMetrics>>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut breaker: Option<Breaker> = None;
    let mut burn = super::forecast::BurnHistory::default();
    let mut last_write: Option<tokio::time::Instant> = None;
    let mut due = tokio::time::Instant::now();
    let mut last_request = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => Some(command),
                None => return,
            },
            _ = tokio::time::sleep_until(due) => None,
        };
        let now = tokio::time::Instant::now();
        let mut batch: Vec<Command> = first.into_iter().collect();
        if batch.is_empty() {
            if now.duration_since(last_request) >= IDLE_STOP {
                tracing::debug!(budget = name, "ledger book idle; stopping");
                return;
            }
        } else {
            last_request = now;
            // Gathers until a window after the previous write; when that has
            // passed, takes only what is already queued.
            let deadline = last_write.map_or(now, |at| (at + BATCH_WINDOW).max(now));
            while batch.len() < BATCH_MAX {
                match tokio::time::timeout_at(deadline, commands.recv()).await {
                    Ok(Some(command)) => batch.push(command),
                    _ => break,
                }
            }
            last_write = Some(tokio::time::Instant::now());
        }
        // Replies are fixed before the write loop, so a retried batch
        // answers what it wrote.
        let started = tokio::time::Instant::now();
        let outcome = apply_batch(&api, &name, &clock, &mut breaker, &mut burn, &batch).await;
        if let Some(metrics) = metrics.as_ref().filter(|_| !batch.is_empty()) {
            metrics.ledger_batch_size.observe(batch.len() as f64);
            metrics
                .ledger_batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let gone = matches!(outcome, Err(LedgerError::BudgetNotFound(_)));
        let answers: Vec<Result<Answer, LedgerError>> = match outcome {
            Ok((answers, status)) => {
                if let Some(metrics) = &metrics {
                    metrics.observe_budget(&namespace, &name, &status);
                }
                due = tokio::time::Instant::now() + next_due(&status, breaker.as_ref(), clock());
                answers.into_iter().map(Ok).collect()
            }
            Err(error) => {
                // The write failed: try again soon.
                due = tokio::time::Instant::now() + Duration::from_secs(1);
                batch.iter().map(|_| Err(error.clone())).collect()
            }
        };
        for (command, answer) in batch.into_iter().zip(answers) {
            send(command, answer);
        }
        if gone {
            tracing::debug!(budget = name, "budget deleted; its ledger book stops");
            return;
        }
    }
}

/// How long until something in the book changes by itself: a lease
/// expiring, or (checked every second) the breaker's cooldown ending.
fn next_due(status: &CreditBudgetStatus, breaker: Option<&Breaker>, now: Timestamp) -> Duration {
    let until_expiry = status
        .leases
        .iter()
        .map(|l| Duration::try_from(l.expires_at.0.duration_since(now)).unwrap_or_default())
        .min()
        .unwrap_or(SWEEP_AT_MOST);
    let breaker_open = breaker.is_some_and(|b| b.state() == BreakerState::Open);
    let until = if breaker_open {
        until_expiry.min(Duration::from_secs(1))
    } else {
        until_expiry
    };
    until.clamp(Duration::from_millis(50), SWEEP_AT_MOST)
}

fn send(command: Command, answer: Result<Answer, LedgerError>) {
    // A caller that gave up waiting is not an error for the ledger.
    match command {
        Command::Lease(_, reply) => drop(reply.send(answer.and_then(Answer::into_lease))),
        Command::Refresh(reply) => drop(reply.send(answer.and_then(Answer::into_refreshed))),
    }
}

/// Applies a batch to a fresh copy of the budget and writes it with a
/// resourceVersion precondition, retrying on conflicts. Returns one answer
/// per command and the status written, or why nothing could be written.
async fn apply_batch(
    api: &Api<CreditBudget>,
    name: &str,
    clock: &Clock,
    breaker: &mut Option<Breaker>,
    burn: &mut super::forecast::BurnHistory,
    batch: &[Command],
) -> Result<(Vec<Answer>, CreditBudgetStatus), LedgerError> {
    for _ in 0..CAS_ATTEMPTS {
        let budget = api
            .get_opt(name)
            .await
            .map_err(|error| LedgerError::Unavailable(error.to_string()))?
            .ok_or_else(|| LedgerError::BudgetNotFound(name.to_string()))?;
        let now = clock();
        let before = budget.status.clone().unwrap_or_default();
        let mut working = budget.clone();
        // Period rollover first, then forfeits, then the batch.
        let mut status = status::compute(&working, now);
        let forfeited = book::expire(&mut status, now);
        for lease in &forfeited {
            tracing::warn!(budget = name, lease = %lease.id, table = %lease.table, holder = %lease.holder,
                held = lease.held.data_credits, "lease expired without renewal; what it held is counted as spent");
        }
        let mut attempt_breaker = breaker.clone().unwrap_or_else(|| {
            Breaker::new(
                status.breaker.state,
                status
                    .breaker
                    .last_transition_time
                    .as_ref()
                    .map_or(now, |t| t.0),
            )
        });
        let spec = &budget.spec;
        let answers: Vec<Answer> = batch
            .iter()
            .map(|command| match command {
                Command::Lease(request, _) => Answer::Lease(
                    book::apply(spec, &mut status, &mut attempt_breaker, request, now)
                        .map_err(LedgerError::from),
                ),
                Command::Refresh(_) => {
                    Answer::Refreshed(Box::new((before.clone(), CreditBudgetStatus::default())))
                }
            })
            .collect();
        attempt_breaker.tick(&spec.circuit_breaker, now);
        if attempt_breaker.state() != status.breaker.state {
            status.breaker = BreakerStatus {
                state: attempt_breaker.state(),
                last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    attempt_breaker.since(),
                )),
                reason: Some(attempt_breaker.reason.clone()),
            };
        }
        working.status = Some(status);
        let mut after = status::compute(&working, now);
        // Measured on credits used (what leases hold arrives in blocks),
        // and only when holders report: an idle budget's status stays as it
        // is, so nothing is written while nothing happens.
        if batch.iter().any(|c| matches!(c, Command::Lease(..))) {
            let used = after.used.data_credits;
            burn.observe(now, used);
            after.forecast = match (spec.limits.data_credits, &after.period_end) {
                (Some(limit), Some(end)) => {
                    burn.forecast(now, used, (limit - used).max(0.0), end.0)
                }
                _ => None,
            };
        }
        let answers: Vec<Answer> = answers
            .into_iter()
            .map(|a| match a {
                Answer::Refreshed(pair) => Answer::Refreshed(Box::new((pair.0, after.clone()))),
                other => other,
            })
            .collect();
        if after == before {
            *breaker = Some(attempt_breaker);
            return Ok((answers, after));
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": budget.metadata.resource_version},
            "status": after,
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => {
                *breaker = Some(attempt_breaker);
                return Ok((answers, after));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(LedgerError::Unavailable(error.to_string())),
        }
    }
    Err(LedgerError::Unavailable(
        "too many concurrent writers to the budget's status".into(),
    ))
}
