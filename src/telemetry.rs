//! Structured logging through tracing, and the same spans exported over
//! OpenTelemetry (OTLP/HTTP) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: a reconcile, a row in the
//! worker and in the receiver each a span, the row id an attribute.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    #[default]
    Json,
    /// Human-readable lines, for terminals.
    Text,
}

/// The environment variables that turn span export on.
pub const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

/// Keeps span export running; what is still buffered is sent when it is
/// dropped (or [`Telemetry::flush`]ed before an early exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends what is buffered and stops exporting.
    pub fn flush(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("exporting the last spans failed: {error}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (info). `service` names the process in exported spans unless
/// `OTEL_SERVICE_NAME` does. Call it outside the async runtime.
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = match otlp_provider(service) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("OTLP span export is off: {error:#}");
            None
        }
    };
    let spans = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("kiln")));
    let registry = tracing_subscriber::registry().with(filter).with(spans);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    // The innermost span's fields (a row's id, a reconcile's
                    // object) on every line logged within it, so grepping
                    // the logs for a row id tells its story.
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).init(),
    }
    Telemetry { provider }
}

/// A tracer provider exporting in batches over OTLP/HTTP, when configured.
fn otlp_provider(service: &str) -> anyhow::Result<Option<SdkTracerProvider>> {
    let configured = OTLP_ENDPOINT_VARS
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}
