#!/usr/bin/env bash
# Installs the Debian package, runs the server it installed as the `im` user with the installed
# configuration, checks its health and a client login, then removes and purges the package and
# checks that nothing is left (issue 19). Root only; changes this machine (a user, /etc/im,
# /var/lib/im) and undoes it.
#
#   deploy/deb/test.sh PACKAGE.deb
set -euo pipefail
deb=$(realpath "$1")
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root" >&2; exit 1; }
if dpkg -s im-server >/dev/null 2>&1; then
  echo "test.sh: im-server is installed here already; not touching it" >&2
  exit 1
fi
fail() { echo "deb test: FAILED: $*" >&2; exit 1; }
pid=""
# The server's output and the client's state directory.
work=$(mktemp -d /tmp/im-deb-test.XXXXXX)
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  dpkg --purge im-server >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

dpkg --install "$deb" >/dev/null
getent passwd im >/dev/null || fail "no user im"
[ "$(stat -c %U:%a /var/lib/im)" = "im:750" ] || fail "/var/lib/im is $(stat -c %U:%a /var/lib/im)"
[ "$(stat -c %U:%a /etc/im/im-server.env)" = "root:600" ] || fail "im-server.env is not root 0600"
grep -Eq '^IM_TOKEN_SECRET=[0-9a-f]{64}$' /etc/im/im-server.env || fail "no random token secret"
for f in /usr/bin/im-server /usr/bin/im-cli /lib/systemd/system/im-server.service \
         /etc/im/im-server.toml /usr/lib/sysctl.d/90-im-gate.conf; do
  [ -e "$f" ] || fail "$f missing"
done
grep -q '^ExecStart=/usr/bin/im-server run --config /etc/im/im-server.toml' \
  /lib/systemd/system/im-server.service || fail "the unit does not run /usr/bin/im-server"
as_im() { ( cd /var/lib/im && exec setpriv --reuid=im --regid=im --init-groups "$@" ); }
as_im /usr/bin/im-server check-config --config /etc/im/im-server.toml \
  --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 >/dev/null || fail "check-config as im"

# Start it as the unit would (systemd is not required here): user im, /var/lib/im, the secret.
out=$work/server.log
set -a; . /etc/im/im-server.env; set +a
( cd /var/lib/im && exec setpriv --reuid=im --regid=im --init-groups \
    /usr/bin/im-server run --config /etc/im/im-server.toml \
    --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 ) >"$out" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  grep -q '^api on ' "$out" && break
  kill -0 "$pid" 2>/dev/null || fail "the server exited: $(cat "$out")"
  sleep 0.1
done
api=$(sed -n 's/^api on //p' "$out" | head -1)
gate=$(sed -n 's/^listening on //p' "$out" | head -1)
[ -n "$api" ] && [ -n "$gate" ] || fail "no listen lines: $(cat "$out")"
health=$(exec 3<>"/dev/tcp/${api%:*}/${api##*:}"; printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3; cat <&3)
echo "$health" | grep -q '"status":"ok"' || fail "healthz: $health"
[ "$(stat -c %U /var/lib/im/data)" = im ] || fail "the data directory is not im's"
# A client logs in with a token of the installed secret and sends a message.
printf '@2 hello from the package\n' | timeout 20 /usr/bin/im-cli --server "$gate" --uid 1 \
  --state-dir "$work/cli" --secret "$IM_TOKEN_SECRET" | grep -q '✓ sent' || fail "im-cli could not send"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

dpkg --remove im-server >/dev/null
[ ! -e /usr/bin/im-server ] || fail "the binary is left after remove"
[ -e /etc/im/im-server.toml ] || fail "remove must keep the configuration"
dpkg --purge im-server >/dev/null
for f in /etc/im /var/lib/im; do [ ! -e "$f" ] || fail "$f is left after purge"; done
! getent passwd im >/dev/null || fail "user im is left after purge"
trap - EXIT
rm -rf "$work"
echo "deb test: installed, ran (healthz ok, a client sent), removed and purged: ok"
