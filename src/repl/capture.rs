//! Row-change capture of the metadata database, for shipping each committed transaction
//! to a replica, and its application on the secondary.
//!
//! On the primary, [`install`] creates, on the store's writer connection only, a
//! temporary table `repl_log` and temporary `AFTER INSERT/UPDATE/DELETE` triggers on
//! every table of the schema (column lists read from `PRAGMA table_info`). A trigger
//! writes the changed row (an insert or the new side of an update: every column; a
//! delete or the old side of an update: the primary key) into `repl_log` *inside the
//! same transaction*, so a rolled-back transaction leaves nothing behind and a
//! committed one leaves exactly its changes, in statement order. After each commit the
//! store calls its [`crate::meta::CommitTap`] (still under the metadata lock), which
//! drains the log with [`drain`] into one encoded record.
//!
//! The secondary applies a record with [`Applier::apply`] inside its own transaction:
//! upserts as `INSERT OR REPLACE` of every column, deletes by primary key. Table and
//! column names come from the secondary's own schema; a record naming another table or
//! another number of columns is refused. Applying the primary's transactions in commit
//! order to a database that was identical at the full sync yields the primary's
//! database at each commit.
//!
//! Record encoding: repeated `name (u32 len + bytes)`, `op: u8` (0 delete, 1 upsert),
//! `n: u16`, then `n` values: tag `0` NULL, `1` i64, `2` f64, `3` text, `4` blob (the
//! last two as u32 len + bytes). [`decode_rows`] never panics on garbage.

use std::collections::HashMap;

use rusqlite::Connection;
use rusqlite::types::{Value, ValueRef};

use crate::error::{Error, Result};
use crate::repl::proto::{Cursor, MAX_FRAME};

/// A table: name, every column, the primary-key columns.
type Table = (String, Vec<String>, Vec<String>);

/// The tables of the main schema with their columns and primary-key columns.
fn tables(conn: &Connection) -> Result<Vec<Table>> {
    let mut st = conn.prepare(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )?;
    let names: Vec<String> = st
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for t in names {
        let mut st = conn.prepare(&format!("PRAGMA main.table_info(\"{t}\")"))?;
        let mut cols: Vec<(String, i64)> = st
            .query_map([], |r| Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let all: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
        cols.retain(|c| c.1 > 0);
        cols.sort_by_key(|c| c.1);
        let pk: Vec<String> = cols.into_iter().map(|c| c.0).collect();
        if pk.is_empty() {
            return Err(Error::Corrupt(format!(
                "table {t} has no primary key: its rows cannot be replicated"
            )));
        }
        out.push((t, all, pk));
    }
    Ok(out)
}

/// Installs the temporary log table and triggers on the writer connection.
pub fn install(conn: &Connection) -> Result<()> {
    let ts = tables(conn)?;
    let width = ts.iter().map(|t| t.1.len()).max().unwrap_or(1);
    let cols: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
    let mut sql = format!(
        "PRAGMA temp_store = MEMORY; DROP TABLE IF EXISTS temp.repl_log;
         CREATE TEMP TABLE repl_log(id INTEGER PRIMARY KEY, tbl TEXT NOT NULL, op INTEGER NOT NULL, n INTEGER NOT NULL, {});",
        cols.join(", ")
    );
    let row = |t: &str, op: u8, side: &str, list: &[String]| {
        let c: Vec<String> = (0..list.len()).map(|i| format!("c{i}")).collect();
        let v: Vec<String> = list.iter().map(|x| format!("{side}.\"{x}\"")).collect();
        format!(
            "INSERT INTO temp.repl_log(tbl, op, n, {}) VALUES('{t}', {op}, {}, {});",
            c.join(", "),
            list.len(),
            v.join(", ")
        )
    };
    for (t, all, pk) in &ts {
        sql.push_str(&format!(
            "CREATE TEMP TRIGGER repl_{t}_i AFTER INSERT ON main.\"{t}\" BEGIN {} END;
             CREATE TEMP TRIGGER repl_{t}_u AFTER UPDATE ON main.\"{t}\" BEGIN {} {} END;
             CREATE TEMP TRIGGER repl_{t}_d AFTER DELETE ON main.\"{t}\" BEGIN {} END;",
            row(t, 1, "NEW", all),
            row(t, 0, "OLD", pk),
            row(t, 1, "NEW", all),
            row(t, 0, "OLD", pk),
        ));
    }
    conn.execute_batch(&sql)?;
    Ok(())
}

fn put_value(out: &mut Vec<u8>, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => out.push(0),
        ValueRef::Integer(i) => {
            out.push(1);
            out.extend_from_slice(&i.to_le_bytes());
        }
        ValueRef::Real(f) => {
            out.push(2);
            out.extend_from_slice(&f.to_le_bytes());
        }
        ValueRef::Text(t) => {
            out.push(3);
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t);
        }
        ValueRef::Blob(b) => {
            out.push(4);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

/// Takes (and deletes) every logged row change: one encoded record, empty if nothing
/// changed since the last drain.
pub fn drain(conn: &Connection) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut st = conn.prepare_cached("SELECT * FROM temp.repl_log ORDER BY id")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let tbl = r.get_ref(1)?.as_bytes().map_err(rusqlite::Error::from)?;
            let op: i64 = r.get(2)?;
            let n: i64 = r.get(3)?;
            out.extend_from_slice(&(tbl.len() as u32).to_le_bytes());
            out.extend_from_slice(tbl);
            out.push(op as u8);
            out.extend_from_slice(&(n as u16).to_le_bytes());
            for i in 0..n as usize {
                put_value(&mut out, r.get_ref(4 + i)?);
            }
        }
    }
    if !out.is_empty() {
        conn.prepare_cached("DELETE FROM temp.repl_log")?
            .execute([])?;
    }
    Ok(out)
}

/// One row change.
#[derive(Debug, PartialEq)]
pub struct RowChange {
    /// Table.
    pub table: String,
    /// True: upsert (every column); false: delete (primary key).
    pub upsert: bool,
    /// Values.
    pub values: Vec<Value>,
}

/// Decodes a record (never panics).
pub fn decode_rows(b: &[u8]) -> std::result::Result<Vec<RowChange>, String> {
    let mut c = Cursor::new(b);
    let mut out = Vec::new();
    while c.left() > 0 {
        let table =
            String::from_utf8(c.bytes(256)?.to_vec()).map_err(|_| "table name not UTF-8")?;
        let upsert = match c.u8()? {
            0 => false,
            1 => true,
            o => return Err(format!("unknown row operation {o}")),
        };
        let n = u16::from_le_bytes(c.array()?) as usize;
        if n > 64 {
            return Err(format!("{n} columns"));
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(match c.u8()? {
                0 => Value::Null,
                1 => Value::Integer(i64::from_le_bytes(c.array()?)),
                2 => Value::Real(f64::from_le_bytes(c.array()?)),
                3 => Value::Text(
                    String::from_utf8(c.bytes(MAX_FRAME)?.to_vec())
                        .map_err(|_| "text not UTF-8")?,
                ),
                4 => Value::Blob(c.bytes(MAX_FRAME)?.to_vec()),
                t => return Err(format!("unknown value tag {t}")),
            });
        }
        out.push(RowChange {
            table,
            upsert,
            values,
        });
    }
    Ok(out)
}

/// The secondary's statements per table (from its own schema).
pub struct Applier {
    sql: HashMap<String, (usize, String, usize, String)>,
}

impl Applier {
    /// Reads the schema of `conn`.
    pub fn new(conn: &Connection) -> Result<Applier> {
        let mut sql = HashMap::new();
        for (t, all, pk) in tables(conn)? {
            let q = |c: &[String]| c.iter().map(|x| format!("\"{x}\"")).collect::<Vec<_>>();
            let upsert = format!(
                "INSERT OR REPLACE INTO main.\"{t}\"({}) VALUES({})",
                q(&all).join(", "),
                (1..=all.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let delete = format!(
                "DELETE FROM main.\"{t}\" WHERE {}",
                pk.iter()
                    .enumerate()
                    .map(|(i, c)| format!("\"{c}\" IS ?{}", i + 1))
                    .collect::<Vec<_>>()
                    .join(" AND ")
            );
            sql.insert(t, (all.len(), upsert, pk.len(), delete));
        }
        Ok(Applier { sql })
    }

    /// Applies a record's row changes (inside the caller's transaction).
    pub fn apply(&self, conn: &Connection, rows: &[u8]) -> Result<usize> {
        let changes =
            decode_rows(rows).map_err(|e| Error::Corrupt(format!("replicated rows: {e}")))?;
        for ch in &changes {
            let Some((na, up, npk, del)) = self.sql.get(&ch.table) else {
                return Err(Error::Corrupt(format!(
                    "replicated rows name table {:?}, which this volume's schema lacks",
                    ch.table
                )));
            };
            let (want, sql) = if ch.upsert { (*na, up) } else { (*npk, del) };
            if ch.values.len() != want {
                return Err(Error::Corrupt(format!(
                    "replicated row of {} has {} values, the schema {want}",
                    ch.table,
                    ch.values.len()
                )));
            }
            conn.prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(ch.values.iter()))?;
        }
        Ok(changes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = "CREATE TABLE a(k TEXT PRIMARY KEY, v TEXT NOT NULL);
        CREATE TABLE b(x INTEGER NOT NULL, y BLOB NOT NULL, z, PRIMARY KEY(x, y)) WITHOUT ROWID;";

    fn dump(c: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for t in ["a", "b"] {
            let mut st = c
                .prepare(&format!("SELECT * FROM {t} ORDER BY 1, 2"))
                .unwrap();
            let n = st.column_count();
            let mut rows = st.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let v: Vec<String> = (0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect();
                out.push(format!("{t}:{}", v.join(",")));
            }
        }
        out
    }

    #[test]
    fn committed_changes_replay_on_a_copy_and_rollbacks_leave_nothing() {
        let p = Connection::open_in_memory().unwrap();
        let s = Connection::open_in_memory().unwrap();
        p.execute_batch(SCHEMA).unwrap();
        s.execute_batch(SCHEMA).unwrap();
        install(&p).unwrap();
        let ap = Applier::new(&s).unwrap();
        let ship = |p: &Connection| {
            let r = drain(p).unwrap();
            let tx = s.unchecked_transaction().unwrap();
            ap.apply(&s, &r).unwrap();
            tx.commit().unwrap();
        };
        p.execute_batch(
            "BEGIN; INSERT INTO a VALUES('x', '1'); INSERT INTO b VALUES(1, x'00ff', 2.5);
             INSERT INTO b VALUES(2, x'01', NULL); COMMIT;",
        )
        .unwrap();
        ship(&p);
        assert_eq!(dump(&p), dump(&s));
        p.execute_batch(
            "BEGIN; UPDATE a SET v = '2'; UPDATE b SET y = x'02' WHERE x = 2;
             DELETE FROM b WHERE x = 1; INSERT OR REPLACE INTO a VALUES('x', '3'); COMMIT;",
        )
        .unwrap();
        ship(&p);
        assert_eq!(dump(&p), dump(&s));
        p.execute_batch("BEGIN; DELETE FROM a; ROLLBACK;").unwrap();
        assert!(drain(&p).unwrap().is_empty());
        assert_eq!(dump(&p), dump(&s));
        assert_eq!(dump(&s).len(), 2);
    }

    #[test]
    fn foreign_tables_and_widths_are_refused() {
        let s = Connection::open_in_memory().unwrap();
        s.execute_batch(SCHEMA).unwrap();
        let ap = Applier::new(&s).unwrap();
        let mut r = Vec::new();
        r.extend_from_slice(&5u32.to_le_bytes());
        r.extend_from_slice(b"other");
        r.push(0);
        r.extend_from_slice(&0u16.to_le_bytes());
        assert!(ap.apply(&s, &r).is_err());
        let mut r = Vec::new();
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(b"a");
        r.push(1);
        r.extend_from_slice(&1u16.to_le_bytes());
        r.push(0);
        assert!(ap.apply(&s, &r).is_err());
    }
    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// A `Commit` record's rows come off the network: random bytes, and valid
        /// records with bytes flipped, cut or appended, are errors or applied rows,
        /// never a panic.
        #[test]
        fn hostile_rows_never_panic(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            flips in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..4),
            cut in 0usize..400,
        ) {
            let s = Connection::open_in_memory().unwrap();
            s.execute_batch(SCHEMA).unwrap();
            let ap = Applier::new(&s).unwrap();
            let _ = decode_rows(&junk);
            let _ = ap.apply(&s, &junk);
            let p = Connection::open_in_memory().unwrap();
            p.execute_batch(SCHEMA).unwrap();
            install(&p).unwrap();
            p.execute_batch(
                "INSERT INTO a VALUES('key', 'value'); INSERT INTO b VALUES(7, x'0102', 'z');
                 DELETE FROM a WHERE k = 'key';",
            )
            .unwrap();
            let mut r = drain(&p).unwrap();
            for (at, b) in flips {
                if !r.is_empty() {
                    let n = r.len();
                    r[at % n] ^= b;
                }
            }
            r.truncate(cut.min(r.len()));
            let _ = decode_rows(&r);
            let _ = ap.apply(&s, &r);
        }
    }
}
