//! Authentication (bearer tokens, mTLS client certificates) and the policy
//! that maps identities to operations on secret-id prefixes.
//!
//! Tokens are never held: only their SHA-256 digests, compared in constant
//! time against every configured digest so that timing does not tell which
//! one matched or how much of it.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use ring::digest;
use tonic::metadata::MetadataMap;

use crate::config::{PolicyConfig, TokenConfig};
use crate::error::{Error, Result};

/// Something an identity may do to a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    Create,
    Rotate,
    Revoke,
    Rollback,
    /// Metadata: versions, stages, status.
    Read,
    /// Values.
    Reveal,
    /// Stream current values (sidecars).
    Watch,
    /// Report the version served (sidecars).
    Report,
    /// Read and verify the audit log.
    Audit,
    /// Issue and revoke tokens (within what the caller may do itself).
    Tokens,
}

impl Operation {
    pub const ALL: [Operation; 10] = [
        Operation::Create,
        Operation::Rotate,
        Operation::Revoke,
        Operation::Rollback,
        Operation::Read,
        Operation::Reveal,
        Operation::Watch,
        Operation::Report,
        Operation::Audit,
        Operation::Tokens,
    ];
    pub const ALL_NAMES: [&'static str; 10] = [
        "create", "rotate", "revoke", "rollback", "read", "reveal", "watch", "report", "audit",
        "tokens",
    ];

    pub fn name(self) -> &'static str {
        Self::ALL_NAMES[self as usize]
    }
}

impl FromStr for Operation {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        Self::ALL_NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| Self::ALL[i])
            .ok_or(())
    }
}

/// Who is calling. Safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// For a token issued through the API: what that token may do, which
    /// is all it may do (configured policies are for configured tokens
    /// and certificates).
    scope: Option<Arc<Rule>>,
}

impl Identity {
    /// An identity whose rights are the configured policies for `name`.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            scope: None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Rule {
    prefixes: Vec<String>,
    operations: BTreeSet<Operation>,
}

impl Rule {
    fn allows(&self, op: Operation, secret_id: &str) -> bool {
        self.operations.contains(&op) && self.prefixes.iter().any(|p| secret_id.starts_with(p))
    }
}

/// A token issued through the API (`rekey token create`), as the store
/// keeps it: its digest, never the token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub identity: String,
    pub sha256: [u8; 32],
    pub prefixes: Vec<String>,
    pub operations: BTreeSet<Operation>,
    /// Unix ms; `None` never expires.
    pub expires_at_ms: Option<i64>,
}

/// A token that matched: its identity, expiry and, for an issued one, its
/// scope.
type Match<'a> = (&'a str, Option<i64>, Option<Arc<Rule>>);

/// The issued tokens in force, with the scope each grants.
#[derive(Default)]
struct Issued(Vec<(IssuedToken, Arc<Rule>)>);

/// The name the bootstrap admin token authenticates as.
pub const ADMIN: &str = "admin";

pub struct Auth {
    tokens: Vec<TokenConfig>,
    rules: HashMap<String, Vec<Rule>>,
    /// Replaced whenever the store's tokens change.
    issued: RwLock<Issued>,
}

impl Auth {
    /// `admin_token_digest` is the SHA-256 of the bootstrap admin token, if
    /// there is one. Unless a policy names `admin`, it may do everything.
    pub fn new(
        mut tokens: Vec<TokenConfig>,
        policies: Vec<PolicyConfig>,
        admin_token_digest: Option<[u8; 32]>,
    ) -> Self {
        if let Some(d) = admin_token_digest {
            tokens.push(TokenConfig {
                identity: ADMIN.into(),
                sha256: d,
                expires_at_ms: None,
            });
        }
        let mut rules: HashMap<String, Vec<Rule>> = HashMap::new();
        for p in policies {
            rules.entry(p.identity).or_default().push(Rule {
                prefixes: p.prefixes,
                operations: p.operations,
            });
        }
        rules.entry(ADMIN.into()).or_insert_with(|| {
            vec![Rule {
                prefixes: vec![String::new()],
                operations: Operation::ALL.into_iter().collect(),
            }]
        });
        Self {
            tokens,
            rules,
            issued: RwLock::default(),
        }
    }

    /// Puts the issued tokens in force (the ones not revoked), replacing
    /// the previous set.
    /// Whether `name` is an identity of the configuration (a configured
    /// token or a policy names it): the operator's, not an issuer's.
    pub fn is_configured(&self, name: &str) -> bool {
        self.rules.contains_key(name) || self.tokens.iter().any(|t| t.identity == name)
    }

    pub fn set_issued(&self, tokens: Vec<IssuedToken>) {
        let issued = tokens
            .into_iter()
            .map(|t| {
                let rule = Arc::new(Rule {
                    prefixes: t.prefixes.clone(),
                    operations: t.operations.clone(),
                });
                (t, rule)
            })
            .collect();
        *self
            .issued
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Issued(issued);
    }

    /// Finds the caller: a client certificate's identity (already verified
    /// by TLS) wins; otherwise `authorization: Bearer <token>`.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        cert_identity: Option<String>,
        now_ms: i64,
    ) -> Result<Identity> {
        if let Some(id) = cert_identity {
            return Ok(Identity::named(id));
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("no bearer token".into()))?;
        let header = header
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed authorization header".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| Error::Unauthenticated("authorization is not a bearer token".into()))?
            .trim();
        let d = digest::digest(&digest::SHA256, token.as_bytes());
        // Compare against every entry, configured and issued, without
        // stopping early.
        let mut found: Option<Match<'_>> = None;
        for t in &self.tokens {
            if rekey_keyring::ct_eq(&t.sha256, d.as_ref()) {
                found = Some((&t.identity, t.expires_at_ms, None));
            }
        }
        let issued = self
            .issued
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (t, rule) in &issued.0 {
            if rekey_keyring::ct_eq(&t.sha256, d.as_ref()) {
                found = Some((&t.identity, t.expires_at_ms, Some(rule.clone())));
            }
        }
        let (identity, expires, scope) =
            found.ok_or_else(|| Error::Unauthenticated("unknown token".into()))?;
        if let Some(exp) = expires
            && exp <= now_ms
        {
            return Err(Error::Unauthenticated(format!(
                "the token for {identity} has expired"
            )));
        }
        Ok(Identity {
            name: identity.to_string(),
            scope,
        })
    }

    /// True when `who` may do `op` on `secret_id`.
    pub fn allows(&self, who: &Identity, op: Operation, secret_id: &str) -> bool {
        match &who.scope {
            Some(scope) => scope.allows(op, secret_id),
            None => self
                .rules
                .get(&who.name)
                .is_some_and(|rules| rules.iter().any(|r| r.allows(op, secret_id))),
        }
    }

    pub fn authorize(&self, who: &Identity, op: Operation, secret_id: &str) -> Result<()> {
        if self.allows(who, op, secret_id) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "{} may not {} {}",
                who.name,
                op.name(),
                if secret_id.is_empty() {
                    "(any secret)".to_string()
                } else {
                    secret_id.to_string()
                }
            )))
        }
    }
}

/// SHA-256 of a token, as stored in configuration.
pub fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Whether `name` may be an identity: 1 to 128 letters, digits and
/// `- _ . @ :`, for issued tokens and certificate common names alike (so
/// no name can forge a log line or an audit actor).
pub fn valid_identity(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b))
}

/// The identity a client certificate names: its one subject common name.
/// `Err` says why a certificate names none that rekey accepts (several
/// common names, one with characters an identity may not have, or one
/// that cannot be read).
pub fn cert_identity(der: &[u8]) -> std::result::Result<String, &'static str> {
    let cns = cert_common_names(der).ok_or("its subject cannot be read")?;
    match cns.as_slice() {
        [] => Err("it has no common name"),
        [one] if valid_identity(one) => Ok(one.clone()),
        [_] => Err("its common name is not 1 to 128 letters, digits and - _ . @ :"),
        _ => Err("it has several common names"),
    }
}

/// Every subject common name of a DER certificate. Only the fields needed
/// to reach the subject are walked; anything unexpected is `None`.
fn cert_common_names(der: &[u8]) -> Option<Vec<String>> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
    // OPTIONAL, serial, signature, issuer, validity, subject, ... } ... }
    let (_, cert, _) = der_tlv(der)?;
    let (_, tbs, _) = der_tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..4 {
        // serial, signature, issuer, validity
        let (_, _, r) = der_tlv(rest)?;
        rest = r;
    }
    let (_, subject, _) = der_tlv(rest)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    let mut rdns = subject;
    let mut cns = Vec::new();
    while !rdns.is_empty() {
        let (_, set, r) = der_tlv(rdns)?;
        rdns = r;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (_, attr, r2) = der_tlv(attrs)?;
            attrs = r2;
            let (oid_tag, oid, val) = der_tlv(attr)?;
            if oid_tag == 0x06 && oid == [0x55, 0x04, 0x03] {
                let (_, v, _) = der_tlv(val)?;
                cns.push(String::from_utf8(v.to_vec()).ok()?);
            }
        }
    }
    Some(cns)
}

/// Reads one DER TLV: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[hdr..end], &b[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    fn auth() -> Auth {
        Auth::new(
            vec![
                TokenConfig {
                    identity: "ci".into(),
                    sha256: token_digest("ci-token"),
                    expires_at_ms: None,
                },
                TokenConfig {
                    identity: "old".into(),
                    sha256: token_digest("old-token"),
                    expires_at_ms: Some(1_000),
                },
            ],
            vec![PolicyConfig {
                identity: "ci".into(),
                prefixes: vec!["prod/api/".into()],
                operations: [Operation::Rotate, Operation::Read].into(),
            }],
            Some(token_digest("admin-token")),
        )
    }

    #[test]
    fn tokens_map_to_identities() {
        let a = auth();
        assert_eq!(
            a.authenticate(&md("ci-token"), None, 0).unwrap(),
            Identity::named("ci")
        );
        assert_eq!(
            a.authenticate(&md("admin-token"), None, 0).unwrap(),
            Identity::named(ADMIN)
        );
        let e = a.authenticate(&md("nope"), None, 0).unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(_)));
        let e = a.authenticate(&MetadataMap::new(), None, 0).unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(_)));
        let e = a.authenticate(&md("old-token"), None, 5_000).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(a.authenticate(&md("old-token"), None, 500).is_ok());
    }

    #[test]
    fn policy_limits_operations_and_prefixes() {
        let a = auth();
        let ci = Identity::named("ci");
        assert!(a.allows(&ci, Operation::Rotate, "prod/api/db"));
        assert!(!a.allows(&ci, Operation::Rotate, "prod/billing/db"));
        assert!(!a.allows(&ci, Operation::Reveal, "prod/api/db"));
        let e = a
            .authorize(&ci, Operation::Revoke, "prod/api/db")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "permission denied: ci may not revoke prod/api/db"
        );
        let admin = Identity::named(ADMIN);
        assert!(a.allows(&admin, Operation::Reveal, "anything"));
        assert!(!a.allows(&Identity::named("stranger"), Operation::Read, "x"));
    }

    #[test]
    fn an_issued_token_may_do_its_scope_and_nothing_more() {
        let a = auth();
        a.set_issued(vec![IssuedToken {
            identity: "ci".into(),
            sha256: token_digest("issued-token"),
            prefixes: vec!["prod/other/".into()],
            operations: [Operation::Watch].into(),
            expires_at_ms: Some(10_000),
        }]);
        let who = a.authenticate(&md("issued-token"), None, 0).unwrap();
        assert_eq!(who.name, "ci");
        assert!(a.allows(&who, Operation::Watch, "prod/other/x"));
        // Not what the configured policy gives "ci": the token's scope only.
        assert!(!a.allows(&who, Operation::Rotate, "prod/api/db"));
        assert!(a.allows(&Identity::named("ci"), Operation::Rotate, "prod/api/db"));
        let e = a
            .authenticate(&md("issued-token"), None, 20_000)
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        a.set_issued(vec![]);
        assert!(a.authenticate(&md("issued-token"), None, 0).is_err());
    }

    #[test]
    fn operation_names_round_trip() {
        for op in Operation::ALL {
            assert_eq!(op.name().parse::<Operation>(), Ok(op));
        }
        assert!("fly".parse::<Operation>().is_err());
    }

    #[test]
    fn der_walker_rejects_garbage() {
        assert_eq!(cert_common_names(b""), None);
        assert_eq!(cert_common_names(&[0x30, 0x82, 0xff]), None);
        assert_eq!(cert_common_names(&[0x30, 0x03, 0x02, 0x01, 0x01]), None);
        assert!(cert_identity(b"").is_err());
    }

    #[test]
    fn identity_names() {
        assert!(valid_identity("api-sidecar@prod:1"));
        for bad in ["", "a\nb", "name with space", &"x".repeat(129)] {
            assert!(!valid_identity(bad), "{bad:?}");
        }
    }
}
