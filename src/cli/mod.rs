//! The command line: argument definitions ([`args`]), subcommands ([`run`]), `status`,
//! `diff`, `scrub`, offline `fsck`, man pages, Prometheus metrics and size parsing.

pub mod args;
pub mod diff;
pub mod fsck;
pub mod manpages;
pub mod metrics;
pub mod run;
pub mod scrub;
pub mod size;
pub mod status;
