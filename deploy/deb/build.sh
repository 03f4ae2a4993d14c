#!/usr/bin/env bash
# Builds the Debian package im-server_<version>_<arch>.deb from already built binaries:
#
#   deploy/deb/build.sh [OUT_DIR]        (BIN_DIR: where im-server and im-cli are; default
#                                         target/release; DEB_COMPRESSION: xz (default) or none)
#
# Contents: /usr/bin/im-server and im-cli; the systemd units (im-server, im-gate, im-logic; not
# enabled or started: the single node is started by postinst when systemd runs); the sample
# configurations as conffiles in /etc/im/; the kernel settings in /usr/lib/sysctl.d/ (applied at
# the next boot or by `sysctl --system`, not at install); the pam limits for the `im` user.
# postinst creates the system user `im`, /var/lib/im, and /etc/im/im-server.env with a random
# IM_TOKEN_SECRET (mode 0600) unless they exist. `dpkg --purge` removes them again.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath "${1:-target/deb}")
bin=${BIN_DIR:-target/release}
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
for b in im-server im-cli; do
  [ -x "$bin/$b" ] || { echo "build.sh: no $bin/$b (cargo build --release -p im-server -p im-cli)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/im-server_${version}_${arch}"

# Debug info stays out of the package (the release profile keeps line tables for profiling;
# ~130 MB of the 145 MB): `strip --strip-debug`, as Debian's dh_strip does.
for b in im-server im-cli; do
  install -D -m 0755 "$bin/$b" "$root/usr/bin/$b"
  strip --strip-debug "$root/usr/bin/$b"
done
for u in deploy/systemd/*.service; do
  install -d "$root/lib/systemd/system"
  sed 's#/usr/local/bin/#/usr/bin/#g' "$u" > "$root/lib/systemd/system/$(basename "$u")"
  chmod 0644 "$root/lib/systemd/system/$(basename "$u")"
done
for c in im-server.toml im-gate.toml im-logic.toml; do
  install -D -m 0644 "deploy/$c" "$root/etc/im/$c"
done
install -D -m 0644 deploy/sysctl.d/90-im-gate.conf "$root/usr/lib/sysctl.d/90-im-gate.conf"
install -D -m 0644 deploy/limits.d/90-im.conf "$root/etc/security/limits.d/90-im.conf"
install -D -m 0644 LICENSE "$root/usr/share/doc/im-server/copyright"
install -D -m 0644 deploy/README.md "$root/usr/share/doc/im-server/README.deploy.md"

install -d "$root/DEBIAN"
size=$(du -sk "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: im-server
Version: $version
Architecture: $arch
Maintainer: im developers <im@example.invalid>
Installed-Size: $size
Depends: libc6, passwd
Section: net
Priority: optional
Homepage: https://example.invalid/im
Description: mobile instant-messaging backend (gate, logic, embedded store)
 Long-lived client connections on a thread-per-core io_uring gate, a sharded
 logic tier with per-user timelines and an embedded LSM store; or, for a
 cluster, gate and logic processes with ScyllaDB and Redis Cluster.
CONTROL
( cd "$root" && find etc -type f -name '*.toml' -printf '/%p\n'; echo /etc/security/limits.d/90-im.conf ) \
  > "$root/DEBIAN/conffiles"

cat > "$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd im >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/im --no-create-home \
            --shell /usr/sbin/nologin im
  fi
  install -d -o im -g im -m 0750 /var/lib/im
  if [ ! -e /etc/im/im-server.env ]; then
    ( umask 077
      printf 'IM_TOKEN_SECRET=%s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" \
        > /etc/im/im-server.env )
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable im-server.service >/dev/null
    systemctl restart im-server.service
  fi
fi
exit 0
SCRIPT
cat > "$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop im-server.service im-gate.service im-logic.service >/dev/null 2>&1 || true
  [ "$1" = remove ] && systemctl disable im-server.service >/dev/null 2>&1 || true
fi
exit 0
SCRIPT
cat > "$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  rm -rf /var/lib/im
  rm -f /etc/im/im-server.env
  rmdir /etc/im 2>/dev/null || true
  # A process of im still running (started by hand) keeps the user: say so, do not fail.
  if getent passwd im >/dev/null; then userdel im || echo "im-server: user im kept (in use)" >&2; fi
  if getent group im >/dev/null; then groupdel im 2>/dev/null || true; fi
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESSION:-xz}" --build "$root" "$out/" >/dev/null
echo "$out/im-server_${version}_${arch}.deb"
