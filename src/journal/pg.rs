//! The PostgreSQL side of the journal store: connecting, applying the versioned
//! migrations (`migrations/*.sql`), and the few statements that write and read run
//! records. It owns the SQL; what a record means, its hash chain and its checks stay
//! with the rest of the journal, which sees this store only through [`super::store`].
//! It must not decide anything a file store would decide differently.

use postgres::{Client, NoTls};

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
        message: e
            .as_db_error()
            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
    }
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

/// Takes the run's append lock until `tx` ends and returns the run's last
/// (seq, hash): every process appending to one run (a coordinator and its
/// workers) chains onto the record the database has, one at a time.
pub(crate) fn lock_tail(
    tx: &mut postgres::Transaction<'_>,
    run: &str,
) -> Result<Option<(u64, String)>, postgres::Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&run],
    )?;
    let row = tx.query_opt(
        "SELECT seq, hash FROM records WHERE run = $1 ORDER BY seq DESC LIMIT 1",
        &[&run],
    )?;
    Ok(row.map(|r| (u64::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1))))
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

/// One record, as its line. Committed (and so durable) when this returns.
pub(crate) fn insert(
    client: &mut impl postgres::GenericClient,
    rec: &super::Record,
    line: &str,
) -> Result<(), postgres::Error> {
    let seq = i64::try_from(rec.seq).unwrap_or(i64::MAX);
    // PostgreSQL text cannot hold NUL. The columns only help queries; `line` keeps
    // the record exactly (JSON writes NUL as `\u0000`), and readers use nothing else.
    let column = |s: &str| s.replace('\0', "\u{fffd}");
    let host = rec.host.as_deref().map(column);
    let kind = column(&rec.kind);
    client.execute(
        "INSERT INTO records (run, seq, ts, host, kind, prev, hash, line)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &rec.run, &seq, &rec.ts, &host, &kind, &rec.prev, &rec.hash, &line,
        ],
    )?;
    Ok(())
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
