//! The frozen view: every object of every frozen copy (pairs in `splitting`, `split`
//! or `updating`), at its split-time path, indexed by copy-mount inode number and by
//! directory (parent -> children). It is what the copy mount serves.
//!
//! A view is immutable and shared behind an [`Arc`]: readers clone the `Arc`, never the
//! maps. The engine builds a new one once per change of the frozen set (split, update,
//! resync, release, error, mount), not per request ([`crate::snap::engine::Engine::view`]),
//! walking again only the lazy pairs and generations whose instant changed ([`PartCache`]).
//! Inode numbers stay stable per path across rebuilds ([`Numbering`]). A hard-linked
//! object has one inode number and one node, reached under each of its names; its link
//! count is the number of names. Directories above a frozen object that are not
//! themselves frozen (the parents of a file-scope pair) are synthesized, mode 0555.
//!
//! A file node names its pair, its index in the pair's frozen list and its main-volume
//! inode: reads go to [`crate::snap::engine::Engine::read_frozen_of`], which refuses
//! (ESTALE) when an update moved another object to that index meanwhile. A lazy pair's
//! objects ([`lazy_objects`]: its records plus the unchanged live tree, docs/design.md
//! "Lazy instants") are read by main inode instead; [`instant_paths`] gives an unchanged
//! object's names at the instant when it is frozen.

use std::collections::HashMap;

use crate::snap::pair::{Frozen, FrozenKind, PairId};

/// Inode number of the copy mount's root directory.
pub const VIEW_ROOT: u64 = 1;

/// The copy-mount directory where a file pair's frozen object goes when the view has
/// its path already (a file split on its own inside a frozen group):
/// `.pairfs/PAIR/PATH`.
pub const ASIDE_DIR: &str = ".pairfs";

/// Attributes of one object of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ViewAttr {
    /// Copy-mount inode number.
    pub ino: u64,
    /// Kind.
    pub kind: FrozenKind,
    /// Permission bits (07777).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Access time (ns).
    pub atime: i64,
    /// Modification time (ns).
    pub mtime: i64,
    /// Change time (ns).
    pub ctime: i64,
    /// Link count: names of a file, 2 + subdirectories of a directory.
    pub nlink: u32,
    /// Device number.
    pub rdev: u32,
}

/// Entries of one directory of the view, in insertion order, with a name index.
#[derive(Debug, Default)]
pub struct DirIndex {
    entries: Vec<(Vec<u8>, u64)>,
    by_name: HashMap<Vec<u8>, usize>,
}

impl DirIndex {
    /// The inode named `name`.
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.by_name.get(name).map(|&k| self.entries[k].1)
    }
    /// Entries (name, inode) in a stable order; readdir offsets index this slice.
    pub fn entries(&self) -> &[(Vec<u8>, u64)] {
        &self.entries
    }
    fn insert(&mut self, name: Vec<u8>, ino: u64) -> bool {
        if self.by_name.contains_key(&name) {
            return false;
        }
        self.by_name.insert(name.clone(), self.entries.len());
        self.entries.push((name, ino));
        true
    }
}

/// What a node holds besides its attributes.
#[derive(Debug)]
pub enum Content {
    /// A directory.
    Dir(DirIndex),
    /// A regular file: its pair, its index in the pair's frozen list, its main inode.
    File {
        /// Pair.
        pair: PairId,
        /// Index in the pair's frozen list.
        idx: usize,
        /// Inode on the main volume.
        ino: u64,
    },
    /// A symlink and its target.
    Symlink(Vec<u8>),
    /// A FIFO, socket or device node (attributes only).
    Special,
}

/// One object of the view.
#[derive(Debug)]
pub struct ViewNode {
    /// Attributes.
    pub attr: ViewAttr,
    /// Parent directory (itself for the root).
    pub parent: u64,
    /// Content.
    pub content: Content,
    /// Extended attributes (sorted by name).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ViewNode {
    /// The value of xattr `name`.
    pub fn xattr(&self, name: &[u8]) -> Option<&[u8]> {
        self.xattrs
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|k| self.xattrs[k].1.as_slice())
    }
    /// xattr names, NUL-terminated and concatenated (the `listxattr` format).
    pub fn xattr_names(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, _) in &self.xattrs {
            out.extend_from_slice(n);
            out.push(0);
        }
        out
    }
}

/// An immutable index of every frozen object.
#[derive(Debug, Default)]
pub struct FrozenView {
    generation: u64,
    nodes: HashMap<u64, ViewNode>,
}

impl FrozenView {
    /// The generation of the frozen set this view was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The node with copy-mount inode `ino`.
    pub fn get(&self, ino: u64) -> Option<&ViewNode> {
        self.nodes.get(&ino)
    }
    /// The node named `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<&ViewNode> {
        match &self.nodes.get(&parent)?.content {
            Content::Dir(d) => self.nodes.get(&d.get(name)?),
            _ => None,
        }
    }
    /// Number of nodes (the root included once built).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    /// True when nothing (not even the root) is in the view.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Copy-mount inode numbers by path, kept across rebuilds so a path keeps its number.
#[derive(Debug, Default, Clone)]
pub struct Numbering {
    by_path: HashMap<String, u64>,
    next: u64,
}

impl Numbering {
    fn of(&mut self, path: &str) -> u64 {
        if path.is_empty() {
            return VIEW_ROOT;
        }
        if let Some(&i) = self.by_path.get(path) {
            return i;
        }
        let i = self.next.max(VIEW_ROOT + 1);
        self.next = i + 1;
        self.by_path.insert(path.to_string(), i);
        i
    }
}

fn synthesized_dir(ino: u64, t: i64) -> ViewAttr {
    ViewAttr {
        ino,
        kind: FrozenKind::Dir,
        perm: 0o555,
        size: 4096,
        blocks: 8,
        atime: t,
        mtime: t,
        ctime: t,
        nlink: 2,
        ..ViewAttr::default()
    }
}

/// Builds a [`FrozenView`] pair by pair.
pub struct Builder<'a> {
    view: FrozenView,
    numbering: &'a mut Numbering,
    track_size: u64,
    /// The last directory [`Builder::dir`] found (path, inode): objects come grouped by
    /// directory, and a path once found stays that directory (nothing is removed or
    /// replaced while building).
    last_dir: Option<(String, u64)>,
}

impl<'a> Builder<'a> {
    /// Starts an empty view of generation `generation`.
    pub fn new(generation: u64, track_size: u64, numbering: &'a mut Numbering) -> Self {
        let mut view = FrozenView {
            generation,
            nodes: HashMap::new(),
        };
        view.nodes.insert(
            VIEW_ROOT,
            ViewNode {
                attr: synthesized_dir(VIEW_ROOT, 0),
                parent: VIEW_ROOT,
                content: Content::Dir(DirIndex::default()),
                xattrs: Vec::new(),
            },
        );
        Builder {
            view,
            numbering,
            track_size,
            last_dir: None,
        }
    }

    /// The directory at `path`, synthesized (with times `t`) where missing; None when a
    /// non-directory already holds one of its names.
    fn dir(&mut self, path: &str, t: i64) -> Option<u64> {
        if let Some((p, ino)) = &self.last_dir
            && p == path
        {
            return Some(*ino);
        }
        let found = self.find_dir(path, t);
        if let Some(ino) = found {
            match &mut self.last_dir {
                Some((p, i)) => {
                    p.clear();
                    p.push_str(path);
                    *i = ino;
                }
                None => self.last_dir = Some((path.to_string(), ino)),
            }
        }
        found
    }

    fn find_dir(&mut self, path: &str, t: i64) -> Option<u64> {
        let mut cur = VIEW_ROOT;
        let mut sub = String::with_capacity(path.len());
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !sub.is_empty() {
                sub.push('/');
            }
            sub.push_str(part);
            let ino = self.numbering.of(&sub);
            let Content::Dir(d) = &self.view.nodes.get(&cur)?.content else {
                return None;
            };
            match d.get(part.as_bytes()) {
                Some(i) => {
                    if !matches!(self.view.nodes.get(&i)?.content, Content::Dir(_)) {
                        return None;
                    }
                    cur = i;
                    continue;
                }
                None => {
                    if self.view.nodes.contains_key(&ino) {
                        // The number is taken by an object under another name.
                        return None;
                    }
                }
            }
            self.view.nodes.insert(
                ino,
                ViewNode {
                    attr: synthesized_dir(ino, t),
                    parent: cur,
                    content: Content::Dir(DirIndex::default()),
                    xattrs: Vec::new(),
                },
            );
            if let Some(ViewNode {
                content: Content::Dir(d),
                ..
            }) = self.view.nodes.get_mut(&cur)
            {
                d.insert(part.as_bytes().to_vec(), ino);
            }
            cur = ino;
        }
        Some(cur)
    }

    /// The node at `path`, if the view has one (nothing is synthesized).
    fn resolve(&self, path: &str) -> Option<u64> {
        let mut cur = VIEW_ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let Content::Dir(d) = &self.view.nodes.get(&cur)?.content else {
                return None;
            };
            cur = d.get(part.as_bytes())?;
        }
        Some(cur)
    }

    /// Adds the frozen objects of a file pair, after every directory and root pair. A
    /// file pair inside a group (`in_group`: a file split on its own inside a directory
    /// or root pair) is always served at `.pairfs/PAIR/PATH` ([`ASIDE_DIR`]), and also
    /// at PATH when the view does not have that path already (the group's frozen copy
    /// holds the file too); any other file pair at PATH, or aside when PATH is taken.
    /// So both frozen copies are served, and the file's own one at a stable path.
    pub fn add_file_pair(&mut self, pair: PairId, objects: &[Frozen], in_group: bool) {
        for (idx, f) in objects.iter().enumerate() {
            let names: Vec<String> = std::iter::once(&f.path)
                .chain(f.links.iter())
                .cloned()
                .collect();
            let taken = names.iter().any(|p| self.resolve(p).is_some());
            let mut all: Vec<String> = Vec::new();
            if !taken {
                all.extend(names.iter().cloned());
            }
            if taken || in_group {
                all.extend(names.iter().map(|p| format!("{ASIDE_DIR}/{pair}/{p}")));
            }
            let mut it = all.into_iter();
            let Some(path) = it.next() else { continue };
            let placed = Frozen {
                path,
                links: it.collect(),
                ..f.clone()
            };
            self.add(pair, idx, &placed);
        }
    }

    /// Adds the frozen objects of pair `pair` (its list, in order).
    pub fn add_pair(&mut self, pair: PairId, objects: &[Frozen]) {
        for (idx, f) in objects.iter().enumerate() {
            self.add(pair, idx, f);
        }
    }

    fn add(&mut self, pair: PairId, idx: usize, f: &Frozen) {
        let a = &f.attr;
        let ino = self.numbering.of(&f.path);
        let mut xattrs = f.xattrs.clone();
        xattrs.sort();
        xattrs.dedup_by(|x, y| x.0 == y.0);
        let attr = ViewAttr {
            ino,
            kind: a.kind,
            perm: a.perm,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            blocks: if a.kind == FrozenKind::File {
                f.extents.tracks() * self.track_size / 512
            } else if a.kind == FrozenKind::Dir {
                8
            } else {
                0
            },
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            nlink: 0,
            rdev: a.rdev,
        };
        if a.kind == FrozenKind::Dir {
            // A directory has one name; it may exist already (synthesized, or the
            // root): keep its entries, take the frozen attributes.
            let node = if ino == VIEW_ROOT {
                self.view.nodes.get_mut(&VIEW_ROOT)
            } else {
                let (parent_path, name) = split_path(&f.path);
                let Some(parent) = self.dir(parent_path, a.ctime) else {
                    return;
                };
                let existing = match &self.view.nodes.get(&parent).map(|n| &n.content) {
                    Some(Content::Dir(d)) => d.get(name.as_bytes()),
                    _ => return,
                };
                match existing {
                    Some(i) if i == ino => {}
                    Some(_) => return,
                    None if self.view.nodes.contains_key(&ino) => return,
                    None => {
                        self.link(parent, name, ino);
                    }
                }
                Some(self.view.nodes.entry(ino).or_insert_with(|| ViewNode {
                    attr,
                    parent,
                    content: Content::Dir(DirIndex::default()),
                    xattrs: Vec::new(),
                }))
            };
            if let Some(n) = node
                && matches!(n.content, Content::Dir(_))
            {
                n.attr = ViewAttr {
                    nlink: n.attr.nlink,
                    ..attr
                };
                n.xattrs = xattrs;
            }
            return;
        }
        if self.view.nodes.contains_key(&ino) {
            // The number of this path belongs to a synthesized directory (a file
            // replaced a directory between two splits of different pairs): skip.
            return;
        }
        let content = match a.kind {
            FrozenKind::File => Content::File {
                pair,
                idx,
                ino: f.ino,
            },
            FrozenKind::Symlink => Content::Symlink(f.target.clone()),
            _ => Content::Special,
        };
        let mut names = 0;
        let mut first_parent = None;
        for path in std::iter::once(&f.path).chain(f.links.iter()) {
            let (parent_path, name) = split_path(path);
            let Some(parent) = self.dir(parent_path, a.ctime) else {
                continue;
            };
            if self.link(parent, name, ino) {
                names += 1;
                first_parent.get_or_insert(parent);
            }
        }
        let Some(parent) = first_parent else {
            return;
        };
        self.view.nodes.insert(
            ino,
            ViewNode {
                attr: ViewAttr {
                    nlink: names,
                    ..attr
                },
                parent,
                content,
                xattrs,
            },
        );
    }

    /// Adds `name` -> `ino` to directory `parent`; false if the name is taken.
    fn link(&mut self, parent: u64, name: &str, ino: u64) -> bool {
        match self.view.nodes.get_mut(&parent) {
            Some(ViewNode {
                content: Content::Dir(d),
                ..
            }) => d.insert(name.as_bytes().to_vec(), ino),
            _ => false,
        }
    }

    /// Finishes the view: link counts of directories, root times.
    pub fn finish(mut self) -> FrozenView {
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        let mut newest = 0;
        for (&ino, n) in &self.view.nodes {
            newest = newest.max(n.attr.ctime);
            if ino != VIEW_ROOT && matches!(n.content, Content::Dir(_)) {
                *subdirs.entry(n.parent).or_default() += 1;
            }
        }
        for (ino, n) in self.view.nodes.iter_mut() {
            if matches!(n.content, Content::Dir(_)) {
                n.attr.nlink = 2 + subdirs.get(ino).copied().unwrap_or(0);
            }
        }
        if let Some(r) = self.view.nodes.get_mut(&VIEW_ROOT)
            && r.attr.ctime == 0
        {
            r.attr.atime = newest;
            r.attr.mtime = newest;
            r.attr.ctime = newest;
        }
        self.view
    }
}

/// The object lists of the parts of the view that cost a walk to make, kept between
/// rebuilds: a lazy pair's or a named generation's objects ([`lazy_objects`]; a
/// generation's placed under `@NAME/`), by (pair or generation id, [`Pair::instant`]).
///
/// An entry stays right while its instant stays: the instant's objects, names and
/// attributes never change while it is split (a member's first change records it
/// first, as it was, docs/design.md rule 8a; its record equals what the walk found),
/// and none of the view's contents points at where data lives now: a lazy pair's file
/// is read by main inode at read time, a whole map's by its index in a list that only a
/// new instant replaces, a symlink holds its target, a directory its names. So a
/// rebuild after one pair or generation changed walks only that one
/// (`Engine::view`); the others' lists are reused as they are, and [`Numbering`] keeps
/// their inode numbers.
///
/// [`Pair::instant`]: crate::snap::pair::Pair::instant
#[derive(Debug, Default)]
pub struct PartCache {
    parts: HashMap<PairId, (u64, std::sync::Arc<Vec<Frozen>>)>,
    used: std::collections::HashSet<PairId>,
    walks: u64,
}

impl PartCache {
    /// The objects of `id` at instant `instant`: the list kept for it, else `walk()`'s,
    /// kept (an error is returned and nothing kept). Marks `id` as used by this rebuild.
    pub fn get_or_walk(
        &mut self,
        id: PairId,
        instant: u64,
        walk: impl FnOnce() -> crate::error::Result<Vec<Frozen>>,
    ) -> crate::error::Result<std::sync::Arc<Vec<Frozen>>> {
        self.used.insert(id);
        if let Some((i, objects)) = self.parts.get(&id)
            && *i == instant
        {
            return Ok(objects.clone());
        }
        self.parts.remove(&id);
        self.walks += 1;
        let objects = std::sync::Arc::new(walk()?);
        self.parts.insert(id, (instant, objects.clone()));
        Ok(objects)
    }

    /// Ends a rebuild: drops the lists of ids it did not ask for (released, resynced,
    /// failed, refreshed under a new id).
    pub fn end_rebuild(&mut self) {
        let used = std::mem::take(&mut self.used);
        self.parts.retain(|id, _| used.contains(id));
    }

    /// Walks made since the cache was made (each a whole lazy walk of one part).
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Number of lists kept.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// True when no list is kept.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The lists whose part `map` carries to another engine, under the instant
    /// number `map` gives (`Some` only where the part's instant is the same there).
    pub fn carry(&self, map: impl Fn(PairId, u64) -> Option<u64>) -> PartCache {
        PartCache {
            parts: self
                .parts
                .iter()
                .filter_map(|(&id, (i, o))| map(id, *i).map(|n| (id, (n, o.clone()))))
                .collect(),
            used: std::collections::HashSet::new(),
            walks: 0,
        }
    }

    /// Drops every list (the next rebuild walks everything again).
    pub fn clear(&mut self) {
        self.parts.clear();
        self.used.clear();
    }
}

/// Where a directory listed in batches continues: the last readdir cookie seen, and a
/// hold that keeps the directory in the namespace's cache (so its cookies stay) until
/// the listing ends.
pub struct Cursor {
    /// Continue after this cookie.
    pub cookie: u64,
    /// Dropped when the listing ends.
    pub hold: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

/// One batch of the unchanged members named in a live directory (name, object with an
/// empty path) and where to continue (None: the end), or None when the directory is
/// gone ([`crate::snap::namespace::Namespace::instant_children`]).
pub type Children = Option<(Vec<(Vec<u8>, Frozen)>, Option<Cursor>)>;

/// Every object of a lazy pair's instant (docs/design.md, "Lazy instants").
///
/// `records(from)` returns the pair's frozen records from index `from` on (the scope's
/// top first; objects frozen before their first change since; absent markers);
/// `children(dir, after)` a batch of the unchanged members named in live directory `dir`
/// after readdir cookie `after` (None if it is gone), each with its bare name as path,
/// and where to continue: a directory is listed in batches, each in its own hold of the
/// namespace lock. Batches may see the directory change in between: an entry changed
/// since the instant names a frozen (left out) or new inode, so the unchanged entries
/// listed are exactly the instant's, each once (an entry keeps its cookie). The objects are the records (absent
/// markers left out) plus the unchanged members reached from the frozen directories
/// through unchanged directories, at their parent's path. The records are read again
/// until no new one appeared during the walk: an object frozen after its directory
/// was listed was found there unchanged (same object); one frozen before was left out
/// of the listing and comes with its record (a record replaces what the walk found,
/// since it holds all the object's names; a directory's entries are walked once).
pub fn lazy_objects(
    mut records: impl FnMut(usize) -> crate::error::Result<Vec<Frozen>>,
    mut children: impl FnMut(u64, Option<Cursor>) -> crate::error::Result<Children>,
) -> crate::error::Result<Vec<Frozen>> {
    use std::collections::{HashSet, VecDeque};
    let mut out: Vec<Frozen> = Vec::new();
    let mut at: HashMap<u64, usize> = HashMap::new();
    let mut from_record: HashSet<u64> = HashSet::new();
    let mut walked: HashSet<u64> = HashSet::new();
    let mut queue: VecDeque<(u64, String)> = VecDeque::new();
    let mut seen = 0;
    loop {
        let fresh = records(seen)?;
        seen += fresh.len();
        let got_new = !fresh.is_empty();
        for f in fresh {
            if f.absent || !from_record.insert(f.ino) {
                continue;
            }
            if f.attr.kind == FrozenKind::Dir {
                queue.push_back((f.ino, f.path.clone()));
            }
            match at.get(&f.ino) {
                Some(&k) => out[k] = f,
                None => {
                    at.insert(f.ino, out.len());
                    out.push(f);
                }
            }
        }
        if !got_new && queue.is_empty() {
            break;
        }
        while let Some((dir, path)) = queue.pop_front() {
            if !walked.insert(dir) {
                continue;
            }
            let mut kids = Vec::new();
            let mut after = None;
            loop {
                let Some((batch, next)) = children(dir, after.take())? else {
                    break;
                };
                kids.extend(batch);
                match next {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            for (name, mut f) in kids {
                let name = String::from_utf8_lossy(&name);
                let p = if path.is_empty() {
                    name.into_owned()
                } else {
                    format!("{path}/{name}")
                };
                if let Some(&k) = at.get(&f.ino) {
                    // Another name of an unchanged hard-linked file (a record already
                    // holds all of its names).
                    if !from_record.contains(&f.ino) && !out[k].links.contains(&p) {
                        out[k].links.push(p);
                    }
                    continue;
                }
                f.path = p.clone();
                f.links.clear();
                if f.attr.kind == FrozenKind::Dir {
                    queue.push_back((f.ino, p));
                }
                at.insert(f.ino, out.len());
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// The names of an unchanged member at a lazy pair's instant, as paths (docs/design.md,
/// "Lazy instants"). An inode not frozen in the pair is unchanged since the instant, so
/// its names now are its names then; `names(ino)` gives them as (parent, name).
/// `frozen(ino)` tells where the pair froze an inode: None (not frozen: unchanged),
/// Some(None) (marked absent: not in the scope at the instant), Some(Some(path)).
/// Each name is resolved by walking up: a frozen directory gives its instant path, an
/// unchanged one its one name, until a frozen directory (the scope's top always is)
/// or a directory with no name (above the scope: that name was outside it). Empty:
/// the inode was not in the scope at the instant. `max_depth` bounds each walk.
pub fn instant_paths(
    ino: u64,
    mut names: impl FnMut(u64) -> crate::error::Result<Vec<(u64, Vec<u8>)>>,
    mut frozen: impl FnMut(u64) -> Option<Option<String>>,
    max_depth: usize,
) -> crate::error::Result<Vec<String>> {
    let mut out = Vec::new();
    'names: for (parent, name) in names(ino)? {
        let mut parts: Vec<Vec<u8>> = vec![name];
        let mut dir = parent;
        for _ in 0..max_depth {
            match frozen(dir) {
                Some(None) => continue 'names,
                Some(Some(base)) => {
                    let mut p = base;
                    for part in parts.iter().rev() {
                        if !p.is_empty() {
                            p.push('/');
                        }
                        p.push_str(&String::from_utf8_lossy(part));
                    }
                    out.push(p);
                    continue 'names;
                }
                None => {
                    let Some((up, n)) = names(dir)?.into_iter().next() else {
                        continue 'names;
                    };
                    parts.push(n);
                    dir = up;
                }
            }
        }
    }
    Ok(out)
}

/// (parent path, last name) of a relative path.
fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(k) => (&path[..k], &path[k + 1..]),
        None => ("", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::extent::ExtentMap;
    use crate::snap::pair::FrozenAttr;

    fn obj(ino: u64, path: &str, kind: FrozenKind) -> Frozen {
        Frozen {
            ino,
            path: path.into(),
            attr: FrozenAttr {
                kind,
                perm: 0o640,
                uid: 7,
                gid: 8,
                size: 10,
                atime: 1,
                mtime: 2,
                ctime: 3,
                rdev: 0,
            },
            extents: ExtentMap::new(),
            ..Frozen::default()
        }
    }

    fn names(v: &FrozenView, dir: u64) -> Vec<String> {
        match &v.get(dir).unwrap().content {
            Content::Dir(d) => d
                .entries()
                .iter()
                .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                .collect(),
            _ => panic!("not a directory"),
        }
    }

    #[test]
    fn tree_with_hard_links_specials_and_xattrs() {
        let mut d = obj(10, "top", FrozenKind::Dir);
        d.attr.perm = 0o2775;
        let mut f = obj(11, "top/a/f", FrozenKind::File);
        f.links = vec!["top/b/g".into()];
        f.xattrs = vec![
            (b"user.z".to_vec(), b"1".to_vec()),
            (b"system.posix_acl_access".to_vec(), b"x".to_vec()),
        ];
        let mut fifo = obj(14, "top/p", FrozenKind::Fifo);
        fifo.attr.size = 0;
        let mut dev = obj(15, "top/c", FrozenKind::CharDev);
        dev.attr.rdev = 0x0103;
        let mut link = obj(16, "top/l", FrozenKind::Symlink);
        link.target = b"a/f".to_vec();
        let objs = vec![
            d,
            obj(12, "top/a", FrozenKind::Dir),
            obj(13, "top/b", FrozenKind::Dir),
            obj(17, "top/empty", FrozenKind::Dir),
            f,
            fifo,
            dev,
            link,
        ];
        let mut num = Numbering::default();
        let mut b = Builder::new(5, 4096, &mut num);
        b.add_pair(1, &objs);
        let v = b.finish();
        assert_eq!(v.generation(), 5);
        let top = v.lookup(VIEW_ROOT, b"top").unwrap();
        assert_eq!(top.attr.perm, 0o2775);
        assert_eq!(top.attr.nlink, 5, "2 + a, b, empty");
        let a = v.lookup(top.attr.ino, b"a").unwrap().attr.ino;
        let b_ = v.lookup(top.attr.ino, b"b").unwrap().attr.ino;
        let f1 = v.lookup(a, b"f").unwrap();
        let f2 = v.lookup(b_, b"g").unwrap();
        assert_eq!(f1.attr.ino, f2.attr.ino, "one inode under both names");
        assert_eq!(f1.attr.nlink, 2);
        assert!(matches!(
            f1.content,
            Content::File {
                pair: 1,
                idx: 4,
                ino: 11
            }
        ));
        assert_eq!(f1.xattr(b"user.z"), Some(&b"1"[..]));
        assert_eq!(f1.xattr(b"user.y"), None);
        assert_eq!(
            f1.xattr_names(),
            b"system.posix_acl_access\0user.z\0".to_vec()
        );
        let p = v.lookup(top.attr.ino, b"p").unwrap();
        assert_eq!(p.attr.kind, FrozenKind::Fifo);
        assert!(matches!(p.content, Content::Special));
        assert_eq!(v.lookup(top.attr.ino, b"c").unwrap().attr.rdev, 0x0103);
        let l = v.lookup(top.attr.ino, b"l").unwrap();
        assert!(matches!(&l.content, Content::Symlink(t) if t == b"a/f"));
        let e = v.lookup(top.attr.ino, b"empty").unwrap();
        assert_eq!(names(&v, e.attr.ino), Vec::<String>::new());
        assert_eq!(names(&v, top.attr.ino), ["a", "b", "empty", "p", "c", "l"]);
        assert_eq!(v.get(a).unwrap().parent, top.attr.ino);
    }

    #[test]
    fn numbers_are_stable_across_rebuilds_and_parents_synthesized() {
        let mut num = Numbering::default();
        let mut b = Builder::new(1, 4096, &mut num);
        b.add_pair(1, &[obj(5, "x/y/f", FrozenKind::File)]);
        let v1 = b.finish();
        let x = v1.lookup(VIEW_ROOT, b"x").unwrap();
        assert_eq!((x.attr.perm, x.attr.uid), (0o555, 0), "synthesized");
        let y = v1.lookup(x.attr.ino, b"y").unwrap().attr.ino;
        let f = v1.lookup(y, b"f").unwrap().attr.ino;
        let mut b = Builder::new(2, 4096, &mut num);
        b.add_pair(2, &[obj(9, "other", FrozenKind::File)]);
        b.add_pair(1, &[obj(5, "x/y/f", FrozenKind::File)]);
        let v2 = b.finish();
        let x2 = v2.lookup(VIEW_ROOT, b"x").unwrap().attr.ino;
        let y2 = v2.lookup(x2, b"y").unwrap().attr.ino;
        assert_eq!(v2.lookup(y2, b"f").unwrap().attr.ino, f);
        assert_eq!(v2.len(), 5, "root, x, y, f, other");
    }

    #[test]
    fn root_pair_gives_the_root_its_attributes_and_clashes_are_skipped() {
        let mut num = Numbering::default();
        let mut b = Builder::new(1, 4096, &mut num);
        let mut root = obj(1, "", FrozenKind::Dir);
        root.attr.perm = 0o711;
        b.add_pair(1, &[root, obj(2, "f", FrozenKind::File)]);
        // A later pair's object under a file's name is skipped, not a panic.
        b.add_pair(2, &[obj(3, "f/g", FrozenKind::File)]);
        b.add_pair(3, &[obj(4, "f", FrozenKind::Dir)]);
        let v = b.finish();
        let r = v.get(VIEW_ROOT).unwrap();
        assert_eq!((r.attr.perm, r.attr.ctime), (0o711, 3));
        assert_eq!(names(&v, VIEW_ROOT), ["f"]);
        assert_eq!(
            v.lookup(VIEW_ROOT, b"f").unwrap().attr.kind,
            FrozenKind::File
        );
    }

    /// A file pair whose path the view has (a file split off a frozen group) goes to
    /// `.pairfs/ID/PATH`; one inside a group whose path is free is at PATH and there
    /// too; a file pair outside any group only at PATH.
    #[test]
    fn a_file_pair_clashing_with_a_group_goes_aside() {
        let mut num = Numbering::default();
        let mut b = Builder::new(1, 4096, &mut num);
        b.add_pair(
            1,
            &[
                obj(2, "d", FrozenKind::Dir),
                obj(3, "d/f", FrozenKind::File),
            ],
        );
        b.add_file_pair(7, &[obj(3, "d/f", FrozenKind::File)], true);
        b.add_file_pair(8, &[obj(4, "d/g", FrozenKind::File)], true);
        b.add_file_pair(9, &[obj(5, "h", FrozenKind::File)], false);
        let v = b.finish();
        assert_eq!(names(&v, VIEW_ROOT), ["d", ASIDE_DIR, "h"]);
        assert_eq!(v.lookup(VIEW_ROOT, b"h").unwrap().attr.nlink, 1);
        let d = v.lookup(VIEW_ROOT, b"d").unwrap().attr.ino;
        assert_eq!(names(&v, d), ["f", "g"]);
        let f = v.lookup(d, b"f").unwrap();
        assert!(matches!(f.content, Content::File { pair: 1, .. }));
        let g = v.lookup(d, b"g").unwrap();
        assert!(matches!(g.content, Content::File { pair: 8, .. }));
        assert_eq!(g.attr.nlink, 2, "also at .pairfs/8/d/g");
        let aside = v.lookup(VIEW_ROOT, ASIDE_DIR.as_bytes()).unwrap().attr.ino;
        assert_eq!(names(&v, aside), ["7", "8"]);
        let eight = v.lookup(aside, b"8").unwrap().attr.ino;
        let d8 = v.lookup(eight, b"d").unwrap().attr.ino;
        assert_eq!(v.lookup(d8, b"g").unwrap().attr.ino, g.attr.ino);
        let seven = v.lookup(aside, b"7").unwrap().attr.ino;
        let d7 = v.lookup(seven, b"d").unwrap().attr.ino;
        let f7 = v.lookup(d7, b"f").unwrap();
        assert!(matches!(
            f7.content,
            Content::File {
                pair: 7,
                ino: 3,
                idx: 0
            }
        ));
        assert_ne!(f7.attr.ino, f.attr.ino);
    }

    /// The kept lists: one walk per (id, instant); a new instant walks that id again,
    /// the others are handed out as kept (the same list); a failed walk keeps nothing;
    /// an id a rebuild did not ask for is dropped.
    #[test]
    fn part_cache_walks_only_a_changed_instant() {
        let mut c = PartCache::default();
        let walked = std::cell::RefCell::new(Vec::new());
        let get = |c: &mut PartCache, id: PairId, instant: u64| {
            c.get_or_walk(id, instant, || {
                walked.borrow_mut().push((id, instant));
                Ok(vec![obj(
                    id,
                    &format!("p{id}/i{instant}"),
                    FrozenKind::File,
                )])
            })
            .unwrap()
        };
        let a1 = get(&mut c, 1, 10);
        let b1 = get(&mut c, 2, 20);
        c.end_rebuild();
        assert_eq!(c.walks(), 2);
        // Pair 2's instant changed: only it is walked; pair 1's list is the same one.
        let a2 = get(&mut c, 1, 10);
        let b2 = get(&mut c, 2, 21);
        c.end_rebuild();
        assert!(std::sync::Arc::ptr_eq(&a1, &a2));
        assert!(!std::sync::Arc::ptr_eq(&b1, &b2));
        assert_eq!(b2[0].path, "p2/i21");
        assert_eq!(*walked.borrow(), [(1, 10), (2, 20), (2, 21)]);
        // A failed walk is not kept: the next rebuild walks again.
        let e = c.get_or_walk(3, 30, || Err(crate::error::Error::Stale));
        assert!(e.is_err());
        assert_eq!(c.len(), 2);
        // Pair 1 released (not asked for): dropped at the end of the rebuild.
        get(&mut c, 2, 21);
        get(&mut c, 3, 30);
        c.end_rebuild();
        assert_eq!(c.len(), 2);
        get(&mut c, 1, 10);
        assert_eq!(c.walks(), 6, "pair 1 walked again after it was dropped");
        c.clear();
        assert!(c.is_empty());
    }

    /// A tree as (ino -> names) and a lazy pair's frozen map (ino -> path or absent).
    fn paths_of(
        ino: u64,
        names: &[(u64, &[(u64, &str)])],
        frozen: &[(u64, Option<&str>)],
    ) -> Vec<String> {
        let names: HashMap<u64, Vec<(u64, Vec<u8>)>> = names
            .iter()
            .map(|(i, ns)| {
                (
                    *i,
                    ns.iter()
                        .map(|(p, n)| (*p, n.as_bytes().to_vec()))
                        .collect(),
                )
            })
            .collect();
        let frozen: HashMap<u64, Option<String>> = frozen
            .iter()
            .map(|(i, p)| (*i, p.map(str::to_string)))
            .collect();
        instant_paths(
            ino,
            |i| Ok(names.get(&i).cloned().unwrap_or_default()),
            |i| frozen.get(&i).cloned(),
            64,
        )
        .unwrap()
    }

    #[test]
    fn instant_paths_walk_up_to_a_frozen_directory() {
        // Root 1; pair top 2 at "top" (frozen at the split); 3 = top/a (unchanged),
        // 4 = top/a/f with a second name in 5 = top/b (frozen: renamed to "top/old_b"
        // at the instant it was "top/b"), 6 = a directory moved in (absent), 7 in it,
        // 8 outside the scope.
        let tree: &[(u64, &[(u64, &str)])] = &[
            (2, &[(1, "top")]),
            (3, &[(2, "a")]),
            (4, &[(3, "f"), (5, "g")]),
            (5, &[(2, "renamed_b")]),
            (6, &[(3, "in")]),
            (7, &[(6, "x")]),
            (8, &[(1, "out")]),
            (9, &[(8, "o"), (3, "o2")]),
        ];
        let frozen: &[(u64, Option<&str>)] = &[(2, Some("top")), (5, Some("top/b")), (6, None)];
        assert_eq!(paths_of(3, tree, frozen), ["top/a"]);
        assert_eq!(paths_of(4, tree, frozen), ["top/a/f", "top/b/g"]);
        assert!(paths_of(7, tree, frozen).is_empty(), "under an absent dir");
        assert!(paths_of(8, tree, frozen).is_empty(), "above the top");
        assert_eq!(
            paths_of(9, tree, frozen),
            ["top/a/o2"],
            "only the name inside the scope"
        );
        // A root pair: the root is the frozen top at "".
        assert_eq!(paths_of(8, tree, &[(1, Some(""))]), ["out"]);
        assert_eq!(
            paths_of(4, tree, &[(1, Some(""))]),
            ["top/a/f", "top/renamed_b/g"]
        );
    }

    #[test]
    fn lazy_objects_merge_records_with_the_unchanged_live_tree() {
        // Live tree: top(2) holds a(3, dir), f(4, file, also named a/f2), n(9, new:
        // not listed by `children`, which leaves out frozen and new inodes); a holds
        // f2 (4) and g (5). Records: top, and 6 = "top/gone" (removed since), and an
        // absent marker for 7. A record for 5 appears during the walk (frozen after
        // `a` was listed: the walk already found it, the record replaces it).
        let mut top = obj(2, "top", FrozenKind::Dir);
        top.attr.perm = 0o700;
        let records = std::cell::RefCell::new(vec![
            top,
            obj(6, "top/gone", FrozenKind::File),
            Frozen::absent(7),
        ]);
        let children = |dir: u64, after: Option<Cursor>| -> crate::error::Result<Children> {
            let cursor = |cookie| Cursor {
                cookie,
                hold: std::sync::Arc::new(()),
            };
            Ok(match (dir, after.map(|c| c.cookie)) {
                // Two batches.
                (2, None) => Some((
                    vec![(b"a".to_vec(), obj(3, "", FrozenKind::Dir))],
                    Some(cursor(5)),
                )),
                (2, Some(5)) => Some((vec![(b"f".to_vec(), obj(4, "", FrozenKind::File))], None)),
                (3, None) => {
                    let mut g = obj(5, "top/a/g", FrozenKind::File);
                    g.attr.size = 99;
                    records.borrow_mut().push(g);
                    Some((
                        vec![
                            (b"f2".to_vec(), obj(4, "", FrozenKind::File)),
                            (b"g".to_vec(), obj(5, "", FrozenKind::File)),
                        ],
                        None,
                    ))
                }
                _ => None,
            })
        };
        let got = lazy_objects(
            |from| Ok(records.borrow().get(from..).unwrap_or_default().to_vec()),
            children,
        )
        .unwrap();
        let by: HashMap<u64, &Frozen> = got.iter().map(|f| (f.ino, f)).collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(by[&2].attr.perm, 0o700);
        assert_eq!(by[&3].path, "top/a");
        assert_eq!(by[&4].path, "top/f");
        assert_eq!(by[&4].links, ["top/a/f2"]);
        assert_eq!(
            by[&5].attr.size, 99,
            "the record replaced the walk's object"
        );
        assert_eq!(by[&6].path, "top/gone");
        assert!(!by.contains_key(&7), "absent markers are left out");
        // Built into a view: one inode under both names.
        let mut num = Numbering::default();
        let mut b = Builder::new(1, 4096, &mut num);
        b.add_pair(1, &got);
        let v = b.finish();
        let t = v.lookup(VIEW_ROOT, b"top").unwrap().attr.ino;
        let a = v.lookup(t, b"a").unwrap().attr.ino;
        assert_eq!(
            v.lookup(t, b"f").unwrap().attr.ino,
            v.lookup(a, b"f2").unwrap().attr.ino
        );
        assert_eq!(v.lookup(t, b"f").unwrap().attr.nlink, 2);
    }
}
