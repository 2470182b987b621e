//! `redis`: an ACL user that holds two passwords during a rotation.
//!
//! set adds the new password (`ACL SETUSER u >new`) so both work; test
//! authenticates with it; decommission removes the old one (`ACL SETUSER u
//! <old`); rollback adds the previous one back. Never `resetpass`, never
//! `ACL DELUSER`: a live user is only ever given or relieved of one
//! password. The user must exist with its permissions; rekey manages only
//! its passwords.

use async_trait::async_trait;
use rekey_keyring::{SecretString, SecretValue};
use serde::{Deserialize, Serialize};

use super::{
    Encoding, InlineUrl, Kind, KindOptions, SecretCtx, admin_url, admin_url_option, field,
    generate, step,
};
use crate::error::{Error, Result};
use rekey_probe::redis::{self as resp, Conn, Reply};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisOptions {
    /// A file holding the admin URL, `redis://admin:password@host:port`.
    pub(crate) admin_url_file: String,
    pub(crate) username: String,
    /// Where apps connect (default: the admin URL's address).
    pub(crate) address: String,
    /// The admin URL handed in memory instead of `admin_url_file`.
    #[serde(skip)]
    pub(crate) admin_url: InlineUrl,
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 128
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// An authenticated admin connection.
async fn admin(secret: &str, step_name: &'static str, o: &RedisOptions) -> Result<Conn> {
    let url = admin_url(secret, step_name, &o.admin_url_file, &o.admin_url)?;
    let (addr, user, pass) = resp::parse_url(&url)
        .ok_or_else(|| step(secret, step_name, "the admin URL is not a redis:// URL"))?;
    let mut c = Conn::connect(&addr)
        .await
        .map_err(|e| step(secret, step_name, e.to_string()))?;
    if let Some(p) = pass {
        c.auth(user.as_deref(), p.expose())
            .await
            .map_err(|e| step(secret, step_name, e.to_string()))?
            .map_err(|e| {
                step(
                    secret,
                    step_name,
                    format!("the admin credential was refused: {e}"),
                )
            })?;
    }
    Ok(c)
}

/// `ACL SETUSER user <op><password>`, after checking the user exists.
async fn setuser(
    secret: &str,
    step_name: &'static str,
    o: &RedisOptions,
    op: char,
    password: &str,
) -> Result<()> {
    let mut c = admin(secret, step_name, o).await?;
    let io = |e: rekey_probe::Error| step(secret, step_name, e.to_string());
    match c.call(&["ACL", "GETUSER", &o.username]).await.map_err(io)? {
        Reply::Nil => {
            return Err(step(
                secret,
                step_name,
                format!(
                    "Redis user {} does not exist; create it with its permissions first",
                    o.username
                ),
            ));
        }
        Reply::Error(e) => return Err(step(secret, step_name, acl_error(&e))),
        _ => {}
    }
    let arg = zeroize::Zeroizing::new(format!("{op}{password}"));
    match c
        .call(&["ACL", "SETUSER", &o.username, &arg])
        .await
        .map_err(io)?
    {
        Reply::Status(_) => Ok(()),
        Reply::Error(e) => Err(step(secret, step_name, acl_error(&e))),
        other => Err(step(
            secret,
            step_name,
            format!("unexpected reply {other:?}"),
        )),
    }
}

/// Server errors say what failed; they never repeat our arguments.
fn acl_error(e: &str) -> String {
    if e.starts_with("NOPERM") {
        format!(
            "the admin user lacks ACL permissions ({})",
            e.split_whitespace().next().unwrap_or("NOPERM")
        )
    } else {
        e.split(':').next().unwrap_or(e).to_string()
    }
}

pub(crate) struct Redis;

#[async_trait]
impl Kind for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check_options(&self, raw: &KindOptions) -> Result<KindOptions> {
        let r = raw.redis.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let admin_url_file = r.admin_url_file.trim().to_string();
        let mut address = r.address.trim().to_string();
        if let Some(u) = admin_url_option(&admin_url_file, &r.admin_url, &mut problems) {
            match resp::parse_url(&u) {
                Some((addr, _, _)) if address.is_empty() => address = addr,
                Some(_) => {}
                None => problems.push(format!("{admin_url_file} does not hold a redis:// URL")),
            }
        }
        let username = r.username.trim().to_string();
        if !valid_user(&username) {
            problems.push(format!(
                "--username {username:?}: use letters, digits, - _ ."
            ));
        }
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems.join("; ")));
        }
        Ok(RedisOptions {
            admin_url_file,
            username,
            address,
            admin_url: r.admin_url.clone(),
        }
        .into())
    }

    async fn create(
        &self,
        ctx: &SecretCtx<'_>,
        _: Option<&SecretValue>,
        _: Option<SecretValue>,
    ) -> Result<SecretValue> {
        let o = ctx.options.redis(ctx.id)?;
        let pw =
            String::from_utf8(generate(32, Encoding::Alnum)?.expose().to_vec()).unwrap_or_default();
        let url = format!("redis://{}:{pw}@{}", o.username, o.address);
        Ok(SecretValue::Fields(
            [
                (
                    "username".to_string(),
                    SecretString::new(o.username.clone()),
                ),
                ("password".to_string(), SecretString::new(pw)),
                ("url".to_string(), SecretString::new(url)),
            ]
            .into(),
        ))
    }

    async fn set(
        &self,
        ctx: &SecretCtx<'_>,
        new: &SecretValue,
        _old: Option<&SecretValue>,
    ) -> Result<()> {
        let pw = field(new, "password")
            .ok_or_else(|| step(ctx.id, "set", "the value lacks password"))?;
        setuser(ctx.id, "set", ctx.options.redis(ctx.id)?, '>', pw).await
    }

    async fn test(&self, ctx: &SecretCtx<'_>, new: &SecretValue) -> Result<()> {
        let o = ctx.options.redis(ctx.id)?;
        let pw = field(new, "password")
            .ok_or_else(|| step(ctx.id, "test", "the value lacks password"))?;
        resp::check(&o.address, Some(&o.username), Some(pw))
            .await
            .map_err(|e| step(ctx.id, "test", e.to_string()))
    }

    async fn revoke(&self, ctx: &SecretCtx<'_>, old: &SecretValue) -> Result<()> {
        let pw = field(old, "password")
            .ok_or_else(|| step(ctx.id, "revoke", "the old value lacks password"))?;
        setuser(ctx.id, "revoke", ctx.options.redis(ctx.id)?, '<', pw).await
    }

    async fn restore(&self, ctx: &SecretCtx<'_>, previous: &SecretValue) -> Result<()> {
        let pw = field(previous, "password")
            .ok_or_else(|| step(ctx.id, "restore", "the value lacks password"))?;
        setuser(ctx.id, "restore", ctx.options.redis(ctx.id)?, '>', pw).await
    }

    fn check_value(&self, _: &SecretCtx<'_>, value: &SecretValue) -> Result<()> {
        super::check_credential(value)
    }

    fn set_keeps_older_values(&self) -> bool {
        true
    }

    fn one_rotation_at_a_time(&self) -> bool {
        true
    }
}
