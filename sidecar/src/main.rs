//! `rekey-sidecar`: the per-pod agent that will watch the backend and
//! hot-reload rotated secrets without restarts. This release ships the
//! backend and the operator CLI; the agent itself comes next.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") | Some("-V") => {
            println!("rekey-sidecar {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "error: rekey-sidecar is not available in this release; use rekey-backend and the rekey CLI"
            );
            ExitCode::from(2)
        }
    }
}
