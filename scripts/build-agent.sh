#!/usr/bin/env bash
# Builds erel-boot as one statically linked x86_64 Linux executable (glibc static-pie,
# profile `agent` of the root Cargo.toml) and prints its path as the last line.
#
# Usage: scripts/build-agent.sh
#
# `--target` is given explicitly so that RUSTFLAGS reach only the agent's own code and
# its dependencies, not build scripts or proc macros (which stay dynamic host programs).
# The agent needs no shared library and no NSS module at run time: users and groups are
# read from /etc/passwd and /etc/group, the listen address is numeric.
set -euo pipefail

target=x86_64-unknown-linux-gnu
cd "$(dirname "$0")/.."

# `pack-relative-relocs` stores the relocations of a position-independent executable
# as RELR (glibc 2.36, binutils 2.38): a few kilobytes instead of 24 bytes per pointer.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs" \
    cargo build --locked --profile agent --target "$target" -p erel-boot --bin erel-boot >&2

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
binary="$target_dir/$target/agent/erel-boot"
if [[ ! -x "$binary" ]]; then
    echo "build-agent: $binary was not built" >&2
    exit 1
fi
echo "$binary"
