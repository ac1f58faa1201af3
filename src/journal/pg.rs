//! The PostgreSQL side of the journal store: connecting, applying the versioned
//! migrations (`migrations/*.sql`), and the few statements that write and read run
//! records. It owns the SQL; what a record means, its hash chain and its checks stay
//! with the rest of the journal, which sees this store only through [`super::store`].
//! It must not decide anything a file store would decide differently.

use postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use super::JournalError;

/// Every migration, in order: (version, SQL). A database records the versions it
/// has in `schema_version`; [`connect`] applies the rest, each in one transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_init.sql")),
    (2, include_str!("../../migrations/0002_workers.sql")),
    (3, include_str!("../../migrations/0003_fleet_limits.sql")),
];

/// Any key two patchbook processes agree on: migrations run under this advisory
/// lock, so two controllers starting on an empty database do not both apply them.
const MIGRATION_LOCK: i64 = 0x7061_7463_6862_6f6b; // "patchbok"

/// The URL without its password, for messages.
pub fn shown_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "postgres://…".to_string(),
    }
}

pub(crate) fn store_error(url: &str, e: &postgres::Error) -> JournalError {
    JournalError::Store {
        url: shown_url(url),
        message: error_message(e),
    }
}

/// The server's message when it sent one, else the client's.
pub(crate) fn error_message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// Connects and brings the schema up to the newest migration this build knows.
pub fn connect(url: &str) -> Result<Client, JournalError> {
    let mut client = Client::connect(url, NoTls).map_err(|e| store_error(url, &e))?;
    migrate(&mut client).map_err(|e| store_error(url, &e))?;
    Ok(client)
}

fn migrate(client: &mut Client) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version integer PRIMARY KEY,
             applied timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let have: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[version],
        )?;
    }
    tx.commit()
}

/// The newest schema version this build applies.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// Registers a new run; `false` when the run already exists.
pub(crate) fn create_run(
    client: &mut Client,
    run: &str,
    operator: &str,
) -> Result<bool, postgres::Error> {
    let n = client.execute(
        "INSERT INTO runs (run, operator) VALUES ($1, $2) ON CONFLICT (run) DO NOTHING",
        &[&run, &operator],
    )?;
    Ok(n == 1)
}

/// The run's last (seq, hash), or (0, genesis) for a run without records;
/// `None` when the store has no such run.
pub(crate) fn tail(
    client: &mut Client,
    run: &str,
) -> Result<Option<(u64, String)>, postgres::Error> {
    if client
        .query_opt("SELECT 1 FROM runs WHERE run = $1", &[&run])?
        .is_none()
    {
        return Ok(None);
    }
    let row = client.query_opt(
        "SELECT seq, hash FROM records WHERE run = $1 ORDER BY seq DESC LIMIT 1",
        &[&run],
    )?;
    Ok(Some(row.map_or((0, super::GENESIS.to_string()), |r| {
        (u64::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1))
    })))
}

/// One host's record lines in seq order.
pub(crate) fn host_lines(
    client: &mut Client,
    run: &str,
    host: &str,
) -> Result<Vec<String>, postgres::Error> {
    let rows = client.query(
        "SELECT line FROM records WHERE run = $1 AND host = $2 ORDER BY seq",
        &[&run, &host],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The connection a journal appends through, with its prepared insert.
pub(crate) struct Appender {
    pub(crate) client: Client,
    insert: Option<Statement>,
}

impl Appender {
    pub(crate) fn new(client: Client) -> Self {
        Appender {
            client,
            insert: None,
        }
    }
}

/// `s` as an SQL string literal. Run ids are checked to be `[A-Za-z0-9._-]`
/// already; doubling quotes keeps any other text a literal too.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\0', "").replace('\'', "''"))
}

/// Writes records to `run` in ONE transaction and returns once it committed (so
/// every record of the batch is durable, or none is). `make(item, seq, prev)`
/// builds each item's record, in order, chained onto (seq, prev), the run's end in the
/// database read under the run's append lock: every process appending to one run
/// (a coordinator and its workers) chains onto what the database has, one
/// transaction at a time.
///
/// Three round trips, whatever the batch's size: BEGIN with the lock and the tail
/// read (one simple query), one multi-row INSERT, COMMIT. The lock key is still
/// `hashtextextended(run, 0)`, so processes of earlier versions share the lock.
pub(crate) fn append_batch<I>(
    conn: &mut Appender,
    run: &str,
    items: Vec<I>,
    mut make: impl FnMut(I, u64, String) -> (super::Record, Vec<u8>),
) -> Result<Vec<(super::Record, Vec<u8>)>, postgres::Error> {
    let run_lit = literal(run);
    let written = (|| {
        let messages = conn.client.simple_query(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended({run_lit}, 0)); \
             SELECT seq, hash FROM records WHERE run = {run_lit} ORDER BY seq DESC LIMIT 1"
        ))?;
        let (mut seq, mut prev) = (0u64, super::GENESIS.to_string());
        // The last row is the tail's (the lock's row comes first).
        for m in &messages {
            if let SimpleQueryMessage::Row(r) = m {
                if let (Ok(Some(s)), Ok(Some(h))) = (r.try_get("seq"), r.try_get("hash")) {
                    seq = s.parse().unwrap_or(0);
                    prev = h.to_string();
                }
            }
        }
        let mut out = Vec::with_capacity(items.len());
        let mut cols = Columns::default();
        for item in items {
            let (rec, line) = make(item, seq, prev);
            let text = String::from_utf8_lossy(&line);
            cols.push(&rec, text.trim_end_matches('\n'));
            seq = rec.seq;
            prev = rec.hash.clone();
            out.push((rec, line));
        }
        let insert = match &conn.insert {
            Some(s) => s.clone(),
            None => {
                let s = conn.client.prepare(
                    "INSERT INTO records (run, seq, ts, host, kind, prev, hash, line)
                     SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[],
                                              $5::text[], $6::text[], $7::text[], $8::text[])",
                )?;
                conn.insert = Some(s.clone());
                s
            }
        };
        conn.client.execute(
            &insert,
            &[
                &run, &cols.seq, &cols.ts, &cols.host, &cols.kind, &cols.prev, &cols.hash,
                &cols.line,
            ],
        )?;
        conn.client.batch_execute("COMMIT")?;
        Ok(out)
    })();
    if written.is_err() {
        // Leave the connection out of the failed transaction; the journal is
        // broken anyway (the COMMIT may have reached the server), this only keeps
        // a later read on this connection possible.
        let _ = conn.client.batch_execute("ROLLBACK");
    }
    written
}

/// A batch's rows as columns, for the one INSERT over `unnest`.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    ts: Vec<String>,
    host: Vec<Option<String>>,
    kind: Vec<String>,
    prev: Vec<String>,
    hash: Vec<String>,
    line: Vec<String>,
}

impl Columns {
    fn push(&mut self, rec: &super::Record, line: &str) {
        // PostgreSQL text cannot hold NUL. The columns only help queries; `line`
        // keeps the record exactly (JSON writes NUL as `\u0000`), and readers use
        // nothing else.
        let column = |s: &str| s.replace('\0', "\u{fffd}");
        self.seq.push(i64::try_from(rec.seq).unwrap_or(i64::MAX));
        self.ts.push(rec.ts.clone());
        self.host.push(rec.host.as_deref().map(column));
        self.kind.push(column(&rec.kind));
        self.prev.push(rec.prev.clone());
        self.hash.push(rec.hash.clone());
        self.line.push(line.to_string());
    }
}

/// A run's record lines in seq order; `None` when the store has no such run.
pub(crate) fn lines(
    client: &mut Client,
    run: &str,
) -> Result<Option<Vec<String>>, postgres::Error> {
    let known = client.query_opt("SELECT 1 FROM runs WHERE run = $1", &[&run])?;
    if known.is_none() {
        return Ok(None);
    }
    let rows = client.query(
        "SELECT line FROM records WHERE run = $1 ORDER BY seq",
        &[&run],
    )?;
    Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
}

/// Every run the store holds, by id.
pub(crate) fn run_names(client: &mut Client) -> Result<Vec<String>, postgres::Error> {
    let rows = client.query(
        "SELECT run FROM runs UNION SELECT DISTINCT run FROM records ORDER BY 1",
        &[],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
