#!/bin/sh
# `make test-fresh`: proves `make test` passes on a machine that has nothing installed yet. Builds a
# minimal Debian 12 root (mmdebstrap --variant=apt, what a CI container starts from), copies the
# checkout in as git tracks it, and runs scripts/deps.sh and `make test` inside it; deps.sh does
# every install. Prints run-specs.sh's summary line and exits non-zero on any failure.
# As root: mmdebstrap --mode=root, mount and chroot need it. The package sources are this machine's.
# FRESH_KEEP=1 keeps the root (unmounted) for a look afterwards; FRESH_TARGET=test-asan runs that.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
if [ "$(id -u)" != 0 ]; then
  echo "test-fresh: needs root (mmdebstrap --mode=root, mount, chroot)" >&2
  exit 1
fi
target=${FRESH_TARGET:-test}
start=$(date +%s)

# Our own sources, in whichever form this machine keeps them.
sources=""
for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
  if [ -s "$f" ]; then sources=$f; break; fi
done
[ -n "$sources" ] || { echo "test-fresh: no apt sources found in /etc/apt" >&2; exit 1; }

if ! command -v mmdebstrap >/dev/null 2>&1; then
  echo "test-fresh: installing mmdebstrap"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/lua-smtp-fresh.XXXXXX)
mounted=""

# Stops whatever was started inside the root (found by its root directory, stopped by PID), then
# unmounts in reverse order, so that nothing outlives the run. Runs on every exit.
cleanup() {
  rc=$?
  set +e
  for sig in TERM KILL; do
    found=""
    for d in /proc/[0-9]*; do
      r=$(readlink "$d/root" 2>/dev/null) || continue
      case "$r" in "$root"|"$root"/*) kill -s "$sig" "${d#/proc/}" 2>/dev/null; found=1 ;; esac
    done
    [ -n "$found" ] && sleep 1
  done
  for m in $mounted; do
    umount -R "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  if grep -q " $root" /proc/self/mounts; then
    echo "test-fresh: mounts left under $root:" >&2; grep " $root" /proc/self/mounts >&2; rc=1
  elif [ "${FRESH_KEEP:-}" = 1 ]; then
    echo "test-fresh: root kept in $root"
  else
    rm -rf "$root"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

echo "test-fresh: building a minimal Debian 12 root in $root"
# mmdebstrap wants the directory empty or absent.
rmdir "$root"
mmdebstrap --quiet --variant=apt --mode=root bookworm "$root" "$sources"
cp /etc/hosts "$root/etc/hosts"
# The certificate authorities this machine adds to Debian's (a network that inspects TLS has its
# own): the root trusts what this machine trusts once ca-certificates is installed, as it uses
# this machine's package sources.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
# Daemons a package would start on install (nginx, postfix) would run in this machine's network
# namespace, outside any spec's control: a container has no init to start them either.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
echo "test-fresh: root ready after $(( $(date +%s) - start )) s"

# The files git tracks, as they are in the working tree (uncommitted edits included; files not
# yet added are not); no build output.
mkdir -p "$root/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -c | while IFS= read -r f; do
    [ -f "$f" ] && printf '%s\n' "$f"
  done | tar -cf - -T - | tar -C "$root/src" -xf -
else
  tar --exclude=./.git --exclude=./build --exclude=./fuzz/build --exclude=./fuzz/corpus-run -cf - . | tar -C "$root/src" -xf -
fi

mount -t proc proc "$root/proc"; mounted="$root/proc $mounted"
mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"; mounted="$root/dev $mounted"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"; mounted="$root/tmp $mounted"

# No stdin, as in CI; a new user's shell environment, nothing of ours. deps.sh first (a minimal
# root has no make), then the README's command.
inside() {
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin sh -c "cd /src && $1" </dev/null 2>&1
}
{ rc=0
  inside "sh scripts/deps.sh" || rc=$?
  echo "test-fresh: deps.sh done after $(( $(date +%s) - start )) s"
  if [ "$rc" = 0 ]; then
    inside "make $target" || rc=$?
  fi
  echo $rc > "$root/test-fresh.rc"; } | tee "$root/test-fresh.log"
rc=$(cat "$root/test-fresh.rc")
line=$(grep -a -E '^specs: [0-9]+ passed, [0-9]+ failed' "$root/test-fresh.log" | tail -n 1)
took=$(( $(date +%s) - start ))
if [ -z "$line" ]; then
  echo "test-fresh: make $target printed no summary line (exit $rc, $took s)"
  exit 1
fi
echo "test-fresh: $line in $took s"
[ "$rc" = 0 ] && case "$line" in *" 0 failed") exit 0 ;; esac
exit 1
