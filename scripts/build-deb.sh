#!/usr/bin/env bash
# Builds the Debian package of the boot agent with dpkg-deb and prints the .deb's path as
# its last line.
#
# Usage: scripts/build-deb.sh [AGENT_BINARY]
#   AGENT_BINARY  the erel-boot executable to package (default: the static agent, built
#                 by scripts/build-agent.sh)
#   EREL_DEB_MAINTAINER  the package's Maintainer field
#
# The package holds /usr/sbin/erel-boot, the unit boot/erel-boot.service (its ExecStart
# pointed at /usr/sbin) in /lib/systemd/system, the example boot/boot.toml.example as
# the conffile /etc/erel/boot.toml, and the maintainer scripts of boot/debian/.
set -euo pipefail

cd "$(dirname "$0")/.."
die() { printf 'build-deb: %s\n' "$*" >&2; exit 1; }

agent=${1:-}
if [[ -z "$agent" ]]; then
    agent=$(bash scripts/build-agent.sh | tail -n 1)
fi
[[ -f "$agent" && -x "$agent" ]] || die "$agent is not an executable file"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[[ -n "$version" ]] || die "no version in [workspace.package] of Cargo.toml"
maintainer=${EREL_DEB_MAINTAINER:-erel maintainers <root@localhost>}

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"

install -D -m 0755 "$agent" "$stage/usr/sbin/erel-boot"
# The unit's opening comment tells how to install it by hand; the package did that.
install -d -m 0755 "$stage/lib/systemd/system"
{
    echo "# systemd unit for the erel boot agent, installed by the erel-boot package."
    sed -n '/^\[Unit\]/,$p' boot/erel-boot.service |
        sed 's|^ExecStart=/usr/local/bin/erel-boot |ExecStart=/usr/sbin/erel-boot |'
} >"$stage/lib/systemd/system/erel-boot.service"
chmod 0644 "$stage/lib/systemd/system/erel-boot.service"
grep -q '^ExecStart=/usr/sbin/erel-boot ' "$stage/lib/systemd/system/erel-boot.service" ||
    die "boot/erel-boot.service has no ExecStart=/usr/local/bin/erel-boot line to point at /usr/sbin"
install -D -m 0644 boot/boot.toml.example "$stage/etc/erel/boot.toml"

install -d -m 0755 "$stage/DEBIAN"
installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" boot/debian/control >"$stage/DEBIAN/control"
install -m 0644 boot/debian/conffiles "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "boot/debian/$script" "$stage/DEBIAN/$script"
done

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
out_dir="$target_dir/debian"
mkdir -p "$out_dir"
deb="$out_dir/erel-boot_${version}_amd64.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >&2
echo "$deb"
