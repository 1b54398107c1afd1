//! The credit ledger's wire protocol and the client workers, receivers and
//! refresh jobs use to reserve and settle credits with the operator's leader.

pub mod client;

use serde::{Deserialize, Serialize};

use crate::api::table::CreditCost;

/// Ask for credits before submitting rows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReserveRequest {
    /// Chosen by the caller; repeating a request with the same id returns the
    /// same grant, so a retry after a lost answer never reserves twice.
    pub id: String,
    /// Namespace of the budget and the table (they must match the caller's).
    pub namespace: String,
    pub budget: String,
    pub table: String,
    /// Who holds the reservation (pod name), for troubleshooting.
    pub holder: String,
    /// Credits wanted (a block for several rows).
    pub ask: CreditCost,
    /// Smallest useful grant (one row's worst case); less is a denial.
    pub min: CreditCost,
    /// Seconds the reservation lives without renewal.
    pub ttl_seconds: u64,
}

/// Credits granted, durably recorded before this answer was sent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub id: String,
    pub granted: CreditCost,
    /// RFC 3339.
    pub expires_at: String,
}

/// Report actual spend against a reservation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SettleRequest {
    pub namespace: String,
    pub budget: String,
    pub table: String,
    pub reservation: String,
    /// 1 for the first settlement of this reservation, then 2, 3, ...;
    /// a settlement already applied is acknowledged without applying it again.
    pub seq: u64,
    /// Spend since the last settlement of this reservation.
    pub used: CreditCost,
    /// True when the holder is done: the unspent remainder is released.
    #[serde(default)]
    pub release: bool,
    /// Clay calls that succeeded / failed since the last report (for the breaker).
    #[serde(default)]
    pub successes: u64,
    #[serde(default)]
    pub failures: u64,
}

/// Keep a reservation alive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    pub namespace: String,
    pub budget: String,
    pub table: String,
    pub reservation: String,
    pub ttl_seconds: u64,
}

/// Why credits were refused; each maps to the table's onExhausted behaviour.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum DenialReason {
    /// The period's limit is reached.
    Exhausted,
    /// The budget is paused by hand.
    Paused,
    /// Clay keeps failing: the circuit breaker is open.
    BreakerOpen,
    /// The budget's spec cannot be acted on (e.g. an unknown time zone).
    Invalid,
}

/// The body of a refusal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Denial {
    pub reason: DenialReason,
    pub message: String,
    /// What the budget wants tables to do while refused.
    #[serde(default)]
    pub on_exhausted: crate::api::budget::OnExhausted,
}
