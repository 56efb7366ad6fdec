//! pairfs: a FUSE filesystem that keeps point-in-time copies of single files, directory
//! trees or the whole volume on a second image, at track granularity, with
//! copy-on-write.
//!
//! The layers, outermost first; a layer only uses the ones below it:
//!
//! ```text
//!   cli/    command line, mount helper, status, fsck, man pages
//!   fuse/   main_fs (live tree) and copy_fs (frozen copies): convert and reply, nothing else
//!   core/   fs: the facade (POSIX namespace and data path; owns the barrier, the pipeline
//!           and the engine; implements snap::namespace::Namespace); volfile: image
//!           headers, lock, open
//!   snap/   pair state machine (pure), engine: copier, copy-on-write, frozen view; sees
//!           the namespace only through the Namespace trait (never imports core::fs)
//!   core/   durability (the one sync and commit path), alloc, extent, inode, trackset
//!   meta/   the metadata store (SQLite, batched commits)
//!   repl/   replication to a second node: wire protocol, primary link (an Attach hook,
//!           image wrappers, a DurabilitySink, a metadata CommitTap), the secondary
//!   store/  the Volume trait and its implementations (file, memory, faults, poisoning)
//! ```

#![warn(missing_docs)]

pub mod cli;
pub mod core;
pub mod error;
pub mod fuse;
pub mod meta;
pub mod repl;
pub mod snap;
pub mod store;

pub use error::{Error, Result};
