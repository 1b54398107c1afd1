//! Results owed to the table's HTTP sink, handed over from the embedded
//! store's outbox; what is owed survives restarts.

use std::sync::Arc;

use super::{Direct, RECHECK};
use crate::dataplane::embedded::SinkFailure;
use crate::dataplane::sink::Delivery;

/// Owed sink deliveries worked on at once.
const OUTBOX_BATCH: usize = 32;
impl Direct {
    /// Hands owed results to the table's HTTP sink until `shutdown`; what is
    /// owed survives restarts in the store.
    pub async fn deliver_outbox(
        self: Arc<Self>,
        http: reqwest::Client,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let owed = match self.store.outbox(OUTBOX_BATCH).await {
                Ok(owed) => owed,
                Err(error) => {
                    tracing::warn!(%error, "reading the outbox failed");
                    Vec::new()
                }
            };
            if owed.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = self.store.waiters.outbox.notified() => {}
                    _ = tokio::time::sleep(RECHECK) => {}
                }
                continue;
            }
            let runtime = self.attempts.runtime();
            // Whole batches: a result is never in flight twice.
            futures::future::join_all(owed.into_iter().map(|outgoing| {
                let (http, runtime, store) = (&http, &runtime, &self.store);
                async move {
                    let no_claim = || async { Ok(()) };
                    let failure = match crate::dataplane::sink::deliver_http(
                        http,
                        runtime,
                        &outgoing.row_id,
                        &outgoing.result,
                        &outgoing.row,
                        no_claim,
                    )
                    .await
                    {
                        Delivery::Delivered => None,
                        Delivery::NoHttpSink => return,
                        Delivery::Failed { detail, attempts } => Some(SinkFailure {
                            reason: "SinkFailed".into(),
                            detail,
                            attempts,
                            row: outgoing.row.clone(),
                        }),
                    };
                    if let Err(error) = store.outbox_done(&outgoing.row_id, failure).await {
                        tracing::warn!(%error, row = %outgoing.row_id, "completing an owed delivery failed; it will be delivered again");
                    }
                }
            }))
            .await;
        }
    }
}
