#!/bin/sh
# Runs every spec with busted once per interpreter given, against build/<lua> (or build/asan-<lua>
# when SMTP_BUILD=asan), then prints one closing line: "specs: N passed, N failed".
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
pass=0; fail=0; status=0
log=$(mktemp)
for lua in "$@"; do
  build="build/$lua"
  [ "${SMTP_BUILD:-}" = asan ] && build="build/asan-$lua"
  export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;$top/spec/?.lua;;"
  export LUA_CPATH="$top/$build/?.so;;"
  export SMTP_TEST_LUA="$lua" SMTP_TEST_BUILD="$top/$build"
  pre=""
  if [ "${SMTP_BUILD:-}" = asan ]; then
    asan=$(${CC:-cc} -print-file-name=libasan.so)
    pre="env LD_PRELOAD=$asan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
  fi
  echo "== busted on $lua ($build)"
  $pre busted --lua="$lua" ${BUSTED_ARGS:-} spec 2>&1 | tee "$log"
  rc=$?
  # busted prints "N successes / N failures / N errors / N pending : T seconds"
  # -a: a spec's output may hold binary bytes (TLS records), and grep would then print no line
  line=$(grep -a -E '^[0-9]+ success' "$log" | tail -n 1)
  if [ -z "$line" ]; then
    echo "busted on $lua printed no summary (crashed?)"; status=1; fail=$((fail + 1)); continue
  fi
  s=$(echo "$line" | sed -E 's/^([0-9]+) success.*/\1/')
  f=$(echo "$line" | sed -E 's/.* ([0-9]+) failure.*/\1/')
  e=$(echo "$line" | sed -E 's/.* ([0-9]+) error.*/\1/')
  pass=$((pass + s)); fail=$((fail + f + e))
  [ "$f" != 0 ] || [ "$e" != 0 ] && status=1
done
rm -f "$log"
echo "specs: $pass passed, $fail failed"
exit $status
