//! Deterministic per-row enrichment: the same seed and row give the same
//! latency, findings and cost, whatever order rows arrive in.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

/// A data provider in a waterfall: what it costs when it finds something and how often it does.
#[derive(Clone, Debug, PartialEq)]
pub struct Provider {
    pub field: String,
    pub cost: f64,
    pub hit_rate: f64,
}

impl std::str::FromStr for Provider {
    type Err = String;
    /// `field:cost:hit_rate`, e.g. `email:1.5:0.9`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let [field, cost, hit] = parts.as_slice() else {
            return Err(format!("provider {s:?} must be field:cost:hit_rate"));
        };
        let cost: f64 = cost.parse().map_err(|_| format!("bad cost in {s:?}"))?;
        let hit_rate: f64 = hit.parse().map_err(|_| format!("bad hit rate in {s:?}"))?;
        if !(0.0..=1.0).contains(&hit_rate) || cost < 0.0 {
            return Err(format!(
                "provider {s:?}: cost must be >= 0 and hit rate within 0..1"
            ));
        }
        Ok(Self {
            field: field.to_string(),
            cost,
            hit_rate,
        })
    }
}

/// What the simulator decided for one row.
#[derive(Clone, Debug, PartialEq)]
pub struct Enrichment {
    pub latency: Duration,
    /// Found fields and their values.
    pub found: Map<String, Value>,
    pub data_credits: f64,
    /// One per provider run, plus one for the HTTP API column call.
    pub actions: u64,
    pub drop_callback: bool,
    pub duplicate_callback: bool,
}

/// Knobs for [`enrich`].
#[derive(Clone, Debug)]
pub struct EnrichPlan {
    pub seed: u64,
    pub providers: Vec<Provider>,
    pub latency_min: Duration,
    pub latency_max: Duration,
    pub drop_rate: f64,
    pub duplicate_rate: f64,
}

/// FNV-1a: a stable hash, so determinism survives toolchain upgrades.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A generator for `key` under the plan's seed.
pub fn rng_for(seed: u64, key: &str) -> StdRng {
    StdRng::seed_from_u64(seed ^ stable_hash(key.as_bytes()))
}

/// The row's identity for determinism: its correlation id when it has one.
pub fn row_key(row: &Value) -> String {
    row.get("kiln_row_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| row.to_string())
}

/// Enriches `row` on its `attempt`-th submission (1 for the first). What is
/// found, and its cost, depends only on the row; latency and delivery
/// faults are drawn afresh per attempt, as a retry meets a new roll of the dice.
pub fn enrich(plan: &EnrichPlan, row: &Value, attempt: u32) -> Enrichment {
    let key = row_key(row);
    let mut rng = rng_for(plan.seed, &key);
    let mut attempt_rng = rng_for(plan.seed, &format!("{key}#{attempt}"));
    let latency = if plan.latency_max > plan.latency_min {
        attempt_rng.random_range(plan.latency_min..=plan.latency_max)
    } else {
        plan.latency_min
    };
    let mut found = Map::new();
    let mut data_credits = 0.0;
    for provider in &plan.providers {
        if rng.random_bool(provider.hit_rate) {
            data_credits += provider.cost;
            let value = format!(
                "{}-{:08x}",
                provider.field,
                stable_hash(format!("{key}/{}", provider.field).as_bytes()) as u32
            );
            found.insert(provider.field.clone(), json!(value));
        }
    }
    Enrichment {
        latency,
        found,
        data_credits,
        actions: plan.providers.len() as u64 + 1,
        drop_callback: attempt_rng.random_bool(plan.drop_rate),
        duplicate_callback: attempt_rng.random_bool(plan.duplicate_rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> EnrichPlan {
        EnrichPlan {
            seed,
            providers: vec![
                "email:1:0.9".parse().unwrap(),
                "phone:5:0.5".parse().unwrap(),
            ],
            latency_min: Duration::from_millis(500),
            latency_max: Duration::from_millis(3000),
            drop_rate: 0.1,
            duplicate_rate: 0.1,
        }
    }

    #[test]
    fn same_seed_same_row_same_result() {
        let row = json!({"kiln_row_id": "r-1", "email": "a@b.c"});
        assert_eq!(enrich(&plan(7), &row, 1), enrich(&plan(7), &row, 1));
        let differs = (0..20).any(|i| {
            let row = json!({"kiln_row_id": format!("r-{i}")});
            enrich(&plan(7), &row, 1) != enrich(&plan(8), &row, 1)
        });
        assert!(differs, "a different seed changes outcomes");
    }

    #[test]
    fn a_retry_finds_the_same_data_but_rolls_faults_again() {
        let mut plan = plan(7);
        plan.drop_rate = 0.5;
        let attempts: Vec<Enrichment> = (1..=20)
            .map(|a| enrich(&plan, &json!({"kiln_row_id": "r-1"}), a))
            .collect();
        assert!(attempts.iter().all(|e| e.found == attempts[0].found && e.data_credits == attempts[0].data_credits));
        assert!(
            attempts.iter().any(|e| e.drop_callback) && attempts.iter().any(|e| !e.drop_callback)
        );
    }

    #[test]
    fn cost_is_the_sum_of_found_providers_and_rates_hold_roughly() {
        let mut hits = 0;
        for i in 0..2000 {
            let e = enrich(&plan(1), &json!({"kiln_row_id": format!("r-{i}")}), 1);
            let expected: f64 = e
                .found
                .keys()
                .map(|k| if k == "email" { 1.0 } else { 5.0 })
                .sum();
            assert_eq!(e.data_credits, expected);
            assert_eq!(e.actions, 3);
            assert!(
                e.latency >= Duration::from_millis(500) && e.latency <= Duration::from_millis(3000)
            );
            hits += usize::from(e.found.contains_key("email"));
        }
        assert!(
            (1700..1900).contains(&hits),
            "email hit rate near 0.9: {hits}/2000"
        );
    }

    #[test]
    fn providers_parse_with_clear_errors() {
        assert_eq!("email:1.5:0.9".parse::<Provider>().unwrap().cost, 1.5);
        assert!(
            "email:1.5"
                .parse::<Provider>()
                .unwrap_err()
                .contains("field:cost:hit_rate")
        );
        assert!("email:1:2".parse::<Provider>().is_err());
    }
}
