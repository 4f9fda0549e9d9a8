#!/usr/bin/env bash
# Fuzzes the agent with cargo-fuzz (libFuzzer, AddressSanitizer) for a bounded time per
# target, and fails if any target finds a crash, a hang or a leak.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET..]
#
# SECONDS_PER_TARGET defaults to 60; the targets default to all of them (frame, request,
# unpack; see fuzz/fuzz_targets/). Targets run one after another. The request and
# unpack targets need root: they mount a private noexec tmpfs so that no fuzzed program
# can run. New inputs go to fuzz/corpus/<target>/ (not committed), the committed seeds
# are read from fuzz/seeds/<target>/, and a crashing input is saved under
# fuzz/artifacts/<target>/. The stable toolchain is used with RUSTC_BOOTSTRAP=1 for the
# sanitizer flags cargo-fuzz passes. Prints, per target, how long it ran and how many
# inputs it tried (libFuzzer's "Done N runs" line).
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'fuzz.sh: %s\n' "$*" >&2; exit 1; }

seconds=${1:-60}
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "SECONDS_PER_TARGET must be a positive integer, got '$seconds'"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame request unpack)
for target in "${targets[@]}"; do
    [ -f "fuzz/fuzz_targets/$target.rs" ] || die "no fuzz target '$target' (fuzz/fuzz_targets/)"
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz || die "cargo install cargo-fuzz failed"
fi

export RUSTC_BOOTSTRAP=1
log "building the fuzz targets"
cargo fuzz build || die "the fuzz targets do not build"

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
summary=()
failed=0
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log "fuzzing $target for ${seconds}s"
    started=$(date +%s)
    status=0
    # -timeout: one input taking this long is a hang, reported as a failure.
    cargo fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=30 -print_final_stats=1 \
        >"$logs/$target.log" 2>&1 || status=$?
    ran=$(( $(date +%s) - started ))
    runs=$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$logs/$target.log" | tail -n 1)
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$target.log" | tail -n 1 || true)
    if [ "$status" -ne 0 ] || [ -z "$runs" ]; then
        failed=1
        tail -n 60 "$logs/$target.log" >&2
        summary+=("$target: FAILED after ${ran}s (exit $status); see fuzz/artifacts/$target/")
    else
        summary+=("$target: ran ${ran}s, tried $runs inputs, no crash | $stats")
    fi
done

printf '%s\n' "${summary[@]}"
[ "$failed" -eq 0 ] || die "a fuzz target failed"
