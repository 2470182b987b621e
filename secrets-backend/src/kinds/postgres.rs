//! `postgres`: database credentials rotated with alternating users.
//!
//! Two login roles, `BASE_a` and `BASE_b`, are members of one group role
//! that owns the app's objects (and each session acts as that group), so
//! grants and ownership never drift. A rotation gives the idle role a new
//! password and LOGIN while the other keeps working; decommission clears the
//! old role's password and sets NOLOGIN. Passwords are sent to Postgres as
//! SCRAM-SHA-256 verifiers computed here (on the blocking pool: 4096
//! PBKDF2 rounds), so the plaintext never reaches the server or its
//! statement log, and rekey's own connections never log statements. A
//! verifier is started as soon as create makes the password, so it is
//! ready by set; set computes its own for any other password.
//!
//! The admin connection of each secret is kept between steps and checked
//! with a ping before each use; it is opened again when the ping fails, the
//! admin URL changed, or it sat idle for [`ADMIN_IDLE`]. A kept connection
//! remembers that it found the roles, so set looks for them again only
//! when a change fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use rekey_keyring::{SecretString, SecretValue};
use rekey_probe::postgres::{PgUrl, SslMode, pg_error};
use ring::{digest, hmac, pbkdf2};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnection;

use super::{
    Encoding, InlineUrl, Kind, KindOptions, Nodes, SecretCtx, admin_url, admin_url_option, field,
    generate, step,
};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct PgOptions {
    /// A file holding the admin connection URL (read at each step).
    pub(crate) admin_url_file: String,
    pub(crate) group_role: String,
    pub(crate) role_base: String,
    pub(crate) database: String,
    /// Where apps connect; empty: the admin URL's host.
    pub(crate) host: String,
    /// 0: the admin URL's port.
    pub(crate) port: u16,
    /// SQL run as the new role by the test step; empty: `SELECT 1`.
    pub(crate) probe: String,
    /// Terminate the old role's sessions at decommission.
    pub(crate) terminate_sessions: bool,
    /// libpq's `sslmode` for apps' URLs; empty: libpq's default.
    pub(crate) sslmode: String,
    /// `sslrootcert` for apps' URLs (a path as apps and the backend see
    /// it, or `system`); empty: none.
    pub(crate) sslrootcert: String,
    /// The admin URL handed in memory instead of `admin_url_file`.
    #[serde(skip)]
    pub(crate) admin_url: InlineUrl,
}

/// Role names rekey creates and quotes: lower-case, digits, underscore.
fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 60
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A SCRAM-SHA-256 verifier for `password`, as Postgres stores it.
pub(crate) fn scram_verifier(password: &str) -> Result<String> {
    const ITER: u32 = 4096;
    let salt = rekey_keyring::random_bytes(16)?;
    let mut salted = zeroize::Zeroizing::new([0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ITER).unwrap_or(std::num::NonZeroU32::MIN),
        salt.expose(),
        password.as_bytes(),
        salted.as_mut_slice(),
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, salted.as_slice());
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(format!(
        "SCRAM-SHA-256${ITER}:{}${}:{}",
        b64.encode(salt.expose()),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    ))
}

/// Connects without statement logging, within 10 s; errors never include
/// the URL or a password.
fn connect<'a>(
    secret: &'a str,
    step_name: &'static str,
    url: &'a str,
) -> BoxFut<'a, Result<PgConnection>> {
    Box::pin(async move {
        rekey_probe::postgres::connect(url, rekey_probe::postgres::DEFAULT_TIMEOUT)
            .await
            .map_err(|e| step(secret, step_name, e.to_string()))
    })
}

type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Runs SQL without parameters. Boxed with explicit lifetimes: sqlx's
/// executor impls are not general enough for `async_trait`'s Send check.
fn exec<'a>(
    secret: &'a str,
    step_name: &'static str,
    c: &'a mut PgConnection,
    sql: String,
) -> BoxFut<'a, Result<()>> {
    Box::pin(async move {
        sqlx::Executor::execute(&mut *c, sql.as_str())
            .await
            .map(drop)
            .map_err(|e| step(secret, step_name, pg_error(&e)))
    })
}

/// Which of `names` exist as roles, in one query.
fn roles_present<'a>(
    secret: &'a str,
    step_name: &'static str,
    c: &'a mut PgConnection,
    names: Vec<String>,
) -> BoxFut<'a, Result<Vec<String>>> {
    Box::pin(async move {
        sqlx::query_scalar::<_, String>(
            "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1)",
        )
        .bind(names)
        .fetch_all(&mut *c)
        .await
        .map_err(|e| step(secret, step_name, pg_error(&e)))
    })
}

/// Checks that a kept connection still answers.
fn ping(c: &mut PgConnection) -> BoxFut<'_, bool> {
    Box::pin(async move { sqlx::Connection::ping(c).await.is_ok() })
}

/// Makes sure the group and both login roles exist (creating the login
/// roles, never the group).
async fn ensure_roles(
    secret: &str,
    step_name: &'static str,
    c: &mut PgConnection,
    o: &PgOptions,
) -> Result<()> {
    let a = format!("{}_a", o.role_base);
    let b = format!("{}_b", o.role_base);
    let present = roles_present(
        secret,
        step_name,
        c,
        vec![o.group_role.clone(), a.clone(), b.clone()],
    )
    .await?;
    if !present.contains(&o.group_role) {
        return Err(step(
            secret,
            step_name,
            format!(
                "group role {} does not exist; create it and give it the app's objects first",
                o.group_role
            ),
        ));
    }
    for role in [a, b] {
        if !present.contains(&role) {
            exec(
                secret,
                step_name,
                c,
                format!(
                    "CREATE ROLE \"{role}\" NOLOGIN IN ROLE \"{}\"",
                    o.group_role
                ),
            )
            .await?;
            // Objects the role creates belong to the group.
            exec(
                secret,
                step_name,
                c,
                format!("ALTER ROLE \"{role}\" SET role = \"{}\"", o.group_role),
            )
            .await?;
        }
    }
    Ok(())
}

async fn enable(
    kind: &Postgres,
    secret: &str,
    step_name: &'static str,
    o: &PgOptions,
    v: &SecretValue,
) -> Result<()> {
    let (Some(user), Some(pw)) = (field(v, "username"), field(v, "password")) else {
        return Err(step(
            secret,
            step_name,
            "the value lacks username or password",
        ));
    };
    if !valid_ident(user) {
        return Err(step(
            secret,
            step_name,
            format!("{user:?} is not a role rekey manages"),
        ));
    }
    // The verifier started at create, or one computed now beside the
    // admin connection's check.
    let verifier = kind.verifier(secret, pw);
    let mut c = kind.admin(secret, step_name, o).await?;
    let verifier = verifier
        .await
        .map_err(|e| Error::Internal(format!("computing a SCRAM verifier: {e}")))??;
    let alter = format!("ALTER ROLE \"{user}\" WITH LOGIN PASSWORD '{verifier}'");
    let roles = format!("{}\0{}", o.group_role, o.role_base);
    let done = async {
        // This connection already saw the roles: go straight to the
        // change, and look again only if the change fails.
        let seen = c.roles.as_deref() == Some(roles.as_str());
        if !seen {
            ensure_roles(secret, step_name, &mut c.conn, o).await?;
            c.roles = Some(roles.clone());
        }
        match exec(secret, step_name, &mut c.conn, alter.clone()).await {
            Err(_) if seen => {
                ensure_roles(secret, step_name, &mut c.conn, o).await?;
                exec(secret, step_name, &mut c.conn, alter).await
            }
            done => done,
        }
    }
    .await;
    kind.keep(secret, c, done.is_ok());
    done
}

/// A SCRAM verifier being computed on the blocking pool for the password
/// create just made, so that set finds it ready.
struct Verifying {
    /// SHA-256 of the password it is for, never the password.
    password: [u8; 32],
    verifier: tokio::task::JoinHandle<Result<String>>,
}

/// Computes `password`'s verifier on the blocking pool.
fn spawn_verifier(password: &str) -> tokio::task::JoinHandle<Result<String>> {
    let pw = zeroize::Zeroizing::new(password.to_string());
    tokio::task::spawn_blocking(move || scram_verifier(&pw))
}

/// How long a kept admin connection may sit unused before it is closed.
pub(crate) const ADMIN_IDLE: Duration = Duration::from_secs(300);
/// How many admin connections are kept at most (one per secret).
const ADMIN_KEPT: usize = 64;

/// An admin connection kept for one secret.
struct Kept {
    conn: PgConnection,
    /// Which admin URL it was opened with (a digest; never the URL).
    url: [u8; 32],
    used: Instant,
    /// The group role and role base whose roles this connection found
    /// present, so the next set does not look again.
    roles: Option<String>,
}

/// SHA-256 of an admin URL or a password: what is kept to recognise it.
fn sha256(text: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, text.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Postgres {
    /// The secret's admin connection: the kept one if it still answers and
    /// was opened with today's admin URL, else a new one.
    async fn admin(&self, secret: &str, step_name: &'static str, o: &PgOptions) -> Result<Kept> {
        let url = admin_url(secret, step_name, &o.admin_url_file, &o.admin_url)?;
        let want = sha256(&url);
        let kept = self.kept().remove(secret);
        if let Some(mut k) = kept
            && k.url == want
            && k.used.elapsed() < ADMIN_IDLE
            && ping(&mut k.conn).await
        {
            return Ok(k);
        }
        Ok(Kept {
            conn: connect(secret, step_name, &url).await?,
            url: want,
            used: Instant::now(),
            roles: None,
        })
    }

    /// Starts computing the verifier of `password` (just made by create)
    /// on the blocking pool, for the secret's next set.
    fn start_verifier(&self, secret: &str, password: &str) {
        let digest = sha256(password);
        let verifier = spawn_verifier(password);
        lock(&self.verifying).insert(
            secret.to_string(),
            Verifying {
                password: digest,
                verifier,
            },
        );
    }

    /// The verifier of `password`: the one started at create if it was
    /// for this password, else one computed now on the blocking pool.
    fn verifier(&self, secret: &str, password: &str) -> tokio::task::JoinHandle<Result<String>> {
        let started = lock(&self.verifying).remove(secret);
        match started {
            Some(v) if rekey_keyring::ct_eq(&v.password, &sha256(password)) => v.verifier,
            _ => spawn_verifier(password),
        }
    }

    /// Keeps `c` for the secret's next step when the step went well (a
    /// failed one may have left the session in a state nobody wants).
    fn keep(&self, secret: &str, mut c: Kept, ok: bool) {
        if !ok {
            return;
        }
        c.used = Instant::now();
        let mut kept = self.kept();
        kept.retain(|_, k| k.used.elapsed() < ADMIN_IDLE);
        if kept.len() >= ADMIN_KEPT
            && let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, k)| k.used)
                .map(|(id, _)| id.clone())
        {
            kept.remove(&oldest);
        }
        kept.insert(secret.to_string(), c);
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        lock(&self.admin)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
pub(crate) struct Postgres {
    /// One admin connection per secret, kept between steps.
    admin: Mutex<HashMap<String, Kept>>,
    /// At most one verifier per secret, started by create for set.
    verifying: Mutex<HashMap<String, Verifying>>,
}

#[async_trait]
impl Kind for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check_options(&self, raw: &KindOptions) -> Result<KindOptions> {
        let p = raw.postgres.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let admin_url_file = p.admin_url_file.trim().to_string();
        let mut host = p.host.trim().to_string();
        let mut port = p.port;
        let mut sslmode = p.sslmode.trim().to_string();
        let mut sslrootcert = p.sslrootcert.trim().to_string();
        if !sslmode.is_empty() && sslmode.parse::<SslMode>().is_err() {
            problems.push(format!(
                "--sslmode {sslmode:?}: use disable, allow, prefer, require, verify-ca or verify-full"
            ));
        }
        if let Some(u) = admin_url_option(&admin_url_file, &p.admin_url, &mut problems) {
            match PgUrl::parse(&u) {
                Ok(url) => {
                    let o = url.options();
                    if host.is_empty() {
                        host = o.get_host().to_string();
                    }
                    if port == 0 {
                        port = o.get_port();
                    }
                    // Apps connect the way the admin does, unless told.
                    let tls = url.tls();
                    if sslmode.is_empty()
                        && let Some(m) = tls.mode
                    {
                        sslmode = m.to_string();
                    }
                    if sslrootcert.is_empty()
                        && let Some(r) = &tls.root_cert
                    {
                        sslrootcert.clone_from(r);
                    }
                }
                Err(rekey_probe::Error::Url { .. }) => {
                    problems.push(format!("{admin_url_file} does not hold a postgres:// URL"));
                }
                Err(e) => problems.push(format!("{admin_url_file}: {e}")),
            }
        }
        let group_role = p.group_role.trim().to_string();
        if !valid_ident(&group_role) {
            problems.push(format!(
                "--group-role {group_role:?}: use lower-case letters, digits and _"
            ));
        }
        let role_base = p.role_base.trim().to_string();
        if !valid_ident(&role_base) || role_base.len() > 58 {
            problems.push(format!(
                "--role-base {role_base:?}: use lower-case letters, digits and _ (at most 58)"
            ));
        }
        let database = p.database.trim().to_string();
        if database.is_empty() || database.contains(['/', '?', '@', ' ']) {
            problems.push(format!("--database {database:?} is not a database name"));
        }
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems.join("; ")));
        }
        let probe = match p.probe.trim() {
            "" => "SELECT 1".to_string(),
            sql => sql.to_string(),
        };
        let o = PgOptions {
            admin_url_file,
            group_role,
            role_base,
            database,
            host,
            port,
            probe,
            terminate_sessions: p.terminate_sessions,
            sslmode,
            sslrootcert,
            admin_url: p.admin_url.clone(),
        };
        Ok(o.into())
    }

    async fn create(
        &self,
        ctx: &SecretCtx<'_>,
        current: Option<&SecretValue>,
        _: Option<SecretValue>,
    ) -> Result<SecretValue> {
        let o = ctx.options.postgres(ctx.id)?;
        let (a, b) = (format!("{}_a", o.role_base), format!("{}_b", o.role_base));
        // The idle role: the one current does not use.
        let user = match current.and_then(|c| field(c, "username")) {
            Some(u) if u == a => b,
            _ => a,
        };
        let pw = generate(32, Encoding::Alnum)?;
        let pw = String::from_utf8(pw.expose().to_vec()).unwrap_or_default();
        // Its PBKDF2 runs while the engine stores the pending version.
        self.start_verifier(ctx.id, &pw);
        let mut url = format!(
            "postgres://{user}:{pw}@{}:{}/{}",
            o.host, o.port, o.database
        );
        let mut fields: std::collections::BTreeMap<String, SecretString> = [
            ("username".to_string(), SecretString::new(user)),
            ("password".to_string(), SecretString::new(pw)),
            ("host".to_string(), SecretString::new(o.host.clone())),
            ("port".to_string(), SecretString::new(o.port.to_string())),
            (
                "database".to_string(),
                SecretString::new(o.database.clone()),
            ),
        ]
        .into();
        // The TLS settings travel with the credential, in the URL and as
        // fields of their own, so an app that connects with either uses
        // TLS as the backend does. `sslmode` is always a field (libpq's
        // default, prefer, when none is set), so a template may name it.
        let mut sep = '?';
        for (k, v) in [("sslmode", &o.sslmode), ("sslrootcert", &o.sslrootcert)] {
            if !v.is_empty() {
                url.push(sep);
                url.push_str(&format!(
                    "{k}={}",
                    rekey_probe::postgres::encode_query_value(v)
                ));
                sep = '&';
                fields.insert(k.to_string(), SecretString::new(v.clone()));
            }
        }
        fields
            .entry("sslmode".to_string())
            .or_insert_with(|| SecretString::new(SslMode::Prefer.as_str().to_string()));
        fields.insert("url".to_string(), SecretString::new(url));
        Ok(SecretValue::Fields(fields))
    }

    async fn set(
        &self,
        ctx: &SecretCtx<'_>,
        new: &SecretValue,
        _old: Option<&SecretValue>,
    ) -> Result<Nodes> {
        enable(self, ctx.id, "set", ctx.options.postgres(ctx.id)?, new).await?;
        Ok(None)
    }

    async fn test(&self, ctx: &SecretCtx<'_>, new: &SecretValue) -> Result<()> {
        let o = ctx.options.postgres(ctx.id)?;
        let url = field(new, "url").ok_or_else(|| step(ctx.id, "test", "the value lacks url"))?;
        let user = field(new, "username").unwrap_or_default().to_string();
        let mut c = connect(ctx.id, "test", url).await?;
        exec(ctx.id, "test", &mut c, o.probe.clone())
            .await
            .map_err(|e| {
                let why = match e {
                    Error::Step { message, .. } => message,
                    other => other.to_string(),
                };
                step(ctx.id, "test", format!("the probe failed as {user}: {why}"))
            })
    }

    async fn revoke(
        &self,
        ctx: &SecretCtx<'_>,
        old: &SecretValue,
        _current: Option<&SecretValue>,
    ) -> Result<Nodes> {
        let o = ctx.options.postgres(ctx.id)?;
        let user = field(old, "username").unwrap_or_default();
        if !valid_ident(user) {
            return Err(step(
                ctx.id,
                "revoke",
                "the old value lacks a managed username",
            ));
        }
        let mut c = self.admin(ctx.id, "revoke", o).await?;
        let done = async {
            exec(
                ctx.id,
                "revoke",
                &mut c.conn,
                format!("ALTER ROLE \"{user}\" WITH NOLOGIN PASSWORD NULL"),
            )
            .await?;
            if o.terminate_sessions {
                // `user` passed valid_ident: safe inside a literal.
                exec(
                    ctx.id,
                    "revoke",
                    &mut c.conn,
                    format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{user}'"),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        self.keep(ctx.id, c, done.is_ok());
        done.map(|()| None)
    }

    async fn restore(&self, ctx: &SecretCtx<'_>, previous: &SecretValue) -> Result<Nodes> {
        enable(
            self,
            ctx.id,
            "restore",
            ctx.options.postgres(ctx.id)?,
            previous,
        )
        .await?;
        Ok(None)
    }

    fn check_value(&self, _: &SecretCtx<'_>, value: &SecretValue) -> Result<()> {
        super::check_credential(value)
    }

    fn one_rotation_at_a_time(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(valid_ident("app_rw"));
        assert!(!valid_ident("App"));
        assert!(!valid_ident("x\"; DROP"));
        assert!(!valid_ident(""));
    }

    #[test]
    fn scram_verifiers_have_postgres_shape_and_fresh_salt() {
        let a = scram_verifier("secret-password").unwrap();
        let b = scram_verifier("secret-password").unwrap();
        assert!(a.starts_with("SCRAM-SHA-256$4096:"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        assert!(!a.contains("secret-password"));
        let (_, rest) = a.split_once('$').unwrap();
        let (salt_part, keys) = rest.split_once('$').unwrap();
        assert_eq!(salt_part.split(':').count(), 2);
        assert_eq!(keys.split(':').count(), 2);
    }

    /// Whether `verifier` is the SCRAM verifier of `password`: its stored
    /// key, recomputed from the password and the verifier's own salt.
    fn verifies(verifier: &str, password: &str) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let rest = verifier.strip_prefix("SCRAM-SHA-256$4096:").unwrap();
        let (salt, keys) = rest.split_once('$').unwrap();
        let (stored, _) = keys.split_once(':').unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(4096).unwrap(),
            &b64.decode(salt).unwrap(),
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        digest::digest(&digest::SHA256, client_key.as_ref()).as_ref() == b64.decode(stored).unwrap()
    }

    #[tokio::test]
    async fn set_uses_the_verifier_started_by_create_only_for_that_password() {
        let kind = Postgres::default();
        kind.start_verifier("db/a", "made-by-create");
        let v = kind
            .verifier("db/a", "made-by-create")
            .await
            .unwrap()
            .unwrap();
        assert!(verifies(&v, "made-by-create"));
        assert!(lock(&kind.verifying).is_empty(), "taken, not kept");

        // A set with another password (a restore of previous, say) never
        // gets the verifier made for create's.
        kind.start_verifier("db/a", "made-by-create");
        let v = kind.verifier("db/a", "previous").await.unwrap().unwrap();
        assert!(verifies(&v, "previous"));
        assert!(!verifies(&v, "made-by-create"));

        // Nor does another secret.
        kind.start_verifier("db/b", "for-b");
        let v = kind.verifier("db/c", "for-c").await.unwrap().unwrap();
        assert!(verifies(&v, "for-c"));
        assert_eq!(lock(&kind.verifying).len(), 1);
    }
}
