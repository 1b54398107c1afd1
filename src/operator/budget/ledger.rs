//! The ledger: one task per CreditBudget (on the leader) that applies
//! reservations, settlements and renewals in small batches and records them
//! durably in the budget's status before anyone is answered. Every write is
//! a compare-and-swap on resourceVersion, so a stale writer (a deposed
//! leader, a concurrent batch) can never overwrite newer bookkeeping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::{mpsc, oneshot};

use super::book::{self, BookError};
use super::breaker::Breaker;
use super::status;
use crate::api::budget::BreakerStatus;
use crate::api::{CreditBudget, CreditBudgetStatus};
use crate::ledger::{Denial, Grant, RenewRequest, ReserveRequest, SettleRequest};
use crate::operator::labels::FIELD_MANAGER;

/// Least time between two batch writes: bounds the ledger's writes to a few
/// per second per budget under any load. A request arriving after a quiet
/// spell is written at once (group commit), so an idle ledger adds one
/// write's latency, not a window.
const BATCH_WINDOW: Duration = Duration::from_millis(200);
/// Largest batch.
const BATCH_MAX: usize = 1000;
/// How often an idle book looks for expired reservations and breaker cooldowns.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
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
    Reserve(ReserveRequest, oneshot::Sender<Result<Grant, LedgerError>>),
    Settle(SettleRequest, oneshot::Sender<Result<(), LedgerError>>),
    Renew(RenewRequest, oneshot::Sender<Result<(), LedgerError>>),
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

    pub async fn reserve(&self, request: ReserveRequest) -> Result<Grant, LedgerError> {
        let (namespace, budget) = (request.namespace.clone(), request.budget.clone());
        self.call(&namespace, &budget, |reply| {
            Command::Reserve(request, reply)
        })
        .await
    }

    pub async fn settle(&self, request: SettleRequest) -> Result<(), LedgerError> {
        let (namespace, budget) = (request.namespace.clone(), request.budget.clone());
        self.call(&namespace, &budget, |reply| Command::Settle(request, reply))
            .await
    }

    pub async fn renew(&self, request: RenewRequest) -> Result<(), LedgerError> {
        let (namespace, budget) = (request.namespace.clone(), request.budget.clone());
        self.call(&namespace, &budget, |reply| Command::Renew(request, reply))
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
    Grant(Result<Grant, LedgerError>),
    Done(Result<(), LedgerError>),
    Refreshed(Box<(CreditBudgetStatus, CreditBudgetStatus)>),
}

fn mismatched() -> LedgerError {
    LedgerError::Unavailable("internal: answer does not match the request".into())
}

impl Answer {
    fn into_grant(self) -> Result<Grant, LedgerError> {
        match self {
            Answer::Grant(result) => result,
            _ => Err(mismatched()),
        }
    }
    fn into_done(self) -> Result<(), LedgerError> {
        match self {
            Answer::Done(result) => result,
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
    let mut last_write: Option<tokio::time::Instant> = None;
    loop {
        let first = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => Some(command),
                None => return,
            },
            _ = tokio::time::sleep(SWEEP_EVERY) => None,
        };
        let mut batch: Vec<Command> = first.into_iter().collect();
        if !batch.is_empty() {
            // Gathers until a window after the previous write; when that has
            // passed, takes only what is already queued.
            let now = tokio::time::Instant::now();
            let deadline = last_write.map_or(now, |at| (at + BATCH_WINDOW).max(now));
            while batch.len() < BATCH_MAX {
                match tokio::time::timeout_at(deadline, commands.recv()).await {
                    Ok(Some(command)) => batch.push(command),
                    _ => break,
                }
            }
            last_write = Some(tokio::time::Instant::now());
        }
        // Reservation ids and replies are fixed before the write loop, so a
        // retried batch grants the same ids.
        let (outcome, status) = apply_batch(&api, &name, &clock, &mut breaker, &batch).await;
        if let (Some(metrics), Some(status)) = (&metrics, &status) {
            metrics.observe_budget(&namespace, &name, status);
        }
        for (command, answer) in batch.into_iter().zip(outcome) {
            send(command, answer);
        }
    }
}

fn send(command: Command, answer: Result<Answer, LedgerError>) {
    // A caller that gave up waiting is not an error for the ledger.
    match command {
        Command::Reserve(_, reply) => drop(reply.send(answer.and_then(Answer::into_grant))),
        Command::Settle(_, reply) | Command::Renew(_, reply) => {
            drop(reply.send(answer.and_then(Answer::into_done)))
        }
        Command::Refresh(reply) => drop(reply.send(answer.and_then(Answer::into_refreshed))),
    }
}

/// Applies a batch to a fresh copy of the budget and writes it with a
/// resourceVersion precondition, retrying on conflicts. Returns one answer
/// per command, or an error for all when the write could not be made.
async fn apply_batch(
    api: &Api<CreditBudget>,
    name: &str,
    clock: &Clock,
    breaker: &mut Option<Breaker>,
    batch: &[Command],
) -> (Vec<Result<Answer, LedgerError>>, Option<CreditBudgetStatus>) {
    let fail_all =
        |error: LedgerError| batch.iter().map(|_| Err(error.clone())).collect::<Vec<_>>();
    for _ in 0..CAS_ATTEMPTS {
        let budget = match api.get_opt(name).await {
            Ok(Some(budget)) => budget,
            Ok(None) => {
                return (
                    fail_all(LedgerError::BudgetNotFound(name.to_string())),
                    None,
                );
            }
            Err(error) => return (fail_all(LedgerError::Unavailable(error.to_string())), None),
        };
        let now = clock();
        let before = budget.status.clone().unwrap_or_default();
        let mut working = budget.clone();
        // Period rollover first, then forfeits, then the batch.
        let mut status = status::compute(&working, now);
        let forfeited = book::expire(&mut status, now);
        for reservation in &forfeited {
            tracing::warn!(budget = name, reservation = %reservation.id, table = %reservation.table, holder = %reservation.holder,
                "reservation expired without settlement; its remainder is counted as spent");
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
        let answers: Vec<Result<Answer, LedgerError>> = batch
            .iter()
            .map(|command| {
                Ok(match command {
                    Command::Reserve(request, _) => {
                        let allows = attempt_breaker.allows(&spec.circuit_breaker, now);
                        let ttl =
                            SignedDuration::from_secs(request.ttl_seconds.clamp(1, 3600) as i64);
                        Answer::Grant(
                            book::reserve(
                                spec,
                                &mut status,
                                request.id.clone(),
                                &request.table,
                                &request.holder,
                                &request.ask,
                                &request.min,
                                ttl,
                                allows,
                                now,
                            )
                            .map(|r| Grant {
                                id: r.id,
                                granted: r.granted,
                                expires_at: r.expires_at.0.to_string(),
                            })
                            .map_err(LedgerError::Denied),
                        )
                    }
                    Command::Settle(request, _) => {
                        attempt_breaker.record(
                            &spec.circuit_breaker,
                            request.successes,
                            request.failures,
                            now,
                        );
                        Answer::Done(
                            book::settle(
                                &mut status,
                                &request.reservation,
                                &request.table,
                                request.seq,
                                &request.used,
                                request.release,
                            )
                            .map_err(LedgerError::from),
                        )
                    }
                    Command::Renew(request, _) => {
                        let ttl =
                            SignedDuration::from_secs(request.ttl_seconds.clamp(1, 3600) as i64);
                        Answer::Done(
                            book::renew(
                                &mut status,
                                &request.reservation,
                                &request.table,
                                ttl,
                                now,
                            )
                            .map_err(LedgerError::from),
                        )
                    }
                    Command::Refresh(_) => {
                        Answer::Refreshed(Box::new((before.clone(), CreditBudgetStatus::default())))
                    }
                })
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
        let after = status::compute(&working, now);
        let answers: Vec<Result<Answer, LedgerError>> = answers
            .into_iter()
            .map(|a| match a {
                Ok(Answer::Refreshed(pair)) => {
                    Ok(Answer::Refreshed(Box::new((pair.0, after.clone()))))
                }
                other => other,
            })
            .collect();
        if after == before {
            *breaker = Some(attempt_breaker);
            return (answers, Some(after));
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
                return (answers, Some(after));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return (fail_all(LedgerError::Unavailable(error.to_string())), None),
        }
    }
    let contended =
        LedgerError::Unavailable("too many concurrent writers to the budget's status".into());
    (fail_all(contended), None)
}
