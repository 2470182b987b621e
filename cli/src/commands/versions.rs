//! `rekey versions`: every version of a secret, newest first.

use rekey_proto::v1 as pb;
use serde_json::Value;

use super::Ctx;
use crate::error::CliError;
use crate::output::{
    VERSION_HEADERS, print_json, provider_label, table, version_json, version_row,
};

pub async fn versions(cx: &Ctx, secret: &str) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .list_versions(pb::ListVersionsRequest {
            secret_id: secret.to_string(),
        })
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(
            r.versions.iter().map(|v| version_json(secret, v)).collect(),
        ));
    } else {
        if let Some(line) = r.secret.as_ref().and_then(provider_line) {
            println!("{line}");
        }
        let rows: Vec<_> = r.versions.iter().map(version_row).collect();
        table(&VERSION_HEADERS, &rows);
    }
    Ok(())
}

/// The line above the table for a secret whose values a provider keeps:
/// `provider: vault-main (secret/rekey/db)`. None for the embedded store,
/// whose table starts at its header as it always has (scripts skip one
/// line).
fn provider_line(s: &pb::Secret) -> Option<String> {
    (!s.provider.is_empty()).then(|| format!("provider: {}", provider_label(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_is_named_above_the_table_and_the_embedded_store_is_not() {
        let mut s = pb::Secret {
            id: "prod/db".into(),
            ..Default::default()
        };
        assert_eq!(provider_line(&s), None);
        s.provider = "vault-main".into();
        s.provider_path = "secret/rekey/prod/db".into();
        assert_eq!(
            provider_line(&s).as_deref(),
            Some("provider: vault-main (secret/rekey/prod/db)")
        );
    }
}
