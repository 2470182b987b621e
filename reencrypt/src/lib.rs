//! Re-encryption of encrypted columns from an old master key to a new one.
//!
//! For each configured (table, id column, ciphertext column): keyset-paginated
//! batches; the CPU-bound codec work runs on OS threads (`spawn_blocking`,
//! one chunk per core) while the next batch is read; each batch is written
//! back in one compare-and-swap statement (`... WHERE id = v.id AND col =
//! v.old`) so that a row the app wrote meanwhile, under either key, is never
//! overwritten. Rows already under the new key are counted and skipped, so
//! a re-run after an interruption does only what is left. A row that opens
//! under neither key stops the run and is named by its id, never its value.

use std::sync::Arc;

use base64::Engine as _;

pub mod checkpoint;
use rekey_keyring::{MasterKey, hyvve};
use sqlx::{PgPool, Row};

/// How a column's values are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The platform's envelope (PBKDF2 per row).
    Hyvve,
    /// rekey's own envelope, base64 in a text column (key id in the header).
    Rekey,
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hyvve" => Ok(Codec::Hyvve),
            "rekey" => Ok(Codec::Rekey),
            other => Err(format!("unknown codec {other:?} (expected hyvve or rekey)")),
        }
    }
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Hyvve => "hyvve",
            Codec::Rekey => "rekey",
        }
    }

    /// Seals `plaintext` under `key` as this codec stores it.
    pub fn seal(
        self,
        key: &MasterKey,
        plaintext: &[u8],
    ) -> Result<String, rekey_keyring::KeyError> {
        match self {
            Codec::Hyvve => hyvve::seal(key, plaintext),
            Codec::Rekey => {
                Ok(base64::engine::general_purpose::STANDARD.encode(key.seal(plaintext, b"")?))
            }
        }
    }

    /// Opens a stored value with `key`.
    pub fn open(
        self,
        key: &MasterKey,
        text: &str,
    ) -> Result<rekey_keyring::SecretBytes, rekey_keyring::KeyError> {
        match self {
            Codec::Hyvve => hyvve::open(key, text),
            Codec::Rekey => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|_| rekey_keyring::KeyError::Malformed("not base64"))?;
                key.open(&raw, b"")
            }
        }
    }

    /// What to do with one stored value. `new_first` says which key a
    /// hyvve value is tried with first; it follows the last value's key,
    /// since rows come in runs: a first pass finds mostly old rows, a
    /// sweep or a re-run mostly new ones, and each wrong guess costs a
    /// PBKDF2 derivation. `sealer` seals hyvve values under the batch's
    /// salt (none: a fresh salt per value); `new_opener` remembers the new
    /// key derived for the last salt, so values sealed by one batch cost
    /// one derivation to recognize.
    fn classify(
        self,
        old: &MasterKey,
        new: &MasterKey,
        text: &str,
        new_first: &mut bool,
        sealer: Option<&hyvve::Sealer>,
        new_opener: &mut hyvve::Opener<'_>,
    ) -> Verdict {
        use rekey_keyring::KeyError;
        match self {
            Codec::Rekey => {
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(text.trim()) else {
                    return Verdict::Malformed;
                };
                match rekey_keyring::envelope_key_id(&raw) {
                    Err(_) => Verdict::Malformed,
                    Ok(id) if id == new.id_hex() => Verdict::AlreadyNew,
                    Ok(id) if id == old.id_hex() => match old.open(&raw, b"") {
                        Ok(p) => match self.seal(new, p.expose()) {
                            Ok(s) => Verdict::Rotated(s),
                            Err(_) => Verdict::Neither,
                        },
                        Err(_) => Verdict::Neither,
                    },
                    Ok(_) => Verdict::Neither,
                }
            }
            // A row under the old key costs one derivation to open and a
            // share of its batch's one to seal; one already moved costs one
            // per batch salt; a wrong guess costs one more.
            Codec::Hyvve => {
                let rotate = |p: rekey_keyring::SecretBytes| {
                    let sealed = match sealer {
                        Some(s) => s.seal(p.expose()),
                        None => hyvve::seal(new, p.expose()),
                    };
                    match sealed {
                        Ok(s) => Verdict::Rotated(s),
                        Err(_) => Verdict::Neither,
                    }
                };
                let mut open = |with_new: bool| {
                    if with_new {
                        new_opener.open(text)
                    } else {
                        hyvve::open(old, text)
                    }
                };
                match open(*new_first) {
                    Ok(p) if *new_first => {
                        drop(p);
                        Verdict::AlreadyNew
                    }
                    Ok(p) => rotate(p),
                    Err(KeyError::Malformed(_)) => Verdict::Malformed,
                    Err(_) => match open(!*new_first) {
                        Ok(p) => {
                            *new_first = !*new_first;
                            if *new_first {
                                Verdict::AlreadyNew
                            } else {
                                rotate(p)
                            }
                        }
                        Err(_) => Verdict::Neither,
                    },
                }
            }
        }
    }
}

enum Verdict {
    Rotated(String),
    AlreadyNew,
    Neither,
    Malformed,
}

/// One encrypted column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub table: String,
    pub column: String,
    pub id_column: String,
    pub codec: Codec,
}

/// The runbook platform's two columns.
pub fn hyvve_preset() -> Vec<Column> {
    ["ai_provider_configs", "mcp_server_configs"]
        .into_iter()
        .map(|t| Column {
            table: t.into(),
            column: "api_key_encrypted".into(),
            id_column: "id".into(),
            codec: Codec::Hyvve,
        })
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub table: String,
    pub column: String,
    pub scanned: u64,
    /// In a dry run: the rows that would be rotated.
    pub rotated: u64,
    pub already_new: u64,
    pub null: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("row {id} of {table}.{column} decrypts under neither the old nor the new key")]
    Neither {
        table: String,
        column: String,
        id: String,
    },
    #[error("row {id} of {table}.{column} holds something other than a {codec} envelope")]
    Malformed {
        table: String,
        column: String,
        id: String,
        codec: &'static str,
    },
    #[error("database: {0}")]
    Db(String),
    /// A hook stopped the run (e.g. this process is no longer the leader).
    #[error("stopped: {0}")]
    Stopped(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Db(match e {
            sqlx::Error::Database(d) => d.message().to_string(),
            other => other.to_string(),
        })
    }
}

/// How re-encrypted hyvve values get their salt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Salt {
    /// One fresh salt per batch, and so one PBKDF2 derivation per batch
    /// to seal it, with a fresh IV per row. The envelope still carries the
    /// salt: the platform's decrypt reads every row unchanged.
    #[default]
    PerBatch,
    /// A fresh salt (and derivation) per row, as the platform seals.
    PerRow,
}

impl std::str::FromStr for Salt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-batch" => Ok(Salt::PerBatch),
            "per-row" => Ok(Salt::PerRow),
            other => Err(format!(
                "unknown salt {other:?} (expected per-batch or per-row)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub batch_size: usize,
    pub dry_run: bool,
    /// OS threads for the codec (default: the cores).
    pub workers: usize,
    pub salt: Salt,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch_size: 200,
            dry_run: false,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            salt: Salt::PerBatch,
        }
    }
}

fn ident(s: &str) -> Result<String, Error> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(format!("\"{s}\""))
    } else {
        Err(Error::Invalid(format!(
            "{s:?} is not a plain SQL identifier"
        )))
    }
}

/// Counts a column's rows (for progress and ETA).
pub async fn count_rows(pool: &PgPool, col: &Column) -> Result<u64, Error> {
    let q = format!("SELECT count(*) FROM {}", ident(&col.table)?);
    let n: i64 = sqlx::query_scalar(&q).fetch_one(pool).await?;
    Ok(n.max(0) as u64)
}

/// Checks that every column exists and returns the id columns' types.
pub async fn check_columns(pool: &PgPool, cols: &[Column]) -> Result<Vec<String>, Error> {
    let mut types = Vec::new();
    let mut missing = Vec::new();
    for c in cols {
        ident(&c.table)?;
        ident(&c.column)?;
        ident(&c.id_column)?;
        let q = "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1";
        let rows = sqlx::query(q).bind(&c.table).fetch_all(pool).await?;
        if rows.is_empty() {
            missing.push(format!("table {} does not exist", c.table));
            types.push(String::new());
            continue;
        }
        let ty = |name: &str| {
            rows.iter()
                .find(|r| r.get::<String, _>(0) == name)
                .map(|r| r.get::<String, _>(1))
        };
        match ty(&c.column) {
            Some(t) if t == "text" || t == "character varying" => {}
            Some(t) => missing.push(format!("{}.{} is {t}, not text", c.table, c.column)),
            None => missing.push(format!("column {}.{} does not exist", c.table, c.column)),
        }
        match ty(&c.id_column) {
            Some(t) => types.push(t),
            None => {
                missing.push(format!("column {}.{} does not exist", c.table, c.id_column));
                types.push(String::new());
            }
        }
    }
    if missing.is_empty() {
        Ok(types)
    } else {
        Err(Error::Invalid(missing.join("; ")))
    }
}

/// Postgres type name usable in a cast.
fn cast(ty: &str) -> &str {
    match ty {
        "character varying" => "varchar",
        "smallint" => "int2",
        "integer" => "int4",
        "bigint" => "int8",
        "numeric" => "numeric",
        "uuid" => "uuid",
        _ => "text",
    }
}

/// Called around each batch: a leader re-checks its lease before a batch
/// and saves a checkpoint after it; the one-shot command shows progress.
pub trait Hook {
    /// Before reading a batch; an error stops the run (e.g. leadership lost).
    fn before_batch(&mut self) -> impl std::future::Future<Output = Result<(), Error>> + Send;
    /// After a batch is written; `last_id` is where a resumed run starts.
    fn after_batch(
        &mut self,
        report: &Report,
        last_id: &str,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send;
}

/// Re-encrypts one column, starting after id `start_after` (a checkpoint)
/// or from the first row.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per caller; a struct would only rename them"
)]
pub async fn run_column(
    pool: &PgPool,
    col: &Column,
    id_type: &str,
    old: Arc<MasterKey>,
    new: Arc<MasterKey>,
    opts: Options,
    start_after: Option<String>,
    hook: &mut impl Hook,
) -> Result<Report, Error> {
    let (t, c, id) = (
        ident(&col.table)?,
        ident(&col.column)?,
        ident(&col.id_column)?,
    );
    let cast = cast(id_type);
    let mut report = Report {
        table: col.table.clone(),
        column: col.column.clone(),
        ..Default::default()
    };
    // The text copy of the id gets its own name: `ORDER BY {id}` would
    // otherwise sort by that text output column, not by the id.
    let select = format!(
        "SELECT {id}::text AS rekey_row_id, {c} FROM {t} WHERE ($1::text IS NULL OR {t}.{id} > $1::{cast}) ORDER BY {t}.{id} LIMIT $2"
    );
    let fetch = |after: Option<String>| {
        let pool = pool.clone();
        let select = select.clone();
        let limit = opts.batch_size as i64;
        async move {
            sqlx::query(&select)
                .bind(after)
                .bind(limit)
                .fetch_all(&pool)
                .await
                .map(|rows| {
                    rows.into_iter()
                        .map(|r| (r.get::<String, _>(0), r.get::<Option<String>, _>(1)))
                        .collect::<Vec<_>>()
                })
        }
    };
    hook.before_batch().await?;
    let mut batch = fetch(start_after).await?;
    while !batch.is_empty() {
        let last = batch.last().map(|(id, _)| id.clone());
        // Read the next batch while this one is re-encrypted.
        let next = tokio::spawn(fetch(last.clone()));
        let mut rows = Vec::new();
        for (rid, v) in batch {
            report.scanned += 1;
            match v {
                None => report.null += 1,
                Some(v) => rows.push((rid, v)),
            }
        }
        let mut pending = rows;
        let sealer = match (col.codec, opts.salt) {
            (Codec::Hyvve, Salt::PerBatch) if !pending.is_empty() => {
                let new = new.clone();
                let s = tokio::task::spawn_blocking(move || hyvve::Sealer::new(&new))
                    .await
                    .map_err(|e| Error::Invalid(format!("deriving the batch key: {e}")))?
                    .map_err(|e| Error::Invalid(format!("deriving the batch key: {e}")))?;
                Some(Arc::new(s))
            }
            _ => None,
        };
        for attempt in 0..5 {
            if pending.is_empty() {
                break;
            }
            let verdicts = classify_all(
                col.codec,
                &old,
                &new,
                sealer.clone(),
                pending.clone(),
                opts.workers,
            )
            .await;
            let mut updates = Vec::new();
            for ((rid, oldv), verdict) in pending.iter().zip(verdicts) {
                match verdict {
                    Verdict::AlreadyNew => report.already_new += 1,
                    Verdict::Rotated(s) => updates.push((rid.clone(), oldv.clone(), s)),
                    Verdict::Neither => {
                        return Err(Error::Neither {
                            table: col.table.clone(),
                            column: col.column.clone(),
                            id: rid.clone(),
                        });
                    }
                    Verdict::Malformed => {
                        return Err(Error::Malformed {
                            table: col.table.clone(),
                            column: col.column.clone(),
                            id: rid.clone(),
                            codec: col.codec.name(),
                        });
                    }
                }
            }
            if opts.dry_run || updates.is_empty() {
                report.rotated += updates.len() as u64;
                pending.clear();
                break;
            }
            let written = write_batch(pool, &t, &c, &id, cast, &updates).await?;
            report.rotated += written.len() as u64;
            // Rows the app changed meanwhile: read them again and retry.
            let written: std::collections::HashSet<String> = written.into_iter().collect();
            let lost: Vec<String> = updates
                .iter()
                .map(|(rid, _, _)| rid.clone())
                .filter(|rid| !written.contains(rid))
                .collect();
            pending = if lost.is_empty() {
                Vec::new()
            } else {
                // Typed, so the id's index serves the lookup.
                let q = format!(
                    "SELECT {id}::text, {c} FROM {t} WHERE {id} = ANY($1::text[]::{cast}[])"
                );
                sqlx::query(&q)
                    .bind(&lost)
                    .fetch_all(pool)
                    .await?
                    .into_iter()
                    .filter_map(|r| Some((r.get::<String, _>(0), r.get::<Option<String>, _>(1)?)))
                    .collect()
            };
            if attempt == 4 && !pending.is_empty() {
                return Err(Error::Db(format!(
                    "{} rows of {}.{} kept changing during re-encryption; run again",
                    pending.len(),
                    col.table,
                    col.column
                )));
            }
        }
        hook.after_batch(&report, last.as_deref().unwrap_or_default())
            .await?;
        hook.before_batch().await?;
        batch = next.await.map_err(|e| Error::Db(e.to_string()))??;
    }
    Ok(report)
}

/// Classifies rows on OS threads, one chunk per worker.
async fn classify_all(
    codec: Codec,
    old: &Arc<MasterKey>,
    new: &Arc<MasterKey>,
    sealer: Option<Arc<hyvve::Sealer>>,
    rows: Vec<(String, String)>,
    workers: usize,
) -> Vec<Verdict> {
    let per = rows.len().div_ceil(workers.max(1)).max(1);
    let mut handles = Vec::new();
    for chunk in rows.chunks(per) {
        let chunk: Vec<String> = chunk.iter().map(|(_, v)| v.clone()).collect();
        let (old, new, sealer) = (old.clone(), new.clone(), sealer.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let mut new_first = false;
            let mut opener = hyvve::Opener::new(&new);
            chunk
                .iter()
                .map(|v| {
                    codec.classify(
                        &old,
                        &new,
                        v,
                        &mut new_first,
                        sealer.as_deref(),
                        &mut opener,
                    )
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut out = Vec::with_capacity(rows.len());
    for h in handles {
        match h.await {
            Ok(v) => out.extend(v),
            Err(_) => out.extend((0..per).map(|_| Verdict::Neither)),
        }
    }
    out.truncate(rows.len());
    out
}

/// One compare-and-swap UPDATE for the batch; returns the ids written. The
/// batch travels as three typed arrays: the planner then looks each row up
/// through the id's index at any batch size (a VALUES list turns into a
/// hash join over the whole table from about a thousand rows).
async fn write_batch(
    pool: &PgPool,
    t: &str,
    c: &str,
    id: &str,
    cast: &str,
    updates: &[(String, String, String)],
) -> Result<Vec<String>, Error> {
    let sql = format!(
        "UPDATE {t} AS t SET {c} = v.new \
         FROM unnest($1::text[]::{cast}[], $2::text[], $3::text[]) AS v(id, old, new) \
         WHERE t.{id} = v.id AND t.{c} = v.old RETURNING t.{id}::text"
    );
    let ids: Vec<&str> = updates.iter().map(|(i, _, _)| i.as_str()).collect();
    let olds: Vec<&str> = updates.iter().map(|(_, o, _)| o.as_str()).collect();
    let news: Vec<&str> = updates.iter().map(|(_, _, n)| n.as_str()).collect();
    Ok(sqlx::query(&sql)
        .bind(ids)
        .bind(olds)
        .bind(news)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(|r| r.get::<String, _>(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_both_codecs_whichever_key_is_tried_first() {
        let old = MasterKey::from_bytes(&[1; 32]).unwrap();
        let new = MasterKey::from_bytes(&[2; 32]).unwrap();
        let other = MasterKey::from_bytes(&[3; 32]).unwrap();
        for codec in [Codec::Rekey, Codec::Hyvve] {
            for start in [false, true] {
                let c = |text: &str| {
                    let mut new_first = start;
                    let mut opener = hyvve::Opener::new(&new);
                    codec.classify(&old, &new, text, &mut new_first, None, &mut opener)
                };
                let under_old = codec.seal(&old, b"v").unwrap();
                match c(&under_old) {
                    Verdict::Rotated(s) => {
                        assert_eq!(codec.open(&new, &s).unwrap().expose(), b"v")
                    }
                    _ => panic!("{codec:?}: should rotate"),
                }
                let under_new = codec.seal(&new, b"v").unwrap();
                assert!(matches!(c(&under_new), Verdict::AlreadyNew));
                let under_other = codec.seal(&other, b"v").unwrap();
                assert!(matches!(c(&under_other), Verdict::Neither));
                assert!(matches!(c("plain text!"), Verdict::Malformed));
            }
        }
    }

    #[test]
    fn the_hyvve_guess_follows_the_last_row() {
        let old = MasterKey::from_bytes(&[1; 32]).unwrap();
        let new = MasterKey::from_bytes(&[2; 32]).unwrap();
        let mut new_first = false;
        let mut opener = hyvve::Opener::new(&new);
        let under_new = Codec::Hyvve.seal(&new, b"v").unwrap();
        let under_old = Codec::Hyvve.seal(&old, b"v").unwrap();
        let _ = Codec::Hyvve.classify(&old, &new, &under_new, &mut new_first, None, &mut opener);
        assert!(
            new_first,
            "a row under the new key makes it the first guess"
        );
        let _ = Codec::Hyvve.classify(&old, &new, &under_new, &mut new_first, None, &mut opener);
        assert!(new_first);
        let _ = Codec::Hyvve.classify(&old, &new, &under_old, &mut new_first, None, &mut opener);
        assert!(!new_first, "and a row under the old key turns it back");
        let _ = Codec::Hyvve.classify(&old, &new, "garbage", &mut new_first, None, &mut opener);
        assert!(!new_first, "an unreadable row leaves it alone");
    }

    #[test]
    fn a_batch_sealer_rotates_under_one_salt() {
        let old = MasterKey::from_bytes(&[1; 32]).unwrap();
        let new = MasterKey::from_bytes(&[2; 32]).unwrap();
        let sealer = hyvve::Sealer::new(&new).unwrap();
        let mut opener = hyvve::Opener::new(&new);
        let mut new_first = false;
        let rotated: Vec<String> = (0..3)
            .map(|i| {
                let under_old = Codec::Hyvve.seal(&old, format!("v{i}").as_bytes()).unwrap();
                match Codec::Hyvve.classify(
                    &old,
                    &new,
                    &under_old,
                    &mut new_first,
                    Some(&sealer),
                    &mut opener,
                ) {
                    Verdict::Rotated(s) => s,
                    _ => panic!("should rotate"),
                }
            })
            .collect();
        let salt =
            |e: &str| base64::engine::general_purpose::STANDARD.decode(e).unwrap()[..64].to_vec();
        assert!(rotated.iter().all(|e| salt(e) == salt(&rotated[0])));
        for (i, e) in rotated.iter().enumerate() {
            assert_eq!(
                hyvve::open(&new, e).unwrap().expose(),
                format!("v{i}").as_bytes()
            );
            assert!(matches!(
                Codec::Hyvve.classify(&old, &new, e, &mut new_first, None, &mut opener),
                Verdict::AlreadyNew
            ));
        }
        assert_eq!("per-row".parse::<Salt>(), Ok(Salt::PerRow));
        assert!("sometimes".parse::<Salt>().is_err());
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(ident("ai_provider_configs").is_ok());
        assert!(ident("x; drop").is_err());
        assert!(ident("").is_err());
    }
}
