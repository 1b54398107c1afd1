//! An Event-tier table on real components (control plane + operator, a
//! Kafka broker, Redis, clay-sim), for tests and benchmarks.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use super::kafka::{Kafka, start_kafka};
use super::pipeline::{Base, base, clay_spec, create_table};

pub struct Event {
    pub base: Base,
    pub kafka: Kafka,
    pub redis: super::Redis,
    pub kubeconfig: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
}

impl Event {
    pub fn start(&self, role: &str, identity: &str) -> super::KilnProcess {
        let listen = format!("127.0.0.1:{}", self.base.receiver_port);
        let mut extra = vec!["--identity", identity];
        if role == "receiver" {
            extra.extend(["--listen", listen.as_str()]);
        }
        super::start_dataplane(
            role,
            &format!("{}/leads", self.base.env.namespace),
            &self.kubeconfig,
            &self.token_file,
            &format!("http://127.0.0.1:{}", self.base.operator.api_port),
            &extra,
            &[],
        )
    }
}

pub async fn event(test: &str, sim_flags: &[&str], limit: f64, on_exhausted: &str) -> Event {
    let redis = super::start_redis_on(test, kiln::devenv::free_port().unwrap(), false).await;
    let kafka = start_kafka(test).await;
    let base = base(
        test,
        sim_flags,
        limit,
        on_exhausted,
        &[("redis-url", &redis.url)],
    )
    .await;
    let (kubeconfig, token_file) = create_table(
        &base.env,
        test,
        json!({
            "tier": "Event", "key": "email", "budgetRef": {"name": "team"}, "dedupeWindow": "1h",
            "clay": clay_spec(8.0),
            "source": {"kafka": {"brokers": [kafka.bootstrap], "topic": "contacts.raw"}},
            "sink": {"kafka": {"topic": "contacts.enriched"}},
            "deadLetter": {"kafka": {"topic": "contacts.dead"}},
            "redis": {"urlSecretRef": {"name": "pipeline", "key": "redis-url"}},
            "workers": {"concurrency": 64, "batchSize": 200}
        }),
    )
    .await;
    Event {
        base,
        kafka,
        redis,
        kubeconfig,
        token_file,
    }
}

pub async fn produce(bootstrap: &str, topic: &str, rows: &[serde_json::Value]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let sends = rows.iter().map(|row| {
        let payload = row.to_string();
        let key = row["email"].as_str().unwrap_or_default().to_string();
        let producer = &producer;
        async move {
            producer
                .send(
                    FutureRecord::to(topic).payload(&payload).key(&key),
                    Duration::from_secs(30),
                )
                .await
                .expect("producing a test record");
        }
    });
    futures::future::join_all(sends).await;
}
