//! The stores a suite of journal and report tests runs on: run files in a
//! temporary state directory, or a private PostgreSQL server (with a state
//! directory for the lock and the audit index), and [`on_both_stores!`], which runs
//! each named suite test once per store. A test file adds its own helpers to
//! [`TestStore`] in an `impl` block of its own.
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use patchbook::journal::Store;

#[cfg(feature = "lab")]
#[path = "postgres.rs"]
pub mod postgres;

pub struct TestStore {
    pub dir: tempfile::TempDir,
    pub store: Store,
    #[cfg(feature = "lab")]
    _pg: Option<postgres::PgServer>,
}

impl TestStore {
    pub fn files() -> Self {
        let dir = tempfile::tempdir().unwrap();
        TestStore {
            store: Store::file(dir.path()),
            dir,
            #[cfg(feature = "lab")]
            _pg: None,
        }
    }

    #[cfg(feature = "lab")]
    pub fn postgres() -> Self {
        let pg = postgres::PgServer::start();
        let dir = tempfile::tempdir().unwrap();
        TestStore {
            store: Store::from_url(dir.path(), Some(&pg.url)).unwrap(),
            dir,
            _pg: Some(pg),
        }
    }
}

/// The suite named, once per store: run files, and PostgreSQL (a private server
/// per test; it needs root to start the server as the `postgres` user). The file
/// using it has `TestStore` in scope at its root.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod on_files {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::TestStore::files());
                }
            )*
        }
        #[cfg(feature = "lab")]
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::TestStore::postgres());
                }
            )*
        }
    };
}
