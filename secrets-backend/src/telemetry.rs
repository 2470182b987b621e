//! Logging: `tracing` with `RUST_LOG` filtering, human-readable on a
//! terminal and JSON lines with `--log-format json`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the global subscriber, writing to stderr. `RUST_LOG` chooses
/// levels (default `info`).
pub fn init(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The Vault client's own error events repeat what rekey reports in its
    // words (with the provider's name), and would print Vault's answers;
    // the AWS SDK's say the same about each retry.
    for quiet in [
        "vaultrs=off",
        "rustify=off",
        "aws_smithy_runtime=warn",
        "aws_config=warn",
        "lambda_runtime=warn",
        "lambda_runtime_api_client=warn",
    ] {
        if let Ok(d) = quiet.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
