//! Log levels and the JSON log layer: one line per event on standard error, with the
//! operation and stage fields the runner attaches.

use std::{fmt, str::FromStr};

use tracing_subscriber::{EnvFilter, Layer, Registry, fmt::format::FmtSpan};

/// How much the daemon logs. Read from the config file, a flag or the environment, case
/// insensitively, `warning` as `warn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum LogLevel {
    /// Everything, including fine-grained steps.
    Debug,
    /// Operations and their stages.
    Info,
    /// Only what needs attention.
    Warn,
    /// Only failures.
    Error,
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" | "warning" => Ok(Self::Warn),
            "error" => Ok(Self::Error),
            _ => Err(format!("{s:?} is not a log level; allowed values: debug, info, warn, error")),
        }
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        value.parse()
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        })
    }
}

/// The JSON log layer at `level` (library noise stays at warn). It sees events only: log
/// lines carry their own fields, and a span this layer saw would cost every RPC its fields
/// formatted as JSON, for nothing (spans are for the OpenTelemetry layer).
pub fn json_layer(level: LogLevel) -> Box<dyn Layer<Registry> + Send + Sync> {
    use tracing_subscriber::filter::{FilterExt, filter_fn};
    let filter = EnvFilter::new(format!("warn,banger_server={level},bangerd={level}"))
        .and(filter_fn(|metadata| metadata.is_event()));
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .boxed()
}
