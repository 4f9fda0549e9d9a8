#!/usr/bin/env bash
# Runs every check erel has: formatting, lints, and the whole test suite against a real
# RabbitMQ and real Erlang/OTP tools. Installs and starts what the tests need when it is
# missing, and fails loudly when it cannot.
set -euo pipefail

cd "$(dirname "$0")/.."

. scripts/lib.sh

ensure_rabbitmq() {
    if port_open 127.0.0.1 5672; then
        return
    fi
    if ! command -v rabbitmq-server >/dev/null && [ ! -x /usr/sbin/rabbitmq-server ]; then
        apt_install rabbitmq-server
    fi
    log "starting RabbitMQ"
    as_root env PATH="/usr/sbin:$PATH" rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 90); do
        if port_open 127.0.0.1 5672; then
            log "RabbitMQ is up on 127.0.0.1:5672"
            return
        fi
        sleep 1
    done
    die "RabbitMQ did not come up on 127.0.0.1:5672 within 90 s"
}

ensure_erlang_tools() {
    command -v erl >/dev/null || apt_install erlang-base erlang-dev
    command -v rebar3 >/dev/null || apt_install rebar3
    command -v rebar3 >/dev/null || die "rebar3 is still missing after installing it"
}

ensure_tools() {
    command -v openssl >/dev/null || apt_install openssl
    # The differential unpack tests compare the agent with GNU tar.
    tar --version 2>/dev/null | grep -q 'GNU tar' || apt_install tar
    command -v cargo >/dev/null || die "cargo is not on PATH"
    # The static agent's tests: file(1), and a C compiler with a static libc for a
    # release program that runs in a chroot holding nothing else.
    command -v file >/dev/null || apt_install file
    # The network fault tests put each agent in a network namespace of its own.
    command -v ip >/dev/null && command -v tc >/dev/null || apt_install iproute2
    [ -f /usr/lib/x86_64-linux-gnu/libc.a ] && command -v cc >/dev/null || apt_install gcc libc6-dev
    # The clock-skew tests run agents with a clock of their own (a preloaded libfaketime).
    [ -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || apt_install faketime
}

ensure_tools
ensure_erlang_tools
ensure_rabbitmq

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test"
cargo test --workspace --no-fail-fast
