//! A real single-node Kafka broker (KRaft, combined broker and controller)
//! from the jars `tests/kafka/fetch.sh` resolves from Maven Central, on
//! random loopback ports. Restartable on the same ports and data directory.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::Message as _;

use super::{process, wait, work_dir};

pub struct Kafka {
    pub process: process::ManagedProcess,
    /// `127.0.0.1:<port>` for clients.
    pub bootstrap: String,
    name: String,
    dir: PathBuf,
    libs: String,
}

/// The broker's jars (resolved once, cached outside the clone).
fn libs() -> String {
    super::install_once("java", "openjdk-17-jre-headless");
    super::install_once("mvn", "maven");
    let output = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kafka/fetch.sh"))
        .output()
        .expect("running tests/kafka/fetch.sh");
    assert!(
        output.status.success(),
        "fetching the Kafka jars failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn java(libs: &str) -> std::process::Command {
    let mut command = std::process::Command::new("java");
    command.args([
        "-Xms256m",
        "-Xmx768m",
        "-XX:+UseSerialGC",
        "-cp",
        &format!("{libs}/*"),
    ]);
    command
}

pub async fn start_kafka(name: &str) -> Kafka {
    start_kafka_on(name, "127.0.0.1").await
}

/// A broker listening (and advertised) on `host`, e.g. the test node's
/// address so pods reach it.
pub async fn start_kafka_on(name: &str, host: &str) -> Kafka {
    let libs = libs();
    let dir = work_dir().join(format!("kafka-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = kiln::devenv::free_port().unwrap();
    let controller_port = kiln::devenv::free_port().unwrap();
    let properties = format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
",
        data = dir.join("data").display()
    );
    std::fs::write(dir.join("server.properties"), properties).unwrap();
    let cluster_id = java(&libs)
        .args(["kafka.tools.StorageTool", "random-uuid"])
        .output()
        .expect("running the Kafka storage tool (needs java 17+)");
    let cluster_id = String::from_utf8(cluster_id.stdout).unwrap();
    let cluster_id = cluster_id
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let format = java(&libs)
        .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
        .arg(dir.join("server.properties"))
        .arg("--ignore-formatted")
        .output()
        .unwrap();
    assert!(
        format.status.success(),
        "formatting Kafka storage: {}",
        String::from_utf8_lossy(&format.stderr)
    );
    let kafka = Kafka {
        process: spawn(name, &libs, &dir),
        bootstrap: format!("{host}:{port}"),
        name: name.to_string(),
        dir,
        libs,
    };
    kafka.wait_ready().await;
    kafka
}

fn spawn(name: &str, libs: &str, dir: &std::path::Path) -> process::ManagedProcess {
    let mut command = java(libs);
    command
        .arg("kafka.Kafka")
        .arg(dir.join("server.properties"));
    let log = format!("kafka-{name}-{}", uuid::Uuid::new_v4().simple());
    process::ManagedProcess::spawn(&log, command, work_dir()).expect("starting the Kafka broker")
}

impl Kafka {
    /// Waits until the broker answers metadata requests.
    pub async fn wait_ready(&self) {
        let bootstrap = self.bootstrap.clone();
        wait::until_within("the Kafka broker", Duration::from_secs(90), || {
            let bootstrap = bootstrap.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    use rdkafka::consumer::{BaseConsumer, Consumer};
                    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                        .set("bootstrap.servers", &bootstrap)
                        .create()
                        .ok()?;
                    consumer
                        .fetch_metadata(None, Duration::from_secs(2))
                        .ok()
                        .filter(|m| !m.brokers().is_empty())
                        .map(|_| ())
                })
                .await
                .ok()
                .flatten()
            }
        })
        .await;
    }

    /// Stops the broker (SIGTERM, so it shuts down cleanly) and starts it
    /// again on the same ports and data.
    pub async fn restart(&mut self) {
        self.process.stop(Duration::from_secs(30));
        self.process = spawn(&self.name, &self.libs, &self.dir);
        self.wait_ready().await;
    }
}

/// How long [`read_topic`] waits for its condition.
const READ_PATIENCE: Duration = Duration::from_secs(240);

/// Reads topics from the beginning with a fresh group until `until` holds
/// for what was read, and returns the records; fails the test, saying how
/// much each topic gave, when that takes longer than [`READ_PATIENCE`].
pub async fn read_topic(
    bootstrap: &str,
    topics: &[&str],
    until: impl Fn(&[rdkafka::message::OwnedMessage]) -> bool,
) -> Vec<rdkafka::message::OwnedMessage> {
    read_topic_within(bootstrap, topics, until)
        .await
        .unwrap_or_else(|partial| {
            let per_topic: Vec<String> = topics
                .iter()
                .map(|topic| {
                    let n = partial.iter().filter(|m| m.topic() == *topic).count();
                    format!("{topic}: {n}")
                })
                .collect();
            panic!(
                "reading {topics:?}: the condition did not hold within {READ_PATIENCE:?}; read {}",
                per_topic.join(", ")
            )
        })
}

/// [`read_topic`], giving back what was read (as `Err`) when the condition
/// did not hold in time, for a caller that explains the failure itself.
pub async fn read_topic_within(
    bootstrap: &str,
    topics: &[&str],
    until: impl Fn(&[rdkafka::message::OwnedMessage]) -> bool,
) -> Result<Vec<rdkafka::message::OwnedMessage>, Vec<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // A topic the data plane creates after this subscription (the
        // dead-letter topic, at its first dead letter) is otherwise only
        // seen at the next metadata refresh, five minutes later.
        .set("topic.metadata.refresh.interval.ms", "1000")
        .create()
        .unwrap();
    consumer.subscribe(topics).unwrap();
    let deadline = tokio::time::Instant::now() + READ_PATIENCE;
    let mut read = Vec::new();
    // Offsets are never committed, so a rebalance (a topic appearing) reads
    // a partition again from the start: each record is kept once.
    let mut positions = std::collections::HashSet::new();
    while !until(&read) {
        if tokio::time::Instant::now() >= deadline {
            return Err(read);
        }
        if let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        {
            let position = (
                message.topic().to_string(),
                message.partition(),
                message.offset(),
            );
            if positions.insert(position) {
                read.push(message.detach());
            }
        }
    }
    Ok(read)
}
