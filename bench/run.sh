#!/bin/sh
# make bench: runs every bench/*.sh (ours and the peers side by side) and prints their figures.
set -u
cd "$(dirname "$0")/.."
status=0
for b in bench/*.sh; do
  [ "$b" = bench/run.sh ] && continue
  echo "== $b"
  sh "$b" || status=1
done
exit $status
