//! Connecting to the database (SQLite or PostgreSQL, chosen by the URL) and migrating it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::{AnyPool, ConnectOptions as _, Connection, Executor};

use crate::error::{Result, StoreError};
use crate::types::Timestamp;

/// Set on every SQLite connection (see `connect_with`), after `PRAGMA synchronous`.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;";

/// SQLite's `synchronous` level: `full` unless the URL says `?synchronous=normal` (only for
/// benchmarks and disposable labs: see `connect_with`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Synchronous {
    Full,
    Normal,
}

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database engine a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite: one provisioner, no setup.
    Sqlite,
    /// PostgreSQL: production, several provisioner replicas.
    Postgres,
}

impl Backend {
    /// Lower-case engine name.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn migrator(self) -> &'static Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        }
    }
}

/// How to connect: the defaults suit the admin CLI; services tune them.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long to wait for a connection (and for the first one, at connect time).
    pub timeout: Duration,
    /// Upper bound of pooled connections.
    pub max_connections: u32,
    /// SQLite: create the database file if it does not exist (the admin CLI does; the guard
    /// must not conjure an empty database out of a wrong path).
    pub create_if_missing: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(5), max_connections: 4, create_if_missing: true }
    }
}

/// A handle on the nodekeeper database. Cheap to clone; all clones share one pool.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
    redacted_url: String,
    /// The database server's clock, last read (see [`Store::now`]).
    clock: Arc<Mutex<Option<ClockReading>>>,
    /// The leadership term this handle writes under, if any (see [`Store::under_lease`]).
    lease: Option<Arc<LeaseToken>>,
    /// SQLite: the write gate of this file, shared by every pool of this process on it
    /// ([`write_gate`]).
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// SQLite takes one writer at a time; the others wait in its busy handler, which sleeps and
/// polls (up to 100 ms a try) and is not fair: under a steady stream of writers (a fleet's
/// heartbeats and reports, the controller) an unlucky one waits seconds. The writers of one
/// process take their turn here first, in order (tokio's mutex is fair), so the busy handler
/// is left to other processes (the CLI). One gate per database file, whatever the pool.
fn write_gate(connect: &str) -> Arc<tokio::sync::Mutex<()>> {
    static GATES: std::sync::OnceLock<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        std::sync::OnceLock::new();
    let file = connect.split('?').next().unwrap_or(connect);
    let file = std::fs::canonicalize(file.trim_start_matches("sqlite://"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| file.to_owned());
    let mut gates = GATES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    gates.entry(file).or_default().clone()
}

/// A write transaction (`Store::begin_write`): the connection it runs on (`&mut *tx`), and on
/// SQLite this process's turn to write, held until it commits or is dropped (a rollback).
pub(crate) struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// Commits.
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }
}

/// A leadership term that a writer acts under (see [`Store::under_lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    /// The role (`controller`).
    pub role: String,
    /// Who holds it.
    pub holder: String,
    /// The term it was taken in.
    pub term: i64,
}

/// Whether `token` is the role's current term, held, and unexpired by the database's clock.
/// On PostgreSQL the row is locked `FOR SHARE` for the rest of the caller's transaction, so a
/// concurrent takeover waits until this write committed (and this write sees a committed one).
async fn check_lease_in(conn: &mut sqlx::AnyConnection, backend: Backend, token: &LeaseToken) -> Result<()> {
    let lock = if backend == Backend::Postgres { " FOR SHARE" } else { "" };
    let sql = format!(
        "SELECT role FROM leadership WHERE role = $1 AND holder = $2 AND term = $3 AND expires_at > {}{lock}",
        db_now_sql(backend)
    );
    let held = sqlx::query(&sql)
        .bind(token.role.as_str())
        .bind(token.holder.as_str())
        .bind(token.term)
        .fetch_optional(&mut *conn)
        .await
        .map_err(crate::error::query("checking the lease"))?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::LeaseLost { role: token.role.clone(), term: token.term }),
    }
}

/// One reading of the database server's clock, and when (on this process's monotonic clock)
/// it was taken.
#[derive(Debug, Clone, Copy)]
struct ClockReading {
    db_ms: i64,
    at: Instant,
}

/// How long one reading of the database's clock is carried forward on the monotonic clock
/// before it is read again (bounds the drift between the two to well under a millisecond).
const CLOCK_RESYNC: Duration = Duration::from_secs(30);

/// The database server's time, in milliseconds since the epoch, as SQL.
pub(crate) fn db_now_sql(backend: Backend) -> &'static str {
    match backend {
        // SQLite is embedded: its clock is the one of the machine that holds the file.
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }
}

/// A database URL, checked and with its redacted form at hand for messages.
#[derive(Debug, Clone)]
pub struct DatabaseUrl {
    backend: Backend,
    /// What the driver gets.
    connect: String,
    redacted: String,
    synchronous: Synchronous,
}

impl DatabaseUrl {
    /// Checks `url`: `sqlite://PATH`, `sqlite::memory:`, or `postgres://` / `postgresql://`.
    pub fn parse(url: &str) -> Result<DatabaseUrl> {
        let redacted = redact_url(url);
        let invalid = |reason: &str| StoreError::InvalidUrl { url: redacted.clone(), reason: reason.to_owned() };
        if let Some(rest) = url.strip_prefix("sqlite:") {
            // Our own parameter, taken out before the driver sees the URL.
            let (head, query) = url.split_once('?').unwrap_or((url, ""));
            let mut synchronous = Synchronous::Full;
            let mut kept = Vec::new();
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=') {
                    Some(("synchronous", "full")) => synchronous = Synchronous::Full,
                    Some(("synchronous", "normal")) => synchronous = Synchronous::Normal,
                    Some(("synchronous", other)) => {
                        return Err(invalid(&format!("synchronous={other}: expected full (the default) or normal")))
                    }
                    _ => kept.push(kv),
                }
            }
            let connect = if kept.is_empty() { head.to_owned() } else { format!("{head}?{}", kept.join("&")) };
            let sqlite = DatabaseUrl { backend: Backend::Sqlite, connect, redacted: redacted.clone(), synchronous };
            if rest == ":memory:" || rest.starts_with(":memory:?") {
                return Ok(sqlite);
            }
            let path = rest.strip_prefix("//").ok_or_else(|| invalid("expected sqlite://PATH"))?;
            let file = path.split('?').next().unwrap_or_default();
            if file.is_empty() {
                return Err(invalid("no file path after sqlite://"));
            }
            return Ok(sqlite);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
            if parsed.host_str().is_none_or(str::is_empty) && !url.contains("host=") {
                return Err(invalid("no host"));
            }
            return Ok(DatabaseUrl {
                backend: Backend::Postgres,
                connect: url.to_owned(),
                redacted,
                synchronous: Synchronous::Full,
            });
        }
        Err(invalid("unsupported scheme; expected sqlite://PATH or postgres://USER@HOST/DB"))
    }

    /// The URL for the driver: SQLite files get `mode=rwc` (create on demand) or `mode=rw`,
    /// unless the URL sets a mode itself.
    fn for_driver(&self, create_if_missing: bool) -> String {
        let url = &self.connect;
        if self.backend != Backend::Sqlite || url.contains("mode=") || url.starts_with("sqlite::memory:") {
            return url.clone();
        }
        let mode = if create_if_missing { "rwc" } else { "rw" };
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}mode={mode}")
    }

    /// The engine this URL selects.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with any password replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// Replaces the password of a URL (userinfo or `password=` query parameter) by `***`.
/// Works on strings that are not valid URLs too, since those end up in error messages.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let auth_end = out[auth_start..].find(['/', '?']).map_or(out.len(), |i| auth_start + i);
        if let Some(at) = out[auth_start..auth_end].rfind('@') {
            let userinfo = &out[auth_start..auth_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(auth_start + colon + 1..auth_start + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let redacted: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

impl Store {
    /// Connects with [`ConnectOptions::default`]. Does not migrate.
    pub async fn connect(url: &str) -> Result<Store> {
        Store::connect_with(url, &ConnectOptions::default()).await
    }

    /// Connects, proving the database answers by opening one connection now.
    pub async fn connect_with(url: &str, opts: &ConnectOptions) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let url = DatabaseUrl::parse(url)?;
        let options: AnyConnectOptions = url
            .for_driver(opts.create_if_missing)
            .parse()
            .map_err(|e: sqlx::Error| StoreError::InvalidUrl { url: url.redacted.clone(), reason: e.to_string() })?;
        // sqlx logs each statement with its full SQL; a batched lookup has thousands of
        // placeholders, which must not land on a host's console as a warning.
        let options = options
            .log_statements(log::LevelFilter::Trace)
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let mut pool = AnyPoolOptions::new().max_connections(opts.max_connections).acquire_timeout(opts.timeout);
        if url.backend == Backend::Sqlite {
            let sync = match url.synchronous {
                Synchronous::Full => "PRAGMA synchronous = FULL;",
                Synchronous::Normal => "PRAGMA synchronous = NORMAL;",
            };
            pool = pool.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    conn.execute(sync).await?;
                    // WAL lets readers go on while one writer commits. FULL syncs the WAL at
                    // every commit: this database is the single source of truth, and a commit
                    // it acknowledged (an ownership move whose new owner already started the
                    // instance, a lease handed out) must survive a power loss, not only a crash
                    // (NORMAL may lose the last transactions then). The cost is in
                    // docs/performance.md ("synchronous = FULL"). `?synchronous=normal` in the
                    // URL gives that up: for benchmarks and disposable labs only.
                    conn.execute(SQLITE_PRAGMAS).await?;
                    Ok(())
                })
            });
        }
        // One direct connection first: the pool would retry a refused connection until its
        // timeout, and a database that is down should be reported at once.
        let probe = async {
            let conn = sqlx::AnyConnection::connect_with(&options).await?;
            conn.close().await?;
            pool.connect_with(options.clone()).await
        };
        let pool = match tokio::time::timeout(opts.timeout, probe).await {
            Ok(Ok(pool)) => pool,
            Ok(Err(source)) => return Err(StoreError::Connect { url: url.redacted, source }),
            Err(_) => return Err(StoreError::Connect { url: url.redacted, source: sqlx::Error::PoolTimedOut }),
        };
        let gate = (url.backend == Backend::Sqlite && !url.connect.starts_with("sqlite::memory:"))
            .then(|| write_gate(&url.connect));
        Ok(Store { pool, backend: url.backend, redacted_url: url.redacted, clock: Arc::default(), lease: None, gate })
    }

    /// The database server's time now. Every timestamp that is compared across machines —
    /// heartbeats, leadership leases, operation deadlines, guard reports, tokens' expiry — is
    /// taken from here, never from this process's wall clock, which may be minutes off (a
    /// guard on PostgreSQL writes its own heartbeats). The server's clock is read at most
    /// every 30 s and carried forward in between on this process's monotonic clock, which
    /// never jumps; the reading is taken as of the middle of its round trip.
    pub async fn now(&self) -> Result<Timestamp> {
        if let Some(t) = self.cached_now() {
            return Ok(t);
        }
        let sent = Instant::now();
        let db_ms: i64 = sqlx::query_scalar(&format!("SELECT {}", db_now_sql(self.backend)))
            .fetch_one(&self.pool)
            .await
            .map_err(crate::error::query("reading the database's clock"))?;
        let reading = ClockReading { db_ms, at: sent + sent.elapsed() / 2 };
        *self.clock.lock().unwrap_or_else(|p| p.into_inner()) = Some(reading);
        Ok(Timestamp(db_ms + i64::try_from(reading.at.elapsed().as_millis()).unwrap_or(0)))
    }

    fn cached_now(&self) -> Option<Timestamp> {
        let reading = (*self.clock.lock().unwrap_or_else(|p| p.into_inner()))?;
        let since = reading.at.elapsed();
        (since < CLOCK_RESYNC).then(|| Timestamp(reading.db_ms + i64::try_from(since.as_millis()).unwrap_or(0)))
    }

    /// The engine behind this store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> &str {
        &self.redacted_url
    }

    /// Opens the database as every program of nodekeeper does for its work: the embedded
    /// SQLite is migrated in place (it is the program's own), a PostgreSQL schema must already
    /// be current (`db migrate` is an operator's step there).
    pub async fn open_for_service(url: &str, options: &ConnectOptions) -> Result<Store> {
        let store = Store::connect_with(url, options).await?;
        match store.backend {
            Backend::Sqlite => {
                store.migrate().await?;
            }
            Backend::Postgres => store.check_schema().await?,
        }
        Ok(store)
    }

    /// Applies every pending migration; returns how many were applied. Idempotent.
    pub async fn migrate(&self) -> Result<usize> {
        let migrator = self.backend.migrator();
        let before = self.schema_version().await?;
        migrator
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate { url: self.redacted_url.clone(), source })?;
        let applied = migrator.iter().filter(|m| m.version > before).count();
        Ok(applied)
    }

    /// The newest applied migration's version (0 when the database is empty).
    pub async fn schema_version(&self) -> Result<i64> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|source| StoreError::Connect { url: self.redacted_url.clone(), source })?;
        // A database never migrated has no bookkeeping table: that is version 0, not an error.
        let exists_sql = match self.backend {
            Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            Backend::Postgres => "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'",
        };
        let exists: i64 = sqlx::query_scalar(exists_sql)
            .fetch_one(&mut *conn)
            .await
            .map_err(crate::error::query("reading the schema version"))?;
        if exists == 0 {
            return Ok(0);
        }
        let applied = conn
            .list_applied_migrations()
            .await
            .map_err(|source| StoreError::Migrate { url: self.redacted_url.clone(), source })?;
        Ok(applied.iter().map(|m| m.version).max().unwrap_or(0))
    }

    /// The newest migration this program ships.
    pub fn latest_schema_version(&self) -> i64 {
        self.backend.migrator().iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Fails unless the schema is exactly the one this program was built for.
    pub async fn check_schema(&self) -> Result<()> {
        let applied = self.schema_version().await?;
        let latest = self.latest_schema_version();
        let url = self.redacted_url.clone();
        match applied.cmp(&latest) {
            std::cmp::Ordering::Less => Err(StoreError::SchemaBehind { url, applied, latest }),
            std::cmp::Ordering::Greater => Err(StoreError::SchemaAhead { url, applied, latest }),
            std::cmp::Ordering::Equal => Ok(()),
        }
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads and then writes fails at once
    /// with SQLITE_BUSY when another writer got there first, instead of waiting its turn.
    /// A store [`Store::under_lease`] first proves, inside the transaction, that its term is
    /// still current ([`StoreError::LeaseLost`] otherwise: nothing is written).
    pub(crate) async fn begin_write(&self, what: &'static str) -> Result<WriteTx> {
        let mut tx = self.begin_write_unfenced(what).await?;
        if let Some(token) = &self.lease {
            check_lease_in(&mut tx, self.backend, token).await?;
        }
        Ok(tx)
    }

    /// [`Store::begin_write`] without the lease check (for taking the lease itself).
    pub(crate) async fn begin_write_unfenced(&self, what: &'static str) -> Result<WriteTx> {
        let turn = match &self.gate {
            Some(gate) => Some(gate.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(crate::error::query(what))?;
        Ok(WriteTx { tx, _turn: turn })
    }

    /// This store, acting under the leadership term `token`: every write transaction it
    /// begins proves first that the term is still current and held by `token.holder`, with a
    /// lease that has not expired by the database's clock — a fencing token, as Chubby's
    /// sequencers: a leader that paused (GC, SIGSTOP, a slow BMC) past its lease and lost the
    /// role changes nothing when it wakes. Same pool.
    pub fn under_lease(&self, token: LeaseToken) -> Store {
        Store { lease: Some(Arc::new(token)), ..self.clone() }
    }

    /// Proves that this store's term is still current (`Ok` for a store under no lease), for
    /// actions outside the database that must not be taken by a stale leader (a BMC command:
    /// checked right before it is sent).
    pub async fn check_lease(&self) -> Result<()> {
        let Some(token) = &self.lease else { return Ok(()) };
        let mut conn = self.pool.acquire().await.map_err(crate::error::query("checking the lease"))?;
        check_lease_in(&mut conn, self.backend, token).await
    }

    /// Proves the database answers (`SELECT 1`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(crate::error::query("pinging the database"))?;
        Ok(())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `count` placeholders for the bind parameters `first..first+count`, for generated
/// statements with thousands of them. PostgreSQL needs `$N`; SQLite gets anonymous `?`,
/// because binding a named (`$N`) parameter looks its name up in a linear list, which made
/// a 1,000-row insert quadratic (118 ms instead of 3 ms).
pub(crate) fn placeholders(backend: Backend, first: usize, count: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; count].join(", "),
        Backend::Postgres => (first..first + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", "),
    }
}

/// The engine behind a connection.
pub(crate) fn backend_of(conn: &sqlx::AnyConnection) -> Backend {
    if conn.backend_name().eq_ignore_ascii_case("sqlite") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    }
}

/// A text column parsed as `T`; a value that does not parse is a corrupt row of `table`.
pub(crate) fn parse_column<T>(table: &'static str, column: &str, value: &str) -> crate::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| crate::StoreError::Corrupt { table, reason: format!("column {column}: {e}") })
}

/// A column of `row`; one that cannot be read as `T` is a corrupt row of `table`.
pub(crate) fn get<'r, T>(row: &'r sqlx::any::AnyRow, table: &'static str, column: &str) -> crate::Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    use sqlx::Row;
    row.try_get(column).map_err(|e| crate::StoreError::Corrupt { table, reason: format!("column {column}: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        let cases = [
            ("postgres://nk:s3cret@db:5432/nk", "postgres://nk:***@db:5432/nk"),
            ("postgres://nk@db/nk", "postgres://nk@db/nk"),
            ("postgres://nk:s3cret@db:notaport/nk", "postgres://nk:***@db:notaport/nk"),
            ("postgres://db/nk?user=nk&password=s3cret", "postgres://db/nk?user=nk&password=***"),
            ("postgres://nk:p@ss:w0rd@db/nk", "postgres://nk:***@db/nk"),
            ("sqlite:///var/lib/nk.db", "sqlite:///var/lib/nk.db"),
        ];
        for (input, want) in cases {
            assert_eq!(redact_url(input), want, "{input}");
        }
    }

    #[tokio::test]
    async fn sqlite_commits_are_synced_to_disk_on_every_connection() {
        let dir = std::env::temp_dir().join(format!("nk-sync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let url = format!("sqlite://{}/sync.db", dir.display());
        let opts = ConnectOptions { max_connections: 3, ..ConnectOptions::default() };
        let store = Store::connect_with(&url, &opts).await.expect("connect");
        // Every pooled connection, not only the first: hold three at once.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut conn = store.pool.acquire().await.expect("acquire");
            let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.expect("pragma");
            let journal: String =
                sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *conn).await.expect("pragma");
            assert_eq!((sync, journal.as_str()), (2, "wal"), "2 is FULL");
            held.push(conn);
        }
        drop(held);
        store.close().await;
        // `?synchronous=normal` (benchmarks only) is ours: the driver never sees it.
        let normal = Store::connect_with(&format!("{url}?synchronous=normal"), &opts).await.expect("normal");
        let mut conn = normal.pool.acquire().await.expect("acquire");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.expect("pragma");
        assert_eq!(sync, 1, "1 is NORMAL");
        drop(conn);
        normal.close().await;
        assert!(DatabaseUrl::parse(&format!("{url}?synchronous=off")).is_err(), "only full or normal");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_are_checked_before_connecting() {
        let ok = DatabaseUrl::parse("sqlite://./nodekeeper.db").expect("relative sqlite path");
        assert_eq!(ok.backend(), Backend::Sqlite);
        assert_eq!(ok.for_driver(true), "sqlite://./nodekeeper.db?mode=rwc");
        assert_eq!(ok.for_driver(false), "sqlite://./nodekeeper.db?mode=rw");
        assert_eq!(DatabaseUrl::parse("postgresql://nk@db/nk").expect("pg").backend(), Backend::Postgres);
        for bad in ["mysql://x@y/z", "sqlite:", "sqlite://", "nodekeeper.db", "postgres://nk:pw@db:99999999/nk"] {
            let err = DatabaseUrl::parse(bad).expect_err(bad).to_string();
            assert!(!err.contains(":pw@"), "password leaked: {err}");
        }
    }
}
