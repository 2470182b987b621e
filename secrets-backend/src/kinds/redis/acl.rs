//! One server's share of a step: the ACL user's passwords changed there,
//! or one of them tried there.
//!
//! A change reads the user first (`ACL GETUSER`, whose `passwords` are
//! SHA-256 digests) and then sends only what is missing: `>new` for a
//! password the server lacks, `<old` for one it still has. So a step run
//! twice (after a crash, on a retry) changes nothing the second time, and
//! removing a password that a server never had (a replica added later) is
//! not an error.

use rekey_probe::redis::{self as resp, Reply};
use ring::digest;
use zeroize::Zeroizing;

use super::topology::Reach;

/// Passwords to add and to remove, in one `ACL SETUSER` per server.
#[derive(Default)]
pub(super) struct Change {
    pub(super) add: Vec<Zeroizing<String>>,
    pub(super) remove: Vec<Zeroizing<String>>,
}

/// Applies `change` to `user` on `node`.
pub(super) async fn apply(
    reach: &Reach,
    node: &str,
    user: &str,
    change: &Change,
) -> Result<(), String> {
    let mut c = reach.admin(node).await?;
    let io = |e: rekey_probe::Error| e.to_string();
    let held = match c.call(&["ACL", "GETUSER", user]).await.map_err(io)? {
        Reply::Nil => {
            return Err(format!(
                "Redis user {user} does not exist on {node}; create it with its permissions first"
            ));
        }
        Reply::Error(e) => return Err(acl_error(&e)),
        Reply::Array(fields) => passwords(&fields),
        other => return Err(format!("ACL GETUSER answered {other:?}")),
    };
    let mut args: Vec<Zeroizing<String>> = Vec::new();
    for p in &change.add {
        if !held.contains(&sha256_hex(p)) {
            args.push(Zeroizing::new(format!(">{}", p.as_str())));
        }
    }
    for p in &change.remove {
        if held.contains(&sha256_hex(p)) && !change.add.iter().any(|a| a == p) {
            args.push(Zeroizing::new(format!("<{}", p.as_str())));
        }
    }
    if args.is_empty() {
        return Ok(());
    }
    let mut cmd: Vec<&str> = vec!["ACL", "SETUSER", user];
    cmd.extend(args.iter().map(|a| a.as_str()));
    match c.call(&cmd).await.map_err(io)? {
        Reply::Status(_) => Ok(()),
        Reply::Error(e) => Err(acl_error(&e)),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Whether `password` authenticates `user` on `node`.
pub(super) async fn try_login(
    reach: &Reach,
    node: &str,
    user: &str,
    password: &str,
) -> Result<(), String> {
    resp::check(node, reach.tls.as_ref(), Some(user), Some(password))
        .await
        .map_err(|e| e.to_string())
}

/// The password digests of an `ACL GETUSER` reply (a flat list of names
/// and values).
fn passwords(fields: &[Reply]) -> Vec<String> {
    fields
        .chunks(2)
        .find(|kv| matches!(&kv[0], Reply::Bulk(k) if k == b"passwords"))
        .and_then(|kv| match kv.get(1) {
            Some(Reply::Array(items)) => Some(
                items
                    .iter()
                    .filter_map(|i| match i {
                        Reply::Bulk(b) => String::from_utf8(b.clone()).ok(),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// A password as Redis keeps it: lower-case hex SHA-256.
fn sha256_hex(password: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, password.as_bytes()))
}

/// Server errors say what failed; they never repeat our arguments.
pub(super) fn acl_error(e: &str) -> String {
    if e.starts_with("NOPERM") {
        format!(
            "the admin user lacks ACL permissions ({})",
            e.split_whitespace().next().unwrap_or("NOPERM")
        )
    } else {
        e.split(':').next().unwrap_or(e).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_what_redis_keeps() {
        // `ACL SETUSER u >foobared` then `ACL GETUSER u` lists this digest.
        assert_eq!(
            sha256_hex("foobared"),
            "1b58ee375b42e41f0e48ef2ff27d10a5b1f6924a9acdcdba7cae868e7adce6bf"
        );
        let fields = vec![
            Reply::Bulk(b"flags".to_vec()),
            Reply::Array(vec![Reply::Bulk(b"on".to_vec())]),
            Reply::Bulk(b"passwords".to_vec()),
            Reply::Array(vec![Reply::Bulk(sha256_hex("a").into_bytes())]),
        ];
        assert_eq!(passwords(&fields), vec![sha256_hex("a")]);
        assert!(passwords(&fields[..2]).is_empty());
    }
}
