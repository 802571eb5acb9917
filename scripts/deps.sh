#!/bin/sh
# Installs the Debian packages lua-smtp builds and tests with, when they are missing.
# As root it runs apt-get itself; otherwise it prints the exact command to run.
set -eu
PKGS="build-essential pkg-config lua5.4 liblua5.4-dev luajit2 libluajit2-5.1-dev lua-busted
lua-compat53-dev libssl-dev libc-ares-dev luarocks lua-cqueues openssl python3 python3-aiosmtpd
postfix swaks msmtp curl dnsmasq-base nginx libnginx-mod-http-lua lua-nginx-dns python3-dkim
clang libclang-rt-14-dev valgrind"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "deps: installing$missing"
  # Postfix asks a question on install; smtp-sink and smtp-source need no configuration.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || true
  apt-get install -y -q --no-install-recommends $missing >/dev/null
  # The postfix package starts nothing we use; make sure no system instance holds port 25.
  command -v postfix >/dev/null && postfix stop >/dev/null 2>&1 || true
else
  echo "deps: missing packages; run as root:" >&2
  echo "  apt-get install -y$missing" >&2
  exit 1
fi
