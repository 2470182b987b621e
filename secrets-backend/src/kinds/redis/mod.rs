//! `redis`: an ACL user that holds two passwords during a rotation, on
//! every server of the deployment.
//!
//! set adds the new password (`ACL SETUSER u >new`) so both work; test
//! authenticates with it; decommission removes the old one (`ACL SETUSER u
//! <old`); rollback adds the previous one back. Never `resetpass`, never
//! `ACL DELUSER`: a live user is only ever given or relieved of one
//! password. The user must exist with its permissions; rekey manages only
//! its passwords.
//!
//! Redis keeps an ACL per server, so each step applies to every server of
//! the declared topology ([`topology`]: one server, a primary and its
//! replicas, Sentinel, Cluster), found afresh each time, and counts as done
//! only when every one of them took it: a server that cannot be reached
//! fails the step, which is retried or parked, so current never moves to
//! a password some servers lack. Decommission also gives current to a
//! server that lacks it (one added since the last step). The servers each
//! password is on are returned to the engine, which records them.
//!
//! A `rediss://` admin URL means TLS to every server (and Sentinel), with
//! the CA, client certificate and server name of the secret's options.

mod acl;
mod topology;

use async_trait::async_trait;
use rekey_keyring::{SecretString, SecretValue};
use rekey_probe::redis as resp;
use rekey_probe::tls::{Tls, TlsFiles};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{
    Encoding, InlineUrl, Kind, KindOptions, Nodes, SecretCtx, admin_url, admin_url_option, field,
    generate, step,
};
use crate::error::{Error, Result};
use acl::Change;
pub(crate) use topology::Topology;
use topology::{Layout, Reach};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RedisOptions {
    /// A file holding the admin URL, `redis://admin:password@host:port`
    /// (`rediss://` for TLS).
    pub(crate) admin_url_file: String,
    pub(crate) username: String,
    /// Where apps connect (default: the admin URL's address).
    pub(crate) address: String,
    /// How the servers that hold the user are found.
    pub(crate) topology: Topology,
    /// `nodes`: the servers (empty: found with `ROLE`); `cluster`: seed
    /// nodes (empty: the admin URL's server).
    pub(crate) nodes: Vec<String>,
    /// `sentinel`: the Sentinels to ask.
    pub(crate) sentinels: Vec<String>,
    /// `sentinel`: the name the Sentinels monitor the primary by.
    pub(crate) master_name: String,
    /// TLS settings for a `rediss://` deployment.
    pub(crate) tls: RedisTls,
    /// The admin URL handed in memory instead of `admin_url_file`.
    #[serde(skip)]
    pub(crate) admin_url: InlineUrl,
}

/// Files on the backend's host, and the name certificates are checked
/// against; empty: none (public CAs, no client certificate, the host
/// connected to).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RedisTls {
    pub(crate) ca_file: String,
    pub(crate) cert_file: String,
    pub(crate) key_file: String,
    pub(crate) server_name: String,
}

impl RedisTls {
    fn is_empty(&self) -> bool {
        self == &RedisTls::default()
    }

    fn files(&self) -> TlsFiles {
        let path = |s: &str| (!s.is_empty()).then(|| s.into());
        TlsFiles {
            ca_file: path(&self.ca_file),
            cert_file: path(&self.cert_file),
            key_file: path(&self.key_file),
            server_name: (!self.server_name.is_empty()).then(|| self.server_name.clone()),
        }
    }
}

impl RedisOptions {
    fn layout(&self) -> Layout<'_> {
        Layout {
            topology: self.topology,
            nodes: &self.nodes,
            sentinels: &self.sentinels,
            master_name: &self.master_name,
        }
    }
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 128
        && u.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `host:port` with a port that is a number.
fn valid_addr(a: &str) -> bool {
    let host = resp::host_of(a);
    host != a
        && !host.is_empty()
        && a.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// The admin credential and TLS, read from the admin URL for this step.
fn reach(secret: &str, step_name: &'static str, o: &RedisOptions) -> Result<Reach> {
    let url = admin_url(secret, step_name, &o.admin_url_file, &o.admin_url)?;
    let u = resp::parse_url(&url)
        .ok_or_else(|| step(secret, step_name, "the admin URL is not a redis:// URL"))?;
    let tls = if u.tls {
        Some(
            Tls::new(rekey_probe::Service::Redis, &o.tls.files())
                .map_err(|e| step(secret, step_name, e.to_string()))?,
        )
    } else {
        None
    };
    Ok(Reach {
        addr: u.addr,
        user: u.user,
        password: u.password,
        tls,
    })
}

/// Every server of the deployment, found now.
async fn servers(
    secret: &str,
    step_name: &'static str,
    o: &RedisOptions,
    r: &Reach,
) -> Result<Vec<String>> {
    topology::discover(&o.layout(), r)
        .await
        .map_err(|e| step(secret, step_name, e))
}

/// Runs `op` on every server at once; done only when every one is. An
/// error lists each server that failed and how many were done.
async fn on_every_server<F, Fut>(
    secret: &str,
    step_name: &'static str,
    servers: &[String],
    op: F,
) -> Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for s in servers {
        let node = s.clone();
        let fut = op(node.clone());
        set.spawn(async move { (node, fut.await) });
    }
    let mut failed = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((node, Err(e))) => failed.push((node, e)),
            Err(e) => failed.push(("a server".into(), format!("the step's task failed: {e}"))),
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    failed.sort();
    let why: Vec<String> = failed
        .iter()
        .map(|(node, e)| {
            // Probe errors name their target already.
            if e.contains(node.as_str()) {
                e.clone()
            } else {
                format!("{node}: {e}")
            }
        })
        .collect();
    Err(step(
        secret,
        step_name,
        format!(
            "{} of {} servers done; {}",
            servers.len() - failed.len(),
            servers.len(),
            why.join("; ")
        ),
    ))
}

/// Changes the user's passwords on every server; the servers.
async fn change(
    secret: &str,
    step_name: &'static str,
    o: &RedisOptions,
    c: Change,
) -> Result<Vec<String>> {
    let r = reach(secret, step_name, o)?;
    let nodes = servers(secret, step_name, o, &r).await?;
    let c = std::sync::Arc::new(c);
    let user = o.username.clone();
    on_every_server(secret, step_name, &nodes, |node| {
        let (r, c, user) = (r.clone(), c.clone(), user.clone());
        async move { acl::apply(&r, &node, &user, &c).await }
    })
    .await?;
    Ok(nodes)
}

fn password<'a>(v: &'a SecretValue, secret: &str, step_name: &'static str) -> Result<&'a str> {
    field(v, "password").ok_or_else(|| step(secret, step_name, "the value lacks password"))
}

fn owned(p: &str) -> Zeroizing<String> {
    Zeroizing::new(p.to_string())
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
        let mut tls_url = false;
        if let Some(u) = admin_url_option(&admin_url_file, &r.admin_url, &mut problems) {
            match resp::parse_url(&u) {
                Some(p) => {
                    tls_url = p.tls;
                    if address.is_empty() {
                        address = p.addr;
                    }
                }
                None => problems.push(format!(
                    "{admin_url_file} does not hold a redis:// or rediss:// URL"
                )),
            }
        }
        let username = r.username.trim().to_string();
        if !valid_user(&username) {
            problems.push(format!(
                "--username {username:?}: use letters, digits, - _ ."
            ));
        }
        let list = |l: &[String]| -> Vec<String> {
            l.iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect()
        };
        let (nodes, sentinels) = (list(&r.nodes), list(&r.sentinels));
        for a in nodes.iter().chain(&sentinels) {
            if !valid_addr(a) {
                problems.push(format!("{a:?} is not host:port"));
            }
        }
        let master_name = r.master_name.trim().to_string();
        match r.topology {
            Topology::Sentinel => {
                if sentinels.is_empty() {
                    problems.push("--topology sentinel needs --sentinel HOST:PORT".into());
                }
                if master_name.is_empty() {
                    problems.push("--topology sentinel needs --master-name".into());
                }
            }
            t => {
                if !sentinels.is_empty() || !master_name.is_empty() {
                    problems.push(format!(
                        "--sentinel and --master-name are for --topology sentinel, not {}",
                        t.as_str()
                    ));
                }
                if t == Topology::Single && !nodes.is_empty() {
                    problems.push(
                        "--node is for --topology nodes or cluster (single uses the admin URL's server)"
                            .into(),
                    );
                }
            }
        }
        let tls = RedisTls {
            ca_file: r.tls.ca_file.trim().to_string(),
            cert_file: r.tls.cert_file.trim().to_string(),
            key_file: r.tls.key_file.trim().to_string(),
            server_name: r.tls.server_name.trim().to_string(),
        };
        if tls_url {
            if let Err(e) = Tls::new(rekey_probe::Service::Redis, &tls.files()) {
                problems.push(e.to_string());
            }
        } else if !tls.is_empty() {
            problems.push("the --tls-* options need a rediss:// admin URL".into());
        }
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems.join("; ")));
        }
        Ok(RedisOptions {
            admin_url_file,
            username,
            address,
            topology: r.topology,
            nodes,
            sentinels,
            master_name,
            tls,
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
        // Apps reach the servers the way the admin does: TLS or not.
        let scheme = if reach(ctx.id, "create", o)?.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let pw =
            String::from_utf8(generate(32, Encoding::Alnum)?.expose().to_vec()).unwrap_or_default();
        let url = format!("{scheme}://{}:{pw}@{}", o.username, o.address);
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

    /// Adds the new password on every server, and current's too where a
    /// server lacks it, so that both work everywhere during the window.
    async fn set(
        &self,
        ctx: &SecretCtx<'_>,
        new: &SecretValue,
        old: Option<&SecretValue>,
    ) -> Result<Nodes> {
        let mut add = vec![owned(password(new, ctx.id, "set")?)];
        if let Some(p) = old.and_then(|o| field(o, "password")) {
            add.push(owned(p));
        }
        let o = ctx.options.redis(ctx.id)?;
        let nodes = change(
            ctx.id,
            "set",
            o,
            Change {
                add,
                remove: vec![],
            },
        )
        .await?;
        Ok(Some(nodes))
    }

    /// Authenticates with the new password: at the apps' address for a
    /// single server, else on every server.
    async fn test(&self, ctx: &SecretCtx<'_>, new: &SecretValue) -> Result<()> {
        let o = ctx.options.redis(ctx.id)?;
        let pw = password(new, ctx.id, "test")?;
        let r = reach(ctx.id, "test", o)?;
        let nodes = match o.topology {
            Topology::Single => vec![o.address.clone()],
            _ => servers(ctx.id, "test", o, &r).await?,
        };
        let (user, pw) = (o.username.clone(), owned(pw));
        on_every_server(ctx.id, "test", &nodes, |node| {
            let (r, user, pw) = (r.clone(), user.clone(), pw.clone());
            async move { acl::try_login(&r, &node, &user, &pw).await }
        })
        .await
    }

    async fn revoke(
        &self,
        ctx: &SecretCtx<'_>,
        old: &SecretValue,
        current: Option<&SecretValue>,
    ) -> Result<Nodes> {
        let remove = vec![owned(password(old, ctx.id, "revoke")?)];
        let add = current
            .and_then(|c| field(c, "password"))
            .map(owned)
            .into_iter()
            .collect();
        let o = ctx.options.redis(ctx.id)?;
        let nodes = change(ctx.id, "revoke", o, Change { add, remove }).await?;
        Ok(Some(nodes))
    }

    async fn restore(&self, ctx: &SecretCtx<'_>, previous: &SecretValue) -> Result<Nodes> {
        let add = vec![owned(password(previous, ctx.id, "restore")?)];
        let o = ctx.options.redis(ctx.id)?;
        let nodes = change(
            ctx.id,
            "restore",
            o,
            Change {
                add,
                remove: vec![],
            },
        )
        .await?;
        Ok(Some(nodes))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(valid_addr("10.0.0.1:6379"));
        assert!(valid_addr("[fd00::1]:6379"));
        assert!(valid_addr("cache.internal:6380"));
        assert!(!valid_addr("cache.internal"));
        assert!(!valid_addr("cache:0"));
        assert!(!valid_addr(":6379"));
    }

    #[test]
    fn options_name_what_a_topology_lacks() {
        let dir = std::env::temp_dir().join(format!("rekey-redis-opts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = dir.join("admin");
        std::fs::write(&url, "redis://admin:pw@127.0.0.1:6379").unwrap();
        let with = |o: RedisOptions| KindOptions {
            redis: Some(RedisOptions {
                admin_url_file: url.display().to_string(),
                username: "app".into(),
                ..o
            }),
            ..KindOptions::default()
        };
        let e = Redis
            .check_options(&with(RedisOptions {
                topology: Topology::Sentinel,
                ..RedisOptions::default()
            }))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs --sentinel") && e.contains("needs --master-name"),
            "{e}"
        );
        let e = Redis
            .check_options(&with(RedisOptions {
                tls: RedisTls {
                    ca_file: "/etc/ca.pem".into(),
                    ..RedisTls::default()
                },
                nodes: vec!["10.0.0.1".into()],
                ..RedisOptions::default()
            }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a rediss:// admin URL"), "{e}");
        assert!(e.contains("\"10.0.0.1\" is not host:port"), "{e}");
        let ok = Redis
            .check_options(&with(RedisOptions {
                topology: Topology::Cluster,
                nodes: vec![" 10.0.0.1:7000 ".into()],
                ..RedisOptions::default()
            }))
            .unwrap();
        let r = ok.redis.unwrap();
        assert_eq!(r.nodes, ["10.0.0.1:7000"]);
        assert_eq!(r.address, "127.0.0.1:6379");
        // Rows stored before topologies still read.
        let old: RedisOptions =
            serde_json::from_str(r#"{"admin_url_file":"/a","username":"app","address":"h:6379"}"#)
                .unwrap();
        assert_eq!(old.topology, Topology::Single);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
