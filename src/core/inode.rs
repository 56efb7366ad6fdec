//! In-memory inodes and directories (pure data, no I/O).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::core::extent::ExtentMap;
use crate::meta::InodeRow;
use crate::snap::pair::PairId;

/// Entries of one directory, with stable readdir cookies: an entry keeps its cookie for
/// its whole life, so `rm -rf` (readdir, unlink, readdir from the last cookie) sees
/// every entry exactly once.
#[derive(Debug, Default)]
pub struct Dir {
    by_name: HashMap<Vec<u8>, (u64, u64)>,
    by_cookie: BTreeMap<u64, Vec<u8>>,
    next_cookie: u64,
}

impl Dir {
    /// Number of entries (without `.` and `..`).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// Looks up a name.
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.by_name.get(name).map(|e| e.1)
    }
    /// Adds or replaces an entry; a replaced entry keeps its cookie.
    pub fn insert(&mut self, name: Vec<u8>, ino: u64) {
        if let Some(e) = self.by_name.get_mut(&name) {
            e.1 = ino;
            return;
        }
        // Cookies 1 and 2 are "." and "..".
        let c = self.next_cookie.max(3);
        self.next_cookie = c + 1;
        self.by_cookie.insert(c, name.clone());
        self.by_name.insert(name, (c, ino));
    }
    /// Removes an entry.
    pub fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (c, ino) = self.by_name.remove(name)?;
        self.by_cookie.remove(&c);
        Some(ino)
    }
    /// Entries after `cookie`, in cookie order: (cookie, name, ino).
    pub fn after(&self, cookie: u64) -> impl Iterator<Item = (u64, &[u8], u64)> + '_ {
        self.by_cookie
            .range(cookie + 1..)
            .map(|(&c, n)| (c, n.as_slice(), self.by_name[n].1))
    }
    /// All entries in cookie order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u64)> + '_ {
        self.by_cookie
            .values()
            .map(|n| (n.as_slice(), self.by_name[n].1))
    }
}

/// One inode in memory.
#[derive(Debug)]
pub struct Inode {
    /// The persisted attributes.
    pub row: InodeRow,
    /// File data (regular files).
    pub extents: ExtentMap,
    /// Ordinary xattrs.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Entries (directories).
    pub dir: Option<Dir>,
    /// Names that refer to this inode: (parent, name). A directory has one.
    pub links: Vec<(u64, Vec<u8>)>,
    /// Open file handles.
    pub open: u32,
    /// The pair whose scope holds this inode.
    pub pair: Option<PairId>,
    /// Held shared by reads and writes, exclusively by operations that free or move
    /// this file's tracks (truncate, punch, final unlink).
    pub data_lock: Arc<RwLock<()>>,
}

impl Inode {
    /// Wraps a row.
    pub fn new(row: InodeRow) -> Inode {
        let is_dir = row.kind == libc::S_IFDIR;
        Inode {
            row,
            extents: ExtentMap::new(),
            xattrs: BTreeMap::new(),
            dir: is_dir.then(Dir::default),
            links: Vec::new(),
            open: 0,
            pair: None,
            data_lock: Arc::new(RwLock::new(())),
        }
    }
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.row.kind == libc::S_IFDIR
    }
    /// True for regular files.
    pub fn is_file(&self) -> bool {
        self.row.kind == libc::S_IFREG
    }
    /// First parent (for path names).
    pub fn parent(&self) -> Option<u64> {
        self.links.first().map(|l| l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_stable_across_removals() {
        let mut d = Dir::default();
        for i in 0..10u8 {
            d.insert(vec![b'a' + i], i as u64 + 10);
        }
        let first: Vec<u64> = d.after(0).take(3).map(|e| e.0).collect();
        for (_, n, _) in d
            .after(0)
            .take(3)
            .map(|(c, n, i)| (c, n.to_vec(), i))
            .collect::<Vec<_>>()
        {
            d.remove(&n);
        }
        // Continuing after the last cookie seen returns the other 7 entries.
        assert_eq!(d.after(*first.last().unwrap()).count(), 7);
        d.insert(b"b".to_vec(), 99);
        assert_eq!(d.get(b"b"), Some(99));
    }
}
