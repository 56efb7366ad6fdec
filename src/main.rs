//! The `pairfs` binary: parses the command line and runs one subcommand.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = pairfs::cli::Cli::parse();
    match pairfs::run::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pairfs: {e}");
            ExitCode::from(1)
        }
    }
}
