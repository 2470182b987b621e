//! One function per subcommand that talks to the backend. Each checks its
//! own flags first (a mistake there is a usage error, exit 2), then
//! connects, makes its call and prints the answer as a table or as JSON.

mod audit;
mod create;
mod get;
mod list;
mod revoke;
mod rollback;
mod rotate;
mod status;
mod sync;
mod token;
mod versions;

pub use audit::audit;
pub use create::create;
pub use get::get;
pub use list::list;
pub use revoke::revoke;
pub use rollback::rollback;
pub use rotate::rotate;
pub use status::status;
pub use sync::sync;
pub use token::token;
pub use versions::versions;

use std::io::Read;
use std::path::Path;

use rekey_proto::v1 as pb;

use crate::args::{BackendArgs, Output};
use crate::client::{Client, Target};
use crate::error::CliError;

/// What every command needs: the checked backend target and the output
/// format.
pub struct Ctx {
    target: Target,
    pub json: bool,
}

impl Ctx {
    /// Checks the connection flags (usage errors) without connecting.
    pub fn new(backend: &BackendArgs, output: Output) -> Result<Ctx, CliError> {
        Ok(Ctx {
            target: Target::from_args(backend)?,
            json: output == Output::Json,
        })
    }

    pub async fn connect(&self) -> Result<Client, CliError> {
        self.target.connect().await
    }
}

/// Milliseconds of a duration flag (`30m`, `1h`); 0 when absent.
fn duration_ms(flag: &str, v: Option<&str>) -> Result<i64, CliError> {
    let Some(s) = v else { return Ok(0) };
    let d = humantime::parse_duration(s.trim()).map_err(|_| {
        CliError::usage(format!("{flag} {s:?} is not a duration such as 30m or 1h"))
    })?;
    i64::try_from(d.as_millis()).map_err(|_| CliError::usage(format!("{flag} {s:?} is too long")))
}

/// The contents of a `--value-file` (`-` for stdin) as a raw value.
fn read_value(path: &Path) -> Result<pb::SecretValue, CliError> {
    let mut buf = Vec::new();
    let r = if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf))
    };
    r.map_err(|e| CliError::usage(format!("cannot read --value-file {}: {e}", path.display())))?;
    Ok(pb::SecretValue {
        value: Some(pb::secret_value::Value::Raw(buf)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_or_name_the_flag() {
        assert_eq!(duration_ms("--window", None).ok(), Some(0));
        assert_eq!(duration_ms("--window", Some(" 30m ")).ok(), Some(1_800_000));
        let e = duration_ms("--jitter", Some("soon"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("invalid argument: --jitter \"soon\" is not a duration such as 30m or 1h")
        );
    }

    #[test]
    fn an_unreadable_value_file_is_a_usage_error() {
        let e = read_value(Path::new("/nonexistent/value")).err();
        assert!(
            matches!(e, Some(CliError::Usage(m)) if m.starts_with("cannot read --value-file /nonexistent/value"))
        );
    }
}
