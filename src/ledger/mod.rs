//! The credit ledger's wire protocol, the client data-plane processes use to
//! reach the operator's leader, and the lease they draw rows from.
//!
//! A data-plane process holds one lease per (budget, table): a block of
//! credits the leader recorded durably before granting. Rows draw on it in
//! memory; one request a second (or sooner, when the pool runs low) reports
//! what was spent, returns refunds, renews the lease and asks for more.

pub mod client;
pub mod lease;

use serde::{Deserialize, Serialize};

use crate::api::table::CreditCost;
use crate::contact::{Contact, MAX_DETAIL_BYTES, Peer};

/// The audience of the ServiceAccount tokens data-plane pods present to the
/// lease API: the API server refuses them, and the lease API refuses the
/// pods' ordinary API-server tokens.
pub const TOKEN_AUDIENCE: &str = "kiln.dev/ledger";
/// Where data-plane pods find that token (a projected volume the kubelet
/// rotates).
pub const TOKEN_DIR: &str = "/var/run/secrets/kiln.dev/ledger";

/// Longest id, holder, table or budget name the ledger accepts (a
/// Kubernetes object name's limit).
pub const MAX_NAME_BYTES: usize = 253;
/// Largest credit amount one request may carry, per meter: far above any
/// real table's block, far below where sums could overflow.
pub const MAX_AMOUNT: f64 = 1e9;
/// Largest Clay-call count one request may report.
pub const MAX_CALLS: u64 = 1_000_000_000;

/// Data credits are fractional (0.5 per email); they are compared as
/// integer thousandths so sums never drift.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Credits {
    pub milli: i64,
    pub actions: u64,
}

impl Credits {
    pub fn of(cost: &CreditCost) -> Self {
        // A non-finite or negative value (a hand-edited status) counts as 0;
        // `as` saturates, so a huge one cannot wrap.
        let milli = if cost.data_credits.is_finite() && cost.data_credits > 0.0 {
            (cost.data_credits * 1000.0).round() as i64
        } else {
            0
        };
        Self {
            milli,
            actions: cost.actions,
        }
    }

    pub fn cost(self) -> CreditCost {
        CreditCost {
            data_credits: self.milli as f64 / 1000.0,
            actions: self.actions,
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            milli: self.milli.saturating_add(other.milli),
            actions: self.actions.saturating_add(other.actions),
        }
    }

    /// self - other, floored at zero per meter.
    pub fn minus(self, other: Self) -> Self {
        Self {
            milli: self.milli.saturating_sub(other.milli).max(0),
            actions: self.actions.saturating_sub(other.actions),
        }
    }

    pub fn min(self, other: Self) -> Self {
        Self {
            milli: self.milli.min(other.milli),
            actions: self.actions.min(other.actions),
        }
    }

    pub fn max_each(self, other: Self) -> Self {
        Self {
            milli: self.milli.max(other.milli),
            actions: self.actions.max(other.actions),
        }
    }

    /// Every meter of self is at least other's.
    pub fn covers(self, other: Self) -> bool {
        self.milli >= other.milli && self.actions >= other.actions
    }

    pub fn is_zero(self) -> bool {
        self.milli == 0 && self.actions == 0
    }
}

/// Everything a holder tells the ledger about its lease, in one request.
/// Requests of one lease are numbered; the ledger applies each number once
/// and answers a repeated one with the answer it gave, so a retry after a
/// lost answer never grants or charges twice.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    /// Namespace of the budget and the table (they must match the caller's).
    pub namespace: String,
    pub budget: String,
    pub table: String,
    /// Who holds the lease (pod name), for troubleshooting.
    pub holder: String,
    /// Chosen by the holder, unique per process.
    pub lease: String,
    /// 1 for the request that creates the lease, then 2, 3, ...
    pub seq: u64,
    /// More credits wanted now (zero: none).
    #[serde(default)]
    pub ask: CreditCost,
    /// One row's worst case: a smaller grant is useless, so less is a denial.
    #[serde(default)]
    pub row_cost: CreditCost,
    /// Credits drawn for rows submitted since the last request: moved from
    /// the lease to `used`.
    #[serde(default)]
    pub spent: CreditCost,
    /// Undrawn credits handed back to the budget.
    #[serde(default)]
    pub give_back: CreditCost,
    /// Spent credits Clay did not charge (a result cost less than its row's
    /// worst case), for rows drawn in `refund_period`.
    #[serde(default)]
    pub refund: CreditCost,
    /// Charges beyond a row's worst case that Clay reported.
    #[serde(default)]
    pub extra: CreditCost,
    /// The period (its start, RFC 3339) the refund belongs to; a refund
    /// for an earlier period is dropped, never taken from the current one.
    #[serde(default)]
    pub refund_period: String,
    /// Clay calls that succeeded / failed since the last request (for the breaker).
    #[serde(default)]
    pub successes: u64,
    #[serde(default)]
    pub failures: u64,
    /// Callbacks whose reported cost was not believable (negative, not a
    /// number, or far above the row's worst case), settled at the worst case.
    #[serde(default)]
    pub implausible_costs: u64,
    /// Seconds the lease lives without another request.
    pub ttl_seconds: u64,
    /// The holder is done: what it still holds is forfeited as spent (a
    /// clean holder has given everything back first) and the lease is closed.
    #[serde(default)]
    pub release: bool,
    /// How the holder used its share of Clay's rate since the last request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateReport>,
    /// How long the rows whose results arrived since the last request took,
    /// from their attempt to their result.
    #[serde(default, skip_serializing_if = "ResultLatency::is_empty")]
    pub result_latency: ResultLatency,
    /// Whether Clay answered the holder's latest request, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clay_contact: Option<Contact>,
    /// Whether the row store (Redis) answered, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_contact: Option<Contact>,
    /// Whether the Kafka brokers answered, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_contact: Option<Contact>,
}

impl LeaseRequest {
    /// What the holder last saw of each service it depends on.
    pub fn contacts(&self) -> [(Peer, Option<&Contact>); 3] {
        [
            (Peer::Clay, self.clay_contact.as_ref()),
            (Peer::Store, self.store_contact.as_ref()),
            (Peer::Kafka, self.kafka_contact.as_ref()),
        ]
    }
}

/// Upper bounds (milliseconds) of the result-latency buckets; a last bucket
/// counts everything slower.
pub const RESULT_LATENCY_BOUNDS_MS: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];

/// Rows counted by how long their result took, in the buckets of
/// [`RESULT_LATENCY_BOUNDS_MS`] (one more for the slowest).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(transparent)]
pub struct ResultLatency(pub Vec<u64>);

impl ResultLatency {
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }

    /// Counts one row that took `took`.
    pub fn record(&mut self, took: std::time::Duration) {
        let millis = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let bucket = RESULT_LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| millis <= *bound)
            .unwrap_or(RESULT_LATENCY_BOUNDS_MS.len());
        self.add_to(bucket, 1);
    }

    /// Adds another count, bucket by bucket.
    pub fn merge(&mut self, other: &ResultLatency) {
        for (bucket, n) in other.0.iter().enumerate() {
            self.add_to(bucket, *n);
        }
    }

    fn add_to(&mut self, bucket: usize, n: u64) {
        if self.0.len() <= bucket {
            self.0.resize(bucket + 1, 0);
        }
        self.0[bucket] = self.0[bucket].saturating_add(n);
    }

    /// The bound (ms) of the bucket holding the `q` quantile (0 < q ≤ 1);
    /// None with no rows, or when it falls in the slowest, unbounded bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.0.iter().fold(0, |sum, n| sum.saturating_add(*n));
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (bucket, n) in self.0.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return RESULT_LATENCY_BOUNDS_MS.get(bucket).copied();
            }
        }
        None
    }
}

/// How long a share of Clay's rate is good without renewal. Past it the
/// holder sends at its fallback, and the leader counts no more than that
/// for it: a share of a holder that died is free again this soon.
pub const RATE_SHARE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest rate, in rows per second, a report may carry (the schema's
/// highest rateLimit is 10,000).
pub const MAX_RATE: f64 = 1e6;

/// A holder's use of its share of the Clay workspace's rate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateReport {
    /// Rows per second it would send now: its table's cap when rows had to
    /// wait for the rate, else what it sent plus headroom.
    pub wanted: f64,
    /// The share it applies now (rows per second), as last granted.
    pub held: f64,
    /// Rows it sent and 429s Clay answered since the last request.
    pub submitted: u64,
    pub throttled: u64,
    /// Seconds those counts cover.
    pub seconds: f64,
}

/// The share of the workspace's rate a holder may use until its lease
/// expires.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateShare {
    pub rows_per_second: f64,
    pub burst: f64,
    /// What every holder gets even when idle: a share at or below it
    /// strands nothing, so the holder need not report every second.
    pub idle_rows_per_second: f64,
    /// What to fall back to when the share is not renewed within
    /// [`RATE_SHARE_TTL`] (the leader is unreachable): a slice small enough
    /// for every holder the leader knew of, plus one.
    pub fallback_rows_per_second: f64,
}

/// Why a request is malformed; the reservation API answers 400.
pub fn validate(request: &LeaseRequest) -> Result<(), String> {
    for (field, value) in [
        ("namespace", &request.namespace),
        ("budget", &request.budget),
        ("table", &request.table),
        ("holder", &request.holder),
        ("lease", &request.lease),
    ] {
        if value.is_empty() || value.len() > MAX_NAME_BYTES {
            return Err(format!("{field} must be 1 to {MAX_NAME_BYTES} bytes"));
        }
    }
    if request.refund_period.len() > 64 {
        return Err("refundPeriod must be an RFC 3339 time".into());
    }
    if request.seq == 0 {
        return Err("seq starts at 1".into());
    }
    for (field, amount) in [
        ("ask", &request.ask),
        ("rowCost", &request.row_cost),
        ("spent", &request.spent),
        ("giveBack", &request.give_back),
        ("refund", &request.refund),
        ("extra", &request.extra),
    ] {
        if !amount.data_credits.is_finite()
            || amount.data_credits < 0.0
            || amount.data_credits > MAX_AMOUNT
            || amount.actions as f64 > MAX_AMOUNT
        {
            return Err(format!(
                "{field} must be finite, at least 0 and at most {MAX_AMOUNT} per meter"
            ));
        }
    }
    for (field, count) in [
        ("successes", request.successes),
        ("failures", request.failures),
        ("implausibleCosts", request.implausible_costs),
    ] {
        if count > MAX_CALLS {
            return Err(format!("{field} must be at most {MAX_CALLS}"));
        }
    }
    if request.result_latency.0.len() > RESULT_LATENCY_BOUNDS_MS.len() + 1
        || request.result_latency.0.iter().any(|n| *n > MAX_CALLS)
    {
        return Err(format!(
            "resultLatency has at most {} buckets of at most {MAX_CALLS}",
            RESULT_LATENCY_BOUNDS_MS.len() + 1
        ));
    }
    for (field, contact) in [
        ("clayContact", &request.clay_contact),
        ("storeContact", &request.store_contact),
        ("kafkaContact", &request.kafka_contact),
    ] {
        if let Some(Contact::Unreachable(detail)) = contact
            && detail.len() > MAX_DETAIL_BYTES
        {
            return Err(format!(
                "{field}.unreachable is at most {MAX_DETAIL_BYTES} bytes"
            ));
        }
    }
    if request.ttl_seconds == 0 || request.ttl_seconds > 3600 {
        return Err("ttlSeconds must be 1 to 3600".into());
    }
    if let Some(rate) = &request.rate {
        for (field, value) in [
            ("rate.wanted", rate.wanted),
            ("rate.held", rate.held),
            ("rate.seconds", rate.seconds),
        ] {
            if !value.is_finite() || !(0.0..=MAX_RATE).contains(&value) {
                return Err(format!("{field} must be finite, 0 to {MAX_RATE}"));
            }
        }
        if rate.submitted > MAX_CALLS || rate.throttled > MAX_CALLS {
            return Err(format!(
                "rate.submitted and rate.throttled must be at most {MAX_CALLS}"
            ));
        }
    }
    Ok(())
}

/// The ledger's answer, sent after the change was durably recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LeaseAnswer {
    pub lease: String,
    pub seq: u64,
    /// Credits added to the holder's pool by this request.
    pub granted: CreditCost,
    /// The part of the request's refund that was applied; the holder sends
    /// the rest again (a refund can arrive before the spend it refunds is
    /// reported by the process that drew it).
    #[serde(default)]
    pub refunded: CreditCost,
    /// What the lease holds now.
    pub held: CreditCost,
    /// RFC 3339.
    pub expires_at: String,
    /// Start of the budget's current period (RFC 3339): the tag for refunds.
    pub period: String,
    /// Set when `ask` was refused; everything else in the request was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial: Option<Denial>,
    /// The holder's share of Clay's rate (absent: keep the table's own limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateShare>,
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

impl DenialReason {
    /// Refusals that also stop drawing on credits already held: a paused
    /// budget or an open breaker means no row goes to Clay at all.
    pub fn stops_drawing(self) -> bool {
        matches!(self, Self::Paused | Self::BreakerOpen | Self::Invalid)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LeaseRequest {
        LeaseRequest {
            namespace: "sales".into(),
            budget: "team".into(),
            table: "leads".into(),
            holder: "pod".into(),
            lease: "pod-1".into(),
            seq: 1,
            ttl_seconds: 60,
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_request_passes() {
        assert_eq!(validate(&request()), Ok(()));
    }

    #[test]
    fn amounts_must_be_finite_non_negative_and_bounded() {
        for bad in [-8000.0, f64::NAN, f64::INFINITY, 1e300] {
            for field in 0..4 {
                let mut r = request();
                let cost = CreditCost {
                    data_credits: bad,
                    actions: 0,
                };
                match field {
                    0 => r.ask = cost,
                    1 => r.spent = cost,
                    2 => r.refund = cost,
                    _ => r.give_back = cost,
                }
                assert!(validate(&r).is_err(), "{bad} in field {field}");
            }
        }
        let mut r = request();
        r.spent.actions = u64::MAX;
        assert!(validate(&r).is_err());
        let mut r = request();
        r.failures = u64::MAX;
        assert!(validate(&r).is_err());
    }

    #[test]
    fn names_are_length_limited_and_seq_starts_at_one() {
        let mut r = request();
        r.lease = "x".repeat(30_000);
        assert!(validate(&r).unwrap_err().contains("lease"));
        let mut r = request();
        r.holder = String::new();
        assert!(validate(&r).is_err());
        let mut r = request();
        r.seq = 0;
        assert!(validate(&r).is_err());
    }

    #[test]
    fn result_latency_buckets_give_quantiles_and_are_bounded() {
        let mut latency = ResultLatency::default();
        assert_eq!(latency.quantile_ms(0.5), None);
        for ms in [40, 90, 90, 300, 4_000] {
            latency.record(std::time::Duration::from_millis(ms));
        }
        assert_eq!(latency.quantile_ms(0.5), Some(100));
        assert_eq!(latency.quantile_ms(0.95), Some(5_000));
        latency.record(std::time::Duration::from_secs(3_600));
        assert_eq!(latency.quantile_ms(1.0), None, "past the slowest bound");
        let mut r = request();
        r.result_latency = ResultLatency(vec![1; RESULT_LATENCY_BOUNDS_MS.len() + 2]);
        assert!(validate(&r).unwrap_err().contains("resultLatency"));
        let mut r = request();
        r.result_latency = ResultLatency(vec![u64::MAX]);
        assert!(validate(&r).is_err());
    }

    #[test]
    fn a_contact_detail_is_length_limited() {
        let mut r = request();
        r.clay_contact = Some(Contact::Unreachable("x".repeat(MAX_DETAIL_BYTES)));
        r.store_contact = r.clay_contact.clone();
        r.kafka_contact = r.clay_contact.clone();
        assert_eq!(validate(&r), Ok(()));
        r.clay_contact = Some(Contact::Unreachable("x".repeat(MAX_DETAIL_BYTES + 1)));
        assert!(validate(&r).unwrap_err().contains("clayContact"));
        r.clay_contact = None;
        r.kafka_contact = Some(Contact::Unreachable("x".repeat(MAX_DETAIL_BYTES + 1)));
        assert!(validate(&r).unwrap_err().contains("kafkaContact"));
        // Unknown shapes are refused when the body is parsed.
        let body = serde_json::json!({"namespace": "sales", "budget": "team", "table": "leads",
            "holder": "pod", "lease": "pod-1", "seq": 1, "ttlSeconds": 60,
            "clayContact": {"unreachable": 12}});
        assert!(serde_json::from_value::<LeaseRequest>(body).is_err());
    }
}
