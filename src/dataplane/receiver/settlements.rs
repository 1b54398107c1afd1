//! Settling delivered rows' credits. A callback's claim leaves an owed
//! settlement in the store; it is taken off the store (by one receiver,
//! however many see it) and then charged to this process's lease at the
//! reported cost instead of the worst case. Takes are batched: Clay's
//! callback is answered without waiting for one, and under load one store
//! call settles many rows. A settlement lost to a crash after its take
//! leaves the row charged at its worst case (never too little).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Receiver;
use crate::dataplane::rows::OwedSettlement;

/// Most settlements taken off the store in one call.
const MOST_PER_TAKE: usize = 256;

/// A row this receiver delivered, with its result's latency.
pub(super) struct Delivered {
    pub owed: OwedSettlement,
    pub took: Option<Duration>,
}

impl Receiver {
    /// Queues a delivered row's settlement. Should the queue be gone (the
    /// receiver is stopping), the settlement stays owed in the store, and
    /// the final sweep or another receiver settles it.
    pub(super) fn settle_later(&self, delivered: Delivered) {
        let _ = self.settling.send(delivered);
    }

    /// Settles queued deliveries, as many per store call as are waiting,
    /// until `stop`; then what is still queued.
    pub(super) async fn settle_queued(
        self: Arc<Self>,
        mut queue: mpsc::UnboundedReceiver<Delivered>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let first = tokio::select! {
                biased;
                first = queue.recv() => first,
                _ = &mut stop => None,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MOST_PER_TAKE {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.settle(&batch).await;
        }
        queue.close();
        let mut rest = Vec::new();
        while let Ok(next) = queue.try_recv() {
            rest.push(next);
        }
        self.settle_all(&rest).await;
    }

    /// Finishes settlements left by receivers that died between delivering
    /// a row and settling it.
    pub(super) async fn settle_owed(&self) {
        match self.rows.owed_settlements().await {
            Ok(owed) => {
                let owed: Vec<Delivered> = owed
                    .into_iter()
                    .map(|owed| Delivered { owed, took: None })
                    .collect();
                self.settle_all(&owed).await;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "reading owed settlements failed")
            }
        }
    }

    /// Settles `deliveries`, [`MOST_PER_TAKE`] per store call.
    async fn settle_all(&self, deliveries: &[Delivered]) {
        for batch in deliveries.chunks(MOST_PER_TAKE) {
            self.settle(batch).await;
        }
    }

    /// Takes the batch's owed settlements off the store and charges the
    /// ones this receiver took.
    async fn settle(&self, batch: &[Delivered]) {
        let ids: Vec<&str> = batch.iter().map(|d| d.owed.row_id.as_str()).collect();
        match self.rows.take_owed(&ids).await {
            Ok(taken) => {
                for (delivered, taken) in batch.iter().zip(taken) {
                    if taken {
                        let owed = &delivered.owed;
                        self.lease.settle_row(
                            &owed.pending.reserved(),
                            &owed.pending.period,
                            owed.reported,
                            delivered.took,
                        );
                    }
                }
            }
            Err(error) => tracing::warn!(
                error = %format!("{error:#}"),
                rows = batch.len(),
                "taking owed settlements failed; the sweep retries them"
            ),
        }
    }
}
