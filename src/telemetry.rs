//! Logs to stderr and, given an OTLP endpoint, spans to a trace backend (Jaeger v2 locally;
//! any OTLP/HTTP collector in production). Traces go through OTLP because the
//! opentelemetry-jaeger crate is deprecated and Jaeger itself recommends OTLP.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Targets, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installed logging and tracing; `shutdown` flushes the spans still queued.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Must run outside the async runtime: the exporter's HTTP client is a blocking one,
    /// driven by the SDK's own export thread. A `command` (not a service) logs warnings and
    /// errors only, unless PARLEY_LOG says otherwise: its output is for the person who ran it.
    pub(crate) fn init(
        log_format: &str,
        otlp_endpoint: Option<&str>,
        service: &str,
        command: bool,
    ) -> Result<Telemetry> {
        let default = if command { "warn" } else { "info,rdkafka=warn" };
        let directives = std::env::var("PARLEY_LOG").unwrap_or_else(|_| default.to_owned());
        let logged = directives
            .parse::<Targets>()
            .with_context(|| format!("PARLEY_LOG={directives:?}: expected e.g. info,scylla=warn"))?;
        // Colour only for a person at a terminal, never into a file or a pipe.
        let logs =
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
        let logs = if log_format == "json" { logs.json().boxed() } else { logs.boxed() };
        let provider = otlp_endpoint.map(|endpoint| tracer_provider(endpoint, service)).transpose()?;
        // Exported spans do not follow PARLEY_LOG: quieting the logs keeps the traces. One
        // filter for the whole stack lets through what either wants (the exporter: INFO and
        // above), and only the logs have a filter of their own: with a second per-layer
        // filter beside the logs', tracing-subscriber dropped the logs' WARN events whenever
        // PARLEY_LOG was below INFO.
        let exported = if provider.is_some() { LevelFilter::INFO } else { LevelFilter::OFF };
        let either = {
            let logged = logged.clone();
            filter_fn(move |meta| *meta.level() <= exported || logged.would_enable(meta.target(), meta.level()))
        };
        let spans =
            provider.as_ref().map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("parley")));
        tracing_subscriber::registry().with(either).with(spans).with(logs.with_filter(logged)).try_init()?;
        Ok(Telemetry { provider })
    }

    pub(crate) fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: not every span was exported: {error}");
        }
    }
}

fn tracer_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider> {
    let exporter = SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
        .build())
}

/// The OTLP/HTTP traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT reads it).
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }
}

/// Clap parser for `--otlp-endpoint`: an http(s) URL, refused at start-up otherwise.
pub(crate) fn parse_endpoint(value: &str) -> Result<String, String> {
    let rest = value.strip_prefix("http://").or_else(|| value.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(value.to_owned()),
        _ => Err(format!("{value:?} is not an http(s) URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_base_urls_or_full_trace_urls() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://127.0.0.1:4318/"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("https://otel.example/v1/traces"), "https://otel.example/v1/traces");
        assert!(parse_endpoint("http://127.0.0.1:4318").is_ok());
        assert!(parse_endpoint("127.0.0.1:4318").unwrap_err().contains("not an http(s) URL"));
        assert!(parse_endpoint("http://").is_err());
    }
}
