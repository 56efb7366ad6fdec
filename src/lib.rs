//! pairfs: a FUSE filesystem that keeps point-in-time copies of single files, directory
//! trees or the whole volume on a second image, at track granularity, with
//! copy-on-write.
//!
//! ```text
//!   kernel ── fuse_main (adapter) ──► fs::Fs (POSIX core) ──► volume::Volume (image)
//!          └─ fuse_copy (adapter) ──► engine::Engine (pairs, copier, COW) ──► copy image
//!                                         │                 pair::Pair (pure state machine)
//!                                         └──► meta::Meta (SQLite, batched commits)
//! ```
//!
//! Pure building blocks: [`alloc`], [`extent`], [`trackset`], [`pair`], [`inode`].

#![warn(missing_docs)]

pub mod alloc;
pub mod cli;
pub mod engine;
pub mod error;
pub mod extent;
pub mod fs;
pub mod fsck;
pub mod fuse_copy;
pub mod fuse_main;
pub mod inode;
pub mod manpages;
pub mod meta;
pub mod pair;
pub mod run;
pub mod size;
pub mod status;
pub mod trackset;
pub mod volfile;
pub mod volume;

pub use error::{Error, Result};
