//! The CreditBudget controller: period bounds, rollover, remaining credits
//! and state in status.

pub mod book;
pub mod breaker;
pub mod period;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;

use super::apply::patch_status;
use super::context::{Context, error_policy, instrumented};
use super::error::{Error, Result};
use crate::api::CreditBudget;
use crate::api::common::{TRUE, find_condition};

const CONTROLLER: &str = "creditbudget";
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let budgets = ctx.watched::<CreditBudget>();
    Controller::new(budgets, watcher::Config::default())
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
    let now = jiff::Timestamp::now();
    let new_status = status::compute(budget, now);
    if budget.status.as_ref() != Some(&new_status) {
        let api = Api::<CreditBudget>::namespaced(ctx.client.clone(), &namespace);
        patch_status(&api, &budget.name_any(), &new_status).await?;
        let old = budget.status.clone().unwrap_or_default();
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
        if let Some(ready) = find_condition(&new_status.conditions, status::READY)
            .filter(|c| c.reason == "InvalidTimeZone")
        {
            let was_invalid = find_condition(&old.conditions, status::READY)
                .is_some_and(|c| c.reason == "InvalidTimeZone");
            if !was_invalid {
                ctx.event(
                    budget,
                    EventType::Warning,
                    "InvalidTimeZone",
                    "Validate",
                    ready.message.clone(),
                )
                .await;
            }
        }
    }
    // Wake up at the period boundary so rollover is prompt.
    let until_end = new_status
        .period_end
        .as_ref()
        .and_then(|end| Duration::try_from(end.0.duration_since(now)).ok())
        .unwrap_or(RESYNC);
    Ok(Action::requeue(
        until_end.clamp(Duration::from_secs(1), RESYNC),
    ))
}
