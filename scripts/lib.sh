# Shell helpers the scripts share: messages, root, installing Debian packages, ports.
# Sourced; the caller sets `set -euo pipefail` and defines nothing of these names.

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"
    fi
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null || die "cannot install $*: no apt-get on this machine"
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
