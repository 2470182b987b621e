//! The `aws-secrets-manager` provider: values in AWS Secrets Manager (ASM),
//! where apps read them through the SDK, its caches or the Secrets Manager
//! Agent.
//!
//! What a user sees with `aws secretsmanager describe-secret`:
//! - every rekey version is an ASM version whose id (its
//!   `ClientRequestToken`) is derived from the secret and the rekey version,
//!   so that a repeated write is a no-op;
//! - a rotation's new value is written with `PutSecretValue` as
//!   `AWSPENDING`; *finish* moves `AWSCURRENT` to it with
//!   `UpdateSecretVersionStage`, and ASM moves `AWSPREVIOUS` to the value it
//!   replaces;
//! - rollback moves `AWSCURRENT` back; decommission removes the old
//!   version's labels (ASM then deprecates it);
//! - a move of `AWSCURRENT` that rekey did not make (an outside
//!   `PutSecretValue`, a console edit, a rotation function) is an outside
//!   change.
//!
//! `SecretString` holds the value itself for a single value and a JSON
//! object of the fields for a structured one; a single value that is not
//! UTF-8 goes to `SecretBinary`.
//!
//! A version's reference is `asm:VERSION_ID`, or `pending:REF` (a sealed
//! copy in rekey's store) for a first version whose ASM secret does not
//! exist yet. rekey keeps a sealed copy of each value it serves, as for
//! Vault, so reads keep working while ASM cannot be reached. Errors name
//! the provider and the secret, never a value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::primitives::Blob;
use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

use super::embedded::Embedded;
use super::{Location, Observed, OutsideChange, Stage, Stored, ValueProvider, Which, sealed_copy};
use crate::config::AwsConfig;
use crate::error::{Error, Result, innermost};
use crate::store::Store;

/// ASM's staging labels.
pub(crate) const AWSCURRENT: &str = "AWSCURRENT";
pub(crate) const AWSPREVIOUS: &str = "AWSPREVIOUS";
pub(crate) const AWSPENDING: &str = "AWSPENDING";

/// ASM's limit on a value.
const MAX_VALUE_BYTES: usize = 65_536;

/// How many version ids one rekey version may try (a write of version N
/// with another value than an earlier, unrecorded write of N takes the
/// next).
const TOKEN_ATTEMPTS: u32 = 8;

pub(crate) struct Aws {
    cfg: AwsConfig,
    sealed: Embedded,
    asm: OnceCell<Asm>,
}

/// What went wrong talking to ASM, in words, and whether trying again
/// later may help; never a value.
#[derive(Debug)]
pub(crate) struct AsmError {
    /// ASM's error code (`ResourceNotFoundException`), empty when the
    /// request got no answer.
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) unavailable: bool,
}

impl AsmError {
    pub(crate) fn is(&self, code: &str) -> bool {
        self.code == code
    }

    /// A problem found here, not answered by ASM: nothing to retry.
    fn local(message: String) -> Self {
        AsmError {
            code: String::new(),
            message,
            unavailable: false,
        }
    }
}

/// An SDK error in words: `what` says what was being done.
pub(crate) fn asm_error<E, R>(what: &str, endpoint: &str, e: &SdkError<E, R>) -> AsmError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("Unknown").to_string();
            let said = s.err().message().unwrap_or_default();
            let unavailable = matches!(
                code.as_str(),
                "InternalServiceError" | "ThrottlingException" | "ServiceUnavailable"
            );
            let message = match code.as_str() {
                "AccessDeniedException" => format!(
                    "{what}: access denied (the role's IAM policy does not allow it): {said}"
                ),
                _ => format!("{what}: Secrets Manager answered {code}: {said}"),
            };
            AsmError {
                code,
                message,
                unavailable,
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            AsmError {
                code: String::new(),
                message: format!(
                    "{what}: cannot reach Secrets Manager at {endpoint}: {}",
                    innermost(e)
                ),
                unavailable: true,
            }
        }
        other => AsmError {
            code: String::new(),
            message: format!("{what}: {}", innermost(other)),
            unavailable: false,
        },
    }
}

/// A client for ASM with the SDK's default credential chain, over rustls
/// with ring (the TLS the rest of rekey uses).
async fn client(region: Option<&str>, endpoint_url: Option<&str>, timeout: Duration) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build(),
        );
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_string()));
    }
    if let Some(u) = endpoint_url {
        loader = loader.endpoint_url(u);
    }
    Client::new(&loader.load().await)
}

/// The version id (`ClientRequestToken`) of rekey version `version` of a
/// secret, attempt `k`: the same every time, so that ASM takes a repeated
/// write as a no-op.
pub(crate) fn version_token(secret_id: &str, version: i64, k: u32) -> String {
    let h = ring::digest::digest(
        &ring::digest::SHA256,
        format!("rekey.v1/asm/{secret_id}#{version}#{k}").as_bytes(),
    );
    format!("rekey-v{version}-{k}-{}", &hex::encode(h.as_ref())[..24])
}

/// A value as ASM keeps it: `SecretString`, or `SecretBinary` for a single
/// value that is not UTF-8.
pub(crate) enum AsmValue {
    String(Zeroizing<String>),
    Binary(SecretBytes),
}

/// A value in ASM's form. A single value that is itself a JSON object would
/// read back as fields: refused.
pub(crate) fn encode(v: &SecretValue) -> std::result::Result<AsmValue, String> {
    let out = match v {
        SecretValue::Raw(b) => match std::str::from_utf8(b.expose()) {
            Ok(s) => {
                if fields_of(s).is_some() {
                    return Err("a single value that is a JSON object of strings cannot be told apart from a structured value in SecretString; store it as fields".into());
                }
                AsmValue::String(Zeroizing::new(s.to_string()))
            }
            Err(_) => AsmValue::Binary(SecretBytes::new(b.expose().to_vec())),
        },
        SecretValue::Fields(f) => {
            let m: serde_json::Map<String, serde_json::Value> = f
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
                .collect();
            let text = Zeroizing::new(serde_json::Value::Object(m).to_string());
            AsmValue::String(text)
        }
    };
    let len = match &out {
        AsmValue::String(s) => s.len(),
        AsmValue::Binary(b) => b.len(),
    };
    if len > MAX_VALUE_BYTES {
        return Err(format!(
            "the value is {len} bytes; Secrets Manager keeps at most {MAX_VALUE_BYTES}"
        ));
    }
    Ok(out)
}

/// The fields of a JSON object whose values are all strings.
fn fields_of(s: &str) -> Option<BTreeMap<String, SecretString>> {
    if !s.trim_start().starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let serde_json::Value::Object(mut m) = v else {
        return None;
    };
    let mut out = BTreeMap::new();
    let mut all_strings = true;
    for (k, v) in &mut m {
        match v {
            serde_json::Value::String(s) => {
                out.insert(k.clone(), SecretString::new(std::mem::take(s)));
            }
            _ => all_strings = false,
        }
    }
    all_strings.then_some(out)
}

/// A value from ASM's `SecretString` / `SecretBinary`.
pub(crate) fn decode(
    string: Option<String>,
    binary: Option<Blob>,
) -> std::result::Result<SecretValue, String> {
    match (string, binary) {
        (Some(s), _) => {
            let s = Zeroizing::new(s);
            Ok(match fields_of(&s) {
                Some(f) => SecretValue::Fields(f),
                None => SecretValue::Raw(SecretBytes::new(s.as_bytes().to_vec())),
            })
        }
        (None, Some(b)) => Ok(SecretValue::Raw(SecretBytes::new(b.into_inner()))),
        (None, None) => Err("it holds neither SecretString nor SecretBinary".into()),
    }
}

/// Which version holds `label`, from `VersionIdsToStages`. ASM keeps each
/// label on one version; should two hold it, one that is not `known` is
/// preferred (moto, for one, can leave `AWSCURRENT` on the version an
/// outside `PutSecretValue` replaced).
pub(crate) fn holder<'a>(
    stages: &'a HashMap<String, Vec<String>>,
    label: &str,
    known: Option<&str>,
) -> Option<&'a str> {
    let mut all: Vec<&str> = stages
        .iter()
        .filter(|(_, s)| s.iter().any(|x| x == label))
        .map(|(v, _)| v.as_str())
        .collect();
    all.sort_unstable();
    all.iter()
        .find(|v| Some(**v) != known)
        .or(all.first())
        .copied()
}

fn asm_ref(r: &str) -> Option<&str> {
    r.strip_prefix("asm:")
}

/// What `DescribeSecret` says about one secret.
pub(crate) struct Described {
    /// `VersionIdsToStages`.
    pub(crate) stages: HashMap<String, Vec<String>>,
    pub(crate) deleted: bool,
    pub(crate) rotation_enabled: bool,
    /// The secret's name (a caller may have named it by ARN).
    pub(crate) name: String,
}

impl Described {
    /// Whether version `id` carries `label`.
    pub(crate) fn has(&self, id: &str, label: &str) -> bool {
        self.stages
            .get(id)
            .is_some_and(|s| s.iter().any(|x| x == label))
    }
}

/// The calls rekey makes to ASM, with errors in words: shared by the
/// provider and the rotation function.
pub(crate) struct Asm {
    client: Client,
    endpoint: String,
}

type AsmResult<T> = std::result::Result<T, AsmError>;

impl Asm {
    /// A client with the SDK's default credential chain; `region` and
    /// `endpoint_url` override the chain's.
    pub(crate) async fn new(
        region: Option<&str>,
        endpoint_url: Option<&str>,
        timeout: Duration,
    ) -> Self {
        let client = client(region, endpoint_url, timeout).await;
        let endpoint = match endpoint_url {
            Some(u) => u.to_string(),
            None => format!(
                "secretsmanager.{}.amazonaws.com",
                client
                    .config()
                    .region()
                    .map_or("(no region)", aws_config::Region::as_ref)
            ),
        };
        Asm { client, endpoint }
    }

    fn err<E, R>(&self, what: &str, e: &SdkError<E, R>) -> AsmError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        asm_error(what, &self.endpoint, e)
    }

    /// `DescribeSecret`; `None` when there is no such secret.
    pub(crate) async fn describe(&self, name: &str) -> AsmResult<Option<Described>> {
        match self.client.describe_secret().secret_id(name).send().await {
            Ok(d) => Ok(Some(Described {
                deleted: d.deleted_date().is_some(),
                rotation_enabled: d.rotation_enabled().unwrap_or(false),
                name: d.name().unwrap_or(name).to_string(),
                stages: d.version_ids_to_stages.unwrap_or_default(),
            })),
            Err(e) => {
                let e = self.err(&format!("describing {name}"), &e);
                if e.is("ResourceNotFoundException") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `GetSecretValue` of one version, or of the version holding `label`.
    /// Callers name one or the other: a read naming neither may see an
    /// older value after stage moves.
    pub(crate) async fn read(&self, name: &str, which: AsmVersion<'_>) -> AsmResult<SecretValue> {
        let req = self.client.get_secret_value().secret_id(name);
        let (req, what) = match which {
            AsmVersion::Id(id) => (
                req.version_id(id),
                format!("reading version {id} of {name}"),
            ),
            AsmVersion::Label(l) => (req.version_stage(l), format!("reading {l} of {name}")),
        };
        let mut out = req.send().await.map_err(|e| self.err(&what, &e))?;
        decode(out.secret_string.take(), out.secret_binary.take())
            .map_err(|m| AsmError::local(format!("{what}: {m}")))
    }

    /// `PutSecretValue` under `token`, labelled `labels`. ASM takes a
    /// repeat with the same token and value as a no-op.
    pub(crate) async fn put(
        &self,
        name: &str,
        token: &str,
        value: &SecretValue,
        labels: &[&str],
    ) -> AsmResult<()> {
        let what = format!("writing version {token} of {name}");
        let data = encode(value).map_err(|m| AsmError::local(format!("{what}: {m}")))?;
        let mut req = self
            .client
            .put_secret_value()
            .secret_id(name)
            .client_request_token(token);
        for l in labels {
            req = req.version_stages(*l);
        }
        let req = match &data {
            AsmValue::String(s) => req.secret_string(s.as_str()),
            AsmValue::Binary(b) => req.secret_binary(Blob::new(b.expose().to_vec())),
        };
        req.send().await.map(drop).map_err(|e| self.err(&what, &e))
    }

    /// `CreateSecret` with its first version under `token`, tagged as
    /// rekey's.
    async fn create(
        &self,
        name: &str,
        token: &str,
        value: &SecretValue,
        secret_id: &str,
    ) -> AsmResult<()> {
        let what = format!("creating {name}");
        let data = encode(value).map_err(|m| AsmError::local(format!("{what}: {m}")))?;
        let tag = |k: &str, v: &str| {
            aws_sdk_secretsmanager::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
        };
        let req = self
            .client
            .create_secret()
            .name(name)
            .client_request_token(token)
            .description(format!("Rotated by rekey (secret {secret_id})"))
            .tags(tag("managed-by", "rekey"))
            .tags(tag("rekey-secret-id", secret_id));
        let req = match &data {
            AsmValue::String(s) => req.secret_string(s.as_str()),
            AsmValue::Binary(b) => req.secret_binary(Blob::new(b.expose().to_vec())),
        };
        req.send().await.map(drop).map_err(|e| self.err(&what, &e))
    }

    /// `UpdateSecretVersionStage`: moves `label` to `to` (from `from`, the
    /// version holding it), or only removes it from `from`.
    pub(crate) async fn label(
        &self,
        name: &str,
        label: &str,
        to: Option<&str>,
        from: Option<&str>,
    ) -> AsmResult<()> {
        let what = match (to, from) {
            (Some(t), _) => format!("moving {label} of {name} to version {t}"),
            (None, f) => format!(
                "removing {label} from version {} of {name}",
                f.unwrap_or("?")
            ),
        };
        self.client
            .update_secret_version_stage()
            .secret_id(name)
            .version_stage(label)
            .set_move_to_version_id(to.map(str::to_string))
            .set_remove_from_version_id(from.map(str::to_string))
            .send()
            .await
            .map(drop)
            .map_err(|e| self.err(&what, &e))
    }

    /// Makes version `to` `AWSCURRENT` (ASM moves `AWSPREVIOUS` to the
    /// version it replaces) and drops its `AWSPENDING`. When `expected` is
    /// given, only if that version is still `AWSCURRENT`. A repeat finds it
    /// done.
    pub(crate) async fn make_current(
        &self,
        d: &Described,
        to: &str,
        expected: Option<&str>,
    ) -> AsmResult<()> {
        let name = d.name.as_str();
        if !d.has(to, AWSCURRENT) {
            let from = match expected {
                Some(e) if d.has(e, AWSCURRENT) => Some(e),
                Some(e) => {
                    return Err(AsmError::local(format!(
                        "{name} changed outside rekey (AWSCURRENT is on version {}, rekey's current is {e}); nothing was moved, the outside change is taken at the next poll",
                        holder(&d.stages, AWSCURRENT, None).unwrap_or("none")
                    )));
                }
                None => holder(&d.stages, AWSCURRENT, None),
            };
            self.label(name, AWSCURRENT, Some(to), from).await?;
        }
        if d.has(to, AWSPENDING) {
            self.label(name, AWSPENDING, None, Some(to)).await?;
        }
        Ok(())
    }
}

/// Which version of a secret to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AsmVersion<'a> {
    Id(&'a str),
    Label(&'a str),
}

impl Aws {
    /// A provider for `cfg`; nothing is asked of ASM until it is used.
    pub(crate) fn new(cfg: AwsConfig, store: Arc<Store>) -> Self {
        Aws {
            cfg,
            sealed: Embedded::new(store),
            asm: OnceCell::new(),
        }
    }

    async fn asm(&self) -> &Asm {
        self.asm
            .get_or_init(|| {
                Asm::new(
                    self.cfg.region.as_deref(),
                    self.cfg.endpoint_url.as_deref(),
                    self.cfg.request_timeout,
                )
            })
            .await
    }

    fn fail(&self, message: impl std::fmt::Display) -> Error {
        Error::Provider {
            provider: self.cfg.name.clone(),
            message: message.to_string(),
            unavailable: false,
        }
    }

    fn to_error(&self, e: AsmError) -> Error {
        Error::Provider {
            provider: self.cfg.name.clone(),
            message: e.message,
            unavailable: e.unavailable,
        }
    }

    async fn describe(&self, name: &str) -> Result<Option<Described>> {
        self.asm()
            .await
            .describe(name)
            .await
            .map_err(|e| self.to_error(e))
    }

    async fn read_version(&self, name: &str, id: &str) -> Result<SecretValue> {
        self.asm()
            .await
            .read(name, AsmVersion::Id(id))
            .await
            .map_err(|e| self.to_error(e))
    }

    /// Writes `value` as a new version labelled `AWSPENDING` under the
    /// first of rekey version `version`'s tokens that is free or already
    /// holds this very value. Returns the version id; `None` when the
    /// secret does not exist.
    async fn put_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<Option<String>> {
        for k in 0..TOKEN_ATTEMPTS {
            let token = version_token(at.secret_id, version, k);
            match self
                .asm()
                .await
                .put(at.path, &token, value, &[AWSPENDING])
                .await
            {
                Ok(()) => return Ok(Some(token)),
                Err(e) if e.is("ResourceNotFoundException") => return Ok(None),
                // Another value under this token: an earlier write of the
                // same rekey version that was never recorded. The next
                // token is free.
                Err(e) if e.is("ResourceExistsException") => {}
                Err(e) => return Err(self.to_error(e)),
            }
        }
        Err(self.fail(format!(
            "writing a pending version of {}: every version id of v{version} is taken by another value",
            at.path
        )))
    }

    /// Creates the secret with `value` as its first (`AWSCURRENT`) version.
    async fn create(&self, at: Location<'_>, version: i64, value: &SecretValue) -> Result<String> {
        let name = at.path;
        let token = version_token(at.secret_id, version, 0);
        match self
            .asm()
            .await
            .create(name, &token, value, at.secret_id)
            .await
        {
            Ok(()) => Ok(token),
            Err(e) if e.is("ResourceExistsException") => {
                if let Some(d) = self.describe(name).await?
                    && d.has(&token, AWSCURRENT)
                {
                    // A repeat of a create that went through.
                    return Ok(token);
                }
                Err(self.fail(format!(
                    "{name} already exists in Secrets Manager and is not rekey's; choose another --provider-path"
                )))
            }
            Err(e) => Err(self.to_error(e)),
        }
    }

    /// Makes version `to` current if `expected` still is.
    async fn make_current(&self, name: &str, to: &str, expected: Option<&str>) -> Result<()> {
        let d = self
            .describe(name)
            .await?
            .ok_or_else(|| self.fail(format!("{name} no longer exists in Secrets Manager")))?;
        self.asm()
            .await
            .make_current(&d, to, expected)
            .await
            .map_err(|e| self.to_error(e))
    }

    fn version_id<'a>(&self, r: &'a str) -> Result<&'a str> {
        asm_ref(r).ok_or_else(|| self.fail(format!("{r:?} is not a Secrets Manager version")))
    }
}

#[async_trait]
impl ValueProvider for Aws {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn default_path(&self, secret_id: &str) -> String {
        format!("{}{secret_id}", self.cfg.name_prefix)
    }

    fn poll_interval(&self) -> Duration {
        self.cfg.poll_interval
    }

    fn check_path(&self, path: &str) -> Result<()> {
        if path.is_empty() || path.len() > 512 || !path.bytes().all(crate::config::asm_name_byte) {
            return Err(Error::InvalidArgument(format!(
                "{path:?} is not a Secrets Manager secret name (1 to 512 of letters, digits and /_+=.@-)"
            )));
        }
        Ok(())
    }

    async fn adopt(&self, at: Location<'_>) -> Result<Option<OutsideChange>> {
        let Some(d) = self.describe(at.path).await? else {
            return Ok(None);
        };
        if d.deleted {
            return Err(self.fail(format!(
                "{} is scheduled for deletion in Secrets Manager; restore it (restore-secret) or choose another --provider-path",
                at.path
            )));
        }
        let Some(current) = holder(&d.stages, AWSCURRENT, None) else {
            return Err(self.fail(format!("{} has no AWSCURRENT version to adopt", at.path)));
        };
        // Its sealed copy is made at the first read, once the secret is
        // recorded: a create refused now leaves nothing behind.
        let value = self.read_version(at.path, current).await?;
        let value_ref = format!("asm:{current}");
        Ok(Some(OutsideChange {
            value,
            value_ref,
            note: format!("adopted version {current} of {}", at.path),
        }))
    }

    async fn write_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<String> {
        match self.put_pending(at, version, value).await? {
            Some(id) => {
                let r = format!("asm:{id}");
                self.sealed.keep(at.secret_id, version, &r, value).await?;
                Ok(r)
            }
            // A first version: ASM makes a new secret's first value current
            // at once, so it waits in rekey's store until promote.
            None => {
                let r = self.sealed.write_pending(at, version, value).await?;
                Ok(format!("pending:{r}"))
            }
        }
    }

    async fn promote(
        &self,
        at: Location<'_>,
        new: Stored<'_>,
        old: Option<Stored<'_>>,
    ) -> Result<String> {
        if let Some(copy) = sealed_copy(new) {
            let value = self.sealed.read(at, Which::Version(copy)).await?;
            let id = self.create(at, new.version, &value).await?;
            let r = format!("asm:{id}");
            self.sealed
                .keep(at.secret_id, new.version, &r, &value)
                .await?;
            return Ok(r);
        }
        let to = self.version_id(new.value_ref)?;
        let expected = old.map(|o| self.version_id(o.value_ref)).transpose()?;
        self.make_current(at.path, to, expected).await?;
        Ok(new.value_ref.to_string())
    }

    async fn read(&self, at: Location<'_>, which: Which<'_>) -> Result<SecretValue> {
        match which {
            Which::Version(v) => {
                if let Some(copy) = sealed_copy(v) {
                    return self.sealed.read(at, Which::Version(copy)).await;
                }
                let id = self.version_id(v.value_ref)?;
                self.sealed
                    .kept_or(at.secret_id, v.version, v.value_ref, || {
                        self.read_version(at.path, id)
                    })
                    .await
            }
            Which::Stage(s) => {
                let label = match s {
                    Stage::Current => AWSCURRENT,
                    Stage::Previous => AWSPREVIOUS,
                    Stage::Pending => AWSPENDING,
                };
                self.asm()
                    .await
                    .read(at.path, AsmVersion::Label(label))
                    .await
                    .map_err(|e| self.to_error(e))
            }
        }
    }

    async fn roll_back(
        &self,
        at: Location<'_>,
        to: Stored<'_>,
        from: Stored<'_>,
    ) -> Result<String> {
        let to_id = self.version_id(to.value_ref)?;
        let from_id = self.version_id(from.value_ref)?;
        self.make_current(at.path, to_id, Some(from_id)).await?;
        Ok(to.value_ref.to_string())
    }

    async fn revoke(&self, at: Location<'_>, old: Stored<'_>) -> Result<()> {
        if sealed_copy(old).is_some() {
            return self.discard(at, old).await;
        }
        let id = self.version_id(old.value_ref)?;
        if let Some(d) = self.describe(at.path).await?
            && let Some(labels) = d.stages.get(id)
        {
            if labels.iter().any(|l| l == AWSCURRENT) {
                return Err(self.fail(format!(
                    "version {id} of {} is AWSCURRENT again (moved outside rekey); it keeps its labels",
                    at.path
                )));
            }
            for label in labels {
                self.asm()
                    .await
                    .label(at.path, label, None, Some(id))
                    .await
                    .map_err(|e| self.to_error(e))?;
            }
        }
        self.sealed.forget_version(at.secret_id, old.version).await
    }

    async fn discard(&self, at: Location<'_>, pending: Stored<'_>) -> Result<()> {
        if let Some(copy) = sealed_copy(pending) {
            return self.sealed.discard(at, copy).await;
        }
        let id = self.version_id(pending.value_ref)?;
        if let Some(d) = self.describe(at.path).await?
            && d.has(id, AWSPENDING)
        {
            self.asm()
                .await
                .label(at.path, AWSPENDING, None, Some(id))
                .await
                .map_err(|e| self.to_error(e))?;
        }
        self.sealed
            .forget_version(at.secret_id, pending.version)
            .await
    }

    async fn observe(&self, at: Location<'_>, current: Stored<'_>) -> Result<Observed> {
        let Some(known) = asm_ref(current.value_ref) else {
            return Ok(Observed::Unchanged);
        };
        let name = at.path;
        let Some(d) = self.describe(name).await? else {
            return Ok(Observed::Problem(format!(
                "{name} no longer exists in Secrets Manager; apps reading it get nothing, sidecars keep v{}",
                current.version
            )));
        };
        if d.deleted {
            return Ok(Observed::Problem(format!(
                "{name} is scheduled for deletion in Secrets Manager; apps reading it get an error, sidecars keep v{}",
                current.version
            )));
        }
        let Some(now) = holder(&d.stages, AWSCURRENT, Some(known)) else {
            return Ok(Observed::Problem(format!(
                "no version of {name} is AWSCURRENT; apps reading it get an error, sidecars keep v{}",
                current.version
            )));
        };
        if now == known {
            return Ok(Observed::Unchanged);
        }
        let value = match self.read_version(name, now).await {
            Ok(v) => v,
            Err(Error::Provider {
                message,
                unavailable: false,
                ..
            }) => return Ok(Observed::Problem(message)),
            Err(e) => return Err(e),
        };
        Ok(Observed::Changed(OutsideChange {
            value,
            value_ref: format!("asm:{now}"),
            note: format!("version {now} of {name} became AWSCURRENT outside rekey"),
        }))
    }
}

impl std::fmt::Debug for AsmValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsmValue(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::super::same_value;
    use super::*;

    fn text(v: &AsmValue) -> &str {
        match v {
            AsmValue::String(s) => s.as_str(),
            AsmValue::Binary(_) => panic!("binary"),
        }
    }

    #[test]
    fn values_map_to_secret_string_and_back() {
        let raw = SecretValue::Raw(SecretBytes::new(b"s3cret".to_vec()));
        let e = encode(&raw).unwrap();
        assert_eq!(text(&e), "s3cret");
        assert!(same_value(
            &decode(Some("s3cret".into()), None).unwrap(),
            &raw
        ));

        let fields = SecretValue::Fields(BTreeMap::from([
            ("username".to_string(), SecretString::new("app".into())),
            ("password".to_string(), SecretString::new("pw".into())),
        ]));
        let e = encode(&fields).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(text(&e)).unwrap(),
            serde_json::json!({"username": "app", "password": "pw"})
        );
        assert!(same_value(
            &decode(Some(text(&e).to_string()), None).unwrap(),
            &fields
        ));

        let bin = SecretValue::Raw(SecretBytes::new(vec![0xff, 0, 1]));
        assert!(matches!(encode(&bin).unwrap(), AsmValue::Binary(_)));
        assert!(same_value(
            &decode(None, Some(Blob::new(vec![0xff, 0, 1]))).unwrap(),
            &bin
        ));
        // JSON that is not an object of strings is a single value.
        let v = decode(Some(r#"{"port": 5432}"#.into()), None).unwrap();
        assert!(matches!(v, SecretValue::Raw(_)));
        assert!(decode(None, None).is_err());
    }

    #[test]
    fn a_single_value_that_reads_back_as_fields_is_refused_without_its_value() {
        let v = SecretValue::Raw(SecretBytes::new(br#"{"k": "hunter2"}"#.to_vec()));
        let e = encode(&v).unwrap_err();
        assert!(e.contains("store it as fields"), "{e}");
        assert!(!e.contains("hunter2"));
        let big = SecretValue::Raw(SecretBytes::new(vec![b'a'; MAX_VALUE_BYTES + 1]));
        assert!(encode(&big).unwrap_err().contains("at most 65536"));
    }

    #[test]
    fn version_ids_are_stable_per_secret_version_and_attempt() {
        let a = version_token("prod/db", 3, 0);
        assert_eq!(a, version_token("prod/db", 3, 0));
        assert_ne!(a, version_token("prod/db", 3, 1));
        assert_ne!(a, version_token("prod/db", 4, 0));
        assert_ne!(a, version_token("prod/api", 3, 0));
        // ASM wants 32 to 64 characters.
        assert!((32..=64).contains(&a.len()), "{a}");
        assert!(a.starts_with("rekey-v3-0-"));
    }

    #[test]
    fn the_holder_of_a_label() {
        let stages = HashMap::from([
            ("a".to_string(), vec![AWSPREVIOUS.to_string()]),
            (
                "b".to_string(),
                vec![AWSCURRENT.to_string(), "custom".to_string()],
            ),
        ]);
        assert_eq!(holder(&stages, AWSCURRENT, None), Some("b"));
        assert_eq!(holder(&stages, AWSPENDING, None), None);
        let mut twice = stages.clone();
        twice.insert("c".into(), vec![AWSCURRENT.to_string()]);
        assert_eq!(holder(&twice, AWSCURRENT, Some("b")), Some("c"));
        assert_eq!(holder(&twice, AWSCURRENT, Some("c")), Some("b"));
    }
}
