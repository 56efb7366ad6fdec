//! The lock order of pairfs, written once. Every other place (module docs of
//! [`crate::core::fs`] and [`crate::snap::engine`], `docs/design.md`) refers here.
//!
//! Outermost first; a thread holding a lock may only take locks further down the list:
//!
//! | # | lock | owner | held for |
//! |---|---|---|---|
//! | 0 | `view_numbering` | [`Engine`](crate::snap::engine::Engine) | one rebuild of the frozen view, taken with nothing held; a lazy pair's rebuild then takes `namespace` (one directory per hold) and pair states in turn |
//! | 0a | `view_parts` ([`PartCache`](crate::snap::view::PartCache)) | [`Engine`](crate::snap::engine::Engine) | the same rebuild, taken right after `view_numbering` and only by it (and by the test accessors `view_walks`/`forget_view_parts`, which take 0 first); the walks of lazy pairs and generations whose instant changed run under it |
//! | 1 | `barrier` (RwLock) | [`Fs`](crate::core::fs::Fs), the facade | host changes share it; split instants take it exclusively ([`Fs::control`](crate::core::fs::Fs::control), which hands the guard to [`Engine::control`](crate::snap::engine::Engine::control)) |
//! | 2 | inode `data_lock` (RwLock) | [`Inode`](crate::core::inode::Inode) | reads and writes share it; truncate/punch/fallocate exclusive |
//! | 2a | `destage_lock` | [`Engine`](crate::snap::engine::Engine) | one destage round of staged copy-on-write writes (takes gates, then commits pair bits) |
//! | 2b | generations' `save_lock` | [`Engine`](crate::snap::engine::Engine) (`snap/engine/gens.rs`) | one save of old tracks for named generations before an overwrite (allocates slots through `namespace`, syncs the copy image, commits) |
//! | 3 | pair `gate` | [`Slot`](crate::snap::engine::Slot) | every copy of the pair's tracks (copy-on-write, copier batch, control op) |
//! | 4 | `commit_lock` | [`Durability`](crate::core::durability::Durability) | one full commit |
//! | 5 | `copy_lock` | [`Durability`](crate::core::durability::Durability) | a copy-image sync and the failing of every pair after it failed; clearing the copy image's poison |
//! | 6 | `namespace` (cached inodes, allocator, handles) | [`Fs`](crate::core::fs::Fs); the engine takes it only through [`Namespace`](crate::snap::namespace::Namespace) calls | in-memory metadata changes; across I/O only to zero a track as it is mapped (`map_range`) or a partial track a truncate keeps (`write_tracks_zero`) |
//! | 7 | `meta` (SQLite connection) | [`Fs`](crate::core::fs::Fs), shared with the pipeline | one transaction |
//! | 7a | the stage table | [`Engine`](crate::snap::engine::Engine) | staged tracks: look-up, patch, insert; a destage writes one track to the volume under it |
//! | 8 | pair state `Slot::p` | [`Slot`](crate::snap::engine::Slot) | bitmap and state changes |
//! | 8a | a generation's state (`GenSlot::g`) | the engine (`snap/engine/gens.rs`) | records, pins, saved map; several are taken together only in id order (`Engine::gen_save`'s plan) |
//!
//! A secondary serving its frozen copies (`replica serve --copy-mount`,
//! [`Follower`](crate::repl::follow::Follower)) has two more, outermost: the follower's
//! `gate` (RwLock: each copy-mount request shares it for its duration; applying a
//! `Commit` record, or closing for a sync, takes it exclusively), then its `cur` (the
//! read-only [`Fs`](crate::core::fs::Fs) of the last committed state; held while a
//! newer one is opened). That `Fs`'s own locks are taken only under them.
//!
//! Leaves (nothing is taken while holding them): `Fs::layout` (shape-change stamps for
//! `fdatasync`), `Fs::clones` (which writable clones depend on which pair), the engine's pair map, a slot's
//! `unconfirmed`, `cow_queue` and `new_sums` lists, the generations' map and slot reference counts, the engine's checksum table (`sums`)
//! and verified-track map (`verified`), the copier's `work` counter,
//! [`Checked`](crate::store::volume::Checked)'s `sync_lock` (held across one fsync), and
//! the image-level locks of [`MigratingVolume`](crate::store::migrate::MigratingVolume)
//! (`images`, read-held across each call on an image; `ranges`; `switching`).
//! [`Migrator`](crate::core::migrate::Migrator)'s state mutex is taken before `meta`
//! (7) and an image's `images`, never under them.
//!
//! Data I/O runs holding only 1 and 2, so reads and writes of different files (and of
//! the same file) run in parallel. A host read takes 2 with `try_read` while it holds 6
//! (one hold finds the inode, its data lock and its extents: `Fs::read_into`); a try
//! never waits, and if it fails the read drops 6, waits for 2, then takes 6 again; syncs hold at most 3–5; `namespace` (6) is held across I/O
//! only by the two zeroing cases above. A frozen-copy read takes no gate: it reads the volume while the pending bit is
//! set and re-checks the bit afterwards (see `snap::engine::Engine::read_frozen_of`).
//!
//! Enforced in the types where a function needs a lock held: it takes the guard, e.g.
//! [`PairHooks::take`](crate::core::durability::PairHooks::take) and
//! `Engine::take_dirty_pairs` take `&MutexGuard<Meta>`, so pair chunks can only be
//! taken under the metadata lock (two commits then write a pair's chunks in order), and
//! `Engine::confirm` takes the pair's gate guard, and `Engine::control` the barrier's write guard. The order itself is checked by review
//! and by the tests that run these paths concurrently (`tests/concurrency.rs`, kill, crash);
//! there is no runtime rank checker.
