#!/usr/bin/env bash
# Builds the Debian package target/debian/pairfs_<version>-1_<arch>.deb with cargo-deb
# ([package.metadata.deb] in Cargo.toml) and prints its path on the last line.
#
#   bash packaging/build-deb.sh
#
# 1. cargo build --release (a no-op when the release build is current);
# 2. generates what the package ships besides the binary into target/deb-extra/: the
#    bash, zsh and fish completions (pairfs gen completions) and the mount helper symlink
#    mount.fuse.pairfs -> pairfs and its man page (pairfs-mount(8));
# 3. cargo deb --no-build (it gzips the man pages; depends: $auto via dpkg-shlibdeps,
#    fuse3, attr).
# Needs cargo-deb (.ci/run installs it: cargo install --locked cargo-deb@3.8.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo-deb >/dev/null || {
    echo "cargo-deb is missing: cargo install --locked cargo-deb@3.8.0" >&2
    exit 2
}
cargo build --release
extra=target/deb-extra
rm -rf "$extra"
mkdir -p "$extra/completions"
target/release/pairfs gen completions bash >"$extra/completions/pairfs"
target/release/pairfs gen completions zsh >"$extra/completions/_pairfs"
target/release/pairfs gen completions fish >"$extra/completions/pairfs.fish"
ln -s pairfs "$extra/mount.fuse.pairfs"
ln -s pairfs-mount.8.gz "$extra/mount.fuse.pairfs.8.gz"
cargo deb --no-build --no-dbgsym
