//! The metadata store: SQLite in WAL mode, one transaction per commit batch.

mod sqlite;

pub use sqlite::*;
