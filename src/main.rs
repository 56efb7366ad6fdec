//! The `pairfs` binary: parses the command line and runs one subcommand.
//!
//! Also the mount helper: invoked as `mount.fuse.pairfs SOURCE DIR [-o OPTS]` (by
//! `mount -t fuse.pairfs` and `/etc/fstab`), or as `pairfs SOURCE DIR -o OPTS` (by
//! fuse3's `mount.fuse3`), it mounts in the background like any mount helper, with
//! `dev,suid` unless told `nodev`/`nosuid` (as `mount.fuse3` does, since mount(8) does
//! not pass those defaults on).

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Rewrites mount-helper invocations into `pairfs mount SOURCE DIR --daemon ...`; the
/// flag tells whether it was one. `root`: run by root (adds `dev,suid`, see below).
fn helper_args(mut args: Vec<OsString>, root: bool) -> (Vec<OsString>, bool) {
    let argv0 = args
        .first()
        .and_then(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let first = args
        .get(1)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let as_helper = argv0.starts_with("mount.fuse.pairfs")
        || argv0.starts_with("mount.pairfs")
        || (args.len() >= 3 && first.contains('/') && std::path::Path::new(&first).exists());
    if !as_helper {
        return (args, false);
    }
    let mut out: Vec<OsString> = vec!["pairfs".into(), "mount".into()];
    let rest = args.split_off(1);
    let mut it = rest.into_iter();
    let mut positional = Vec::new();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                if let Some(o) = it.next() {
                    out.push("-o".into());
                    out.push(o);
                }
            }
            // mount(8) flags for helpers: fake, sloppy, verbose, no mtab.
            Some("-f" | "-s" | "-v" | "-n") => {}
            _ => positional.push(a),
        }
    }
    // mount(8) does not pass the defaults `dev` and `suid` on to a helper; like fuse3's
    // mount.fuse3, add them back unless `nodev`/`nosuid` was asked for (as root only:
    // fusermount3 forces nosuid,nodev for users anyway). Not on a remount: that keeps
    // the flags it does not name.
    let opts: Vec<String> = out
        .iter()
        .filter_map(|o| o.to_str())
        .flat_map(|o| o.split(','))
        .map(str::to_string)
        .collect();
    let has = |o: &str| opts.iter().any(|x| x == o);
    if !has("remount") && root {
        for (flag, no) in [("dev", "nodev"), ("suid", "nosuid")] {
            if !has(no) && !has(flag) {
                out.push("-o".into());
                out.push(flag.into());
            }
        }
    }
    out.extend(positional);
    out.push("--daemon".into());
    (out, true)
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (args, as_helper) = helper_args(std::env::args_os().collect(), root);
    // A mount helper is silent on success: only warnings and errors reach stderr (set
    // RUST_LOG, or PAIRFS_LOG_FILE for the daemon's log, to see more).
    let default = if as_helper {
        "warn,fuser=error"
    } else {
        "info,fuser=error"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        // fuser warns "Unmount failed: Invalid argument" when the session ends after
        // umount(8) already unmounted it: not a failure.
        .filter_module("fuser::mnt", log::LevelFilter::Error)
        .format_timestamp_millis()
        .init();
    let cli = pairfs::cli::args::Cli::parse_from(args);
    match pairfs::cli::run::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("pairfs: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::helper_args;
    use std::ffi::OsString;

    fn run(args: &[&str], root: bool) -> (Vec<String>, bool) {
        let (out, helper) = helper_args(args.iter().map(OsString::from).collect(), root);
        (
            out.into_iter().map(|a| a.into_string().unwrap()).collect(),
            helper,
        )
    }

    #[test]
    fn helper_invocations_become_daemon_mounts_with_fuse3_defaults() {
        let (a, h) = run(
            &["/sbin/mount.fuse.pairfs", "/v.img", "/mnt", "-o", "rw"],
            true,
        );
        assert!(h);
        assert_eq!(
            a,
            [
                "pairfs", "mount", "-o", "rw", "-o", "dev", "-o", "suid", "/v.img", "/mnt",
                "--daemon"
            ]
        );
        // nodev/nosuid asked for, a user, or a remount: nothing added.
        let (a, _) = run(
            &["mount.fuse.pairfs", "/v.img", "/mnt", "-o", "nodev"],
            true,
        );
        assert!(a.contains(&"suid".to_string()) && !a.contains(&"dev".to_string()));
        let (a, _) = run(&["mount.fuse.pairfs", "/v.img", "/mnt", "-o", "rw"], false);
        assert!(!a.contains(&"dev".to_string()) && !a.contains(&"suid".to_string()));
        let (a, _) = run(
            &["mount.fuse.pairfs", "/v.img", "/mnt", "-o", "remount,ro"],
            true,
        );
        assert!(!a.contains(&"dev".to_string()));
        // The CLI itself is left alone.
        let (a, h) = run(&["pairfs", "status"], true);
        assert!(!h);
        assert_eq!(a, ["pairfs", "status"]);
    }
}
