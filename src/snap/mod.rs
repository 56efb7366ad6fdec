//! Pairs and frozen copies: the pure pair state machine ([`pair`]) and the engine that
//! drives it ([`engine`]: background copier, copy-on-write, split/update/resync/release),
//! the frozen view the copy mount serves ([`view`]) the changed-range export
//! ([`diff`]) and the copy image's checksums ([`sums`]). The engine reaches the namespace
//! only through the narrow [`namespace::Namespace`] trait, which the core implements.

pub mod diff;
pub mod engine;
pub mod namespace;
pub mod pair;
pub mod stage;
pub mod sums;
pub mod view;
