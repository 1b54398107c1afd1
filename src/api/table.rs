//! EnrichmentTable: one Clay table and the pipeline around it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{LocalObjectRef, Resources, SecretKeyRef};

/// How much traffic the table is built for; selects defaults and which
/// sources and sinks are valid.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Tier {
    /// Synchronous HTTP enrichment, under about 1K rows a day, embedded state store.
    Direct,
    /// Redis Stream workers, about 1K-50K rows a day, CRM webhook in and CRM update out.
    #[default]
    Queue,
    /// Kafka in and out with a dead-letter topic, 50K+ rows a day.
    Event,
}

/// Desired state of an EnrichmentTable.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kiln.dev",
    version = "v1alpha1",
    kind = "EnrichmentTable",
    namespaced,
    status = "EnrichmentTableStatus",
    shortname = "et",
    shortname = "etable",
    category = "kiln",
    doc = "One Clay table and the pipeline around it: where rows come from, how they reach Clay, where results and dead letters go, and the CreditBudget it draws on. The operator runs its workers and receiver.",
    validation = Rule::new("self.metadata.name.size() <= 54").message("EnrichmentTable names must be at most 54 characters: the receiver Service is named <table>-receiver and Service names are limited to 63"),
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Enriched","type":"integer","jsonPath":".status.rows.enriched"}"#,
    printcolumn = r#"{"name":"Credits","type":"number","jsonPath":".status.creditsThisPeriod.dataCredits"}"#,
    printcolumn = r#"{"name":"Budget","type":"string","jsonPath":".spec.budgetRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.tier != 'Event' || has(self.source.kafka)").message("tier Event reads rows from Kafka: set source.kafka"),
    validation = Rule::new("self.tier != 'Direct' || has(self.source.http)").message("tier Direct takes rows over HTTP: set source.http"),
    validation = Rule::new("self.tier != 'Queue' || has(self.source.http) || has(self.source.redisStream)").message("tier Queue takes rows from source.http or source.redisStream"),
    validation = Rule::new("!has(self.sink) || self.tier != 'Event' || has(self.sink.kafka)").message("tier Event delivers results to Kafka: use sink.kafka"),
    validation = Rule::new("!has(self.sink) || self.tier == 'Event' || !has(self.sink.kafka)").message("sink.kafka is only valid for tier Event"),
    validation = Rule::new("!has(self.sink) || self.tier != 'Direct' || has(self.sink.http)").message("tier Direct can only deliver to sink.http (results also go to the waiting caller)"),
    validation = Rule::new("self.tier == 'Direct' || has(self.sink)").message("tiers Queue and Event need a sink for results"),
    validation = Rule::new("self.tier != 'Direct' || !has(self.deadLetter)").message("tier Direct keeps dead letters in its embedded store: remove deadLetter"),
    validation = Rule::new("self.tier == 'Direct' || has(self.deadLetter)").message("tiers Queue and Event need a deadLetter destination"),
    validation = Rule::new("!has(self.deadLetter) || self.tier != 'Event' || has(self.deadLetter.kafka)").message("tier Event dead-letters to Kafka: use deadLetter.kafka"),
    validation = Rule::new("!has(self.deadLetter) || self.tier != 'Queue' || has(self.deadLetter.redisStream)").message("tier Queue dead-letters to a Redis Stream: use deadLetter.redisStream"),
    validation = Rule::new("self.tier == 'Direct' || has(self.redis)").message("tiers Queue and Event keep state in Redis: set redis.urlSecretRef"),
    validation = Rule::new("self.tier != 'Direct' || !has(self.redis)").message("tier Direct uses an embedded store: remove redis"),
    validation = Rule::new("(has(self.clay.webhookSources) && size(self.clay.webhookSources) > 0) || has(self.clay.routine)").message("set clay.webhookSources (or, for tier Direct, clay.routine)"),
    validation = Rule::new("!has(self.clay.routine) || self.tier == 'Direct'").message("clay.routine answers in the request: only for tier Direct"),
    validation = Rule::new("!has(self.clay.routine) || !has(self.clay.webhookSources) || size(self.clay.webhookSources) == 0").message("set clay.routine or clay.webhookSources, not both: a Direct table enriches through one of them"),
    validation = Rule::new("self.tier != 'Direct' || !has(self.receiver) || !has(self.receiver.replicas) || self.receiver.replicas == 1").message("tier Direct runs exactly one receiver (its store is embedded on one volume): set receiver.replicas to 1 or use tier Queue"),
    validation = Rule::new("self.tier == 'Event' || !has(self.workers) || !has(self.workers.autoscaling)").message("workers.autoscaling scales on Kafka consumer lag: only for tier Event"),
)]
#[serde(rename_all = "camelCase")]
pub struct EnrichmentTableSpec {
    /// Scale tier: Direct (< 1K rows/day), Queue (1K-50K/day) or Event (50K+/day).
    #[serde(default)]
    pub tier: Tier,
    /// How rows reach Clay and how results come back.
    pub clay: ClaySpec,
    /// Where rows come from. Exactly one kind must be set.
    pub source: SourceSpec,
    /// Where enriched rows are delivered. Required for Queue and Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkSpec>,
    /// Where rows that cannot be enriched go, with the reason. Required for Queue and Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
    /// State store connection for Queue and Event (pending rows, de-dupe index, counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// Name of the row field that identifies a record (e.g. `email` or `domain`);
    /// used for de-duplication and refresh.
    #[schemars(length(min = 1, max = 256))]
    pub key: String,
    /// A key enriched within this window is served from the store at zero credits.
    /// Go duration syntax, e.g. `720h`.
    #[serde(default = "default_dedupe_window")]
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("dedupeWindow must be a positive duration such as 720h or 30m"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub dedupe_window: Duration,
    /// The CreditBudget (same namespace) this table draws credits from.
    pub budget_ref: LocalObjectRef,
    /// Worker sizing.
    #[serde(default)]
    pub workers: WorkerSpec,
    /// Receiver sizing.
    #[serde(default)]
    pub receiver: ReceiverSpec,
    /// Container image for this table's pods; defaults to the operator's configured image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When the observed volume says another tier fits better (the TierFit
    /// condition), and how soon missing results are reported
    /// (CallbacksArriving). Defaults follow Kiln's tier matrix.
    #[serde(default)]
    pub tier_advice: TierAdvice,
}

/// The volume bands of the tier matrix and how long a volume must be seen
/// before the TierFit condition judges it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.directMaxRowsPerDay < self.queueMaxRowsPerDay").message("tierAdvice.directMaxRowsPerDay must be below queueMaxRowsPerDay"))]
#[x_kube(validation = Rule::new("self.eventMinRowsPerDay <= self.queueMaxRowsPerDay").message("tierAdvice.eventMinRowsPerDay must not exceed queueMaxRowsPerDay"))]
pub struct TierAdvice {
    /// Above this many rows a day, a Direct table should move to Queue.
    #[serde(default = "default_direct_max")]
    #[schemars(range(min = 1, max = 100000000))]
    pub direct_max_rows_per_day: u64,
    /// Above this many rows a day, a Queue table should move to Event.
    #[serde(default = "default_queue_max")]
    #[schemars(range(min = 1, max = 100000000))]
    pub queue_max_rows_per_day: u64,
    /// Below this many rows a day, an Event table costs Kafka for little: Queue fits.
    #[serde(default = "default_event_min")]
    #[schemars(range(min = 0, max = 100000000))]
    pub event_min_rows_per_day: u64,
    /// How long traffic must be observed before TierFit judges it (Go duration, 1m..24h).
    #[serde(default = "default_sustained_for")]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub sustained_for: Duration,
    /// Enriched rows older than this, with no RefreshSchedule to redo them,
    /// make Fresh False (Go duration).
    #[serde(default = "default_stale_after")]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub stale_after: Duration,
    /// Results missing for this many result timeouts while rows are sent
    /// make CallbacksArriving False.
    #[serde(default = "default_missing_after")]
    #[schemars(range(min = 1, max = 100))]
    pub callbacks_missing_after_timeouts: u32,
}

impl Default for TierAdvice {
    fn default() -> Self {
        Self {
            direct_max_rows_per_day: default_direct_max(),
            queue_max_rows_per_day: default_queue_max(),
            event_min_rows_per_day: default_event_min(),
            sustained_for: default_sustained_for(),
            stale_after: default_stale_after(),
            callbacks_missing_after_timeouts: default_missing_after(),
        }
    }
}

fn default_direct_max() -> u64 {
    1_000
}
fn default_queue_max() -> u64 {
    50_000
}
fn default_event_min() -> u64 {
    5_000
}
fn default_sustained_for() -> Duration {
    std::time::Duration::from_secs(3600).into()
}
fn default_stale_after() -> Duration {
    std::time::Duration::from_secs(90 * 24 * 3600).into()
}
fn default_missing_after() -> u32 {
    3
}

fn default_dedupe_window() -> Duration {
    std::time::Duration::from_secs(30 * 24 * 3600).into()
}

/// The Clay side of the table.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaySpec {
    /// The table's inbound webhook sources, used in order: each accepts 50,000
    /// submissions in its lifetime, so Kiln moves to the next one before the cap.
    #[serde(default)]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(o, o.name == s.name))").message("clay.webhookSources names must be unique (they key each source's submission count)"))]
    pub webhook_sources: Vec<WebhookSource>,
    /// Tier Direct: enrich through a Clay routine (the public API: run, then
    /// poll its results) instead of webhook sources and callbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routine: Option<RoutineSpec>,
    /// Rows per webhook request (Clay accepts arrays of up to 10 objects).
    #[serde(default = "default_rows_per_request")]
    #[schemars(range(min = 1, max = 10))]
    pub rows_per_request: u32,
    /// Client-side rate limit for submissions to Clay.
    #[serde(default)]
    pub rate_limit: RateLimit,
    /// Worst-case credits one row can cost; reserved before a row is submitted.
    #[x_kube(validation = Rule::new("(has(self.dataCredits) && self.dataCredits > 0.0) || (has(self.actions) && self.actions > 0)").message("clay.creditsPerRow must be more than zero in dataCredits or actions: it is what the budget holds for each row"))]
    pub credits_per_row: CreditCost,
    /// How long to wait for a row's callback before retrying it or dead-lettering
    /// it with reason ResultTimeout.
    #[serde(default = "default_result_timeout")]
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("resultTimeout must be a positive duration such as 10m"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub result_timeout: Duration,
    /// Submissions of a row before it is dead-lettered after result timeouts.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: u32,
    /// The static header value Clay's HTTP API column sends with each callback.
    pub callback_token_secret_ref: SecretKeyRef,
    /// JSON pointer into the callback body where the row's actual data-credit
    /// cost is reported; when absent the reservation is settled as spent.
    #[serde(default = "default_cost_pointer")]
    #[x_kube(validation = Rule::new("self == '' || self.startsWith('/')").message("costPointer must be a JSON pointer starting with '/'"))]
    pub cost_pointer: String,
}

fn default_rows_per_request() -> u32 {
    1
}
fn default_result_timeout() -> Duration {
    std::time::Duration::from_secs(600).into()
}
fn default_max_attempts() -> u32 {
    3
}
fn default_cost_pointer() -> String {
    "/kiln_credits".to_string()
}

/// A Clay routine run through the public API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutineSpec {
    /// The routine's id.
    #[schemars(length(min = 1, max = 128))]
    pub routine_id: String,
    /// Secret key holding the workspace API key (sent as `clay-api-key`).
    pub api_key_secret_ref: SecretKeyRef,
    /// Base URL of Clay's public API.
    #[serde(default = "default_routine_api_url")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("apiUrl must be an http(s) URL"))]
    pub api_url: String,
}

fn default_routine_api_url() -> String {
    "https://api.clay.com/public/v0".to_string()
}

/// One Clay inbound webhook source of the table.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSource {
    /// A short name for logs and status (the URL itself is secret).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Secret key holding the webhook URL (treated as a secret: it authorizes writes).
    pub url_secret_ref: SecretKeyRef,
    /// Secret key holding the `x-clay-webhook-auth` token, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token_secret_ref: Option<SecretKeyRef>,
}

/// A token bucket for submissions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained rows per second (Clay allows about 10 per workspace).
    #[serde(default = "default_rows_per_second")]
    #[schemars(range(min = 1, max = 10000))]
    pub rows_per_second: u32,
    /// Burst size.
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1, max = 10000))]
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            rows_per_second: default_rows_per_second(),
            burst: default_burst(),
        }
    }
}
fn default_rows_per_second() -> u32 {
    10
}
fn default_burst() -> u32 {
    20
}

/// A cost on Clay's two meters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CreditCost {
    /// Data credits (0.5-25 per data point found, depending on the provider).
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub data_credits: f64,
    /// Actions (1 per enrichment, AI run or HTTP call).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub actions: u64,
}

/// Where rows come from. Exactly one must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.http), has(self.redisStream), has(self.kafka)].filter(x, x).size() == 1").message("set exactly one of source.http, source.redisStream, source.kafka"))]
pub struct SourceSpec {
    /// Rows are posted to the receiver (`POST /v1/rows`, and `POST /v1/enrich` for Direct).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// Rows are read from a Redis Stream with a consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_stream: Option<RedisStreamSource>,
    /// Rows are read from a Kafka topic with a consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
}

/// Rows posted over HTTP to the receiver.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Secret key holding the bearer token callers must present.
    pub auth_token_secret_ref: SecretKeyRef,
    /// Largest accepted request body in bytes.
    #[serde(default = "default_max_body_bytes")]
    #[schemars(range(min = 1024, max = 10485760))]
    pub max_body_bytes: u32,
    /// Tier Direct: how long `POST /v1/enrich` waits for the result before
    /// answering 202 with the row's URL (callers may ask less with `?timeout=`).
    #[serde(default = "default_sync_timeout")]
    #[x_kube(validation = Rule::new(super::common::POSITIVE_DURATION_RULE).message("syncTimeout must be a positive duration such as 30s"))]
    #[schemars(with = "String", length(min = 2, max = 32))]
    pub sync_timeout: Duration,
}

fn default_sync_timeout() -> Duration {
    "30s".parse().expect("a valid duration")
}

fn default_max_body_bytes() -> u32 {
    1024 * 1024
}

/// A Redis Stream read through a consumer group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisStreamSource {
    /// Stream key.
    #[schemars(length(min = 1, max = 512))]
    pub stream: String,
    /// Consumer group; defaults to `kiln-<table>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
}

/// Kafka connection settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaConnection {
    /// Bootstrap brokers as `host:port`.
    #[schemars(
        length(min = 1, max = 32),
        inner(regex(pattern = r"^[^:/\s]+:[0-9]{1,5}$"), length(max = 255))
    )]
    pub brokers: Vec<String>,
    /// Use TLS to the brokers.
    #[serde(default)]
    pub tls: bool,
    /// SASL credentials, when the cluster requires them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSasl>,
}

/// SASL credentials for Kafka.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSasl {
    /// SASL mechanism.
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// Secret key holding the user name.
    pub username_secret_ref: SecretKeyRef,
    /// Secret key holding the password.
    pub password_secret_ref: SecretKeyRef,
}

/// SASL mechanisms Kiln supports.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SaslMechanism {
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "PLAIN")]
    Plain,
}

/// A Kafka topic read through a consumer group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSource {
    /// Connection settings.
    #[serde(flatten)]
    pub connection: KafkaConnection,
    /// Topic to consume.
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Consumer group; defaults to `kiln-<table>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
}

/// Where enriched rows go. Exactly one must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.http), has(self.redisStream), has(self.kafka)].filter(x, x).size() == 1").message("set exactly one of sink.http, sink.redisStream, sink.kafka"))]
pub struct SinkSpec {
    /// An HTTP call per enriched row (e.g. a CRM update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    /// Append enriched rows to a Redis Stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_stream: Option<RedisStreamTarget>,
    /// Publish enriched rows to a Kafka topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTarget>,
}

/// HTTP methods a sink may use.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Post,
    Put,
    Patch,
}

/// An HTTP call per enriched row.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpSink {
    /// HTTP method.
    #[serde(default)]
    pub method: HttpMethod,
    /// URL template; `{field}` is replaced by the row's URL-encoded field value,
    /// e.g. `https://crm.example.com/leads/{email}`.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("urlTemplate must be an http(s) URL"))]
    pub url_template: String,
    /// Secret whose keys are sent as request headers (e.g. `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("sink.http.headersSecretName must be a Secret name (lower-case letters, digits, '-' and '.')"))]
    #[schemars(length(min = 1, max = 253))]
    pub headers_secret_name: Option<String>,
    /// Delivery attempts before the row is dead-lettered with reason SinkFailed.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: u32,
}

/// A Redis Stream to append to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisStreamTarget {
    /// Stream key.
    #[schemars(length(min = 1, max = 512))]
    pub stream: String,
    /// Approximate maximum stream length (XADD MAXLEN ~); unbounded when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_len: Option<u64>,
}

/// A Kafka topic to publish to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTarget {
    /// Connection settings; defaults to the source's when the source is Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<KafkaConnection>,
    /// Topic to publish to.
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Row field used as the record key; defaults to the table's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
}

/// Where rows that cannot be enriched go. Exactly one must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.redisStream), has(self.kafka)].filter(x, x).size() == 1").message("set exactly one of deadLetter.redisStream, deadLetter.kafka"))]
pub struct DeadLetterSpec {
    /// A Redis Stream holding the original row and the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_stream: Option<RedisStreamTarget>,
    /// A Kafka topic; the reason and attempt count travel in headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaTarget>,
}

/// Redis connection for the state store.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret key holding the Redis URL (`redis://[:password@]host:port/db`).
    pub url_secret_ref: SecretKeyRef,
}

/// Worker Deployment sizing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker replicas (Direct tables run none: the receiver enriches in-line).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Rows in flight per worker.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1000))]
    pub concurrency: u32,
    /// Rows read from the source per poll.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1000))]
    pub batch_size: u32,
    /// Container resources.
    #[serde(default)]
    pub resources: Resources,
    /// Tier Event: scale workers on the consumer group's lag with KEDA, when
    /// KEDA is installed (else `replicas` stays fixed; see the Autoscaling condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<WorkerAutoscaling>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            concurrency: default_concurrency(),
            batch_size: default_batch_size(),
            resources: Resources::default(),
            autoscaling: None,
        }
    }
}

/// Lag-based worker autoscaling (a KEDA ScaledObject with a Kafka trigger).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas"))]
pub struct WorkerAutoscaling {
    /// Fewest workers (0 lets KEDA scale to zero when there is no lag).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,
    /// Most workers (more than the topic's partitions would sit idle).
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Consumer lag per worker replica that triggers scaling out.
    #[serde(default = "default_lag_threshold")]
    #[schemars(range(min = 1, max = 1000000))]
    pub lag_threshold: u32,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_lag_threshold() -> u32 {
    500
}

/// Receiver Deployment sizing.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReceiverSpec {
    /// Receiver replicas (Direct tables always run exactly one: the store is embedded).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    /// Container resources.
    #[serde(default)]
    pub resources: Resources,
    /// Size of the embedded store's volume (Direct tier).
    #[serde(default = "default_storage_size")]
    #[x_kube(validation = Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))").message("receiver.storageSize must be a positive quantity such as 1Gi"))]
    pub storage_size: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
}

impl Default for ReceiverSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            resources: Resources::default(),
            storage_size: default_storage_size(),
        }
    }
}

fn default_replicas() -> i32 {
    1
}
fn default_concurrency() -> u32 {
    16
}
fn default_batch_size() -> u32 {
    50
}
fn default_storage_size() -> k8s_openapi::apimachinery::pkg::api::resource::Quantity {
    k8s_openapi::apimachinery::pkg::api::resource::Quantity("1Gi".to_string())
}

/// Observed state of an EnrichmentTable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnrichmentTableStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, SecretsResolved, BudgetResolved, Provisioned, WorkersAvailable,
    /// KafkaReachable (Event), RedisReachable (Queue, Event), Autoscaling
    /// (with workers.autoscaling), ClayReachable, ClayRateAccepted, TierFit,
    /// CallbacksArriving and Fresh.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// In-cluster URL of the receiver's Clay callback endpoint: paste it into
    /// the table's HTTP API column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// In-cluster URL of the receiver's ingest endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest_url: Option<String>,
    /// Row counters since the table was created.
    #[serde(default)]
    pub rows: RowCounters,
    /// Credits this table used in the budget's current period.
    #[serde(default)]
    #[schemars(with = "CreditTotal")]
    pub credits_this_period: CreditCost,
    /// When a row was last enriched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_enriched_at: Option<Time>,
    /// When the row enriched longest ago was enriched (Queue and Event:
    /// read from Redis); what the Fresh condition judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_enriched_at: Option<Time>,
    /// Rows submitted through each webhook source in its lifetime, by the
    /// source's name: Clay drops rows past 50,000 per source, and Kiln moves
    /// to the next source of clay.webhookSources before that.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhook_source_rows: BTreeMap<String, u64>,
    /// Rows the table sent to Clay, as the operator observed them: the
    /// figures the TierFit condition judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObservedVolume>,
    /// The table's share of its Clay workspace's rate while its processes
    /// send rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateStatus>,
}

/// The table's traffic as the operator's leader observed it (since it
/// became leader, over the last day at most).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservedVolume {
    /// Rows sent to Clay in the last 24 hours (or since observed).
    pub rows_last_day: u64,
    /// Rows a day at the last hour's rate.
    pub rows_per_day_recent: u64,
    /// How long the traffic has been observed, in seconds (at most a day).
    pub observed_seconds: i64,
    /// Results that came back per row sent to Clay over the same window, in
    /// percent (at most 100): well below 100 means callbacks are being lost
    /// (see the CallbacksArriving condition). Absent before any row was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callbacks_percent: Option<u32>,
    /// How long results took over the last hour, from a row's attempt to its
    /// result (Clay's enrichment plus any wait for the workspace's rate): the
    /// median, in milliseconds, as the upper bound of its bucket (50 ms to
    /// 5 min). Absent without results, or past the slowest bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_latency_p50_ms: Option<u64>,
    /// The 95th percentile of the same, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_latency_p95_ms: Option<u64>,
}

/// How fast the table sends rows to Clay, and the part of the workspace's
/// rate its processes hold (rows per second, to a tenth).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateStatus {
    /// The workspace's limit (the budget's workspace.rateLimit), or the
    /// table's own clay.rateLimit when the budget names no workspace.
    pub limit_rows_per_second: f64,
    /// Rows per second leased to the table's processes now.
    pub share_rows_per_second: f64,
    /// Rows per second the table sent to Clay recently.
    pub observed_rows_per_second: f64,
    /// Processes holding a share (workers, and Direct receivers).
    pub holders: u32,
    /// Rows sent to Clay in the last minute.
    pub submitted_last_minute: u64,
    /// Of those, rows Clay refused with 429 (over the workspace's limit).
    pub throttled_last_minute: u64,
}

impl CreditCost {
    /// Nothing on either meter.
    pub fn is_zero(&self) -> bool {
        self.data_credits == 0.0 && self.actions == 0
    }
}

/// A total of credits (the schema of status totals; the values are
/// [`CreditCost`]s).
#[derive(schemars::JsonSchema, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditTotal {
    /// Data credits in total.
    data_credits: f64,
    /// Actions in total.
    actions: u64,
}

/// Rows by lifecycle stage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RowCounters {
    /// Rows taken in from the source (HTTP, Redis Stream or Kafka).
    pub received: u64,
    /// Rows answered from the de-dupe store at no charge.
    pub deduplicated: u64,
    /// Rows sent to Clay (each attempt counts).
    pub submitted: u64,
    /// Rows whose result came back from Clay.
    pub enriched: u64,
    /// Results the sink accepted.
    pub delivered: u64,
    /// Rows that ended in the dead-letter destination, with a reason.
    pub dead_lettered: u64,
    /// The same, by reason (InvalidRow, MissingKey, BudgetExhausted,
    /// ResultTimeout, SinkFailed, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dead_lettered_by_reason: BTreeMap<String, u64>,
    /// Rows sent to Clay and waiting for their result.
    pub pending: u64,
}

impl EnrichmentTableSpec {
    /// Every Secret key the table's pods read, for RBAC and reference checks.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut refs = vec![&self.clay.callback_token_secret_ref];
        if let Some(routine) = &self.clay.routine {
            refs.push(&routine.api_key_secret_ref);
        }
        for source in &self.clay.webhook_sources {
            refs.push(&source.url_secret_ref);
            refs.extend(source.auth_token_secret_ref.as_ref());
        }
        if let Some(http) = &self.source.http {
            refs.push(&http.auth_token_secret_ref);
        }
        if let Some(redis) = &self.redis {
            refs.push(&redis.url_secret_ref);
        }
        for kafka in self.kafka_connections() {
            if let Some(sasl) = &kafka.sasl {
                refs.push(&sasl.username_secret_ref);
                refs.push(&sasl.password_secret_ref);
            }
        }
        refs
    }

    /// Names of every Secret the table's pods read, sorted and de-duplicated.
    pub fn secret_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .secret_refs()
            .into_iter()
            .map(|r| r.name.clone())
            .collect();
        if let Some(name) = self
            .sink
            .as_ref()
            .and_then(|s| s.http.as_ref())
            .and_then(|h| h.headers_secret_name.clone())
        {
            names.push(name);
        }
        names.sort();
        names.dedup();
        names
    }

    fn kafka_connections(&self) -> impl Iterator<Item = &KafkaConnection> {
        let source = self.source.kafka.as_ref().map(|k| &k.connection);
        let sink = self
            .sink
            .as_ref()
            .and_then(|s| s.kafka.as_ref())
            .and_then(|k| k.connection.as_ref());
        let dead_letter = self
            .dead_letter
            .as_ref()
            .and_then(|d| d.kafka.as_ref())
            .and_then(|k| k.connection.as_ref());
        source.into_iter().chain(sink).chain(dead_letter)
    }
}
