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

# The test binaries other than the end-to-end one (`tests/tests/e2e`): Cargo's own rule
# for the targets of a package's `tests/` directory (no `[[test]]` overrides them here).
other_integration_tests() {
    local file name
    for file in tests/tests/*.rs tests/tests/*/main.rs; do
        [ -e "$file" ] || continue
        name=${file#tests/tests/}
        name=${name%.rs}
        name=${name%/main}
        [ "$name" = e2e ] || printf -- '--test\n%s\n' "$name"
    done
}

# Runs "$@" with every line it prints prefixed by `[$1] `, so that two runs at the same
# time stay readable; returns the command's exit status (`pipefail`: sed's only if it
# alone failed).
prefixed() {
    local tag=$1
    shift
    local status=0
    "$@" 2>&1 | sed -u "s/^/[$tag] /" || status=$?
    return "$status"
}

# Everything but the end-to-end binary: the static agent first (the kit and static agent
# tests of the end-to-end binary use it; built here it is ready when they come, instead of
# being built while they wait), the other packages' tests (unit, integration, doc), then
# erel-tests' other test binaries and its own unit and doc tests (its `src/bin` programs have
# none: `test = false`).
rest_of_the_workspace() {
    local others
    mapfile -t others < <(other_integration_tests)
    local failed=0
    scripts/build-agent.sh >/dev/null || failed=1
    cargo test --workspace --exclude erel-tests --no-fail-fast || failed=1
    cargo test -p erel-tests --no-fail-fast --lib "${others[@]}" || failed=1
    cargo test -p erel-tests --no-fail-fast --doc || failed=1
    return "$failed"
}

log "cargo test --no-run: build every test target first"
cargo test --workspace --no-run

# The end-to-end binary spends most of its time waiting on agents, releases and the
# broker, so the rest of the workspace runs beside it rather than before and after it.
# The two share nothing by name: ports, broker prefixes, namespaces and mounts are
# reserved or named per process, and the broker restart holds the broker lock alone.
log "cargo test: the end-to-end binary [e2e] and the rest of the workspace [rest], at once"
prefixed e2e cargo test -p erel-tests --test e2e --no-fail-fast &
e2e_pid=$!
prefixed rest rest_of_the_workspace &
rest_pid=$!
e2e_status=0
rest_status=0
wait "$e2e_pid" || e2e_status=$?
wait "$rest_pid" || rest_status=$?
[ "$e2e_status" -eq 0 ] || log "the end-to-end tests failed (exit status $e2e_status): see the [e2e] lines"
[ "$rest_status" -eq 0 ] || log "tests of the rest of the workspace failed: see the [rest] lines"
[ "$e2e_status" -eq 0 ] && [ "$rest_status" -eq 0 ] || die "tests failed"
log "all tests passed"
