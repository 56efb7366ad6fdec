//! The command line, defined with clap. Man pages and shell completions are generated
//! from [`Cli`], so this file is the single source of the CLI's documentation.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Point-in-time copies of single files, directory trees or a whole volume, by
/// copy-on-write at track granularity, served over FUSE.
#[derive(Debug, Parser)]
#[command(name = "pairfs", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Where a volume's files are.
#[derive(Debug, Args, Clone)]
pub struct VolumeArgs {
    /// The volume image: a file, a block device or an NBD URI
    /// (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    pub volume: PathBuf,
    /// Metadata database [default: VOLUME.meta; required with an NBD URI].
    #[arg(long, value_name = "PATH")]
    pub meta: Option<PathBuf>,
    /// Copy image, a path or an NBD URI [default: VOLUME.copy; required with an NBD
    /// URI volume].
    #[arg(long, value_name = "PATH|URI")]
    pub copy: Option<PathBuf>,
}

/// Subcommands. Exit codes: 0 success, 1 failure (fsck: problems found), 2 usage error.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Make a new volume: sparse image, copy image and metadata database.
    Mkfs {
        /// Volume files.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Volume size, e.g. 10G [default with an NBD volume: the export's size].
        #[arg(long, value_parser = parse_size_arg)]
        size: Option<u64>,
        /// Track size: the unit of copying, a power of two from 4K to 1M.
        #[arg(long, default_value = "64K", value_parser = parse_size_arg)]
        track_size: u64,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Mount a volume (foreground unless --daemon; SIGINT/SIGTERM unmount cleanly).
    Mount {
        /// Volume files.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Also serve the frozen copies, read-only, at this directory.
        #[arg(long, value_name = "DIR")]
        copy_mount: Option<PathBuf>,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
        /// Detach once the mount is ready.
        #[arg(long)]
        daemon: bool,
        /// Mount options (comma separated): ro, allow_other, default_permissions,
        /// copy_mount=DIR, threads=N, commit_ms=N, writeback_cache (kernel write-back
        /// caching; a split first flushes the kernel's dirty pages of its scope),
        /// replica=HOST:PORT, key_file=FILE, replica_mode=sync|async,
        /// on_disconnect=block|continue; others are passed to FUSE.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Milliseconds between background metadata commits.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=60000))]
        commit_ms: u64,
        /// Replicate to the secondary at HOST:PORT (`pairfs replica serve`): the mount
        /// first sends a full copy (images and metadata), then every write, sync and
        /// commit in order. The link is authenticated but NOT encrypted: tunnel it.
        #[arg(long, value_name = "HOST:PORT", requires = "key_file")]
        replica: Option<String>,
        /// File holding the shared replication key (at least 16 bytes, mode 600).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// sync: an fsync (any durability point) returns once the secondary has it
        /// durably; async: at once, the link drains behind.
        #[arg(long, value_name = "MODE", value_parser = ["sync", "async"])]
        replica_mode: Option<String>,
        /// When the link is down: block (durability points wait for it) or continue
        /// (they return; records are buffered, up to 256 MiB, and replayed on
        /// reconnection; beyond that the changed blocks are marked and resynced when the
        /// secondary is back).
        #[arg(long, value_name = "POLICY", value_parser = ["block", "continue"])]
        on_disconnect: Option<String>,
    },
    /// Replication: serve a secondary, promote it.
    Replica {
        /// What to do.
        #[command(subcommand)]
        cmd: ReplicaCmd,
    },
    /// Serve only the frozen copies, read-only, while the main mount is down.
    MountCopy {
        /// Volume files.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Where to mount the copies.
        mountpoint: PathBuf,
        /// Detach once the mount is ready.
        #[arg(long)]
        daemon: bool,
    },
    /// Mount the whole volume as of its last root split, read-only (copy image plus
    /// a copy of the metadata), e.g. to back it all up or to recover from it.
    ///
    /// It serves the same frozen view as the copy mount (hard links, special files,
    /// owners, times, xattrs and ACLs as at the split). It copies the metadata database
    /// when it mounts (one read transaction, beside the database, removed once open;
    /// the live mount does not wait for it). It holds a shared lock on the copy
    /// image: while it is mounted the live mount refuses update, resync and release of
    /// the root pair with EBUSY; it is refused while the root pair is not split.
    MountSnapshot {
        /// Volume files.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Where to mount it.
        mountpoint: PathBuf,
        /// Detach once the mount is ready.
        #[arg(long)]
        daemon: bool,
    },
    /// Unmount a pairfs mount and wait for its daemon to finish its last commit.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// Pair a file or directory with its copy (forming).
    Pair(PathArgs),
    /// Freeze the copy of a file or directory now (creates the pair if needed).
    ///
    /// A regular file inside a paired directory (or volume) gets a pair of its own with
    /// its own instant; the directory's frozen copy keeps the file as of its instant (see
    /// `pairfs join`).
    ///
    /// With `--generation NAME`: split (or refresh) the pair's named generation NAME, a
    /// further instant kept by copy-on-write alone, served under `@NAME/` of the copy
    /// mount (the pair must exist; PATH is its file, directory or mount root).
    Split(WaitArgs),
    /// Refresh the frozen copy to now, copying only changed tracks (`--generation NAME`:
    /// refresh generation NAME, as `split --generation NAME`).
    Update(WaitArgs),
    /// Leave the frozen state and converge back to formed.
    Resync(WaitArgs),
    /// Delete the pair, its frozen copy and its named generations (`--generation NAME`:
    /// only generation NAME, freeing the space no other generation shares).
    Release(GenArgs),
    /// Make DST a writable clone of SRC's frozen copy, at once, copying no data.
    ///
    /// SRC is a regular file or a directory; without a frozen copy it is split first
    /// (creating its pair if needed). DST (a new name, outside every directory or volume
    /// pair) is an ordinary read-write file or tree (directories, symlinks, special files,
    /// hard links and xattrs as in the frozen copy; each regular file a clone): its
    /// unwritten tracks read SRC's frozen copy, its writes go to newly allocated tracks.
    /// While a clone depends on it, SRC's frozen copy cannot be updated, resynced or
    /// released (EBUSY, naming the clone). `--detach DST` copies the tracks a clone still
    /// reads from the frozen copy into its own and drops the dependency. Pairing or
    /// splitting a clone detaches it first. `pairfs status` lists linked clones. Root
    /// only (a clone keeps the frozen owners and modes).
    Clone {
        /// The source (with --detach: the clone, or a directory holding clones).
        src: PathBuf,
        /// The new clone (a path that does not exist yet, on the same mount).
        #[arg(required_unless_present = "detach", conflicts_with = "detach")]
        dst: Option<PathBuf>,
        /// Detach the clone(s) at SRC instead: copy the remaining tracks, drop the
        /// dependency on the frozen copy.
        #[arg(long)]
        detach: bool,
    },
    /// End the own pair of a file split on its own inside a directory or root pair
    /// (`pairfs split DIR/FILE`) and join the file back into that group pair: its
    /// changes are recorded there, so the group's next update or split covers it. The
    /// group's frozen copy is unchanged. Refused (EINVAL) for a pair that is not a file
    /// pair inside a group.
    Join(PathArgs),
    /// Move the volume image (or the copy image) of a mounted volume to TARGET while it
    /// is in use.
    ///
    /// A background copy runs while every write goes to both images; at the end the
    /// metadata records the new place in one durable step and the old image is no longer
    /// used (it is left in place: delete it yourself). Pairs, frozen copies and the copy
    /// mount are unaffected. `pairfs status` shows progress, rate and ETA. A kill or crash
    /// at any point: the next mount resumes or has completed it. The volume mounts again
    /// with the same command line (the metadata says where its images are now).
    Migrate {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// Where to: a new file, a block device or an NBD URI.
        #[arg(long, value_name = "PATH|URI", conflicts_with = "abort")]
        to: Option<String>,
        /// Move the copy image instead of the volume image.
        #[arg(long)]
        copy_image: bool,
        /// Block until the migration has switched (or aborted).
        #[arg(long)]
        wait: bool,
        /// Stop the running migration and stay on the source.
        #[arg(long)]
        abort: bool,
    },
    /// Show pairs: states, progress, rate and ETA, pinned space.
    Status {
        /// A file or directory on a pairfs mount, or a mountpoint (all its pairs).
        /// Without it: every pairfs mount.
        path: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print the Prometheus text format: per pair (labels mountpoint, pair, scope,
        /// path) its state, tracks and bytes to copy, copy rate, copy-on-write counts,
        /// pinned bytes and split time; per volume size, used space, clean flag and
        /// copy counters. Exit 1 if a mount could not be read.
        #[arg(long, conflicts_with_all = ["json", "watch"])]
        prometheus: bool,
        /// Write the --prometheus text to PATH atomically (temporary file and rename),
        /// e.g. for node_exporter's textfile collector (a *.prom file in its directory).
        #[arg(long, value_name = "PATH", conflicts_with_all = ["json", "watch"])]
        textfile: Option<PathBuf>,
    },
    /// List the byte ranges of a file changed since its pair's split, or since the split
    /// of one of the pair's named generations (from the pair's bitmaps, the generation's
    /// saved tracks and extent maps, reading no data); for a directory, of each regular
    /// file beneath it.
    ///
    /// Text: a `# size=N old_size=M pair=ID state=S track_size=T` line, then one
    /// `OFFSET LENGTH` line per merged range (a directory: `OFFSET LENGTH PATH`, PATH
    /// relative to it). Ranges are whole tracks (except at the end of the file) and stop
    /// at the current size: a file that shrank reports its new size. Exit code 2 (ENOENT)
    /// when the pair has no generation NAME.
    Diff {
        /// A regular file or directory on a pairfs mount.
        path: PathBuf,
        /// The generation to compare with (`default`: the pair's own frozen copy, as
        /// without the option; others are made by `setfattr -n user.pairfs.split -v NAME`).
        #[arg(long, value_name = "NAME")]
        generation: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every copied track of every frozen copy against its checksum (crc32c).
    ///
    /// Given a mountpoint, the running daemon does it; given a volume that is not
    /// mounted, it reads the metadata and the copy image itself. Prints
    /// `checked=N unsummed=N bad=N` (unsummed: copied before checksums existed), then
    /// `bad pair=ID track=V file_track=F path=P` per mismatch. Exit code 1 on a mismatch.
    Scrub {
        /// Volume files, or the mountpoint of a mounted volume.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a volume that is not mounted.
    Fsck {
        /// Volume files.
        #[command(flatten)]
        vol: VolumeArgs,
        /// Apply the safe fixes.
        #[arg(long)]
        repair: bool,
    },
    /// Generate man pages or shell completions.
    Gen {
        /// What to generate.
        #[command(subcommand)]
        what: Gen,
    },
}

/// A path argument.
#[derive(Debug, Args)]
pub struct PathArgs {
    /// A regular file or directory on a pairfs mount.
    pub path: PathBuf,
}

/// A path and --wait.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// A regular file or directory on a pairfs mount.
    pub path: PathBuf,
    /// Block until the background copy is complete, showing progress on a terminal.
    #[arg(long)]
    pub wait: bool,
    /// A named generation of the pair instead of its own frozen copy (split and update
    /// only; `default` is the pair's own).
    #[arg(long, value_name = "NAME")]
    pub generation: Option<String>,
}

/// A path and an optional generation.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// A regular file or directory on a pairfs mount.
    pub path: PathBuf,
    /// Only the pair's named generation NAME.
    #[arg(long, value_name = "NAME")]
    pub generation: Option<String>,
}

/// Replication subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// Keep VOLUME (a path: VOLUME, VOLUME.copy, VOLUME.meta) as the secondary of a
    /// primary mounted with --replica: accept one primary at a time, authenticate it
    /// with the shared key, apply its records in order and acknowledge each sync and
    /// commit after its own fsync. VOLUME may not exist yet or be a new empty volume
    /// of the same geometry: the primary's first connection copies everything. Runs in
    /// the foreground until killed.
    Serve {
        /// The secondary's volume image.
        volume: PathBuf,
        /// Address to listen on, e.g. 0.0.0.0:7789.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// File holding the shared replication key (at least 16 bytes, mode 600).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// VOLUME is the old primary of a promoted secondary: let that new primary take
        /// it over as its secondary, sending only the blocks that differ (the two sides'
        /// out-of-sync bitmaps), or everything if the bitmaps do not line up.
        #[arg(long)]
        rejoin: bool,
        /// Serve the frozen copies this secondary holds, read-only, on DIR while it
        /// replicates (backups at the second site): the state of its last applied
        /// commit; EAGAIN while a full sync or resync runs.
        #[arg(long, value_name = "DIR")]
        copy_mount: Option<PathBuf>,
    },
    /// Make a secondary an ordinary volume that mounts read-write (failover). Stop
    /// `pairfs replica serve` first. Mount it with --replica to the old primary
    /// (`replica serve OLD --rejoin`) to bring that back in sync by bitmap.
    Promote {
        /// The secondary's volume image.
        volume: PathBuf,
    },
}

/// Generators.
#[derive(Debug, Subcommand)]
pub enum Gen {
    /// Write man pages into DIR.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// Print a completion script.
    Completions {
        /// bash, zsh or fish.
        shell: clap_complete::Shell,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::cli::size::parse_size(s).map_err(|e| e.to_string())
}
