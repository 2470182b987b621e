//! Which servers hold a Redis user's passwords, found afresh at every
//! step.
//!
//! Redis keeps its ACL per server: `ACL SETUSER` on a primary is not
//! replicated to its replicas, and every node of a cluster has its own. So
//! a step that changes a password must reach every server of the
//! deployment, and one that is added later (a new replica, a resharded
//! cluster) is found at the next step because nothing is cached:
//! - `single`: the admin URL's server;
//! - `nodes`: the listed servers, or the admin URL's server with the
//!   primary and replicas that `ROLE` names;
//! - `sentinel`: the primary and every replica the Sentinels know of the
//!   named master (the union over every Sentinel that answers);
//! - `cluster`: every node `CLUSTER SHARDS` (or `CLUSTER NODES` before
//!   Redis 7) lists, failed ones included: a node that is down now must
//!   not miss a password it will need when it is back.

use std::collections::BTreeSet;

use rekey_keyring::SecretString;
use rekey_probe::redis::{Conn, Reply};
use rekey_probe::tls::Tls;
use serde::{Deserialize, Serialize};

/// How a deployment is laid out, declared per secret.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Topology {
    /// One server: the admin URL's.
    #[default]
    Single,
    /// A primary and its replicas.
    Nodes,
    /// Found through Sentinels.
    Sentinel,
    /// A Redis Cluster.
    Cluster,
}

impl Topology {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Nodes => "nodes",
            Topology::Sentinel => "sentinel",
            Topology::Cluster => "cluster",
        }
    }
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "single" => Ok(Topology::Single),
            "nodes" => Ok(Topology::Nodes),
            "sentinel" => Ok(Topology::Sentinel),
            "cluster" => Ok(Topology::Cluster),
            other => Err(format!(
                "--topology {other:?}: use single, nodes, sentinel or cluster"
            )),
        }
    }
}

/// How a step reaches the deployment: the admin credential and TLS, read
/// from the admin URL at each step.
#[derive(Clone)]
pub(super) struct Reach {
    /// The admin URL's server (`host:port`).
    pub(super) addr: String,
    pub(super) user: Option<String>,
    pub(super) password: Option<SecretString>,
    /// `rediss://`: every server, Sentinels included, is reached over TLS.
    pub(super) tls: Option<Tls>,
}

impl Reach {
    /// A connection to `addr`, authenticated as the admin user when the
    /// admin URL has a password.
    pub(super) async fn admin(&self, addr: &str) -> Result<Conn, String> {
        let mut c = Conn::connect(addr, self.tls.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        if let Some(p) = &self.password {
            c.auth(self.user.as_deref(), p.expose())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{addr}: the admin credential was refused: {e}"))?;
        }
        Ok(c)
    }

    /// A connection to a Sentinel: without credentials, unless it asks
    /// for them (`NOAUTH`); then with the admin URL's, as deployments that
    /// protect Sentinels with the data nodes' password expect.
    async fn sentinel(&self, addr: &str, probe: &[&str]) -> Result<(Conn, Reply), String> {
        let mut c = Conn::connect(addr, self.tls.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        let first = c.call(probe).await.map_err(|e| e.to_string())?;
        if matches!(&first, Reply::Error(e) if e.starts_with("NOAUTH")) {
            drop(c);
            let mut c = self.admin(addr).await?;
            let again = c.call(probe).await.map_err(|e| e.to_string())?;
            return Ok((c, again));
        }
        Ok((c, first))
    }
}

/// What a topology is declared with.
pub(super) struct Layout<'a> {
    pub(super) topology: Topology,
    /// `nodes`: the servers; `cluster`: seed nodes.
    pub(super) nodes: &'a [String],
    pub(super) sentinels: &'a [String],
    pub(super) master_name: &'a str,
}

/// Every server of the deployment, sorted, without duplicates.
pub(super) async fn discover(layout: &Layout<'_>, reach: &Reach) -> Result<Vec<String>, String> {
    let found = match layout.topology {
        Topology::Single => BTreeSet::from([reach.addr.clone()]),
        Topology::Nodes if !layout.nodes.is_empty() => layout.nodes.iter().cloned().collect(),
        Topology::Nodes => replication(reach).await?,
        Topology::Sentinel => sentinels(layout, reach).await?,
        Topology::Cluster => cluster(layout, reach).await?,
    };
    if found.is_empty() {
        return Err("no Redis server found".into());
    }
    Ok(found.into_iter().collect())
}

/// The admin URL's server, its primary and the primary's replicas (from
/// `ROLE`).
async fn replication(reach: &Reach) -> Result<BTreeSet<String>, String> {
    let mut found = BTreeSet::from([reach.addr.clone()]);
    let role = role_of(reach, &reach.addr).await?;
    let primary = match role {
        Role::Primary(replicas) => {
            found.extend(replicas);
            return Ok(found);
        }
        Role::Replica(primary) => primary,
    };
    match role_of(reach, &primary).await? {
        Role::Primary(replicas) => found.extend(replicas),
        Role::Replica(_) => {
            return Err(format!(
                "{primary}, the primary of {}, is itself a replica; list the servers with --node",
                reach.addr
            ));
        }
    }
    found.insert(primary);
    Ok(found)
}

enum Role {
    /// The replicas it names.
    Primary(Vec<String>),
    /// Its primary.
    Replica(String),
}

async fn role_of(reach: &Reach, addr: &str) -> Result<Role, String> {
    let mut c = reach.admin(addr).await?;
    let r = c.call(&["ROLE"]).await.map_err(|e| e.to_string())?;
    let bad = || format!("{addr} answered ROLE with something else than a role");
    let Reply::Array(items) = r else {
        return Err(match r {
            Reply::Error(e) => format!("{addr}: ROLE: {e}"),
            _ => bad(),
        });
    };
    match items.first().and_then(text).as_deref() {
        Some("master") => {
            let Some(Reply::Array(replicas)) = items.get(2) else {
                return Err(bad());
            };
            Ok(Role::Primary(
                replicas
                    .iter()
                    .filter_map(|r| match r {
                        Reply::Array(f) => Some(join(&text(f.first()?)?, &text(f.get(1)?)?)),
                        _ => None,
                    })
                    .collect(),
            ))
        }
        Some("slave" | "replica") => {
            let (Some(host), Some(port)) =
                (items.get(1).and_then(text), items.get(2).and_then(text))
            else {
                return Err(bad());
            };
            Ok(Role::Replica(join(&host, &port)))
        }
        _ => Err(bad()),
    }
}

/// The master and its replicas as every Sentinel that answers knows them.
async fn sentinels(layout: &Layout<'_>, reach: &Reach) -> Result<BTreeSet<String>, String> {
    let name = layout.master_name;
    let mut found = BTreeSet::new();
    let mut problems = Vec::new();
    for s in layout.sentinels {
        match one_sentinel(reach, s, name).await {
            Ok(nodes) => found.extend(nodes),
            Err(e) => problems.push(format!("Sentinel {s}: {e}")),
        }
    }
    if found.is_empty() {
        return Err(format!(
            "no Sentinel named the servers of master {name}: {}",
            problems.join("; ")
        ));
    }
    for p in &problems {
        tracing::warn!(problem = %p, "a Sentinel did not answer; the others named the servers");
    }
    Ok(found)
}

async fn one_sentinel(reach: &Reach, addr: &str, name: &str) -> Result<Vec<String>, String> {
    let (mut c, master) = reach
        .sentinel(addr, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name])
        .await?;
    let mut nodes = match master {
        Reply::Array(f) if f.len() == 2 => match (text(&f[0]), text(&f[1])) {
            (Some(h), Some(p)) => vec![join(&h, &p)],
            _ => return Err("an address that is not one".into()),
        },
        Reply::Nil => return Err(format!("it monitors no master named {name}")),
        Reply::Error(e) => return Err(e),
        _ => return Err("an answer that is not an address".into()),
    };
    match c
        .call(&["SENTINEL", "REPLICAS", name])
        .await
        .map_err(|e| e.to_string())?
    {
        Reply::Array(replicas) => {
            for r in &replicas {
                let Reply::Array(f) = r else { continue };
                if let (Some(h), Some(p)) = (field(f, "ip"), field(f, "port")) {
                    nodes.push(join(&h, &p));
                }
            }
        }
        Reply::Error(e) => return Err(e),
        _ => return Err("SENTINEL REPLICAS answered with something else than a list".into()),
    }
    Ok(nodes)
}

/// Every node of the cluster, from the first seed that answers.
async fn cluster(layout: &Layout<'_>, reach: &Reach) -> Result<BTreeSet<String>, String> {
    let seeds: Vec<String> = if layout.nodes.is_empty() {
        vec![reach.addr.clone()]
    } else {
        layout.nodes.to_vec()
    };
    let mut problems = Vec::new();
    for seed in &seeds {
        match cluster_nodes(reach, seed).await {
            Ok(nodes) => return Ok(nodes),
            Err(e) => problems.push(format!("{seed}: {e}")),
        }
    }
    Err(format!(
        "no seed node listed the cluster: {}",
        problems.join("; ")
    ))
}

async fn cluster_nodes(reach: &Reach, seed: &str) -> Result<BTreeSet<String>, String> {
    let mut c = reach.admin(seed).await?;
    match c
        .call(&["CLUSTER", "SHARDS"])
        .await
        .map_err(|e| e.to_string())?
    {
        Reply::Array(shards) => Ok(shards_nodes(&shards, reach.tls.is_some())),
        // Before Redis 7: the text form.
        Reply::Error(e) if e.contains("unknown subcommand") || e.contains("Unknown subcommand") => {
            match c
                .call(&["CLUSTER", "NODES"])
                .await
                .map_err(|e| e.to_string())?
            {
                Reply::Bulk(b) => Ok(nodes_text(&String::from_utf8_lossy(&b))),
                Reply::Error(e) => Err(e),
                _ => Err("CLUSTER NODES answered with something else than text".into()),
            }
        }
        Reply::Error(e) => Err(e),
        _ => Err("CLUSTER SHARDS answered with something else than a list".into()),
    }
}

/// The nodes of a `CLUSTER SHARDS` reply, at their TLS port when the
/// deployment is reached over TLS.
fn shards_nodes(shards: &[Reply], tls: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for shard in shards {
        let Reply::Array(s) = shard else { continue };
        let Some(Reply::Array(nodes)) = value(s, "nodes") else {
            continue;
        };
        for n in nodes {
            let Reply::Array(f) = n else { continue };
            let host = field(f, "endpoint")
                .filter(|e| !e.is_empty() && e != "?")
                .or_else(|| field(f, "ip"));
            let port = if tls {
                field(f, "tls-port").or_else(|| field(f, "port"))
            } else {
                field(f, "port").or_else(|| field(f, "tls-port"))
            };
            if let (Some(h), Some(p)) = (host, port) {
                out.insert(join(&h, &p));
            }
        }
    }
    out
}

/// The nodes of `CLUSTER NODES` text: `id ip:port@bus[,host] flags ...`,
/// but nodes still in the handshake or without an address.
fn nodes_text(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (_, addr, flags) = (f.next()?, f.next()?, f.next()?);
            if flags.split(',').any(|x| x == "handshake" || x == "noaddr") {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (h, p) = hostport.rsplit_once(':')?;
            (!h.is_empty()).then(|| join(h, p))
        })
        .collect()
}

/// `host:port`, with an IPv6 host in brackets.
fn join(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn text(r: &Reply) -> Option<String> {
    match r {
        Reply::Bulk(b) => String::from_utf8(b.clone()).ok(),
        Reply::Status(s) => Some(s.clone()),
        Reply::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The value after `key` in a flat key / value list.
fn value<'a>(items: &'a [Reply], key: &str) -> Option<&'a Reply> {
    items
        .chunks(2)
        .find(|kv| text(&kv[0]).as_deref() == Some(key))
        .and_then(|kv| kv.get(1))
}

fn field(items: &[Reply], key: &str) -> Option<String> {
    value(items, key).and_then(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Reply {
        Reply::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn cluster_shards_name_every_node_at_the_port_in_use() {
        let node = |ip: &str, port: i64, tls: i64, health: &str| {
            Reply::Array(vec![
                b("id"),
                b("abc"),
                b("port"),
                Reply::Int(port),
                b("tls-port"),
                Reply::Int(tls),
                b("ip"),
                b(ip),
                b("endpoint"),
                b(ip),
                b("role"),
                b("master"),
                b("health"),
                b(health),
            ])
        };
        let shards = vec![Reply::Array(vec![
            b("slots"),
            Reply::Array(vec![Reply::Int(0), Reply::Int(5460)]),
            b("nodes"),
            Reply::Array(vec![
                node("10.0.0.1", 7000, 17000, "online"),
                node("fd00::2", 7001, 17001, "fail"),
            ]),
        ])];
        assert_eq!(
            shards_nodes(&shards, false).into_iter().collect::<Vec<_>>(),
            ["10.0.0.1:7000", "[fd00::2]:7001"]
        );
        assert_eq!(
            shards_nodes(&shards, true).into_iter().collect::<Vec<_>>(),
            ["10.0.0.1:17000", "[fd00::2]:17001"],
            "a failed node is listed too"
        );
    }

    #[test]
    fn cluster_nodes_text_skips_nodes_without_an_address() {
        let text = "\
a1 10.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 10.0.0.2:7001@17001,redis-b.internal slave a1 0 0 1 connected
c3 :0@0 noaddr,master - 0 0 0 disconnected
d4 10.0.0.4:7003@17003 handshake - 0 0 0 connected
e5 10.0.0.5:7004@17004 master,fail - 0 0 2 disconnected 5461-10922
";
        assert_eq!(
            nodes_text(text).into_iter().collect::<Vec<_>>(),
            ["10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.5:7004"]
        );
    }

    #[test]
    fn topologies_parse() {
        assert_eq!("".parse::<Topology>(), Ok(Topology::Single));
        assert_eq!("cluster".parse::<Topology>(), Ok(Topology::Cluster));
        assert!("mesh".parse::<Topology>().unwrap_err().contains("sentinel"));
    }
}
