//! Leader election on a coordination.k8s.io Lease, as client-go does it:
//! the holder renews the lease; a candidate takes it over only once the
//! lease record has stayed unchanged for the lease duration, timed by the
//! candidate's own clock from when it first saw that record (the holder's
//! `renewTime` is another node's clock: skew between nodes would shorten or
//! stretch the lease). Every write is a compare-and-swap on
//! resourceVersion, so two candidates cannot both win.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

/// Label the leader puts on its own pod. The operator Service selects it, so
/// reservation traffic reaches the leader while every healthy replica reports
/// Ready (and `helm install --wait` or a rollout can succeed).
pub const LEADER_POD_LABEL: &str = "kiln.dev/leader";

/// This replica's pod, when running in one (POD_NAME and POD_NAMESPACE set).
pub struct LeaderPodLabel {
    api: Api<Pod>,
    name: String,
}

impl LeaderPodLabel {
    pub fn new(client: Client, namespace: Option<&str>, name: Option<&str>) -> Option<Self> {
        Some(Self {
            api: Api::namespaced(client, namespace?),
            name: name?.to_string(),
        })
    }

    /// Adds or removes the leader label. A container restarted after losing
    /// leadership keeps its pod's labels, so every replica clears the label
    /// before it campaigns.
    pub async fn set(&self, leader: bool) -> Result<(), kube::Error> {
        let value = leader.then_some("true");
        let patch = serde_json::json!({"metadata": {"labels": {LEADER_POD_LABEL: value}}});
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }
}

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How often the holder renews and candidates retry.
    pub retry_period: Duration,
    /// The holder steps down when it could not renew for this long
    /// (shorter than the lease duration, so it stops before anyone else starts).
    pub renew_deadline: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Mutex<Option<Observation>>,
}

/// How a replica came to lead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Succession {
    /// It created the Lease: no leader came before it, so nothing an
    /// earlier leader granted (rate shares) can still be in force.
    First,
    /// It took the Lease over from an earlier leader (expired or released).
    TookOver,
}

/// The lease record as last read, and when (by this process's clock) it was
/// first seen in that form.
#[derive(Clone, Debug, PartialEq)]
struct Observation {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Duration,
    seen_at: Instant,
}

impl Observation {
    /// The observation after reading `spec` at `now`: a record that has not
    /// changed keeps the time it was first seen.
    fn after(previous: Option<&Self>, spec: &LeaseSpec, now: Instant) -> Self {
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.clone();
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(0),
        );
        let seen_at = match previous {
            Some(p)
                if p.holder == holder && p.renew_time == renew_time && p.duration == duration =>
            {
                p.seen_at
            }
            _ => now,
        };
        Self {
            holder,
            renew_time,
            duration,
            seen_at,
        }
    }

    /// True when nobody holds the lease, or the record has not changed for
    /// its whole duration (its holder stopped renewing).
    fn expired(&self, now: Instant) -> bool {
        self.holder.is_none() || self.seen_at + self.duration < now
    }
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: LeaseTiming,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) -> Succession {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Some(succession)) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, ?succession, "acquired leadership");
                    return succession;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews the lease until a renewal has failed for longer than the renew
    /// deadline; returns when leadership is lost.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(Some(_)) => last_renewal = tokio::time::Instant::now(),
                Ok(None) => {
                    tracing::error!(identity = %self.identity, "another replica took the lease");
                    return;
                }
                Err(error) => tracing::warn!(%error, "renewing the lease failed"),
            }
            if last_renewal.elapsed() > self.timing.renew_deadline {
                tracing::error!(identity = %self.identity, "could not renew the lease in time; stepping down");
                return;
            }
        }
    }

    /// Gives the lease up so a standby can take over at once (on graceful shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(identity = %self.identity, "released leadership"),
            Err(error) => tracing::warn!(%error, "releasing the lease failed"),
        }
    }

    /// One election round: how this candidate holds the lease afterwards
    /// (`First` when it created it), or None when it does not.
    pub async fn try_acquire_or_renew(&self) -> Result<Option<Succession>, kube::Error> {
        let now = jiff::Timestamp::now();
        let duration_secs = self.timing.lease_duration.as_secs() as i32;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Some(Succession::First)),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let held_by_me = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = {
            let mut observed = self.observed.lock().unwrap();
            let seen = Instant::now();
            let observation = Observation::after(observed.as_ref(), spec, seen);
            let expired = observation.expired(seen);
            *observed = Some(observation);
            expired
        };
        if !held_by_me && !expired {
            return Ok(None);
        }
        if !held_by_me {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(MicroTime(now));
        // `replace` carries the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Some(Succession::TookOver)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: &str, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        }
    }

    const RENEWED: &str = "2026-11-27T12:00:00Z";

    #[test]
    fn a_record_seen_for_less_than_its_duration_is_not_expired() {
        let t0 = Instant::now();
        let first = Observation::after(None, &spec(Some("a"), RENEWED, 15), t0);
        let later = t0 + Duration::from_secs(14);
        let again = Observation::after(Some(&first), &spec(Some("a"), RENEWED, 15), later);
        assert_eq!(again.seen_at, t0);
        assert!(!again.expired(later));
    }

    #[test]
    fn a_record_unchanged_for_its_duration_is_expired() {
        let t0 = Instant::now();
        let first = Observation::after(None, &spec(Some("a"), RENEWED, 15), t0);
        let later = t0 + Duration::from_secs(16);
        let again = Observation::after(Some(&first), &spec(Some("a"), RENEWED, 15), later);
        assert!(again.expired(later));
    }

    #[test]
    fn a_renewal_restarts_the_clock_whatever_time_it_claims() {
        let t0 = Instant::now();
        let first = Observation::after(None, &spec(Some("a"), RENEWED, 15), t0);
        // The holder's clock runs an hour behind: its renewal still counts.
        let later = t0 + Duration::from_secs(16);
        let renewed = spec(Some("a"), "2026-11-27T11:00:02Z", 15);
        let again = Observation::after(Some(&first), &renewed, later);
        assert_eq!(again.seen_at, later);
        assert!(!again.expired(later + Duration::from_secs(14)));
    }

    #[test]
    fn a_stale_renewal_time_alone_does_not_expire_a_lease_just_seen() {
        // Renewed "an hour ago" by a holder whose clock runs behind ours.
        let now = Instant::now();
        let seen = Observation::after(None, &spec(Some("a"), "2026-11-27T11:00:00Z", 15), now);
        assert!(!seen.expired(now + Duration::from_secs(1)));
    }

    #[test]
    fn a_released_lease_is_expired() {
        let now = Instant::now();
        let released = Observation::after(None, &spec(None, RENEWED, 1), now);
        assert!(released.expired(now));
        let emptied = Observation::after(None, &spec(Some(""), RENEWED, 15), now);
        assert!(emptied.expired(now));
    }
}
