#!/bin/sh
# Runs each named harness for FUZZ_SECONDS on a copy of its seed corpus, FUZZ_JOBS at a time, and
# prints one line per harness: executions, coverage (cov/ft) and corpus size. Any crash fails.
set -u
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-60}; jobs=${FUZZ_JOBS:-2}
rm -rf logs; mkdir -p corpus-run logs
run_one() {
  n=$1
  mkdir -p "corpus-run/$n"
  [ -d "corpus/$n" ] && cp -r "corpus/$n/." "corpus-run/$n/" 2>/dev/null
  # FUZZ_SEED makes a run repeat the same mutations (CI sets it; by hand, leave it unset).
  ./build/"$n" ${FUZZ_SEED:+-seed=$FUZZ_SEED} -max_total_time="$secs" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="logs/$n-" "corpus-run/$n" >"logs/$n.log" 2>&1
  echo $? >"logs/$n.rc"
}
set -- "$@"
while [ $# -gt 0 ]; do
  pids=""
  i=0
  while [ $# -gt 0 ] && [ $i -lt "$jobs" ]; do
    run_one "$1" & pids="$pids $!"; shift; i=$((i + 1))
  done
  for p in $pids; do wait "$p"; done
done
status=0
for log in logs/*.log; do
  n=$(basename "$log" .log)
  rc=$(cat "logs/$n.rc")
  runs=$(grep -E 'stat::number_of_executed_units' "$log" | awk '{print $2}')
  cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' )
  files=$(ls "corpus-run/$n" | wc -l)
  printf 'fuzz %-12s rc=%s executions=%s %s corpus=%s\n' "$n" "$rc" "${runs:-?}" "${cov:-cov: ?}" "$files"
  if [ "$rc" != 0 ]; then status=1; grep -E 'ERROR|SUMMARY|==[0-9]+==' "$log" | head -n 20; fi
done
exit $status
