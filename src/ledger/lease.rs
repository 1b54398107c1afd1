//! The holder's side of a credit lease: rows draw their worst case from an
//! in-memory pool with no network round trip; one background task reports
//! spend, refunds and Clay outcomes, renews the lease and tops the pool up
//! before it runs dry, sized from recent spend.
//!
//! Safety does not depend on this process staying alive: everything drawn
//! came from credits the ledger recorded as held by this lease, and a lease
//! that stops being renewed is forfeited as spent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::client::{LedgerClient, LedgerClientError};
use super::{
    Credits, Denial, LeaseAnswer, LeaseRequest, RATE_SHARE_TTL, RateReport, RateShare,
    ResultLatency,
};
use crate::api::table::{CreditCost, RateLimit};
use crate::clay::limiter::{Rate, RateLimiter, Share};
use crate::contact::{self, Peer};

/// Lease life without renewal: how long a killed holder's credits stay held
/// before they are forfeited.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// Spend and outcomes are reported at least this often while there are any.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A process holding more than an idle share of Clay's rate, or whose rows
/// wait for rate, reports this often: a share moves from a process that no
/// longer needs it to one that does within a few of these.
const RATE_REPORT_EVERY: Duration = Duration::from_millis(250);
/// The pool aims to cover this much of the recent draw rate.
const POOL_COVERS: f64 = 5.0;
/// ... and at least this many rows while rows are being drawn.
const POOL_MIN_ROWS: i64 = 4;
/// Undrawn credits are given back after this long without a draw.
const IDLE_GIVE_BACK: Duration = Duration::from_secs(30);
/// After a refusal the ledger is asked again no sooner than this (room
/// opens when refunds arrive or the limit is raised).
const ASK_AGAIN_AFTER_REFUSAL: Duration = Duration::from_millis(500);
/// Longest a refund is sent again while the ledger cannot apply it: past a
/// killed holder's lease forfeiture, which makes room for it.
const REFUND_CARRY: Duration = Duration::from_secs(150);
/// How long a draw waits for credits before calling the ledger unavailable.
const DRAW_PATIENCE: Duration = Duration::from_secs(30);
/// A holder that did not wait for rate asks for this much more than it sent.
const RATE_HEADROOM: f64 = 1.25;
/// How far back a holder looks to tell the rate it sends at. Rows come in
/// clumps (callers in lockstep, batches): a share sized from one 250 ms
/// report window alone would swing with them and make the next clump wait.
const SENDING_WINDOW: Duration = Duration::from_secs(2);

/// Which budget and table a lease is for, and who holds it.
#[derive(Clone, Debug)]
pub struct LeaseTarget {
    pub namespace: String,
    pub budget: String,
    pub table: String,
    pub holder: String,
}

/// Credits drawn for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    pub cost: CreditCost,
    /// The budget period the credits were counted in (tag for refunds).
    pub period: String,
    generation: u64,
}

#[derive(Default)]
struct State {
    lease: String,
    generation: u64,
    next_seq: u64,
    row_cost: Credits,
    free: Credits,
    unreported: Credits,
    /// Refunds by period.
    refunds: BTreeMap<String, Credits>,
    extra: Credits,
    successes: u64,
    failures: u64,
    implausible: u64,
    result_latency: ResultLatency,
    /// Credits wanted by draws that are waiting.
    waiting: Credits,
    period: String,
    /// Paused, breaker open: nothing may be drawn.
    blocked: Option<Denial>,
    /// The last refusal of an ask, and when.
    refused: Option<(Denial, Instant)>,
    /// Why the ledger cannot be used, when it refused the request itself.
    broken: Option<String>,
    expires: Option<Instant>,
    drawn_total: i64,
    last_draw: Option<Instant>,
    /// Draw rate in milli-credits per second (moving average).
    rate: f64,
    /// How long a refund the ledger could not apply yet is sent again.
    carry_until: Option<Instant>,
    /// The request sent and not acknowledged: resent unchanged until it is.
    in_flight: Option<LeaseRequest>,
    last_sent: Option<Instant>,
    closing: bool,
    /// The share of Clay's rate last granted, and since when usage is counted.
    share: Option<RateShare>,
    usage_since: Option<Instant>,
    /// Rows sent per report window, by the window's start, for the last
    /// [`SENDING_WINDOW`].
    sent_recently: std::collections::VecDeque<(Instant, u64)>,
}

/// A lease on one budget for one table, shared by a process's tasks.
pub struct CreditLease {
    target: LeaseTarget,
    client: LedgerClient,
    state: Mutex<State>,
    wake: Notify,
    answered: watch::Sender<u64>,
    /// Set once the process submits rows to Clay: its share of the rate.
    limiter: OnceLock<Arc<RateLimiter>>,
}

impl CreditLease {
    /// Starts the lease and its reporting task (stopped by [`Self::close`]).
    pub fn start(target: LeaseTarget, row_cost: &CreditCost, client: LedgerClient) -> Arc<Self> {
        let lease = Arc::new(Self {
            state: Mutex::new(State {
                lease: new_lease_id(),
                next_seq: 1,
                row_cost: Credits::of(row_cost),
                ..Default::default()
            }),
            target,
            client,
            wake: Notify::new(),
            answered: watch::channel(0).0,
            limiter: OnceLock::new(),
        });
        tokio::spawn(lease.clone().run());
        lease
    }

    /// The limiter a process that submits rows to Clay sends through: the
    /// table's `clay.rateLimit` (`cap`), narrowed to the share of the
    /// workspace's rate this lease carries once the leader granted one.
    pub fn rate_limiter(&self, cap: &RateLimit) -> Arc<RateLimiter> {
        self.limiter
            .get_or_init(|| Arc::new(RateLimiter::new(cap.rows_per_second, cap.burst)))
            .clone()
    }

    /// Asks for a pool of a few rows now, so the first rows of a process that
    /// answers callers (the Direct tier) do not wait for the ledger; given
    /// back after a quiet spell like any pool.
    pub fn prefill(&self) {
        self.state.lock().unwrap().last_draw = Some(Instant::now());
        self.wake.notify_one();
    }

    /// Draws `cost` (one row's worst case, which also sizes the pool and the
    /// smallest useful grant, so a creditsPerRow edit takes effect here) for
    /// one row: at once from the pool, else after the ledger tops it up.
    /// Refused when the budget refuses.
    pub async fn draw(&self, cost: &CreditCost) -> Result<Draw, LedgerClientError> {
        let want = Credits::of(cost);
        let mut answers = self.answered.subscribe();
        let deadline = tokio::time::Instant::now() + DRAW_PATIENCE;
        let mut asked_at: Option<Instant> = None;
        let result = loop {
            {
                let mut state = self.state.lock().unwrap();
                state.row_cost = want;
                let first_unreported = state.unreported.is_zero();
                if let Some(result) = try_draw(&mut state, want, cost, asked_at) {
                    // The task schedules a report for the first spend since
                    // the last one, and tops up a pool running low.
                    if result.is_ok() && (first_unreported || state.pool_low()) {
                        self.wake.notify_one();
                    }
                    break result;
                }
                if asked_at.is_none() {
                    state.waiting = state.waiting.plus(want);
                    asked_at = Some(Instant::now());
                }
            }
            self.wake.notify_one();
            let waited = tokio::time::timeout_at(deadline, answers.changed()).await;
            if !matches!(waited, Ok(Ok(()))) {
                break Err(LedgerClientError::Unavailable(
                    "no credits from the ledger in time".into(),
                ));
            }
        };
        if asked_at.is_some() {
            let mut state = self.state.lock().unwrap();
            state.waiting = state.waiting.minus(want);
        }
        result
    }

    /// Returns a draw whose row never reached Clay.
    pub fn undo(&self, draw: &Draw) {
        let cost = Credits::of(&draw.cost);
        let mut state = self.state.lock().unwrap();
        if draw.generation == state.generation && state.unreported.covers(cost) {
            state.unreported = state.unreported.minus(cost);
            state.free = state.free.plus(cost);
        } else {
            // Already reported as spent (or forfeited with a lost lease).
            add_refund(&mut state, &draw.period, cost);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Credits spent on a row that Clay did not charge after all.
    pub fn refund(&self, cost: &CreditCost, period: &str) {
        add_refund(&mut self.state.lock().unwrap(), period, Credits::of(cost));
        self.wake.notify_one();
    }

    /// A row's result arrived (`took` after its attempt, when known):
    /// charges its reported cost instead of its worst case when the cost is
    /// believable.
    pub fn settle_row(
        &self,
        reserved: &CreditCost,
        period: &str,
        reported: Option<f64>,
        took: Option<std::time::Duration>,
    ) {
        let worst = Credits::of(reserved);
        self.wake.notify_one();
        let mut state = self.state.lock().unwrap();
        state.successes = state.successes.saturating_add(1);
        if let Some(took) = took {
            state.result_latency.record(took);
        }
        let Some(reported) = reported else { return };
        let plausible_max = (reserved.data_credits * 100.0).max(100.0);
        if !reported.is_finite() || reported < 0.0 || reported > plausible_max {
            state.implausible = state.implausible.saturating_add(1);
            return;
        }
        let actual = Credits {
            milli: (reported * 1000.0).round() as i64,
            actions: worst.actions,
        };
        if worst.covers(actual) {
            add_refund(&mut state, period, worst.minus(actual));
        } else {
            state.extra = state.extra.plus(actual.minus(worst));
        }
    }

    /// A Clay call failed (a refused submission, or a result that never came).
    pub fn record_failure(&self) {
        let mut state = self.state.lock().unwrap();
        state.failures = state.failures.saturating_add(1);
        drop(state);
        self.wake.notify_one();
    }

    /// Reports everything, gives back the pool and closes the lease.
    pub async fn close(&self) {
        self.state.lock().unwrap().closing = true;
        self.wake.notify_one();
        let mut answers = self.answered.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while !self.state.lock().unwrap().lease.is_empty() {
                if answers.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    async fn run(self: Arc<Self>) {
        let mut last_tick = Instant::now();
        let mut drawn_at_tick = 0i64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let due = self.next_due();
            let recheck = Instant::now() + RATE_REPORT_EVERY;
            if due > Instant::now() {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = tokio::time::sleep_until(due.min(recheck).into()) => {}
                }
                // Woken only to look again (rows may be waiting for rate).
                if due > recheck {
                    continue;
                }
            }
            {
                let mut state = self.state.lock().unwrap();
                let elapsed = last_tick.elapsed().as_secs_f64();
                if elapsed >= 0.2 {
                    let delta = (state.drawn_total - drawn_at_tick) as f64 / elapsed;
                    state.rate = 0.5 * state.rate + 0.5 * delta;
                    drawn_at_tick = state.drawn_total;
                    last_tick = Instant::now();
                }
            }
            let Some(request) = self.next_request() else {
                continue;
            };
            let closing = request.release;
            match self.client.lease(&request).await {
                Ok(answer) => {
                    tracing::debug!(lease = %request.lease, seq = request.seq, ask = request.ask.data_credits,
                        spent = request.spent.data_credits, refund = request.refund.data_credits,
                        granted = answer.granted.data_credits, denial = ?answer.denial.as_ref().map(|d| d.reason),
                        "lease request applied");
                    backoff = Duration::from_millis(100);
                    self.apply(answer, closing);
                    if closing {
                        return;
                    }
                }
                Err(LedgerClientError::Rejected {
                    status: 409,
                    message,
                }) => {
                    tracing::warn!(lease = %request.lease, %message, "lease lost; starting a new one (what it held was counted as spent)");
                    self.restart();
                    if closing {
                        self.finish_close();
                        return;
                    }
                }
                Err(error) => {
                    let broken = matches!(error, LedgerClientError::Rejected { .. });
                    tracing::warn!(%error, lease = %request.lease, "lease request failed; retrying");
                    self.state.lock().unwrap().broken = broken.then(|| error.to_string());
                    self.answered.send_modify(|n| *n += 1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// When the next request is due (now or earlier: send at once). An
    /// absolute time, so the wake-ups of busy draws cannot postpone it.
    fn next_due(&self) -> Instant {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        if state.in_flight.is_some() || state.closing {
            return now;
        }
        let after_last = |every: Duration| state.last_sent.map_or(now, |at| at + every);
        // Refused or blocked: ask again once a second, not in a loop.
        if state.blocked.is_some() {
            return after_last(REPORT_EVERY);
        }
        if let Some((_, at)) = &state.refused
            && at.elapsed() < ASK_AGAIN_AFTER_REFUSAL
        {
            return *at + ASK_AGAIN_AFTER_REFUSAL;
        }
        if !state.waiting.is_zero() || state.pool_low() {
            return now;
        }
        let reporting = !state.unreported.is_zero()
            || state.refunds.values().any(|r| !r.is_zero())
            || !state.extra.is_zero()
            || state.successes > 0
            || state.failures > 0
            || state.implausible > 0;
        if state.holds_rate() || self.wants_more_rate(&state) {
            return after_last(RATE_REPORT_EVERY);
        }
        if reporting {
            return after_last(REPORT_EVERY);
        }
        if state.idle() && !state.free.is_zero() {
            return now;
        }
        let due = match state.expires {
            // Renew halfway through the lease's life.
            Some(expires) => expires - LEASE_TTL / 2,
            // Nothing held and nothing to say: a change wakes the task.
            None => now + Duration::from_secs(3600),
        };
        // News of Clay, the store or Kafka travels with the next request.
        contact::next_report().map_or(due, |report| due.min(report.max(now)))
    }

    /// The request to send now: the unacknowledged one again, or a new one
    /// carrying everything accumulated since.
    fn next_request(&self) -> Option<LeaseRequest> {
        let mut state = self.state.lock().unwrap();
        if let Some(request) = &state.in_flight {
            return Some(request.clone());
        }
        if state.lease.is_empty() {
            return None;
        }
        let stopped = state.blocked.is_some() || state.closing;
        let ask = if stopped || !state.pool_low() && state.waiting.is_zero() {
            Credits::default()
        } else {
            state.target_pool().plus(state.waiting).minus(state.free)
        };
        // Paused, breaker open, idle or closing: hand the pool back.
        let give_back = if stopped || (state.idle() && state.waiting.is_zero()) {
            std::mem::take(&mut state.free)
        } else {
            Credits::default()
        };
        let period = state.period.clone();
        let refund = state.refunds.remove(&period).unwrap_or_default();
        // Refunds of other periods can never apply: an older period is over,
        // and a newer one is learned before anything is drawn in it.
        state.refunds.retain(|p, _| *p > period);
        let request = LeaseRequest {
            namespace: self.target.namespace.clone(),
            budget: self.target.budget.clone(),
            table: self.target.table.clone(),
            holder: self.target.holder.clone(),
            lease: state.lease.clone(),
            seq: state.next_seq,
            ask: ask.cost(),
            row_cost: state.row_cost.cost(),
            spent: std::mem::take(&mut state.unreported).cost(),
            give_back: give_back.cost(),
            refund: refund.cost(),
            extra: std::mem::take(&mut state.extra).cost(),
            refund_period: period,
            successes: std::mem::take(&mut state.successes),
            failures: std::mem::take(&mut state.failures),
            implausible_costs: std::mem::take(&mut state.implausible),
            ttl_seconds: LEASE_TTL.as_secs(),
            release: state.closing,
            rate: self.rate_report(&mut state),
            result_latency: std::mem::take(&mut state.result_latency),
            clay_contact: contact::take(Peer::Clay),
            store_contact: contact::take(Peer::Store),
            kafka_contact: contact::take(Peer::Kafka),
        };
        state.next_seq += 1;
        state.in_flight = Some(request.clone());
        state.last_sent = Some(Instant::now());
        Some(request)
    }

    /// Rows waited for rate within the last report interval while the
    /// share is below the table's cap: the leader should hear of it.
    fn wants_more_rate(&self, state: &State) -> bool {
        let Some(limiter) = self.limiter.get() else {
            return false;
        };
        let share = state.share.as_ref().map_or(0.0, |s| s.rows_per_second);
        share < limiter.cap().per_second && limiter.waited_within(REPORT_EVERY)
    }

    /// The limiter's use since the last request (None: the process does not
    /// submit rows, so it needs no share).
    fn rate_report(&self, state: &mut State) -> Option<RateReport> {
        let limiter = self.limiter.get()?;
        let usage = limiter.take_usage();
        let now = Instant::now();
        let since = state.usage_since.replace(now);
        let seconds = since.map_or(0.0, |since| now.duration_since(since).as_secs_f64());
        let cap = limiter.cap().per_second;
        let sent = state.sending_rate(since, usage.rows, now);
        Some(RateReport {
            wanted: if usage.waited {
                cap
            } else {
                (sent * RATE_HEADROOM).min(cap)
            },
            held: state.share.as_ref().map_or(0.0, |s| s.rows_per_second),
            submitted: usage.rows,
            throttled: usage.throttled,
            seconds: seconds.min(super::MAX_RATE),
        })
    }

    fn apply(&self, answer: LeaseAnswer, closed: bool) {
        if let Some(limiter) = self.limiter.get()
            && !closed
        {
            // Valid from when the request was sent: never later than the
            // leader's own clock for it.
            let sent = self
                .state
                .lock()
                .unwrap()
                .last_sent
                .unwrap_or_else(Instant::now);
            limiter.set_share(answer.rate.as_ref().map(|share| {
                Share {
                    rate: Rate {
                        per_second: share.rows_per_second,
                        burst: share.burst,
                    },
                    valid_until: (sent + RATE_SHARE_TTL).into(),
                    fallback: Rate {
                        per_second: share.fallback_rows_per_second,
                        burst: (share.burst * share.fallback_rows_per_second
                            / share.rows_per_second.max(f64::MIN_POSITIVE))
                        .clamp(1.0, share.burst.max(1.0)),
                    },
                }
            }));
        }
        {
            let mut state = self.state.lock().unwrap();
            state.share = answer.rate.clone();
            if let Some(sent) = state.in_flight.take() {
                let left = Credits::of(&sent.refund).minus(Credits::of(&answer.refunded));
                carry_refund(&mut state, &sent.refund_period, left);
            }
            state.broken = None;
            state.free = state.free.plus(Credits::of(&answer.granted));
            state.period = answer.period.clone();
            state.expires = Some(Instant::now() + LEASE_TTL);
            match answer.denial {
                Some(denial) if denial.reason.stops_drawing() => {
                    state.blocked = Some(denial);
                }
                Some(denial) => {
                    state.blocked = None;
                    state.refused = Some((denial, Instant::now()));
                }
                None => {
                    state.blocked = None;
                    state.refused = None;
                }
            }
            if closed {
                state.lease.clear();
            }
        }
        self.answered.send_modify(|n| *n += 1);
    }

    /// The lease is gone at the ledger (expired and forfeited): start a new
    /// one. Its pool was counted as spent there, so it is dropped here.
    fn restart(&self) {
        {
            let mut state = self.state.lock().unwrap();
            state.in_flight = None;
            state.lease = new_lease_id();
            state.generation += 1;
            state.next_seq = 1;
            state.free = Credits::default();
            state.unreported = Credits::default();
            state.expires = None;
        }
        self.answered.send_modify(|n| *n += 1);
    }

    fn finish_close(&self) {
        self.state.lock().unwrap().lease.clear();
        self.answered.send_modify(|n| *n += 1);
    }
}

/// One attempt at a draw; None when it must wait for the ledger.
fn try_draw(
    state: &mut State,
    want: Credits,
    cost: &CreditCost,
    asked_at: Option<Instant>,
) -> Option<Result<Draw, LedgerClientError>> {
    if let Some(denial) = &state.blocked {
        return Some(Err(LedgerClientError::Denied(denial.clone())));
    }
    if state.closing {
        return Some(Err(LedgerClientError::Unavailable(
            "the process is shutting down".into(),
        )));
    }
    if state.free.covers(want) {
        state.free = state.free.minus(want);
        state.unreported = state.unreported.plus(want);
        state.drawn_total = state.drawn_total.saturating_add(want.milli);
        state.last_draw = Some(Instant::now());
        return Some(Ok(Draw {
            cost: cost.clone(),
            period: state.period.clone(),
            generation: state.generation,
        }));
    }
    // Only a refusal that came after this draw asked answers it: an older
    // one may be stale (refunds arrived, the limit was raised).
    if let Some((denial, at)) = &state.refused
        && asked_at.is_some_and(|asked| *at >= asked)
    {
        return Some(Err(LedgerClientError::Denied(denial.clone())));
    }
    state
        .broken
        .as_ref()
        .map(|reason| Err(LedgerClientError::Unavailable(reason.clone())))
}

impl Credits {
    fn half(self) -> Self {
        Self {
            milli: self.milli / 2,
            actions: self.actions / 2,
        }
    }
}

impl State {
    /// Rows per second sent over the last [`SENDING_WINDOW`], after
    /// recording `rows` sent since `since`.
    fn sending_rate(&mut self, since: Option<Instant>, rows: u64, now: Instant) -> f64 {
        if let Some(since) = since {
            self.sent_recently.push_back((since, rows));
        }
        while self.sent_recently.len() > 1
            && self
                .sent_recently
                .front()
                .is_some_and(|(start, _)| now.duration_since(*start) > SENDING_WINDOW)
        {
            self.sent_recently.pop_front();
        }
        let Some((start, _)) = self.sent_recently.front() else {
            return 0.0;
        };
        let span = now.duration_since(*start).as_secs_f64();
        let rows: u64 = self.sent_recently.iter().map(|(_, rows)| rows).sum();
        if span > 0.0 { rows as f64 / span } else { 0.0 }
    }

    /// Holding more rate than an idle holder: others may need it, so its
    /// use is reported every [`RATE_REPORT_EVERY`].
    fn holds_rate(&self) -> bool {
        self.share
            .as_ref()
            .is_some_and(|s| s.rows_per_second > s.idle_rows_per_second * 1.5)
    }

    /// No row drawn for [`IDLE_GIVE_BACK`] (or ever).
    fn idle(&self) -> bool {
        self.last_draw
            .is_none_or(|at| at.elapsed() >= IDLE_GIVE_BACK)
    }

    /// The pool worth holding: ~[`POOL_COVERS`] seconds of the recent draw
    /// rate, at least a few rows while drawing, nothing when idle.
    fn target_pool(&self) -> Credits {
        if self.idle() || self.row_cost.is_zero() {
            return Credits::default();
        }
        let row = self.row_cost;
        let rows = if row.milli > 0 {
            ((self.rate * POOL_COVERS) / row.milli as f64).ceil() as i64
        } else {
            0
        }
        .max(POOL_MIN_ROWS);
        Credits {
            milli: row.milli.saturating_mul(rows),
            actions: row.actions.saturating_mul(rows as u64),
        }
    }

    /// Holding no more than half the pool worth holding: time to top it up.
    fn pool_low(&self) -> bool {
        let target = self.target_pool();
        !target.is_zero() && self.free.minus(target.half()).is_zero()
    }
}

/// Keeps the part of a refund the ledger could not apply yet (the spend it
/// refunds was not reported yet, or is held by a killed holder's lease until
/// that is forfeited), for at most [`REFUND_CARRY`].
fn carry_refund(state: &mut State, period: &str, left: Credits) {
    if left.is_zero() {
        state.carry_until = None;
        return;
    }
    let until = *state
        .carry_until
        .get_or_insert_with(|| Instant::now() + REFUND_CARRY);
    if Instant::now() < until {
        add_refund(state, period, left);
    } else {
        tracing::debug!(
            refund = left.milli as f64 / 1000.0,
            "dropping a refund the ledger never took; the rows stay charged at their worst case"
        );
        state.carry_until = None;
    }
}

fn add_refund(state: &mut State, period: &str, amount: Credits) {
    if amount.is_zero() || period.is_empty() {
        return;
    }
    let entry = state.refunds.entry(period.to_string()).or_default();
    *entry = entry.plus(amount);
}

/// Random and short: the holder is recorded beside it, and every byte is
/// repeated per holder in the budget's status.
fn new_lease_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sending_rate_smooths_clumps_over_report_windows() {
        // Eight rows every 500 ms, reported every 250 ms: 8, 0, 8, 0, ...
        let mut state = State::default();
        let start = Instant::now();
        let mut since = None;
        let mut rates = Vec::new();
        for window in 0..16u32 {
            let now = start + Duration::from_millis(250) * window;
            let rows = if window % 2 == 0 { 8 } else { 0 };
            rates.push(state.sending_rate(since, rows, now));
            since = Some(now);
        }
        // Once two seconds are counted, every report says about 16 rows/s,
        // whichever half of a clump its own window saw.
        for rate in &rates[9..] {
            assert!((14.0..=18.5).contains(rate), "{rates:?}");
        }
    }
}
