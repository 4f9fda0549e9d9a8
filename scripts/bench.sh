#!/usr/bin/env bash
# The side-by-side benchmark suite (see BENCHMARKS.md): erel beside scp, ssh + tar and
# openssl, in the same run on the same machine, with ratios.
#
#   scripts/bench.sh [--quick]
#
# Installs what it needs when missing (OpenSSH's server and client, hyperfine, Erlang/OTP
# for the archive), builds the release archive once into a cache directory
# ($XDG_CACHE_HOME/erel-bench, else ~/.cache/erel-bench), starts a throw-away sshd on a
# free loopback port with keys generated in a temporary directory (nothing global is
# changed; everything is removed on exit, signals included), builds the static agent
# for the footprint section (scripts/build-agent.sh) and runs the Rust suite
# (tests/benches/suite.rs) with the bench profile. --quick runs 3 times on small inputs,
# to check that the whole chain works; its figures mean nothing.
#
# The config section uses the RabbitMQ at 127.0.0.1:5672 (guest/guest; or
# $EREL_BENCH_AMQP) under names of its own, which it deletes, and starts and stops a
# three-node RabbitMQ cluster of its own when rabbitmq-server is installed.
set -euo pipefail

cd "$(dirname "$0")/.."

. scripts/lib.sh

quick=0
[ "$#" -le 1 ] || die "too many arguments: $* (usage: scripts/bench.sh [--quick])"
case "${1:-}" in
    --quick) quick=1 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: scripts/bench.sh [--quick])" ;;
esac

ensure_tools() {
    command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || apt_install openssh-server
    command -v ssh >/dev/null && command -v scp >/dev/null || apt_install openssh-client
    command -v hyperfine >/dev/null || apt_install hyperfine
    command -v openssl >/dev/null || apt_install openssl
    tar --version 2>/dev/null | grep -q 'GNU tar' || apt_install tar
    # The push + unpack input: Debian's whole Erlang/OTP (the `erlang` package, which
    # rebar3 brings too, as scripts/test.sh installs it): 3,872 entries, 102 MB, 48.4 MB
    # gzipped, the ~100 MB the benchmark asks for. OTP packages installed besides it
    # would add to the archive; its name in the cache counts the installation's entries.
    if command -v dpkg >/dev/null; then
        dpkg -s erlang >/dev/null 2>&1 || apt_install erlang
    fi
    [ -d /usr/lib/erlang/lib ] || die "no Erlang/OTP installation in /usr/lib/erlang"
    command -v cargo >/dev/null || die "cargo is not on PATH"
}

work=""
sshd_pid=""
made_run_sshd=0
cleanup() {
    if [ -n "$sshd_pid" ]; then kill "$sshd_pid" 2>/dev/null || true; wait "$sshd_pid" 2>/dev/null || true; fi
    if [ "$made_run_sshd" -eq 1 ]; then as_root rmdir /run/sshd 2>/dev/null || true; fi
    if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The release archive: an Erlang/OTP installation, without the symlinks that point
# outside it (an archive of a release carries its own files). Built once per OTP version
# and number of entries (installing more of OTP makes a new one).
archive() {
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/erel-bench"
    local otp="/usr/lib/erlang"
    local version
    version=$(cat "$otp"/releases/*/OTP_VERSION 2>/dev/null | head -n 1 || echo unknown)
    local entries
    entries=$(find "$otp" | wc -l)
    local name="otp-$version-$entries" what=("erlang")
    if [ "$quick" -eq 1 ]; then
        name="otp-$version-stdlib"
        what=("erlang/lib/$(basename "$(ls -d "$otp"/lib/stdlib-* | head -n 1)")")
    fi
    local out="$cache/$name.tar.gz"
    if [ ! -s "$out" ]; then
        mkdir -p "$cache"
        log "building $out from $otp"
        local outside="$work/outside-links"
        : >"$outside"
        while IFS= read -r -d '' link; do
            case "$(readlink -m "$link")" in
                "$otp"/*) ;;
                *) printf '%s\n' "erlang/${link#"$otp"/}" >>"$outside" ;;
            esac
        done < <(find "$otp" -type l -print0)
        tar -C "$(dirname "$otp")" --exclude-from="$outside" -czf "$out.tmp" "${what[@]}"
        mv "$out.tmp" "$out"
    fi
    printf '%s\n' "$out"
}

# A throw-away sshd on a free loopback port, for the current user, with fresh keys.
start_sshd() {
    local sshd
    sshd=$(command -v sshd || echo /usr/sbin/sshd)
    local dir="$work/ssh"
    mkdir -m 700 "$dir"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$dir/client_key"
    cp "$dir/client_key.pub" "$dir/authorized_keys"
    # sshd checks for its privilege separation directory even when it does not use it.
    if [ ! -d /run/sshd ]; then as_root mkdir -m 755 /run/sshd; made_run_sshd=1; fi
    local port attempt
    for attempt in $(seq 1 20); do
        port=$((20000 + RANDOM % 40000))
        port_open 127.0.0.1 "$port" && continue
        cat >"$dir/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile none
Subsystem sftp internal-sftp
# The fan-out peer opens one scp per host at once: room for all of them (the default,
# 10:30:100, drops new connections beyond ten unauthenticated ones).
MaxStartups 100
CONF
        "$sshd" -D -e -f "$dir/sshd_config" 2>>"$dir/sshd.log" &
        sshd_pid=$!
        for _ in $(seq 1 100); do
            if port_open 127.0.0.1 "$port"; then break; fi
            kill -0 "$sshd_pid" 2>/dev/null || break
            sleep 0.1
        done
        if port_open 127.0.0.1 "$port"; then
            cat >"$dir/ssh_config" <<CONF
Host bench
    HostName 127.0.0.1
    Port $port
    User $(id -un)
    IdentityFile $dir/client_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
CONF
            ssh -F "$dir/ssh_config" bench true || die "ssh to the loopback sshd failed: $(cat "$dir/sshd.log")"
            log "sshd on 127.0.0.1:$port (attempt $attempt)"
            export EREL_BENCH_SSH_CONFIG="$dir/ssh_config"
            return
        fi
        kill "$sshd_pid" 2>/dev/null || true
        wait "$sshd_pid" 2>/dev/null || true
        sshd_pid=""
    done
    die "could not start sshd on a loopback port: $(cat "$dir/sshd.log")"
}

ensure_tools
work=$(mktemp -d "${TMPDIR:-/tmp}/erel-bench.XXXXXX")
EREL_BENCH_ARCHIVE=$(archive)
export EREL_BENCH_ARCHIVE
# The footprint section measures the static agent too (its size, its idle memory), and
# the rollout section's agents are static agents: the agent a blank host receives. Built
# once (cargo keeps it), when one of those sections runs.
case ",${EREL_BENCH_ONLY:-footprint}," in
    *,footprint,* | *,rollout,*)
        [ -f /usr/lib/x86_64-linux-gnu/libc.a ] && command -v cc >/dev/null || apt_install gcc libc6-dev
        log "building the static agent (scripts/build-agent.sh)"
        scripts/build-agent.sh >/dev/null
        ;;
esac
start_sshd
if [ "$quick" -eq 1 ]; then
    export EREL_BENCH_RUNS="${EREL_BENCH_RUNS:-3}" EREL_BENCH_SIZES="${EREL_BENCH_SIZES:-8}"
    export EREL_BENCH_FANOUT_HOSTS="${EREL_BENCH_FANOUT_HOSTS:-1,2}" EREL_BENCH_FANOUT_MB="${EREL_BENCH_FANOUT_MB:-4}"
    # Configs: a short log and few publishes, and no three-node cluster (booting its
    # nodes takes about a minute).
    export EREL_BENCH_CONFIG_LOG="${EREL_BENCH_CONFIG_LOG:-1000}" \
        EREL_BENCH_CONFIG_PUBLISHES="${EREL_BENCH_CONFIG_PUBLISHES:-10}" \
        EREL_BENCH_CONFIG_PARTS="${EREL_BENCH_CONFIG_PARTS:-broker,catch-up}"
    # Rolling deploys: a few agents instead of 25 to 1,000.
    export EREL_BENCH_ROLLING="${EREL_BENCH_ROLLING:-3}" EREL_BENCH_FLEET="${EREL_BENCH_FLEET:-5}"
fi
log "archive: $EREL_BENCH_ARCHIVE ($(du -h "$EREL_BENCH_ARCHIVE" | cut -f1))"
# The suite's own scratch files (the pushed files, the agent's root) go to $work too.
TMPDIR="$work" cargo bench -p erel-tests --bench suite
