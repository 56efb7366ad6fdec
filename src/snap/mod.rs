//! Pairs and frozen copies: the pure pair state machine ([`pair`]) and the engine that
//! drives it ([`engine`]: background copier, copy-on-write, split/update/resync/release),
//! the frozen view the copy mount serves ([`view`]) the changed-range export
//! ([`diff`]), the copy image's checksums ([`sums`]) and the rule that keeps a file split
//! on its own inside a group apart from the group's frozen copy ([`group`]), and the named
//! generations of a pair ([`gens`]). The engine reaches the namespace
//! only through the narrow [`namespace::Namespace`] trait, which the core implements.

pub mod diff;
pub mod engine;
pub mod gens;
pub mod group;
pub mod namespace;
pub mod pair;
pub mod stage;
pub mod sums;
pub mod view;
