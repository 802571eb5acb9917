#!/bin/sh
# Memory per idle connection: 10,000 loopback connections parked in smtp.loop (one coroutine,
# one socket object each), measured as VmRSS growth of the server process and of the client
# process, beside a cqueues server holding the same connections (the peer). Kernel socket
# memory is not in VmRSS, so the figures are the process's own cost. IDLE_CONNECTIONS=N overrides.
# Then TLS 1.3 (IDLE_TLS_CONNECTIONS=N, default 5,000), each end in its own process: at the client,
# what a user holds: N smtp.connect sessions over implicit TLS after EHLO (engine, transport, TLS
# and the session's tables), once resuming a cached session (the client's default: a warm-up
# session seeds the cache) and once with full handshakes; at the server, the accepting socket
# that answered the greeting and EHLO.
set -u
cd "$(dirname "$0")/.."
top=$(pwd)
N=${IDLE_CONNECTIONS:-10000}
TLS_N=${IDLE_TLS_CONNECTIONS:-5000}
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
if [ "$hard" -lt $((N + 100)) ]; then
  N=$((hard - 100))
  echo "note: the hard limit on open files is $hard; measuring $N connections"
fi
[ "$hard" -lt $((TLS_N + 100)) ] && TLS_N=$((hard - 100))
M=$N; [ "$TLS_N" -gt "$M" ] && M=$TLS_N
ulimit -n $((M + 100)) || { echo "cannot raise RLIMIT_NOFILE to $((M + 100))"; exit 1; }
export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;$top/spec/?.lua;;"
script=spec/support/transport_load.lua
status=0

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" "$2"; }

run_pair() { # lua server-mode dir [client-mode [server-count]]
  lua=$1; smode=$2; dir=$3; cmode=${4:-client}; sn=${5:-$N}
  timeout 300 "$lua" $script "$smode" "$sn" "$dir" >"$dir/server.out" 2>&1 &
  spid=$!
  i=0
  while [ ! -s "$dir/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
  [ -s "$dir/port" ] || { echo "server did not start: $(cat "$dir/server.out")"; kill "$spid"; return 1; }
  timeout 300 "$lua" $script "$cmode" "$N" "$(cat "$dir/port")" "$dir" >"$dir/client.out" 2>&1
  wait "$spid"
  grep -q kb_per_connection "$dir/server.out" && grep -q kb_per_connection "$dir/client.out"
}

for lua in lua5.4 luajit; do
  [ -f "build/$lua/smtp/core.so" ] || { echo "$lua: build/$lua/smtp/core.so missing (run make)"; continue; }
  export LUA_CPATH="$top/build/$lua/?.so;;"
  d1=$(mktemp -d); d2=$(mktemp -d)
  if run_pair "$lua" server "$d1"; then
    s=$(field kb_per_connection "$d1/server.out"); c=$(field kb_per_connection "$d1/client.out")
    echo "$lua smtp.loop server: $N idle connections, $s KB each (Lua heap $(field lua_kb_per_connection "$d1/server.out") KB), accepted in $(field seconds "$d1/server.out") s"
    echo "$lua smtp.loop client: $N idle connections, $c KB each (Lua heap $(field lua_kb_per_connection "$d1/client.out") KB)"
    if [ "$(echo "$s < 16 && $c < 16" | bc)" = 1 ]; then echo "$lua: under 16 KB per connection: yes"
    else echo "$lua: under 16 KB per connection: NO"; status=1; fi
  else
    echo "$lua smtp.loop run failed:"; cat "$d1/server.out" "$d1/client.out"; status=1
  fi
  if "$lua" -e 'require "cqueues"' 2>/dev/null; then
    if run_pair "$lua" cqserver "$d2"; then
      q=$(field kb_per_connection "$d2/server.out")
      echo "$lua cqueues server (peer): $N idle connections, $q KB each"
      echo "$lua ratio smtp.loop/cqueues per connection: $(echo "scale=2; $s / $q" | bc)"
    else
      echo "$lua cqueues run failed:"; cat "$d2/server.out" "$d2/client.out"
    fi
  fi
  # TLS 1.3, each end in its own process (target: 24 KB or less at each end).
  certs=$(mktemp -d); bash scripts/make-certs.sh "$certs" >/dev/null 2>&1
  NP=$N; N=$TLS_N
  export IDLE_TLS=1 IDLE_SMTP=1 IDLE_TLS_CERTS="$certs"
  for resume in 1 0; do
    d3=$(mktemp -d)
    [ $resume = 1 ] && how="resumed sessions" || how="full handshakes"
    # the server accepts the client's warm-up session too
    if IDLE_RESUME=$resume run_pair "$lua" server "$d3" smtpclient $((N + 1)); then
      s=$(field kb_per_connection "$d3/server.out"); c=$(field kb_per_connection "$d3/client.out")
      echo "$lua TLS 1.3 ($how, $(field resumed "$d3/client.out") of $N resumed): $N idle sessions, $s KB each at the server, $c KB each at the client (Lua heap $(field lua_kb_per_connection "$d3/client.out") KB; load $(cut -d' ' -f1-3 /proc/loadavg))"
      if [ "$(echo "$s <= 24 && $c <= 24" | bc)" = 1 ]; then echo "$lua ($how): TLS at most 24 KB per connection at each end: yes"
      else echo "$lua ($how): TLS at most 24 KB per connection at each end: NO"; fi
    else
      echo "$lua TLS run ($how) failed:"; cat "$d3/server.out" "$d3/client.out"; status=1
    fi
    rm -rf "$d3"
  done
  unset IDLE_TLS IDLE_SMTP IDLE_TLS_CERTS
  N=$NP
  rm -rf "$d1" "$d2" "$certs"
done
exit $status
