//! The CreditBudget controller: period bounds, rollover, remaining credits
//! and state in status.

pub mod book;
pub mod breaker;
pub mod forecast;
pub mod lease_api;
pub mod ledger;
pub mod period;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;

use super::cache::{cached, without_annotations};
use super::context::{Context, error_policy, instrumented};
use super::error::{Error, Result};
use crate::api::CreditBudget;
use crate::api::common::{TRUE, find_condition};

const CONTROLLER: &str = "creditbudget";
/// Budgets reconciled at once.
const CONCURRENCY: u16 = 8;
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (budgets, budget_events) = cached(
        ctx.watched::<CreditBudget>(),
        watcher::Config::default(),
        without_annotations,
    );
    Controller::for_stream(budget_events, budgets)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "creditbudget reconcile loop");
            }
        })
        .await;
}

async fn reconcile(budget: Arc<CreditBudget>, ctx: Arc<Context>) -> Result<Action> {
    instrumented(&ctx, CONTROLLER, &*budget, reconcile_inner(&budget, &ctx)).await
}

async fn reconcile_inner(budget: &CreditBudget, ctx: &Context) -> Result<Action> {
    let namespace = budget
        .namespace()
        .ok_or_else(|| Error::NotNamespaced(budget.name_any()))?;
    // The ledger is the single writer of budget status: it recomputes the
    // period, rollover and state together with any pending bookkeeping.
    let (old, new_status) = ctx.ledger.refresh(&namespace, &budget.name_any()).await?;
    for type_ in [status::WARNING, status::EXHAUSTED] {
        let was = find_condition(&old.conditions, type_).is_some_and(|c| c.status == TRUE);
        if let Some(now_true) =
            find_condition(&new_status.conditions, type_).filter(|c| c.status == TRUE && !was)
        {
            ctx.event(
                budget,
                EventType::Warning,
                &now_true.reason,
                "Account",
                now_true.message.clone(),
            )
            .await;
        }
    }
    let invalid = |s: &crate::api::CreditBudgetStatus| {
        find_condition(&s.conditions, status::READY)
            .filter(|c| c.reason == "InvalidTimeZone")
            .cloned()
    };
    if let (Some(ready), None) = (invalid(&new_status), invalid(&old)) {
        ctx.event(
            budget,
            EventType::Warning,
            "InvalidTimeZone",
            "Validate",
            ready.message,
        )
        .await;
    }
    if old.breaker.state != new_status.breaker.state {
        let reason = new_status.breaker.reason.clone().unwrap_or_default();
        ctx.event(
            budget,
            EventType::Warning,
            &format!("Breaker{:?}", new_status.breaker.state),
            "Account",
            reason,
        )
        .await;
    }
    if let Some((period, message)) = status::forecast_warning(&new_status) {
        let key = format!("{namespace}/{}", budget.name_any());
        let first = ctx
            .forecasts_announced
            .lock()
            .unwrap()
            .insert(key, period.clone())
            .is_none_or(|announced| announced != period);
        if first {
            ctx.event(
                budget,
                EventType::Warning,
                "ExhaustionForecast",
                "Forecast",
                message,
            )
            .await;
        }
    }
    // Wake up at the period boundary so rollover is prompt.
    let now = ctx.ledger.now();
    let until_end = new_status
        .period_end
        .as_ref()
        .and_then(|end| Duration::try_from(end.0.duration_since(now)).ok())
        .unwrap_or(RESYNC);
    Ok(Action::requeue(
        until_end.clamp(Duration::from_secs(1), RESYNC),
    ))
}
