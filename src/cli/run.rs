//! Subcommand implementations behind the CLI: mkfs, mount (with daemon mode, signals
//! and clean shutdown), mount-copy, umount, the xattr-based control commands, status,
//! fsck and the generators.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, SessionACL};

use crate::cli::args::{Cli, Cmd, Gen, ReplicaCmd, VolumeArgs};
pub use crate::cli::status::{getxattr_state, pairfs_mounts};
use crate::core::fs::Options;
use crate::core::inode::AtimePolicy;
use crate::core::volfile::{self, Paths};
use crate::error::{Error, Result};

fn paths(v: &VolumeArgs) -> Result<Paths> {
    Paths::resolve(&v.volume, v.meta.as_deref(), v.copy.as_deref())
}

/// The paths of an existing volume: those of the command line, or where a migration
/// moved its images (recorded in the metadata).
fn located(v: &VolumeArgs) -> Result<Paths> {
    volfile::follow_locations(&paths(v)?)
}

/// Runs one command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Mkfs {
            vol,
            size,
            track_size,
            force,
        } => {
            let p = paths(&vol)?;
            let size = match size {
                Some(s) => s,
                None => volfile::default_size(&p)?,
            };
            let g = volfile::mkfs(&p, size, track_size, force)?;
            println!(
                "made pairfs volume {} ({}, {} tracks of {}), uuid {}",
                p.volume.display(),
                crate::cli::size::format_size(g.size),
                g.tracks(),
                crate::cli::size::format_size(g.track_size),
                g.uuid
            );
            println!(
                "metadata {}, copy image {}",
                p.meta.display(),
                p.copy.display()
            );
            Ok(0)
        }
        Cmd::Mount {
            vol,
            mountpoint,
            copy_mount,
            threads,
            daemon,
            options,
            commit_ms,
            replica,
            key_file,
            replica_mode,
            on_disconnect,
        } => {
            if options
                .iter()
                .flat_map(|o| o.split(','))
                .any(|o| o.trim() == "remount")
            {
                remount(&mountpoint, &options)?;
                return Ok(0);
            }
            let mut m = MountSpec {
                paths: located(&vol)?,
                mountpoint,
                copy_mount,
                threads: threads as usize,
                readonly: false,
                fuse_opts: Vec::new(),
                commit_ms,
                copy_only: false,
                snapshot: false,
                atime: AtimePolicy::default(),
                nodiratime: false,
                writeback_cache: false,
                replica: ReplicaSpec::default(),
            };
            m.parse_options(&options)?;
            // The command line's flags win over -o.
            m.replica.addr = replica.or(m.replica.addr);
            m.replica.key_file = key_file.or(m.replica.key_file);
            m.replica.mode = replica_mode.or(m.replica.mode);
            m.replica.on_disconnect = on_disconnect.or(m.replica.on_disconnect);
            mount(m, daemon)
        }
        Cmd::Replica { cmd } => match cmd {
            ReplicaCmd::Serve {
                volume,
                listen,
                key_file,
                rejoin,
                copy_mount,
            } => {
                let key = crate::repl::proto::Key::from_file(&key_file)?;
                match copy_mount {
                    Some(dir) => {
                        check_mountpoint(&dir)?;
                        // Before any thread starts: every thread inherits the mask.
                        let sigs = block_signals();
                        let mount = |f| mount_replica_copies(&volume, &dir, sigs, f);
                        crate::repl::secondary::serve(
                            &volume,
                            &listen,
                            &key,
                            rejoin,
                            Some(&mount),
                        )?;
                    }
                    None => crate::repl::secondary::serve(&volume, &listen, &key, rejoin, None)?,
                }
                Ok(0)
            }
            ReplicaCmd::Promote { volume } => {
                println!("{}", crate::repl::secondary::promote(&volume)?);
                Ok(0)
            }
        },
        Cmd::MountCopy {
            vol,
            mountpoint,
            daemon,
        } => {
            let m = MountSpec {
                paths: located(&vol)?,
                mountpoint: mountpoint.clone(),
                copy_mount: Some(mountpoint),
                threads: 2,
                readonly: true,
                fuse_opts: Vec::new(),
                commit_ms: 1000,
                copy_only: true,
                snapshot: false,
                atime: AtimePolicy::Never,
                nodiratime: false,
                writeback_cache: false,
                replica: ReplicaSpec::default(),
            };
            mount(m, daemon)
        }
        Cmd::MountSnapshot {
            vol,
            mountpoint,
            daemon,
        } => {
            let m = MountSpec {
                paths: located(&vol)?,
                mountpoint,
                copy_mount: None,
                threads: 2,
                readonly: true,
                fuse_opts: Vec::new(),
                commit_ms: 1000,
                copy_only: false,
                snapshot: true,
                atime: AtimePolicy::Never,
                nodiratime: false,
                writeback_cache: false,
                replica: ReplicaSpec::default(),
            };
            mount(m, daemon)
        }
        Cmd::Umount { mountpoint } => {
            umount_and_wait(&mountpoint)?;
            Ok(0)
        }
        Cmd::Pair(a) => control(&a.path, "pair", false),
        Cmd::Release(a) => match named(&a.generation) {
            Some(g) => control_generation(&a.path, "release", g),
            None => control(&a.path, "release", false),
        },
        Cmd::Clone { src, dst, detach } => clone(&src, dst.as_deref(), detach),
        Cmd::Join(a) => control(&a.path, "join", false),
        Cmd::Split(a) | Cmd::Update(a) if named(&a.generation).is_some() => {
            control_generation(&a.path, "split", named(&a.generation).unwrap_or_default())
        }
        Cmd::Split(a) => control(&a.path, "split", a.wait),
        Cmd::Update(a) => control(&a.path, "update", a.wait),
        Cmd::Resync(a) => {
            if named(&a.generation).is_some() {
                return Err(Error::invalid(
                    "resync --generation: a named generation is split, updated or released",
                ));
            }
            control(&a.path, "resync", a.wait)
        }
        Cmd::Migrate {
            mountpoint,
            to,
            copy_image,
            wait,
            abort,
        } => migrate(&mountpoint, to.as_deref(), copy_image, wait, abort),
        Cmd::Status {
            path,
            json,
            watch,
            prometheus,
            textfile,
        } => {
            if prometheus || textfile.is_some() {
                crate::cli::metrics::prometheus(path.as_deref(), textfile.as_deref())
            } else {
                crate::cli::status::status(path.as_deref(), json, watch)
            }
        }
        Cmd::Diff {
            path,
            generation,
            json,
        } => crate::cli::diff::diff(&path, generation.as_deref(), json),
        Cmd::Scrub { vol, json } => {
            let target = std::fs::canonicalize(&vol.volume).unwrap_or_else(|_| vol.volume.clone());
            if target.is_dir() {
                // A mountpoint: no volume files to resolve.
                let main = crate::cli::status::pairfs_mounts()
                    .into_iter()
                    .any(|(m, src)| {
                        m == target && !src.ends_with(":copy") && !src.ends_with(":snapshot")
                    });
                if !main {
                    return Err(Error::invalid(format!(
                        "{}: not the mountpoint of a pairfs main mount (give it, or a volume image)",
                        target.display()
                    )));
                }
                crate::cli::scrub::run(&Paths::new(&target, None, None), json)
            } else {
                crate::cli::scrub::run(&located(&vol)?, json)
            }
        }
        Cmd::Fsck { vol, repair } => {
            let r = crate::cli::fsck::fsck(&located(&vol)?, repair)?;
            for (k, v) in &r.stats {
                println!("{k}: {v}");
            }
            for p in &r.problems {
                println!("PROBLEM: {p}");
            }
            for f in &r.fixed {
                println!("FIXED: {f}");
            }
            if r.problems.is_empty() {
                println!("clean");
                Ok(0)
            } else if repair && !r.fixed.is_empty() {
                println!(
                    "{} problems, {} fixes applied; run fsck again",
                    r.problems.len(),
                    r.fixed.len()
                );
                Ok(1)
            } else {
                println!("{} problems found", r.problems.len());
                Ok(1)
            }
        }
        Cmd::Gen { what } => {
            match what {
                Gen::Man { dir } => crate::cli::manpages::write_all(&dir)?,
                Gen::Completions { shell } => {
                    let mut cmd = <Cli as clap::CommandFactory>::command();
                    clap_complete::generate(shell, &mut cmd, "pairfs", &mut std::io::stdout());
                }
            }
            Ok(0)
        }
    }
}

/// What to mount.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Volume files.
    pub paths: Paths,
    /// Main mountpoint (or the copy mountpoint with `copy_only`).
    pub mountpoint: PathBuf,
    /// Copy mount directory.
    pub copy_mount: Option<PathBuf>,
    /// FUSE threads.
    pub threads: usize,
    /// Read-only main mount.
    pub readonly: bool,
    /// Extra FUSE options.
    pub fuse_opts: Vec<String>,
    /// Commit interval.
    pub commit_ms: u64,
    /// Serve only the copy mount.
    pub copy_only: bool,
    /// Serve the whole-volume snapshot (copy image + a copy of the metadata), read-only.
    pub snapshot: bool,
    /// When reads update atimes (`relatime` default, `strictatime`, `noatime`).
    pub atime: AtimePolicy,
    /// Reading a directory does not update its atime.
    pub nodiratime: bool,
    /// Kernel write-back caching (`-o writeback_cache`): writes return once in the
    /// page cache; a split or update flushes the kernel's dirty pages of its scope first.
    pub writeback_cache: bool,
    /// `--replica` and its options.
    pub replica: ReplicaSpec,
}

/// The replica options of a mount (`--replica`, `-o replica=`...).
#[derive(Debug, Default, Clone)]
pub struct ReplicaSpec {
    /// HOST:PORT of the secondary.
    pub addr: Option<String>,
    /// The key file.
    pub key_file: Option<PathBuf>,
    /// `sync` (default) or `async`.
    pub mode: Option<String>,
    /// `block` (default) or `continue`.
    pub on_disconnect: Option<String>,
}

impl ReplicaSpec {
    /// The attach hook for [`Options::replica`], or None without `--replica`.
    fn hook(&self) -> Result<Option<crate::core::durability::ReplicaHook>> {
        use crate::repl::link::{Config, Mode, OnDisconnect, Replica};
        let Some(addr) = &self.addr else {
            if self.key_file.is_some() || self.mode.is_some() || self.on_disconnect.is_some() {
                return Err(Error::invalid(
                    "key_file, replica_mode and on_disconnect need --replica HOST:PORT",
                ));
            }
            return Ok(None);
        };
        let kf = self
            .key_file
            .as_ref()
            .ok_or_else(|| Error::invalid("--replica needs --key-file FILE"))?;
        let mode = match self.mode.as_deref() {
            None | Some("sync") => Mode::Sync,
            Some("async") => Mode::Async,
            Some(m) => return Err(Error::invalid(format!("replica_mode={m}: sync or async"))),
        };
        let on_disconnect = match self.on_disconnect.as_deref() {
            None | Some("block") => OnDisconnect::Block,
            Some("continue") => OnDisconnect::Continue,
            Some(m) => {
                return Err(Error::invalid(format!(
                    "on_disconnect={m}: block or continue"
                )));
            }
        };
        let cfg = Config {
            addr: addr.clone(),
            key: crate::repl::proto::Key::from_file(kf)?,
            mode,
            on_disconnect,
        };
        Ok(Some(crate::core::durability::ReplicaHook(Arc::new(
            Replica::new(cfg),
        ))))
    }
}

impl MountSpec {
    /// Applies `-o` options.
    pub fn parse_options(&mut self, opts: &[String]) -> Result<()> {
        for o in opts.iter().flat_map(|s| s.split(',')) {
            let o = o.trim();
            if o.is_empty() {
                continue;
            }
            let (k, v) = o.split_once('=').map_or((o, None), |(k, v)| (k, Some(v)));
            match (k, v) {
                ("ro", None) => self.readonly = true,
                ("rw", None) => self.readonly = false,
                ("copy_mount", Some(d)) => self.copy_mount = Some(PathBuf::from(d)),
                ("threads", Some(n)) => {
                    self.threads = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| Error::invalid(format!("threads={n}: expected 1..64")))?
                }
                ("commit_ms", Some(n)) => {
                    self.commit_ms = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=60000).contains(n))
                        .ok_or_else(|| {
                            Error::invalid(format!("commit_ms={n}: expected 1..60000"))
                        })?
                }
                // Options mount(8) passes that mean nothing here.
                (
                    "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "_netdev"
                    | "nofail" | "lazytime",
                    _,
                ) => {}
                // Atimes are the daemon's to keep (the kernel leaves them to FUSE).
                ("relatime" | "atime", None) => self.atime = AtimePolicy::Relative,
                ("strictatime", None) => self.atime = AtimePolicy::Strict,
                ("noatime", None) => {
                    self.atime = AtimePolicy::Never;
                    self.fuse_opts.push(k.to_string());
                }
                ("writeback_cache", None) => self.writeback_cache = true,
                ("replica", Some(a)) => self.replica.addr = Some(a.to_string()),
                ("key_file", Some(f)) => self.replica.key_file = Some(PathBuf::from(f)),
                ("replica_mode", Some(m)) => self.replica.mode = Some(m.to_string()),
                ("on_disconnect", Some(m)) => self.replica.on_disconnect = Some(m.to_string()),
                ("no_writeback_cache", None) => self.writeback_cache = false,
                ("nodiratime", None) => self.nodiratime = true,
                ("diratime", None) => self.nodiratime = false,
                ("allow_other" | "default_permissions" | "allow_root", None) => {}
                (k, _) if k.starts_with("x-") => {}
                (
                    "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "async" | "sync"
                    | "dirsync",
                    None,
                ) => self.fuse_opts.push(k.to_string()),
                _ => return Err(Error::invalid(format!("unknown mount option {o:?}"))),
            }
        }
        Ok(())
    }
}

fn fuse_option(o: &str) -> MountOption {
    match o {
        "dev" => MountOption::Dev,
        "nodev" => MountOption::NoDev,
        "suid" => MountOption::Suid,
        "nosuid" => MountOption::NoSuid,
        "exec" => MountOption::Exec,
        "noexec" => MountOption::NoExec,
        "atime" => MountOption::Atime,
        "noatime" => MountOption::NoAtime,
        "sync" => MountOption::Sync,
        "async" => MountOption::Async,
        "dirsync" => MountOption::DirSync,
        other => MountOption::CUSTOM(other.to_string()),
    }
}

fn config(spec: &MountSpec, copy: bool) -> Config {
    let mut c = Config::default();
    // The main mount shows the volume as named on the command line (made absolute), as
    // a disk file system shows its device: findmnt, fstests and systemd match on it. An
    // NBD volume shows its lock file (`META.lock`), which `umount` waits on. The copy
    // and snapshot mounts are told apart by a `pairfs:` prefix and a suffix.
    let vol = source_name(&volfile::lock_file(&spec.paths));
    // A URI is no path: the `pairfs:` prefix marks the lock file as ours.
    let main_name = if volfile::is_uri(&spec.paths.volume) {
        format!("pairfs:{vol}")
    } else {
        vol.clone()
    };
    c.mount_options = vec![
        MountOption::FSName(if copy {
            format!("pairfs:{vol}:copy")
        } else if spec.snapshot {
            format!("pairfs:{vol}:snapshot")
        } else {
            main_name
        }),
        MountOption::Subtype("pairfs".to_string()),
        MountOption::DefaultPermissions,
    ];
    if copy || spec.readonly {
        c.mount_options.push(MountOption::RO);
    }
    for o in &spec.fuse_opts {
        c.mount_options.push(fuse_option(o));
    }
    // Root mounts serve every user, with the kernel checking permissions as on ext4.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        c.acl = SessionACL::All;
    }
    c.n_threads = Some(if copy { 2 } else { spec.threads });
    c.clone_fd = true;
    c
}

/// The volume path as the mount table shows it: as given, made absolute (not resolved).
pub fn source_name(volume: &Path) -> String {
    std::path::absolute(volume)
        .unwrap_or_else(|_| volume.to_path_buf())
        .display()
        .to_string()
}

/// `mount -o remount,...`: changes the flags of a mounted pairfs (ro/rw, nosuid, nodev,
/// noexec, sync, atime flags) with mount(2), keeping the others. The kernel enforces
/// them (a read-only mount refuses writes before they reach the daemon), so the running
/// daemon needs no message; pairfs' own options (copy_mount, threads, commit_ms) can
/// only be set at mount time.
pub fn remount(mnt: &Path, options: &[String]) -> Result<()> {
    let c =
        CString::new(mnt.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    // SAFETY: statvfs into a zeroed local with a valid C string.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut sv) } != 0 {
        return Err(Error::io("remount", std::io::Error::last_os_error()));
    }
    let keep = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_SYNCHRONOUS, libc::MS_SYNCHRONOUS),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    let mut flags = libc::MS_REMOUNT;
    for (st, ms) in keep {
        if sv.f_flag & st != 0 {
            flags |= ms;
        }
    }
    for o in options.iter().flat_map(|s| s.split(',')) {
        let o = o.trim();
        let (set, clear) = match o {
            "remount" | "" | "defaults" | "allow_other" | "default_permissions" => (0, 0),
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "noatime" => (libc::MS_NOATIME, libc::MS_RELATIME | libc::MS_STRICTATIME),
            "atime" | "strictatime" => (libc::MS_STRICTATIME, libc::MS_NOATIME | libc::MS_RELATIME),
            "relatime" => (libc::MS_RELATIME, libc::MS_NOATIME | libc::MS_STRICTATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            o if o.starts_with("x-") => (0, 0),
            o => {
                return Err(Error::invalid(format!(
                    "mount option {o:?} cannot be changed by a remount"
                )));
            }
        };
        flags = (flags | set) & !clear;
    }
    // SAFETY: valid C strings; source, type and data are ignored by a remount.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c.as_ptr(),
            c"fuse.pairfs".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::io("remount", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn check_mountpoint(p: &Path) -> Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::NotDir),
        Err(_) => Err(Error::NotFound(format!("mountpoint {}", p.display()))),
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and the threads it spawns later) and
/// returns the set, for `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Unmounts a FUSE mount: umount(2) as root, else fusermount3 -u. If it is busy,
/// `lazy` detaches it (the daemon exits when the last file closes); otherwise EBUSY.
pub fn unmount(p: &Path, lazy: bool) -> Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EBUSY) if !lazy => Err(Error::Busy(format!(
            "{} (files are open on it; close them or use umount -l)",
            p.display()
        ))),
        Some(libc::EBUSY) => {
            log::warn!("{} is busy; detaching it (lazy unmount)", p.display());
            // SAFETY: valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                return Ok(());
            }
            Err(Error::io("unmount", std::io::Error::last_os_error()))
        }
        Some(libc::EPERM) => {
            let st = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(p)
                .status()
                .map_err(|e| Error::io("fusermount3", e))?;
            if st.success() {
                Ok(())
            } else {
                Err(Error::Busy(format!(
                    "fusermount3 -u {} failed",
                    p.display()
                )))
            }
        }
        _ => Err(Error::io("unmount", err)),
    }
}

fn umount_and_wait(mnt: &Path) -> Result<()> {
    let mnt = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    let src = pairfs_mounts()
        .into_iter()
        .find(|(m, _)| *m == mnt)
        .map(|(_, s)| s)
        .ok_or_else(|| Error::invalid(format!("{} is not a pairfs mount", mnt.display())))?;
    unmount(&mnt, false)?;
    if src.ends_with(":copy") {
        // The daemon keeps serving the main mount.
        return Ok(());
    }
    if let Some(vol) = src
        .strip_suffix(":snapshot")
        .map(|v| v.trim_start_matches("pairfs:"))
    {
        // Wait for the snapshot daemon to release its lock on the copy image, so that
        // an update, resync or release of the root pair right after is not refused.
        let copy = Paths::new(Path::new(vol), None, None).copy;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if pairfs_mounts().iter().any(|(_, s)| *s == src) {
                // Another snapshot mount of the same volume keeps it locked.
                return Ok(());
            }
            let Ok(f) = std::fs::File::open(&copy) else {
                return Ok(());
            };
            // SAFETY: flock on a valid fd (released when `f` is closed).
            let r = unsafe {
                libc::flock(
                    std::os::unix::io::AsRawFd::as_raw_fd(&f),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            };
            if r == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Err(Error::Busy(format!(
            "the snapshot daemon of {vol} did not exit within 60 s"
        )));
    }
    let vol = src.trim_start_matches("pairfs:");
    if mounted_on(Path::new(vol)).is_some() {
        // Another mountpoint of the same volume (see `bind_again`): the daemon stays.
        return Ok(());
    }
    // Wait for the daemon to unmount the copy mount, commit and release the volume lock.
    let vol = src.trim_start_matches("pairfs:").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let still_mounted = pairfs_mounts()
            .iter()
            .any(|(_, s)| s.trim_start_matches("pairfs:").trim_end_matches(":copy") == vol);
        if !still_mounted {
            match std::fs::File::open(&vol) {
                Ok(f) => {
                    // SAFETY: flock on a valid fd.
                    let r = unsafe {
                        libc::flock(
                            std::os::unix::io::AsRawFd::as_raw_fd(&f),
                            libc::LOCK_EX | libc::LOCK_NB,
                        )
                    };
                    if r == 0 {
                        return Ok(());
                    }
                }
                Err(_) => return Ok(()),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Busy(format!(
        "the daemon of {vol} did not exit within 60 s"
    )))
}

/// Mounting a volume that is already mounted on `existing` gives a second mountpoint of
/// the same file system, as mounting a disk twice does (one superblock, one daemon): a
/// bind mount of the first, with the requested read-only flag. Unmounting either leaves
/// the other; the daemon exits with its last mountpoint. Pairfs' own options cannot differ.
fn bind_again(spec: &MountSpec, existing: &Path) -> Result<u8> {
    if spec.copy_mount.is_some() {
        return Err(Error::Locked(format!(
            "{} is already mounted on {} (its daemon serves the copy mount it was given)",
            spec.paths.volume.display(),
            existing.display()
        )));
    }
    let from = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("path with NUL"))?;
    let to = CString::new(spec.mountpoint.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("path with NUL"))?;
    // A bind mount (then its flags by a bind remount); type and data are ignored.
    let bind = |flags: libc::c_ulong| -> std::io::Result<()> {
        // SAFETY: valid C strings; null type and data.
        let r = unsafe {
            libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let mut flags = libc::MS_BIND;
    if let Err(e) = bind(flags) {
        return Err(Error::Locked(format!(
            "{} is already mounted on {} and binding it to {} failed: {e}",
            spec.paths.volume.display(),
            existing.display(),
            spec.mountpoint.display()
        )));
    }
    let extra: Vec<(&str, u64)> = vec![
        ("ro", libc::MS_RDONLY),
        ("nosuid", libc::MS_NOSUID),
        ("nodev", libc::MS_NODEV),
        ("noexec", libc::MS_NOEXEC),
    ];
    flags |= libc::MS_REMOUNT;
    for (o, f) in extra {
        if o == "ro" && spec.readonly || spec.fuse_opts.iter().any(|x| x == o) {
            flags |= f;
        }
    }
    // Keep the defaults of the first mount (nosuid, nodev) unless asked otherwise.
    if !spec.fuse_opts.iter().any(|x| x == "suid") {
        flags |= libc::MS_NOSUID;
    }
    if !spec.fuse_opts.iter().any(|x| x == "dev") {
        flags |= libc::MS_NODEV;
    }
    if let Err(e) = bind(flags) {
        let _ = unmount(&spec.mountpoint, true);
        return Err(Error::io("bind mount flags", e));
    }
    log::info!(
        "{} is mounted on {}: bound it to {} as well",
        spec.paths.volume.display(),
        existing.display(),
        spec.mountpoint.display()
    );
    Ok(0)
}

/// Mounts and serves until unmounted or signalled.
fn mount(spec: MountSpec, daemon: bool) -> Result<u8> {
    check_mountpoint(&spec.mountpoint)?;
    if let Some(c) = &spec.copy_mount {
        check_mountpoint(c)?;
        if !spec.copy_only && c == &spec.mountpoint {
            return Err(Error::invalid(
                "the copy mount must differ from the mountpoint",
            ));
        }
    }
    if !spec.copy_only
        && !spec.snapshot
        && let Some(m) = mounted_on(&spec.paths.volume)
    {
        return bind_again(&spec, &m);
    }
    if !daemon {
        return serve(spec, None);
    }
    // Fork before any thread exists; the parent waits for "ready" or an error text.
    let mut fds = [0; 2];
    // SAFETY: pipe into a local array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: single-threaded here; the child continues with its own copy.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::io("fork", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: we own fds[0]; close our copy of the write end.
        let mut r = unsafe {
            libc::close(fds[1]);
            std::fs::File::from_raw_fd(fds[0])
        };
        let mut msg = String::new();
        let _ = r.read_to_string(&mut msg);
        if msg.starts_with("ready") {
            return Ok(0);
        }
        eprintln!(
            "pairfs: {}",
            if msg.is_empty() {
                "the daemon exited before the mount was ready"
            } else {
                msg.trim()
            }
        );
        return Ok(1);
    }
    // Child.
    // SAFETY: we own fds[1]; setsid has no preconditions.
    let w = unsafe {
        libc::close(fds[0]);
        libc::setsid();
        std::fs::File::from_raw_fd(fds[1])
    };
    let code = match serve(spec, Some(w)) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            1
        }
    };
    std::process::exit(code as i32);
}

/// The mountpoint of a running main mount of `volume`, if any.
fn mounted_on(volume: &Path) -> Option<PathBuf> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let want = canon(volume);
    pairfs_mounts().into_iter().find_map(|(m, src)| {
        let v = src.strip_prefix("pairfs:")?;
        (!v.ends_with(":copy") && !v.ends_with(":snapshot") && canon(Path::new(v)) == want)
            .then_some(m)
    })
}

/// Opens the volume. A volume that is mounted is refused with where it is mounted; a
/// lock held by a daemon whose mount is already gone (it finishes its last commit after
/// the kernel has unmounted) is waited for, up to 10 s, so unmount-then-mount just works.
fn open_volume(
    spec: &MountSpec,
    opts: Options,
) -> Result<(crate::core::fs::Fs, volfile::VolumeLock)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = if spec.snapshot {
            volfile::open_snapshot(&spec.paths)
        } else {
            volfile::open(&spec.paths, opts.clone())
        };
        match r {
            Err(Error::Locked(msg)) => {
                if let Some(m) = mounted_on(&spec.paths.volume) {
                    return Err(Error::Locked(format!(
                        "{} is already mounted on {}; a volume is served by one daemon at a \
                         time: use that mount, or a bind mount of it (mount --bind {} DIR)",
                        spec.paths.volume.display(),
                        m.display(),
                        m.display()
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(Error::Locked(msg));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn serve(spec: MountSpec, mut ready: Option<std::fs::File>) -> Result<u8> {
    let fail = |ready: &mut Option<std::fs::File>, e: Error| -> Result<u8> {
        if let Some(w) = ready.as_mut() {
            let _ = writeln!(w, "{e}");
        }
        Err(e)
    };
    let replica = match spec.replica.hook() {
        Ok(r) => r,
        Err(e) => return fail(&mut ready, e),
    };
    if replica.is_some() && (spec.readonly || spec.copy_only || spec.snapshot) {
        return fail(
            &mut ready,
            Error::invalid("--replica needs a read-write main mount"),
        );
    }
    let opts = Options {
        replica,
        commit_interval: Duration::from_millis(spec.commit_ms),
        readonly: spec.readonly || spec.copy_only,
        meta_path: None,
        copy_path: None,
        // Tests shrink the inode cache to exercise eviction under real FUSE traffic.
        cache_inodes: std::env::var("PAIRFS_CACHE_INODES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(Options::default().cache_inodes),
        ..Options::default()
    };
    let (fs, _lock) = match open_volume(&spec, opts) {
        Ok(x) => x,
        Err(e) => return fail(&mut ready, e),
    };
    let fs = Arc::new(fs);
    let sigs = block_signals();
    let mut sessions = Vec::new();
    let mut points = Vec::new();
    if !spec.copy_only {
        // A whole-volume snapshot is served as the frozen view of its root pair, the
        // same view the copy mount serves.
        let session = if spec.snapshot {
            fuser::Session::new(
                crate::fuse::copy_fs::CopyFs::new(fs.clone()),
                &spec.mountpoint,
                &config(&spec, false),
            )
            .and_then(|s| {
                crate::fuse::copy_fs::invalidate_on_change(fs.clone(), s.notifier())?;
                s.spawn()
            })
        } else {
            let main = crate::fuse::main_fs::MainFs::new(fs.clone())
                .with_atime(spec.atime, spec.nodiratime, spec.mountpoint.clone())
                .with_writeback_cache(spec.writeback_cache);
            let slot = main.notifier_slot();
            fuser::Session::new(main, &spec.mountpoint, &config(&spec, false)).and_then(|s| {
                let _ = slot.set(s.notifier());
                s.spawn()
            })
        };
        match session {
            Ok(s) => {
                sessions.push(s);
                points.push(spec.mountpoint.clone());
            }
            Err(e) => return fail(&mut ready, Error::io("mount", e)),
        }
    }
    if let Some(c) = &spec.copy_mount {
        match fuser::Session::new(
            crate::fuse::copy_fs::CopyFs::new(fs.clone()),
            c,
            &config(&spec, true),
        )
        .and_then(|s| {
            crate::fuse::copy_fs::invalidate_on_change(fs.clone(), s.notifier())?;
            s.spawn()
        }) {
            Ok(s) => {
                sessions.push(s);
                points.push(c.clone());
            }
            Err(e) => {
                for p in &points {
                    let _ = unmount(p, true);
                }
                return fail(&mut ready, Error::io("copy mount", e));
            }
        }
    }
    for p in &points {
        raise_readahead(p);
    }
    let mut workers = Vec::new();
    if !fs.opts.readonly {
        let f = fs.clone();
        workers.push(
            std::thread::Builder::new()
                .name("pairfs-flush".into())
                .spawn(move || f.run_flusher())
                .map_err(|e| Error::io("thread", e))?,
        );
        let f = fs.clone();
        workers.push(
            std::thread::Builder::new()
                .name("pairfs-copier".into())
                .spawn(move || f.engine.run_copier(&*f))
                .map_err(|e| Error::io("thread", e))?,
        );
        let f = fs.clone();
        workers.push(
            std::thread::Builder::new()
                .name("pairfs-destage".into())
                .spawn(move || f.engine.run_destager(&*f))
                .map_err(|e| Error::io("thread", e))?,
        );
        let f = fs.clone();
        workers.push(
            std::thread::Builder::new()
                .name("pairfs-migrate".into())
                .spawn(move || f.run_migrator())
                .map_err(|e| Error::io("thread", e))?,
        );
    }
    log::info!(
        "mounted {} on {}{}",
        spec.paths.volume.display(),
        points
            .first()
            .map_or_else(String::new, |p| p.display().to_string()),
        spec.copy_mount
            .as_ref()
            .map_or_else(String::new, |c| format!(" (copies on {})", c.display()))
    );
    if let Some(mut w) = ready.take() {
        let _ = w.write_all(b"ready\n");
        // Detach stdio so the parent's terminal (or pipe) is released. Logs go to
        // $PAIRFS_LOG_FILE when set, else nowhere (run in the foreground under systemd
        // to keep them in the journal).
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null");
        let log = std::env::var_os("PAIRFS_LOG_FILE").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        if let Ok(null) = &null {
            use std::os::unix::io::AsRawFd;
            let out = log.as_ref().map_or(null.as_raw_fd(), |l| l.as_raw_fd());
            // SAFETY: dup2 of valid fds onto the standard descriptors.
            unsafe {
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(out, 1);
                libc::dup2(out, 2);
            }
        }
    }
    // Signal thread: unmount everything on SIGINT/SIGTERM/SIGHUP.
    let sig_points = points.clone();
    std::thread::Builder::new()
        .name("pairfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on a set blocked in every thread.
            unsafe { libc::sigwait(&sigs, &mut sig) };
            log::info!("signal {sig}: unmounting");
            for p in &sig_points {
                if let Err(e) = unmount(p, true) {
                    log::warn!("unmount {}: {e}", p.display());
                }
            }
        })
        .map_err(|e| Error::io("thread", e))?;
    // Serve until the first session ends (unmounted), then take the others down.
    let mut first = true;
    for s in sessions {
        if !first {
            for p in &points {
                let _ = unmount(p, true);
            }
        }
        first = false;
        if let Err(e) = s.join() {
            log::warn!("session ended with {e}");
        }
    }
    fs.request_stop();
    for w in workers {
        let _ = w.join();
    }
    let (cached, known) = fs.cache_stats();
    log::info!(
        "inode cache at unmount: {cached} cached, {known} known to the kernel, {} evicted since mount",
        fs.evictions.load(std::sync::atomic::Ordering::Relaxed)
    );
    fs.shutdown()?;
    log::info!(
        "unmounted {} cleanly ({} tracks copied since mount, {} of them by copy-on-write)",
        spec.paths.volume.display(),
        fs.engine
            .copied_total
            .load(std::sync::atomic::Ordering::Relaxed),
        fs.engine
            .cow_total
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(0)
}

/// Mounts the copy mount of a secondary (`replica serve --copy-mount DIR`) on `dir`,
/// served from `f`; SIGINT, SIGTERM and SIGHUP (blocked in `sigs`) unmount it and end
/// the process.
fn mount_replica_copies(
    volume: &Path,
    dir: &Path,
    sigs: libc::sigset_t,
    f: Arc<crate::repl::follow::Follower>,
) -> Result<()> {
    let vol = source_name(&volfile::lock_file(&volfile::Paths::new(
        volume, None, None,
    )));
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName(format!("pairfs:{vol}:replica-copy")),
        MountOption::Subtype("pairfs".to_string()),
        MountOption::DefaultPermissions,
        MountOption::RO,
    ];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        c.acl = SessionACL::All;
    }
    c.n_threads = Some(2);
    c.clone_fd = true;
    let (tx, rx) = std::sync::mpsc::channel();
    f.set_invalidator(tx);
    let session = fuser::Session::new(crate::fuse::copy_fs::CopyFs::new(f), dir, &c)
        .and_then(|s| {
            crate::fuse::copy_fs::invalidate_names(rx, s.notifier())?;
            s.spawn()
        })
        .map_err(|e| Error::io("copy mount", e))?;
    raise_readahead(dir);
    log::info!(
        "replica: frozen copies of {} on {}",
        volume.display(),
        dir.display()
    );
    let point = dir.to_path_buf();
    std::thread::Builder::new()
        .name("pairfs-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on a set blocked in every thread.
            unsafe { libc::sigwait(&sigs, &mut sig) };
            log::info!("signal {sig}: unmounting {}", point.display());
            if let Err(e) = unmount(&point, true) {
                log::warn!("unmount {}: {e}", point.display());
            }
            drop(session);
            std::process::exit(0);
        })
        .map_err(|e| Error::io("thread", e))?;
    Ok(())
}

/// FUSE mounts start with the kernel's default read-ahead (128 KiB) whatever the
/// filesystem asks for at init; raise the mount's backing-device read-ahead to 1 MiB so
/// sequential reads arrive as large requests. Best effort (needs root).
fn raise_readahead(mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(mnt) else {
        return;
    };
    let dev = m.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{maj}:{min}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "1024") {
        log::debug!("read-ahead of {}: {knob}: {e}", mnt.display());
    }
}

/// Sets `user.pairfs.<op>` on a path (the CLI wrappers of the control interface).
pub fn setxattr_control(path: &Path, op: &str) -> Result<()> {
    let c =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid("path with NUL"))?;
    let name = CString::new(format!("user.pairfs.{op}")).expect("no NUL");
    // SAFETY: valid C strings, empty value.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), std::ptr::null(), 0, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY)
            && matches!(op, "update" | "resync" | "release")
            && let Some(clones) = crate::cli::status::clones_of(path)
        {
            return Err(Error::Busy(format!(
                "{op} {}: {e}: the frozen copy is read by the clone {clones} \
                 (detach it first: pairfs clone --detach)",
                path.display()
            )));
        }
        let hint = match e.raw_os_error() {
            Some(libc::EINVAL) => " (wrong state for this operation; see `pairfs status`)",
            Some(libc::EBUSY) => " (an operation is running or the path is inside another pair)",
            Some(libc::ENOTSUP) => " (not a pairfs mount?)",
            _ => "",
        };
        return Err(Error::invalid(format!(
            "{op} {}: {e}{hint}",
            path.display()
        )));
    }
    Ok(())
}

/// A `--generation` other than `default`.
fn named(g: &Option<String>) -> Option<&str> {
    g.as_deref()
        .filter(|g| *g != crate::snap::gens::DEFAULT_NAME)
}

/// `pairfs split|update|release --generation NAME PATH`: `user.pairfs.OP` = NAME on
/// PATH, then the generation's status line.
fn control_generation(path: &Path, op: &str, name: &str) -> Result<u8> {
    crate::snap::gens::check_name(name)?;
    crate::cli::status::setxattr_value(path, op, name.as_bytes())
        .map_err(|e| Error::invalid(format!("{op} --generation {name} {}: {e}", path.display())))?;
    println!("{}: generation {name}: {op} done", path.display());
    Ok(0)
}

/// `pairfs clone SRC DST` (setxattr `user.pairfs.clone` = `SRC_INO NAME` on DST's
/// directory) and `pairfs clone --detach PATH` (`user.pairfs.detach` on PATH).
fn clone(src: &Path, dst: Option<&Path>, detach: bool) -> Result<u8> {
    use std::os::unix::fs::MetadataExt;
    let t = std::time::Instant::now();
    let Some(dst) = dst.filter(|_| !detach) else {
        crate::cli::status::setxattr_value(src, "detach", b"")?;
        println!(
            "{}: detached ({:.1} ms)",
            src.display(),
            t.elapsed().as_secs_f64() * 1e3
        );
        return Ok(0);
    };
    let sm =
        std::fs::metadata(src).map_err(|e| Error::invalid(format!("{}: {e}", src.display())))?;
    let name = dst
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a new name", dst.display())))?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let pm = std::fs::metadata(&parent)
        .map_err(|e| Error::invalid(format!("{}: {e}", parent.display())))?;
    if pm.dev() != sm.dev() {
        return Err(Error::invalid(format!(
            "{} and {} are not on the same pairfs mount",
            src.display(),
            dst.display()
        )));
    }
    let mut value = format!("{} ", sm.ino()).into_bytes();
    value.extend_from_slice(name.as_bytes());
    crate::cli::status::setxattr_value(&parent, "clone", &value)?;
    println!(
        "{}: clone of {} ({:.1} ms)",
        dst.display(),
        src.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(0)
}

fn control(path: &Path, op: &str, wait: bool) -> Result<u8> {
    setxattr_control(path, op)?;
    let state = getxattr_state(path)?;
    if !wait {
        println!("{}: {}", path.display(), state);
        return Ok(0);
    }
    crate::cli::status::wait_until_done(path)?;
    println!("{}: {}", path.display(), getxattr_state(path)?);
    Ok(0)
}

/// `pairfs migrate`: sets `user.pairfs.migrate` on the mount root, then shows (or with
/// `--wait` follows) `user.pairfs.migration`.
fn migrate(mnt: &Path, to: Option<&str>, copy_image: bool, wait: bool, abort: bool) -> Result<u8> {
    let value = match (abort, to) {
        (true, _) => "abort".to_string(),
        (false, Some(t)) => {
            // The daemon's working directory is not ours: a path goes absolute.
            let t = if volfile::is_uri(Path::new(t)) {
                t.to_string()
            } else {
                let abs = std::path::absolute(t).map_err(|e| Error::io("migration target", e))?;
                // Resolve the directory (symlinks), so the daemon can tell a target inside
                // its own mount.
                match (abs.parent().map(std::fs::canonicalize), abs.file_name()) {
                    (Some(Ok(dir)), Some(name)) => dir.join(name),
                    _ => abs,
                }
                .display()
                .to_string()
            };
            format!("{} {t}", if copy_image { "copy" } else { "volume" })
        }
        (false, None) => return Err(Error::invalid("migrate: give --to TARGET or --abort")),
    };
    crate::cli::status::setxattr_value(mnt, "migrate", value.as_bytes())?;
    if !wait && !abort {
        println!(
            "{}: {}",
            mnt.display(),
            crate::cli::status::migration_state(mnt)?
        );
        return Ok(0);
    }
    let line = crate::cli::status::wait_migration(mnt)?;
    println!("{}: {line}", mnt.display());
    Ok(if line.starts_with("migrated") || abort {
        0
    } else {
        1
    })
}
