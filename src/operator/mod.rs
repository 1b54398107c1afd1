//! `kiln operator`: the controllers, leader election, health and metrics.

pub mod apply;
pub mod budget;
pub mod cache;
pub mod context;
pub mod error;
pub mod labels;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod pod;
pub mod rate;
pub mod refresh;
pub mod slim;
pub mod table;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use futures::FutureExt;
use prometheus_client::registry::Registry;

use self::budget::ledger::Ledger;
use self::context::Context;
use self::leader::{LeaderElector, LeaderPodLabel, LeaseTiming};
use self::metrics::OperatorMetrics;
use self::table::build::BuildConfig;
use crate::health::{Readiness, serve_health};

/// Settings of `kiln operator`.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorArgs {
    /// Image for data-plane pods (worker, receiver, refresh) unless a table overrides it.
    #[arg(
        long,
        env = "KILN_IMAGE",
        default_value = "ghcr.io/kiln-dev/kiln:latest"
    )]
    pub image: String,
    /// URL of this operator's reservation API as data-plane pods reach it.
    #[arg(
        long,
        env = "KILN_OPERATOR_URL",
        default_value = "http://kiln-operator.kiln-system.svc:8443"
    )]
    pub operator_url: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kiln-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "kiln-operator")]
    pub lease_name: String,
    /// This replica's identity in the election; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Watch only this namespace (a namespace-scoped install); all namespaces when unset.
    #[arg(long, env = "KILN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub health_addr: SocketAddr,
    /// Address of the reservation API (served by the leader only).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub api_addr: SocketAddr,
    /// Shifts the ledger's clock, to exercise period rollover in tests.
    #[arg(long, default_value_t = 0, hide = true, allow_negative_numbers = true)]
    pub clock_skew_seconds: i64,
}

/// Runs the operator until SIGTERM/SIGINT, or until leadership is lost
/// (then it exits with an error so the pod restarts as a standby).
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("kiln-operator-{}", uuid::Uuid::new_v4().simple()));

    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::register(&mut registry));
    let readiness = Readiness::default();
    let shutdown = crate::shutdown_signal().shared();
    let health = tokio::spawn(serve_health(
        args.health_addr,
        registry,
        readiness.clone(),
        shutdown.clone(),
    ));

    // A healthy standby is Ready too; the leader label routes reservations.
    readiness.set(true);
    let pod_label = LeaderPodLabel::new(
        client.clone(),
        std::env::var("POD_NAMESPACE").ok().as_deref(),
        std::env::var("POD_NAME").ok().as_deref(),
    );
    if let Some(label) = &pod_label {
        label
            .set(false)
            .await
            .context("clearing this pod's leader label")?;
    }
    let elector = Arc::new(LeaderElector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        LeaseTiming::default(),
    ));
    let succession = tokio::select! {
        succession = elector.acquire() => succession,
        _ = shutdown.clone() => {
            tracing::info!("shutting down before becoming leader");
            return Ok(());
        }
    };
    metrics.is_leader.set(1);
    if let Some(label) = &pod_label {
        // Without the label no reservation reaches this replica: retry.
        while let Err(error) = label.set(true).await {
            tracing::warn!(%error, "labelling this pod as the leader failed; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    let tls = if args.operator_url.starts_with("https://") {
        Some(
            LeaseApiTls::prepare(&client, &args)
                .await
                .context("preparing the lease API's TLS certificate")?,
        )
    } else {
        None
    };
    let build = BuildConfig {
        default_image: args.image.clone(),
        operator_url: args.operator_url.clone(),
        operator_ca: tls.as_ref().map(|t| t.ca_cert.clone()),
        // Where the operator exports spans, its pods export theirs.
        otlp_endpoints: crate::telemetry::OTLP_ENDPOINT_VARS
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
            .filter(|(_, value)| !value.is_empty())
            .collect(),
    };
    let skew = jiff::SignedDuration::from_secs(args.clock_skew_seconds);
    let ledger = Ledger::new(
        client.clone(),
        Arc::new(move || jiff::Timestamp::now() + skew),
        Some(metrics.clone()),
    );
    let ctx = Arc::new(Context::new(
        client.clone(),
        args.watch_namespace.clone(),
        build,
        metrics.clone(),
        ledger.clone(),
        identity.clone(),
        succession,
    ));
    let holder = elector.clone();
    let lost = async move { holder.hold().await }.boxed().shared();
    let stop = futures::future::select(shutdown.clone(), lost.clone())
        .map(|_| ())
        .shared();
    let serving = tls.map(|tls| tls.keep_renewed(client.clone(), stop.clone()));
    let lease_api = tokio::spawn(budget::lease_api::serve(
        args.api_addr,
        ctx.clone(),
        serving,
        stop.clone(),
    ));
    tokio::join!(
        table::run(ctx.clone(), stop.clone()),
        budget::run(ctx.clone(), stop.clone()),
        refresh::run(ctx.clone(), stop.clone()),
        memory::keep_small(ctx.clone(), stop.clone()),
    );
    metrics.is_leader.set(0);
    if let Some(label) = &pod_label
        && let Err(error) = label.set(false).await
    {
        tracing::warn!(%error, "removing this pod's leader label failed");
    }
    lease_api.await??;

    if lost.now_or_never().is_some() {
        anyhow::bail!(
            "lost leadership of lease {}/{}",
            args.lease_namespace,
            args.lease_name
        );
    }
    elector.release().await;
    health.await??;
    tracing::info!("operator stopped");
    Ok(())
}

/// The lease API's certificate (https operator URLs): its CA for pod
/// templates, and the serving configuration the leader keeps renewed.
struct LeaseApiTls {
    ca_cert: String,
    material: tls::ServingMaterial,
    namespace: String,
    secret: String,
    names: Vec<String>,
}

impl LeaseApiTls {
    async fn prepare(client: &kube::Client, args: &OperatorArgs) -> anyhow::Result<Self> {
        let names = tls::serving_names(&args.operator_url);
        let secret = format!("{}-tls", args.lease_name);
        let material = tls::ensure(client, &args.lease_namespace, &secret, &names).await?;
        Ok(Self {
            ca_cert: material.ca_cert.clone(),
            material,
            namespace: args.lease_namespace.clone(),
            secret,
            names,
        })
    }

    /// The serving configuration, re-issued from the Secret when it nears
    /// expiry, until `stop`.
    fn keep_renewed(
        self,
        client: kube::Client,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>> {
        let config = self
            .material
            .server_config()
            .expect("a certificate Kiln issued parses");
        let (sender, receiver) = tokio::sync::watch::channel(config);
        tokio::spawn(async move {
            let mut current = self.material;
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(tls::CHECK_EVERY) => {}
                }
                let renewed = tls::ensure(&client, &self.namespace, &self.secret, &self.names)
                    .await
                    .and_then(|m| Ok((m.server_config()?, m)));
                match renewed {
                    Ok((config, material)) if material != current => {
                        current = material;
                        let _ = sender.send(config);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "renewing the lease API certificate failed; serving the current one");
                    }
                }
            }
        });
        receiver
    }
}
