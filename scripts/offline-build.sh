#!/usr/bin/env bash
# Builds `erel` and `erel-boot` without the network: every crate comes from a vendored copy
# of exactly what Cargo.lock names, and Cargo runs with --offline --frozen.
#
#   scripts/offline-build.sh vendor [DIR]   with the network: copy every crate into DIR
#   scripts/offline-build.sh build [DIR]    without it: build both binaries from DIR
#   scripts/offline-build.sh [DIR]          both steps, one after the other
#
# DIR defaults to target/vendor. To build on a machine with no network, run `vendor` where
# the crate registry is reachable, carry the source tree with DIR inside it (or next to it),
# and run `build` there. The build uses only DIR and the Rust toolchain: no registry index,
# no git, no cache in CARGO_HOME.
#
# Environment: PROFILE (default `release`; `dev` for a quicker debug build),
# CARGO_TARGET_DIR (default `target`). The last line printed is the directory holding the
# two binaries.
set -euo pipefail

cd "$(dirname "$0")/.."

die() { printf 'offline-build.sh: %s\n' "$*" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

step=all
case "${1:-}" in
    vendor | build) step=$1; shift ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
esac
[ $# -le 1 ] || die "usage: offline-build.sh [vendor|build] [DIR]"
vendor_dir=${1:-target/vendor}
profile=${PROFILE:-release}

vendor() {
    log "vendoring every crate of Cargo.lock into $vendor_dir"
    mkdir -p "$(dirname "$vendor_dir")"
    # --locked: the copy is exactly what Cargo.lock names, or nothing.
    cargo vendor --locked --versioned-dirs "$vendor_dir" >/dev/null \
        || die "cargo vendor failed (it needs the crate registry)"
}

build() {
    [ -d "$vendor_dir" ] || die "$vendor_dir: no vendored crates; run 'offline-build.sh vendor' first where the registry is reachable"
    local abs
    abs=$(cd "$vendor_dir" && pwd)
    log "building erel and erel-boot offline from $vendor_dir (profile $profile)"
    cargo build --offline --frozen --profile "$profile" --bin erel --bin erel-boot \
        --config "source.crates-io.replace-with='vendored-sources'" \
        --config "source.vendored-sources.directory='$abs'" \
        || die "the offline build failed"
    local out=${CARGO_TARGET_DIR:-target}
    case $profile in dev) out=$out/debug ;; *) out=$out/$profile ;; esac
    for bin in erel erel-boot; do
        [ -x "$out/$bin" ] || die "$out/$bin was not built"
    done
    echo "$out"
}

case $step in
    vendor) vendor ;;
    build) build ;;
    all) vendor; build ;;
esac
