//! Writable clones (`pairfs clone`, seed 003): creating a clone file or tree from a
//! frozen copy, filling a clone's tracks from its backing before they are first written
//! (write redirection), detaching, and the status lines. The pure parts (backing
//! reference, which tracks are backed, the dependency bookkeeping) are in
//! [`crate::core::clone`]; `docs/design.md` ("Writable clones") has the order of writes.

use std::collections::HashMap;
use std::sync::MutexGuard;

use super::{Fs, NamespaceState, now_ns};
use crate::core::clone::{CloneRef, Dependents, backed_holes};
use crate::core::inode::Inode;
use crate::error::{Error, Result};
use crate::meta::InodeRow;
use crate::snap::engine::Op;
use crate::snap::pair::{FrozenKind, PairId};
use crate::snap::view::{Content, FrozenView, VIEW_ROOT};
use crate::store::volume::Volume;

/// File tracks filled per hold of the namespace lock (16 MiB with 64 KiB tracks).
const FILL_BATCH: u64 = 256;

/// What `pairfs clone` made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneMade {
    /// Inode of the clone (the top of a tree).
    pub ino: u64,
    /// Objects created (files, directories, symlinks, special files).
    pub objects: u64,
    /// Regular files among them (each a clone).
    pub files: u64,
    /// The pair whose frozen copy backs them.
    pub pair: PairId,
}

fn mode_of(k: FrozenKind) -> u32 {
    match k {
        FrozenKind::File => libc::S_IFREG,
        FrozenKind::Dir => libc::S_IFDIR,
        FrozenKind::Symlink => libc::S_IFLNK,
        FrozenKind::Fifo => libc::S_IFIFO,
        FrozenKind::Socket => libc::S_IFSOCK,
        FrozenKind::CharDev => libc::S_IFCHR,
        FrozenKind::BlockDev => libc::S_IFBLK,
    }
}

impl Fs {
    /// The clone dependency table (a leaf lock).
    pub(super) fn dependents(&self) -> MutexGuard<'_, Dependents> {
        self.clones.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The path (and inode) of a clone reading from pair `id`'s frozen copy, if any.
    pub(super) fn clone_of_pair(&self, id: PairId) -> Result<Option<String>> {
        let first = self.dependents().of_pair(id);
        let Some(&ino) = first.first() else {
            return Ok(None);
        };
        let more = first.len() - 1;
        let mut st = self.state();
        let path = self.path_of(&mut st, ino)?;
        Ok(Some(if more > 0 {
            format!("/{path} (and {more} more)")
        } else {
            format!("/{path}")
        }))
    }

    /// True if a write to file tracks `[f0, f0+n)` of `ino` must fill backed tracks of a
    /// clone first.
    pub(super) fn clone_needs_fill(&self, ino: u64, f0: u64, n: u64) -> Result<bool> {
        // Every linked clone is in the dependency table: without any, no write asks the
        // namespace lock a second time.
        if self.dependents().is_empty() {
            return Ok(false);
        }
        let st = self.state_with(ino)?;
        let i = st.get(ino)?;
        Ok(match i.row.clone {
            Some(c) => !backed_holes(&i.extents, c.limit, self.track_size, f0, n).is_empty(),
            None => false,
        })
    }

    /// Redirects the backed holes of file tracks `[f0, f0+n)` of clone `ino` to new
    /// tracks: allocates them, writes each one whole (the frozen bytes below the limit,
    /// zeros above it, `overlay` = a write's (offset, bytes) laid over them), and only
    /// then maps them, so the map row that points at a track is never committed before
    /// the track's data write (design.md "Writable clones"). The caller holds the
    /// barrier shared and the inode's data lock exclusively. A no-op for other files.
    pub(super) fn fill_clone(
        &self,
        ino: u64,
        f0: u64,
        n: u64,
        overlay: Option<(u64, &[u8])>,
    ) -> Result<()> {
        if self.dependents().is_empty() {
            return Ok(());
        }
        let ts = self.track_size;
        let mut f = f0;
        let end = f0.saturating_add(n);
        while f < end {
            let k = (end - f).min(FILL_BATCH);
            self.fill_batch(ino, f, k, overlay, ts)?;
            f += k;
        }
        Ok(())
    }

    fn fill_batch(
        &self,
        ino: u64,
        f0: u64,
        n: u64,
        overlay: Option<(u64, &[u8])>,
        ts: u64,
    ) -> Result<()> {
        // 1. Which tracks, and new tracks for them (not mapped yet).
        let (c, holes, vt) = {
            let mut st = self.state_with(ino)?;
            let i = st.get(ino)?;
            let Some(c) = i.row.clone else {
                return Ok(());
            };
            let holes = backed_holes(&i.extents, c.limit, ts, f0, n);
            if holes.is_empty() {
                return Ok(());
            }
            if st.alloc.free_tracks() < holes.len() as u64 {
                return Err(Error::NoSpace("volume"));
            }
            let goal = i.extents.goal_for(holes[0]);
            let runs = st.alloc.allocate(goal, holes.len() as u64)?;
            let vt: Vec<u64> = runs.iter().flat_map(|&(v, l)| v..v + l).collect();
            self.engine.drop_staged(vt.iter().copied());
            (c, holes, vt)
        };
        // 2. The data, written whole to the new tracks, holding no namespace lock.
        let r = self.write_fill(&c, &holes, &vt, overlay, ts);
        let mut st = self.state();
        if let Err(e) = r {
            for &v in &vt {
                st.alloc.free(v, 1);
            }
            return Err(e);
        }
        // 3. Map them (the commit that writes the map syncs the volume first).
        let pid = match st.inodes.get_mut(&ino) {
            Some(i) => {
                for (&f, &v) in holes.iter().zip(&vt) {
                    i.extents.insert(f, v, 1);
                }
                i.pair
            }
            None => {
                for &v in &vt {
                    st.alloc.free(v, 1);
                }
                return Err(Error::NotFound(format!("inode {ino}")));
            }
        };
        st.touch(ino);
        drop(st);
        self.layout_changed(ino);
        if let Some(pid) = pid {
            self.engine.written(pid, &vt);
        }
        Ok(())
    }

    /// Writes the frozen bytes of file tracks `holes` (with `overlay` laid over them) to
    /// volume tracks `vt`, one contiguous run of file tracks per frozen read.
    fn write_fill(
        &self,
        c: &CloneRef,
        holes: &[u64],
        vt: &[u64],
        overlay: Option<(u64, &[u8])>,
        ts: u64,
    ) -> Result<()> {
        let mut k = 0;
        while k < holes.len() {
            let mut j = k + 1;
            while j < holes.len() && holes[j] == holes[j - 1] + 1 {
                j += 1;
            }
            let a = holes[k] * ts;
            let b = (holes[j - 1] + 1) * ts;
            let mut buf = vec![0u8; (b - a) as usize];
            let lim = b.min(c.limit);
            if a < lim {
                let d = self
                    .engine
                    .read_frozen_ino(self, c.pair, c.src, a, (lim - a) as u32)?;
                let m = d.len().min(buf.len());
                buf[..m].copy_from_slice(&d[..m]);
            }
            if let Some((off, data)) = overlay {
                let x = off.max(a);
                let y = (off + data.len() as u64).min(b);
                if x < y {
                    buf[(x - a) as usize..(y - a) as usize]
                        .copy_from_slice(&data[(x - off) as usize..(y - off) as usize]);
                }
            }
            // Write runs of consecutive volume tracks in one call.
            let mut p = k;
            while p < j {
                let mut q = p + 1;
                while q < j && vt[q] == vt[q - 1] + 1 {
                    q += 1;
                }
                let from = ((p - k) as u64 * ts) as usize;
                let to = ((q - k) as u64 * ts) as usize;
                self.vol.write_at(vt[p] * ts, &buf[from..to])?;
                p = q;
            }
            k = j;
        }
        Ok(())
    }

    /// `pairfs clone SRC DST`: makes `name` in directory `parent` a writable clone of
    /// SRC's frozen copy (a file, or a tree whose regular files are clones). SRC without
    /// a frozen copy is split first. Durable when it returns.
    pub fn make_clone(&self, src: u64, parent: u64, name: &[u8]) -> Result<CloneMade> {
        self.check_writable()?;
        Self::check_name(name)?;
        // 1. A frozen copy of SRC: split first if there is none.
        let pair = {
            let st = self.state_with(src)?;
            let i = st.get(src)?;
            if !i.is_file() && !i.is_dir() {
                return Err(Error::invalid(
                    "clone: SRC must be a regular file or a directory",
                ));
            }
            i.pair
        };
        let pid = match pair {
            Some(id) if self.engine.is_frozen(id) => id,
            Some(id) => {
                self.control_id(id, Op::Split)?;
                id
            }
            None => {
                self.control(src, Op::Split)?;
                self.state_with(src)?
                    .get(src)?
                    .pair
                    .ok_or_else(|| Error::invalid("clone: SRC could not be split"))?
            }
        };
        // 2a. A file: its frozen object directly (the pair's record, or for a lazy
        // instant the unchanged live inode), no view: flat in the size of the pair.
        let is_file = self.state_with(src)?.get(src)?.is_file();
        if is_file {
            let b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
            if !self.engine.is_frozen(pid) {
                return Err(Error::Busy(format!(
                    "clone: pair {pid} lost its frozen copy meanwhile"
                )));
            }
            let made = self.clone_file_under_barrier(pid, src, parent, name)?;
            drop(b);
            self.commit(Vec::new())?;
            return Ok(made);
        }
        // 2. The frozen view (built with no lock held), then the barrier: no split,
        // update, resync or release until the clone is registered. A view that changed
        // meanwhile is built again.
        for _ in 0..8 {
            let view = self.engine.view(self, self.track_size);
            let b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
            if !self.engine.view_is_current(&view) {
                drop(b);
                continue;
            }
            if !self.engine.is_frozen(pid) {
                return Err(Error::Busy(format!(
                    "clone: pair {pid} lost its frozen copy meanwhile"
                )));
            }
            let made = self.clone_under_barrier(&view, pid, src, parent, name)?;
            drop(b);
            // The clone (rows and map) is durable before we return.
            self.commit(Vec::new())?;
            return Ok(made);
        }
        Err(Error::Busy(
            "clone: the frozen copies keep changing; try again".into(),
        ))
    }

    /// The split-time path of `ino` in pair `pid`'s frozen copy.
    fn instant_path(&self, st: &mut NamespaceState, pid: PairId, ino: u64) -> Result<String> {
        let absent = || Error::NotFound("clone: SRC is not in its pair's frozen copy".into());
        match self.engine.frozen_path(pid, ino) {
            Some(Some(p)) => Ok(p),
            Some(None) => Err(absent()),
            None => self
                .instant_names(st, pid, ino)?
                .into_iter()
                .next()
                .ok_or_else(absent),
        }
    }

    /// A clone of regular file `src` as pair `pid` froze it. The caller holds the
    /// barrier shared.
    fn clone_file_under_barrier(
        &self,
        pid: PairId,
        src: u64,
        parent: u64,
        name: &[u8],
    ) -> Result<CloneMade> {
        let mut st = self.state_with(src)?;
        let absent = || Error::NotFound("clone: SRC is not in its pair's frozen copy".into());
        let f = match self.engine.frozen_record(pid, src) {
            Some(f) if f.absent => return Err(absent()),
            Some(f) => f,
            // Not frozen yet in a lazy instant that holds it: unchanged since.
            None if st.get(src)?.pair == Some(pid) && self.engine.holds(pid, src) => {
                super::object_of(st.get(src)?, src, String::new(), Vec::new()).ok_or_else(absent)?
            }
            None => return Err(absent()),
        };
        if f.attr.kind != FrozenKind::File {
            return Err(Error::invalid(
                "clone: SRC is not a regular file in the frozen copy",
            ));
        }
        self.check_clone_parent(&mut st, parent, name)?;
        let now = now_ns();
        let ino = st.next_ino;
        st.next_ino += 1;
        let a = f.attr;
        let clone = CloneRef {
            pair: pid,
            src,
            limit: a.size,
        };
        let row = InodeRow {
            ino,
            kind: libc::S_IFREG,
            perm: a.perm,
            uid: a.uid,
            gid: a.gid,
            nlink: 0,
            size: a.size,
            atime: a.atime,
            mtime: a.mtime,
            ctime: now,
            rdev: 0,
            target: None,
            clone: Some(clone),
        };
        let mut inode = Inode::new(row);
        inode.xattrs.extend(
            f.xattrs
                .into_iter()
                .filter(|(k, _)| super::stored_xattr(k) && !k.starts_with(b"user.pairfs.")),
        );
        st.inodes.insert(ino, inode);
        st.inode_count += 1;
        st.touch(ino);
        self.link_clone(&mut st, ino, parent, name, now)?;
        self.layout_changed(ino);
        self.dependents().add(pid, ino);
        Ok(CloneMade {
            ino,
            objects: 1,
            files: 1,
            pair: pid,
        })
    }

    /// DST's directory: a directory outside every directory or volume pair, with no
    /// `name` in it yet.
    fn check_clone_parent(&self, st: &mut NamespaceState, parent: u64, name: &[u8]) -> Result<()> {
        self.want(st, parent)?;
        let p = st.get(parent)?;
        let d = p.dir.as_ref().ok_or(Error::NotDir)?;
        if d.get(name).is_some() {
            return Err(Error::Exists(String::from_utf8_lossy(name).into_owned()));
        }
        if p.row.nlink == 0 {
            return Err(Error::NotFound("directory was removed".into()));
        }
        if let Some(q) = p.pair.filter(|&q| self.engine.inherits(q)) {
            return Err(Error::Busy(format!(
                "clone: DST would be inside the scope of pair {q}; a clone lives outside \
                 directory and volume pairs"
            )));
        }
        self.freeze_before(st, parent)
    }

    fn clone_under_barrier(
        &self,
        view: &FrozenView,
        pid: PairId,
        src: u64,
        parent: u64,
        name: &[u8],
    ) -> Result<CloneMade> {
        let mut st = self.state_with(src)?;
        let path = self.instant_path(&mut st, pid, src)?;
        // The frozen object at that path.
        let mut top = VIEW_ROOT;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            top = view
                .lookup(top, part.as_bytes())
                .map(|n| n.attr.ino)
                .ok_or_else(|| {
                    Error::NotFound(format!("clone: /{path} is not in the frozen view"))
                })?;
        }
        let node = view
            .get(top)
            .ok_or_else(|| Error::NotFound(format!("clone: /{path}")))?;
        if !matches!(node.content, Content::Dir(_) | Content::File { .. }) {
            return Err(Error::invalid(
                "clone: SRC must be a regular file or a directory",
            ));
        }
        // DST: a new name in a directory outside every directory or volume pair.
        self.check_clone_parent(&mut st, parent, name)?;
        // Breadth first over the frozen tree; a hard-linked file is one clone under
        // each of its names.
        let now = now_ns();
        let mut made: HashMap<u64, u64> = HashMap::new();
        let mut queue = std::collections::VecDeque::from([(top, parent, name.to_vec())]);
        let mut out = CloneMade {
            ino: 0,
            objects: 0,
            files: 0,
            pair: pid,
        };
        let mut deps = Vec::new();
        while let Some((vino, dir, nm)) = queue.pop_front() {
            let Some(n) = view.get(vino) else { continue };
            if let Some(&ino) = made.get(&vino) {
                self.link_clone(&mut st, ino, dir, &nm, now)?;
                continue;
            }
            let a = n.attr;
            let kind = mode_of(a.kind);
            let (target, clone) = match &n.content {
                Content::File { pair, ino, .. } => (
                    None,
                    Some(CloneRef {
                        pair: *pair,
                        src: *ino,
                        limit: a.size,
                    }),
                ),
                Content::Symlink(t) => (Some(t.clone()), None),
                _ => (None, None),
            };
            let ino = st.next_ino;
            st.next_ino += 1;
            let row = InodeRow {
                ino,
                kind,
                perm: a.perm,
                uid: a.uid,
                gid: a.gid,
                nlink: if kind == libc::S_IFDIR { 2 } else { 0 },
                size: if kind == libc::S_IFREG || kind == libc::S_IFLNK {
                    a.size
                } else {
                    0
                },
                atime: a.atime,
                mtime: a.mtime,
                ctime: now,
                rdev: a.rdev,
                target,
                clone,
            };
            let mut inode = Inode::new(row);
            inode.xattrs.extend(
                n.xattrs
                    .iter()
                    .filter(|(k, _)| super::stored_xattr(k) && !k.starts_with(b"user.pairfs."))
                    .cloned(),
            );
            st.inodes.insert(ino, inode);
            st.inode_count += 1;
            st.touch(ino);
            self.link_clone(&mut st, ino, dir, &nm, now)?;
            made.insert(vino, ino);
            if out.ino == 0 {
                out.ino = ino;
            }
            out.objects += 1;
            if let Some(c) = clone {
                out.files += 1;
                deps.push((c.pair, ino));
                self.layout_changed(ino);
            }
            if let Content::Dir(d) = &n.content {
                for (child, cino) in d.entries() {
                    queue.push_back((*cino, ino, child.clone()));
                }
            }
        }
        let mut dep = self.dependents();
        for (p, ino) in deps {
            dep.add(p, ino);
        }
        drop(dep);
        self.shrink(&mut st);
        log::info!(
            "clone: /{} -> {} objects ({} files) backed by pair {pid}",
            path,
            out.objects,
            out.files
        );
        Ok(out)
    }

    /// Names `ino` (a clone object just made) `name` in directory `dir`.
    fn link_clone(
        &self,
        st: &mut NamespaceState,
        ino: u64,
        dir: u64,
        name: &[u8],
        now: i64,
    ) -> Result<()> {
        let is_dir = st.get(ino)?.is_dir();
        let p = st.get_mut(dir)?;
        p.dir
            .as_mut()
            .ok_or(Error::NotDir)?
            .insert(name.to_vec(), ino);
        if is_dir {
            p.row.nlink += 1;
        }
        p.row.mtime = now;
        p.row.ctime = now;
        st.entries += 1;
        st.touch(dir);
        let i = st.get_mut(ino)?;
        i.links.push((dir, name.to_vec()));
        if !is_dir {
            i.row.nlink += 1;
        }
        st.touch(ino);
        st.set_dirent(dir, name, Some(ino));
        Ok(())
    }

    /// `pairfs clone --detach PATH`: copies the tracks every clone at or beneath `ino`
    /// still reads from its backing into its own tracks and drops the backing
    /// reference, so the source pair can be updated, resynced or released. Durable when
    /// it returns. Returns the number of clones detached.
    pub fn detach(&self, ino: u64) -> Result<u64> {
        self.check_writable()?;
        let targets: Vec<u64> = {
            let mut st = self.state_with(ino)?;
            if st.get(ino)?.is_dir() {
                let mut v = Vec::new();
                self.walk(&mut st, ino, false, |i, n| {
                    if n.row.clone.is_some() {
                        v.push(i);
                    }
                })?;
                v
            } else if st.get(ino)?.row.clone.is_some() {
                vec![ino]
            } else {
                Vec::new()
            }
        };
        let mut done = Vec::new();
        for &t in &targets {
            if self.detach_file(t)? {
                done.push(t);
            }
        }
        // Rows (the map and the cleared reference, one transaction) durable, then the
        // dependencies go.
        self.commit(Vec::new())?;
        let mut dep = self.dependents();
        for &t in &done {
            dep.remove(t);
        }
        Ok(done.len() as u64)
    }

    fn detach_file(&self, ino: u64) -> Result<bool> {
        let _b = self.barrier.read().unwrap_or_else(|p| p.into_inner());
        let dl = self.data_lock(ino)?;
        let _d = dl.write().unwrap_or_else(|p| p.into_inner());
        let c = {
            let st = self.state_with(ino)?;
            st.get(ino)?.row.clone
        };
        let Some(c) = c else { return Ok(false) };
        self.fill_clone(ino, 0, c.backed_tracks(self.track_size), None)?;
        let mut st = self.state_with(ino)?;
        st.get_mut(ino)?.row.clone = None;
        st.touch(ino);
        Ok(true)
    }

    /// Before `ino` becomes the top of a new pair: detaches the clones of its scope (a
    /// frozen copy holds only a file's own tracks). A no-op when it is paired already.
    pub(super) fn detach_new_scope(&self, ino: u64) -> Result<()> {
        if self.dependents().is_empty() {
            return Ok(());
        }
        let unpaired = {
            let st = self.state_with(ino)?;
            st.get(ino)?.pair.is_none()
        };
        if unpaired {
            let n = self.detach(ino)?;
            if n > 0 {
                log::info!("inode {ino}: {n} clones detached before pairing");
            }
        }
        Ok(())
    }

    /// `user.pairfs.clones` of the mount root: one line per linked clone (at most
    /// `max`, and about 60,000 bytes), then a `clones total=N` line.
    pub fn clone_lines(&self, max: usize) -> Result<String> {
        let all = self.dependents().all();
        let ts = self.track_size;
        let mut out = String::new();
        for &(ino, pair) in all.iter().take(max) {
            // A getxattr value is at most 64 KiB (paths may be long).
            if out.len() > 60_000 {
                break;
            }
            let mut st = self.state();
            if !self.try_want(&mut st, ino)? {
                continue;
            }
            let path = self.path_of(&mut st, ino)?;
            let i = st.get(ino)?;
            let Some(c) = i.row.clone else { continue };
            let backed = c.backed_tracks(ts);
            let unwritten = backed_holes(&i.extents, c.limit, ts, 0, backed).len();
            out.push_str(&format!(
                "clone ino={ino} pair={pair} source_ino={} size={} written_tracks={} \
                 backed_tracks={unwritten} path={:?}\n",
                c.src,
                i.row.size,
                i.extents.tracks(),
                format!("/{path}"),
            ));
            self.shrink(&mut st);
        }
        out.push_str(&format!("clones total={}\n", all.len()));
        Ok(out)
    }
}
