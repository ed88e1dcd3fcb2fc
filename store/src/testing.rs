//! Throwaway databases for tests: every test gets its own, on either engine, removed when
//! the handle is dropped (even when the test fails). Enabled by the `testing` feature.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{ConnectOptions, Store};

/// The environment variable naming a PostgreSQL server (any database on it) where tests may
/// create databases. `make test` sets it after starting a real server.
pub const POSTGRES_URL_VAR: &str = "NODEKEEPER_TEST_POSTGRES_URL";
/// When set to `1`, a missing [`POSTGRES_URL_VAR`] fails the PostgreSQL tests instead of
/// skipping them (`make test` and CI set it, so a broken setup cannot pass quietly).
pub const REQUIRE_POSTGRES_VAR: &str = "NODEKEEPER_REQUIRE_POSTGRES";

/// One throwaway database.
#[derive(Debug)]
pub struct TestDb {
    url: String,
    // Keeps the SQLite file's directory alive.
    _dir: Option<tempfile::TempDir>,
    // PostgreSQL: (admin URL, database name) to drop afterwards.
    pg_drop: Option<(String, String)>,
}

impl TestDb {
    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temporary directory for a test database");
        let url = format!("sqlite://{}/nodekeeper.db", dir.path().display());
        TestDb { url, _dir: Some(dir), pg_drop: None }
    }

    /// A fresh database on the PostgreSQL server of [`POSTGRES_URL_VAR`]; `None` (with a
    /// note on stderr) when the variable is unset, a panic if [`REQUIRE_POSTGRES_VAR`] is `1`.
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin) = std::env::var(POSTGRES_URL_VAR) else {
            if std::env::var(REQUIRE_POSTGRES_VAR).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_POSTGRES_VAR}=1 but {POSTGRES_URL_VAR} is not set");
            }
            eprintln!("skipping: {POSTGRES_URL_VAR} is not set (make test sets it)");
            return None;
        };
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nk_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple().to_string().get(..8).unwrap_or("0")
        );
        let admin_store = Store::connect(&admin).await.expect("connect to the PostgreSQL test server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin_store.pool)
            .await
            .expect("create a throwaway test database");
        admin_store.close().await;
        let mut url = url::Url::parse(&admin).expect("NODEKEEPER_TEST_POSTGRES_URL is a URL");
        url.set_path(&name);
        Some(TestDb { url: url.to_string(), _dir: None, pg_drop: Some((admin, name)) })
    }

    /// PostgreSQL only: makes the database refuse (`false`: new connections refused, every
    /// open one ended) or accept connections again — a database outage, for tests. Returns
    /// `false` on SQLite (nothing done).
    pub async fn set_reachable(&self, reachable: bool) -> bool {
        let Some((admin, name)) = &self.pg_drop else { return false };
        let admin_store = Store::connect(admin).await.expect("connect to the PostgreSQL test server");
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {reachable}"))
            .execute(&admin_store.pool)
            .await
            .expect("toggle connections");
        if !reachable {
            sqlx::query(&format!(
                "SELECT CAST(COUNT(pg_terminate_backend(pid)) AS BIGINT) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .execute(&admin_store.pool)
            .await
            .expect("end the open connections");
        }
        admin_store.close().await;
        true
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A migrated store on this database, with room for concurrent tests.
    pub async fn store(&self) -> Store {
        let store = Store::connect_with(&self.url, &ConnectOptions { max_connections: 16, ..Default::default() })
            .await
            .expect("connect to the test database");
        store.migrate().await.expect("migrate the test database");
        store
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg_drop.take() else { return };
        // Drop may run inside a runtime: do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                if let Ok(store) = Store::connect(&admin).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&store.pool).await;
                    store.close().await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

/// Runs each listed `async fn(TestDb)` once per engine, as `sqlite::NAME` and
/// `postgres::NAME` (the latter skipped, or failed under `NODEKEEPER_REQUIRE_POSTGRES=1`,
/// without a server). The calling crate needs `tokio` with `macros` and `rt-multi-thread`.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name($crate::testing::TestDb::sqlite()).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                if let Some(db) = $crate::testing::TestDb::postgres().await { super::$name(db).await }
            })*
        }
    };
}

/// A host name from a literal (tests).
pub fn host_name(s: &str) -> crate::HostName {
    s.parse().expect("a valid host name")
}

/// Whether libvirtd runs here (its socket exists). A test that needs it and cannot have it
/// says so on stderr and skips; with `NODEKEEPER_REQUIRE_LIBVIRT=1` (make test) it fails.
pub fn libvirtd_available() -> bool {
    const SOCKET: &str = "/run/libvirt/libvirt-sock";
    if std::path::Path::new(SOCKET).exists() {
        return true;
    }
    assert!(
        std::env::var("NODEKEEPER_REQUIRE_LIBVIRT").as_deref() != Ok("1"),
        "NODEKEEPER_REQUIRE_LIBVIRT=1 but libvirtd is not running ({SOCKET} missing)"
    );
    eprintln!("skipping: libvirtd is not running (make test starts it)");
    false
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// A host record as the database would hold it (tests of pure functions over hosts): no
/// addresses, no BMC, created at 0; `heartbeat` in ms since the epoch.
pub fn host(name: &str, state: crate::HostState, heartbeat: Option<i64>) -> crate::Host {
    crate::Host {
        name: host_name(name),
        mac: None,
        ip: None,
        bmc_url: None,
        bmc_credentials: None,
        state,
        last_heartbeat: heartbeat.map(crate::Timestamp),
        image: None,
        created_at: crate::Timestamp(0),
        updated_at: crate::Timestamp(0),
    }
}
