//! Pairs and frozen copies: the pure pair state machine ([`pair`]) and the engine that
//! drives it ([`engine`]: background copier, copy-on-write, split/update/resync/release),
//! and the frozen view the copy mount serves ([`view`]).

pub mod engine;
pub mod pair;
pub mod stage;
pub mod view;
