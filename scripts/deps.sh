#!/bin/sh
# Installs the Debian packages lua-smtp builds and tests with, when they are missing, then checks
# that what the specs need works (a package can be installed without the capability: swaks has TLS
# only with Net::SSLeay, which Debian installs only as a Recommends, and we install without those).
# As root it runs apt-get itself; otherwise it prints the exact command to run.
set -eu
# Build: compiler, make, pkg-config, both interpreters and their headers, OpenSSL, c-ares and
# libidn2 (international domain names).
# Specs: busted; cqueues; Debian's Python (/usr/bin/python3, what the specs run) with aiosmtpd,
# dnspython (scripted DNS answers), dkim (verifies our signatures, signs what we verify), authres
# (parses our Authentication-Results), idna and the idn2 command (IDNA conversions compared),
# icalendar (parses our invitations) and spf (pyspf, the SPF reference); lyaml (lua-yaml: the
# RFC 7208 test suite is YAML); publicsuffix (the Public Suffix List DMARC needs); Postfix (a private MTA, smtp-sink, smtp-source); swaks with Perl TLS
# (libnet-ssleay-perl) and Perl's Net::SMTP; msmtp; curl; dnsmasq; nginx with the Lua module and
# its DNS resolver; openssl (test certificates); luarocks (the rockspec); microsocks (SOCKS5) and
# tinyproxy (HTTP CONNECT; the -bin package: the binary without a system service); Dovecot's LMTP
# server (dovecot-core, dovecot-lmtpd: a private instance the LMTP client delivers to); haproxy
# (sends the PROXY protocol to the server); lua-http and lua-dkjson (the sink's web inbox), headless
# Chromium with chromium-driver and python3-selenium (the inbox in a browser), nodejs (runs Mailpit's
# API client, fetched from the npm registry at test time with npm, which the spec fetches too when
# the system has none; ca-certificates lets curl and npm verify the registry). Fuzzing and the sanitizer
# build: clang with its runtime. valgrind for `make test-valgrind`. DANE's DNSSEC test bed: NSD
# (authoritative), unbound (the validating resolver), ldnsutils (ldns-keygen, ldns-signzone).
PKGS="build-essential make pkg-config lua5.4 liblua5.4-dev luajit2 libluajit2-5.1-dev lua-busted
lua-compat53-dev libssl-dev libc-ares-dev libidn2-dev idn2 luarocks lua-cqueues openssl python3
python3-aiosmtpd python3-dnspython python3-dkim python3-authres python3-idna python3-icalendar python3-spf lua-yaml publicsuffix postfix swaks libnet-ssleay-perl perl msmtp curl dnsmasq-base nginx
libnginx-mod-http-lua lua-nginx-dns clang libclang-rt-14-dev valgrind microsocks tinyproxy-bin
dovecot-core dovecot-lmtpd haproxy nsd unbound ldnsutils lua-http lua-dkjson chromium chromium-driver
python3-selenium nodejs ca-certificates"

# What each capability needs: a shell test, and the package that provides it.
check() {
  failed=""
  sh -c 'swaks --support 2>&1 | grep -q "^=== TLS supported"' 2>/dev/null ||
    failed="$failed swaks-TLS(libnet-ssleay-perl)"
  perl -MNet::SMTP -e 1 2>/dev/null || failed="$failed Net::SMTP(perl)"
  /usr/bin/python3 -c 'import aiosmtpd.controller, dns.message, dkim, nacl.signing, authres, idna, icalendar, spf' 2>/dev/null ||
    failed="$failed python-modules(python3-aiosmtpd,python3-dnspython,python3-dkim,python3-nacl,python3-authres,python3-idna,python3-icalendar,python3-spf)"
  lua5.4 -e 'require "lyaml"' 2>/dev/null || failed="$failed lyaml(lua-yaml)"
  [ -s /usr/share/publicsuffix/public_suffix_list.dat ] || failed="$failed public-suffix-list(publicsuffix)"
  [ -x /usr/sbin/dnsmasq ] || failed="$failed dnsmasq(dnsmasq-base)"
  [ -s /etc/ssl/certs/ca-certificates.crt ] || failed="$failed ca-certificates(ca-certificates)"
  /usr/bin/python3 -c 'import selenium' 2>/dev/null || failed="$failed selenium(python3-selenium)"
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || failed="$failed chromium(chromium,chromium-driver)"
  [ -x /usr/lib/postfix/sbin/master ] && command -v smtp-sink >/dev/null 2>&1 ||
    failed="$failed postfix(postfix)"
  [ -x /usr/sbin/dovecot ] && [ -x /usr/lib/dovecot/lmtp ] || failed="$failed dovecot-lmtp(dovecot-core,dovecot-lmtpd)"
  [ -x /usr/sbin/nsd ] && [ -x /usr/sbin/unbound ] && command -v ldns-signzone >/dev/null 2>&1 ||
    failed="$failed dnssec-bed(nsd,unbound,ldnsutils)"
  ls /usr/share/nginx/modules-available/*http-lua*.conf >/dev/null 2>&1 ||
    failed="$failed nginx-lua(libnginx-mod-http-lua)"
  for c in cc make pkg-config lua5.4 luajit busted openssl curl msmtp nginx luarocks idn2 microsocks tinyproxy haproxy node; do
    command -v "$c" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$c" >/dev/null 2>&1 ||
      failed="$failed $c"
  done
  [ -z "$failed" ]
}

missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "deps: installing$missing"
    # Postfix asks a question on install; smtp-sink and smtp-source need no configuration.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || true
    # Only apt's totals: how many packages, how much to download, how much disk.
    apt-get install -y -q --no-install-recommends $missing > /tmp/lua-smtp-deps.$$ 2>&1 ||
      { cat /tmp/lua-smtp-deps.$$ >&2; rm -f /tmp/lua-smtp-deps.$$; exit 1; }
    grep -E '^(Need to get|After this operation|[0-9]+ upgraded)' /tmp/lua-smtp-deps.$$ | sed 's/^/deps: /'
    rm -f /tmp/lua-smtp-deps.$$
    # The postfix package starts nothing we use; make sure no system instance holds port 25.
    command -v postfix >/dev/null && postfix stop >/dev/null 2>&1 || true
  else
    echo "deps: missing packages; run as root:" >&2
    echo "  apt-get install -y --no-install-recommends$missing" >&2
    exit 1
  fi
fi
if ! check; then
  echo "deps: installed, but not working:$failed" >&2
  exit 1
fi
