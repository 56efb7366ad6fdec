//! Pairs and frozen copies: the pure pair state machine ([`pair`]) and the engine that
//! drives it ([`engine`]: background copier, copy-on-write, split/update/resync/release),
//! and the frozen view the copy mount serves ([`view`]). The engine reaches the namespace
//! only through the narrow [`namespace::Namespace`] trait, which the core implements.

pub mod engine;
pub mod namespace;
pub mod pair;
pub mod stage;
pub mod view;
