//! `rekey get`: one version's metadata, or with `--reveal` its value alone
//! (so that it can be piped).

use std::io::Write;

use rekey_proto::v1 as pb;
use rekey_proto::v1::get_secret_request::Selector;

use super::Ctx;
use crate::args::{GetArgs, StageArg};
use crate::error::CliError;
use crate::output::{VERSION_HEADERS, print_json, table, version_json, version_row};

pub async fn get(cx: &Ctx, a: &GetArgs) -> Result<(), CliError> {
    let selector = match (a.stage, a.version) {
        (_, Some(n)) => Some(Selector::Version(n)),
        (Some(st), None) => Some(Selector::Stage(
            match st {
                StageArg::Current => pb::Stage::Current,
                StageArg::Previous => pb::Stage::Previous,
                StageArg::Pending => pb::Stage::Pending,
            }
            .into(),
        )),
        (None, None) => None,
    };
    let r = cx
        .connect()
        .await?
        .get_secret(pb::GetSecretRequest {
            secret_id: a.secret.clone(),
            selector,
            reveal: a.reveal,
        })
        .await?
        .into_inner();
    let v = r.version.unwrap_or_default();
    if cx.json {
        print_json(&version_json(&a.secret, &v));
        return Ok(());
    }
    let Some(val) = &v.value else {
        table(&VERSION_HEADERS, &[version_row(&v)]);
        return Ok(());
    };
    match &val.value {
        Some(pb::secret_value::Value::Raw(b)) => {
            let mut out = std::io::stdout().lock();
            let newline: &[u8] = if b.ends_with(b"\n") { b"" } else { b"\n" };
            out.write_all(b)
                .and_then(|()| out.write_all(newline))
                .map_err(|e| CliError::failed(format!("cannot write the value: {e}")))?;
        }
        Some(pb::secret_value::Value::Fields(f)) => {
            for (k, v) in &f.fields {
                println!("{k}={v}");
            }
        }
        None => {}
    }
    Ok(())
}
