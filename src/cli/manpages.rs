//! Man pages generated from the CLI definition (`pairfs gen man DIR`), so they never
//! drift from `--help`. The hand-written concepts page is `man/pairfs-pairs.7`.

use std::path::Path;

use clap::CommandFactory;

use crate::cli::args::Cli;
use crate::error::{Error, Result};

/// Writes `pairfs.8` and `pairfs-<sub>.8` for every subcommand into `dir`, and
/// `pairfs-<sub>-<subsub>.8` for nested ones (`pairfs-replica-serve.8`).
pub fn write_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("man dir", e))?;
    let cmd = Cli::command();
    write_one(dir, "pairfs", cmd.clone())?;
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "gen" {
            continue;
        }
        let name = format!("pairfs-{}", sub.get_name());
        write_one(dir, &name, sub.clone().name(name.clone().leak() as &str))?;
        for subsub in sub.get_subcommands() {
            let name = format!("pairfs-{}-{}", sub.get_name(), subsub.get_name());
            write_one(dir, &name, subsub.clone().name(name.clone().leak() as &str))?;
        }
    }
    Ok(())
}

fn write_one(dir: &Path, name: &str, cmd: clap::Command) -> Result<()> {
    let man = clap_mangen::Man::new(cmd).section("8").date("2026-11-21");
    let mut buf = Vec::new();
    man.render(&mut buf).map_err(|e| Error::io("man page", e))?;
    std::fs::write(dir.join(format!("{name}.8")), buf).map_err(|e| Error::io("man page", e))
}
