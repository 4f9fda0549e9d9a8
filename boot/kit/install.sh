#!/bin/sh
# Installs the erel boot agent from this kit (written by `erel certs host ID --kit FILE`).
#
#   install.sh [--prefix DIR]
#
# Puts, under DIR (default /):
#   usr/local/bin/erel-boot                the agent (replaced only when it differs)
#   etc/erel/boot.toml                     its configuration (never overwritten)
#   etc/erel/certs/                        the host's bundle, 0700 (never overwritten;
#                                          host.key 0600)
#   var/lib/erel/                          the agent's root, 0755 (searchable by the
#                                          users releases run as)
#   etc/systemd/system/erel-boot.service   the unit (replaced only when it differs)
# The agent goes under /usr/local, where a binary installed by hand belongs (the
# Debian package, managed by dpkg, puts its own in /usr/sbin); the unit's ExecStart
# names it. A host with the package installed is refused: upgrade the package instead.
# With DIR other than /, the configuration's paths and the unit's ExecStart point inside
# DIR too. Run as root, every file and directory it creates is owned by root. Each file
# is written to a temporary name beside it, fsynced and renamed: a power cut or a
# signal leaves the old file or the new one, never a part. With DIR / and systemd
# running, it reloads systemd when the unit changed, enables and starts the unit until
# one run has done so (a unit the administrator disabled stays disabled), and restarts a
# running agent whose binary or unit changed. A second run changes nothing. The last
# line it prints is the command that starts the agent it installed.
set -eu

UNIT_NAME=erel-boot.service

fail() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

say() {
    printf '%s\n' "$*"
}

PREFIX=/
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix)
        [ $# -ge 2 ] || fail "--prefix needs a directory (usage: install.sh [--prefix DIR])"
        PREFIX=$2
        shift 2
        ;;
    --prefix=*)
        PREFIX=${1#--prefix=}
        shift
        ;;
    -h | --help)
        sed -n '2,25s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *)
        fail "unknown argument '$1' (usage: install.sh [--prefix DIR])"
        ;;
    esac
done

# The paths go into boot.toml, the unit's ExecStart and a sed expression: only characters
# that need no quoting in any of them.
safe_path() {
    case "$1" in
    '' | *[!A-Za-z0-9._/+-]*) return 1 ;;
    *) return 0 ;;
    esac
}
safe_path "$PREFIX" || fail "--prefix '$PREFIX': use only letters, digits and . _ / + -"

if [ "$(id -u)" -eq 0 ]; then
    AS_ROOT=yes
else
    AS_ROOT=no
fi

KIT=$(cd -P "$(dirname "$0")" && pwd -P)
for file in erel-boot boot.toml "$UNIT_NAME" certs/ca.pem certs/host.pem certs/host.key certs/crl.pem; do
    [ -f "$KIT/$file" ] || fail "$KIT/$file is missing: unpack the whole kit and run its install.sh"
done

mkdir -p "$PREFIX"
PREFIX=$(cd -P "$PREFIX" && pwd -P)
safe_path "$PREFIX" || fail "--prefix resolves to '$PREFIX': use only letters, digits and . _ / + -"
[ "$PREFIX" != / ] || PREFIX=
# Checked on the resolved prefix: `--prefix /.` is / too.
[ "$AS_ROOT" = yes ] || [ -n "$PREFIX" ] || fail "installing to / needs root (or give --prefix DIR)"

BIN=$PREFIX/usr/local/bin/erel-boot
ETC=$PREFIX/etc/erel
CONF=$ETC/boot.toml
CERTS=$ETC/certs
ROOT=$PREFIX/var/lib/erel
UNIT=$PREFIX/etc/systemd/system/$UNIT_NAME

# Two agents for one host would fight over its root, and this unit, in /etc, would hide
# the package's.
PACKAGED=$PREFIX/usr/sbin/erel-boot
[ ! -e "$PACKAGED" ] ||
    fail "$PACKAGED is there: the erel-boot Debian package is installed; upgrade it with dpkg, or remove it before installing this kit"

own() {
    [ "$AS_ROOT" = no ] || chown 0:0 "$1"
}

# make_dir DIR MODE: creates DIR with MODE, owned by root, unless it exists.
make_dir() {
    if [ -d "$1" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$1")"
    mkdir -m "$2" "$1"
    own "$1"
    say "created $1 (mode $2)"
}

# put SRC DEST MODE: writes DEST from SRC through a temporary file beside it, fsynced and
# renamed over DEST once complete, then fsyncs the directory (a running agent keeps its
# old binary; a power cut leaves the old DEST or the new one).
put() {
    PENDING="$2.install-tmp.$$"
    (umask 077 && cp "$1" "$PENDING")
    chmod "$3" "$PENDING"
    own "$PENDING"
    sync "$PENDING"
    mv -f "$PENDING" "$2"
    PENDING=
    sync "$(dirname "$2")"
    say "installed $2"
}

# put_new SRC DEST MODE: installs DEST unless it exists (configuration and keys are never
# overwritten).
put_new() {
    if [ -e "$2" ] || [ -L "$2" ]; then
        if [ -f "$2" ] && ! cmp -s "$1" "$2"; then
            say "kept existing $2 (the kit's differs: remove it first to install the kit's)"
        else
            say "kept existing $2"
        fi
    else
        put "$1" "$2" "$3"
    fi
}

# differs SRC DEST: true when DEST is not a copy of SRC (says so when it is).
differs() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "unchanged $2"
        return 1
    fi
}

# Removes the staging directory and a temporary file not yet renamed, on exit and on
# INT, TERM and HUP (dash runs no EXIT trap on a signal), then dies of the same signal.
PENDING=
STAGING=
cleanup() {
    [ -z "$PENDING" ] || rm -f "$PENDING"
    [ -z "$STAGING" ] || rm -rf "$STAGING"
}
trap cleanup EXIT
for signal in INT TERM HUP; do
    # shellcheck disable=SC2064 # the signal's name is meant to be expanded now
    trap "cleanup; trap - $signal EXIT; kill -$signal \$\$" "$signal"
done
STAGING=$(mktemp -d "${TMPDIR:-/tmp}/erel-kit.XXXXXX")

make_dir "$PREFIX/usr/local/bin" 0755
make_dir "$ETC" 0755
make_dir "$CERTS" 0700
make_dir "$ROOT" 0755
make_dir "$PREFIX/etc/systemd/system" 0755

changed=no
if differs "$KIT/erel-boot" "$BIN"; then
    put "$KIT/erel-boot" "$BIN" 0755
    changed=yes
fi

sed -e "s|^root = \"/var/lib/erel\"$|root = \"$ROOT\"|" \
    -e "s|^certs = \"/etc/erel/certs\"$|certs = \"$CERTS\"|" \
    "$KIT/boot.toml" >"$STAGING/boot.toml"
grep -q "^root = \"$ROOT\"$" "$STAGING/boot.toml" ||
    fail "$KIT/boot.toml has no line 'root = \"/var/lib/erel\"' to point at $ROOT"
grep -q "^certs = \"$CERTS\"$" "$STAGING/boot.toml" ||
    fail "$KIT/boot.toml has no line 'certs = \"/etc/erel/certs\"' to point at $CERTS"
put_new "$STAGING/boot.toml" "$CONF" 0644

for name in ca.pem host.pem crl.pem; do
    put_new "$KIT/certs/$name" "$CERTS/$name" 0644
done
put_new "$KIT/certs/host.key" "$CERTS/host.key" 0600

sed -e "s|^ExecStart=/usr/local/bin/erel-boot --config /etc/erel/boot.toml$|ExecStart=$BIN --config $CONF|" \
    "$KIT/$UNIT_NAME" >"$STAGING/$UNIT_NAME"
grep -q "^ExecStart=$BIN --config $CONF$" "$STAGING/$UNIT_NAME" ||
    fail "$KIT/$UNIT_NAME has no ExecStart line to point at $BIN"
# The unit is enabled by the install that installs it, and by no later one: a mark,
# written once `systemctl enable --now` succeeded (like deb-systemd-helper's state under
# /var/lib/systemd), tells a finished first install from one cut off before it enabled
# the unit, which a rerun completes.
ENABLED_MARK=$PREFIX/var/lib/erel-kit/unit-enabled
first=no
[ -e "$ENABLED_MARK" ] || first=yes
unit_changed=no
if differs "$STAGING/$UNIT_NAME" "$UNIT"; then
    put "$STAGING/$UNIT_NAME" "$UNIT" 0644
    changed=yes
    unit_changed=yes
fi

if [ -n "$PREFIX" ]; then
    say "systemd: not enabling $UNIT_NAME (installed under --prefix $PREFIX)"
elif [ ! -d /run/systemd/system ]; then
    say "systemd: not running here; start the agent with the command below"
else
    [ "$unit_changed" = no ] || systemctl daemon-reload
    if [ "$first" = yes ]; then
        systemctl enable --now "$UNIT_NAME"
        make_dir "$(dirname "$ENABLED_MARK")" 0755
        printf '%s\n' "$UNIT_NAME" >"$STAGING/unit-enabled"
        put "$STAGING/unit-enabled" "$ENABLED_MARK" 0644
        say "systemd: $UNIT_NAME enabled and started"
    elif [ "$changed" = yes ] && systemctl is-active --quiet "$UNIT_NAME"; then
        systemctl restart "$UNIT_NAME"
        say "systemd: restarted $UNIT_NAME (its binary or unit changed; releases keep running)"
    else
        # Enabled by the first install; what the administrator changed since stays.
        say "systemd: $UNIT_NAME left enabled or disabled, running or not, as it was"
    fi
fi

say "$BIN --config $CONF"
