#!/bin/sh
# Server benchmark: Postfix smtp-source (20 sessions, 20,000 messages of 4 KB, sessions reused)
# against smtp.server with a counting on_message, Postfix smtp-sink, aiosmtpd's Sink and our
# `lua-smtp sink` writing a Maildir, in the same run; then 5,000 idle connections held by
# smtp.server and its memory per connection (IDLE=0: not). ROUNDS (default 3) interleaved rounds,
# best counts.
# `bench/server.sh --http`: the sink without and with its web inbox instead (see below).
set -u
cd "$(dirname "$0")/.."
top=$(pwd)
LUA=${LUA:-lua5.4}
build=$top/build/$LUA; [ "$LUA" = luajit ] || build=$top/build/lua5.4
export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;;" LUA_CPATH="$build/?.so;;"
MSGS=${MSGS:-20000}
tmp=$(mktemp -d /tmp/lua-smtp-bench.XXXXXX)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null; done; rm -rf "$tmp"; }
trap cleanup EXIT INT TERM
ulimit -n 20000 2>/dev/null || true

free_port() { /usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() {
  /usr/bin/python3 - "$1" <<'X'
import socket, sys, time
for _ in range(200):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close(); sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
X
}
now() { date +%s.%N; }

cat > "$tmp/count.lua" <<'X'
local server = require "smtp.server"
local n = 0
-- 20 sessions carry all the messages: more than max_transactions' 1,000 per session
local srv = assert(server.listen { host = "127.0.0.1", port = tonumber(arg[1]), max_connections = 10000,
  max_transactions = false,
  on_message = function() n = n + 1 return true end })
srv:serve()
X

# CPU time (user + system, clock ticks) used so far by process $1
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# run NAME: smtp-source against 127.0.0.1:$port served by process $p; stores msgs/s in $rate and
# the server process's CPU microseconds per message in $cpu
run() {
  name=$1; f=$(echo "$name" | tr -c "a-zA-Z0-9\n" _)
  c0=$(ticks "$p"); t0=$(now)
  /usr/sbin/smtp-source -s 20 -d -m "$MSGS" -l 4096 "127.0.0.1:$port" >"$tmp/$f.src" 2>&1 || echo "  smtp-source failed: $(cat "$tmp/$f.src")"
  t1=$(now); c1=$(ticks "$p")
  rate=$(echo "$MSGS $t0 $t1" | awk '{ printf "%.0f", $1 / ($3 - $2) }')
  cpu=$(echo "$MSGS $c0 $c1 $(getconf CLK_TCK)" | awk '{ printf "%.0f", ($3 - $2) * 1e6 / $4 / $1 }')
}
show() { printf '  %-34s %6s msgs/s, server CPU %4s us/msg  (best of %d rounds of %d messages)\n' "$1" "$2" "$3" "$ROUNDS" "$MSGS"; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b) ? a : b }'; }
least() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }

# --http: instead, `lua-smtp sink` without and with its web inbox (--http, a browser's event stream
# connected so every message is announced; EVENTS=0: none), to a Maildir and in memory, rounds
# interleaved. On this kind of machine one configuration's rounds spread by +-20 %, so the best
# round of three can land a tenth either way by luck: the medians of ROUNDS (default 7) rounds,
# of the rate and of the server's CPU per message, are printed beside the best ones.
median() { echo "$1" | tr ' ' '\n' | grep . | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
if [ "${1:-}" = "--http" ]; then
  ROUNDS=${ROUNDS:-7}
  # the sink keeps smtp.server's 1,000 transactions per session: 20 sessions carry fewer than 20,000
  [ "$MSGS" -lt 20000 ] || MSGS=10000
  echo "smtp-source -s 20 -d -m $MSGS -l 4096 ($LUA), lua-smtp sink without and with --http:"
  for store in ${STORES:-maildir memory}; do
    plain=0; web=0; plain_cpu=; web_cpu=; plain_all=; web_all=; plain_cpus=; web_cpus=
    for r in $(seq "$ROUNDS"); do
      for mode in plain web; do
        port=$(free_port); hport=$(free_port); rm -rf "$tmp/Maildir"
        if [ $store = maildir ]; then st="--maildir $tmp/Maildir"; else st="--memory --max-messages 1000"; fi
        if [ $mode = web ]; then extra="--http 127.0.0.1:$hport"; else extra=""; fi
        $LUA "$top/bin/lua-smtp" sink --listen "127.0.0.1:$port" $st $extra >/dev/null 2>&1 & p=$!; pids="$pids $p"
        wait_port "$port"
        ev=""
        if [ $mode = web ] && [ "${EVENTS:-1}" = 1 ]; then
          wait_port "$hport"
          curl -s -N "http://127.0.0.1:$hport/api/v1/events" >"$tmp/events" 2>/dev/null & ev=$!; pids="$pids $ev"
        fi
        run "$store-$mode"
        if [ $mode = web ]; then
          web=$(best "$web" "$rate"); web_cpu=$(least "$web_cpu" "$cpu")
          web_all="$web_all $rate"; web_cpus="$web_cpus $cpu"
          [ -z "$ev" ] || kill $ev 2>/dev/null
          [ -z "$ev" ] || [ "$(grep -c '^event: new' "$tmp/events")" -gt 0 ] || echo "  (no events reached the stream)"
        else
          plain=$(best "$plain" "$rate"); plain_cpu=$(least "$plain_cpu" "$cpu")
          plain_all="$plain_all $rate"; plain_cpus="$plain_cpus $cpu"
        fi
        kill $p; wait $p 2>/dev/null
      done
    done
    show "sink --$store" "$plain" "$plain_cpu"
    show "sink --$store --http" "$web" "$web_cpu"
    echo "$web $plain" | awk -v s="$store" '{ printf "ratio of the best rounds: --%s with --http / without = %.2fx\n", s, $1/$2 }'
    pm=$(median "$plain_all"); wm=$(median "$web_all"); pc=$(median "$plain_cpus"); wc=$(median "$web_cpus")
    printf '  medians: without %s msgs/s, %s us/msg; with --http %s msgs/s, %s us/msg\n' "$pm" "$pc" "$wm" "$wc"
    echo "$wm $pm $pc $wc" | awk -v s="$store" '{ printf "ratio of the medians: --%s with --http / without = %.2fx by rate, %.2fx per CPU (target >= 0.9x)\n", s, $1/$2, $3/$4 }'
  done
  exit 0
fi

# Each server runs ROUNDS times, interleaved, and its best round counts: on a shared machine a
# background burst then hurts nobody's figure more than another's. The CPU per message of every
# round is kept too, and the medians' ratios printed beside the best rounds': smtp-sink's own
# cost moves by a third between runs here, so one lucky round can carry a best-of ratio.
ROUNDS=${ROUNDS:-3}
echo "smtp-source -s 20 -d -m $MSGS -l 4096 ($LUA):"
ours=0; sink=0; aio=0; ours_cpu=; sink_cpu=; aio_cpu=
ours_cpus=; sink_cpus=; aio_cpus=
for r in $(seq "$ROUNDS"); do
  port=$(free_port)
  $LUA "$tmp/count.lua" "$port" & p=$!; pids="$pids $p"
  wait_port "$port"; run ours; ours=$(best "$ours" "$rate"); ours_cpu=$(least "$ours_cpu" "$cpu"); ours_cpus="$ours_cpus $cpu"; kill $p

  port=$(free_port)
  /usr/sbin/smtp-sink -u nobody "127.0.0.1:$port" 256 & p=$!; pids="$pids $p"
  wait_port "$port"; run sink; sink=$(best "$sink" "$rate"); sink_cpu=$(least "$sink_cpu" "$cpu"); sink_cpus="$sink_cpus $cpu"; kill $p

  port=$(free_port)
  /usr/bin/python3 -m aiosmtpd -n -l "127.0.0.1:$port" -c aiosmtpd.handlers.Sink & p=$!; pids="$pids $p"
  wait_port "$port"; run aiosmtpd; aio=$(best "$aio" "$rate"); aio_cpu=$(least "$aio_cpu" "$cpu"); aio_cpus="$aio_cpus $cpu"; kill $p
done
show "smtp.server (counting on_message)" "$ours" "$ours_cpu"
show "Postfix smtp-sink" "$sink" "$sink_cpu"
show "aiosmtpd Sink" "$aio" "$aio_cpu"

port=$(free_port)
# the sink keeps smtp.server's 1,000 transactions per session, which 20 sessions of smtp-source
# share unevenly: half the messages, so no session reaches it
all=$MSGS; MSGS=$((MSGS / 2))
$LUA "$top/bin/lua-smtp" sink --listen "127.0.0.1:$port" --maildir "$tmp/Maildir" >/dev/null 2>&1 & p=$!; pids="$pids $p"
wait_port "$port"; run maildir; md=$rate; kill $p
printf '  %-34s %6s msgs/s  (one round of %d messages)\n' "lua-smtp sink --maildir (fsync)" "$md" "$MSGS"
files=$(ls "$tmp/Maildir/new" | wc -l)
echo "  Maildir holds $files files for $MSGS messages"
MSGS=$all

echo "$ours $sink $aio $md" | awk '{ printf "ratios: smtp.server / smtp-sink = %.2fx (target >= 0.6x), smtp.server / aiosmtpd = %.2fx (target >= 3x), sink to Maildir / smtp-sink = %.2fx\n", $1/$2, $1/$3, $4/$2 }'
# per CPU-second of each server (issue 21's targets): messages per CPU-second are 1 / (us per message)
echo "$ours_cpu $sink_cpu $aio_cpu" | awk '{ printf "per CPU-second: smtp.server / smtp-sink = %.2fx (target >= 1.5x), smtp.server / aiosmtpd = %.2fx (target >= 5x)\n", $2/$1, $3/$1 }'
om=$(median "$ours_cpus"); sm=$(median "$sink_cpus"); am=$(median "$aio_cpus")
echo "$om $sm $am" | awk -v r="$ROUNDS" '{ printf "medians of %d rounds: smtp.server %s us/msg, smtp-sink %s, aiosmtpd %s: per CPU-second %.2fx smtp-sink, %.2fx aiosmtpd\n", r, $1, $2, $3, $2/$1, $3/$1 }'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
# IDLE=0: without the 5,000 idle connections
[ "${IDLE:-1}" = 1 ] || exit 0

# 5,000 idle connections
port=$(free_port)
$LUA "$tmp/count.lua" "$port" & p=$!; pids="$pids $p"
wait_port "$port"
rss0=$(awk '/VmRSS/ {print $2}' /proc/$p/status)
/usr/bin/python3 - "$port" "$p" <<'X'
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
port, pid = int(sys.argv[1]), sys.argv[2]
conns = []
for i in range(5000):
    s = socket.create_connection(("127.0.0.1", port))
    conns.append(s)
greeted = 0
for s in conns:
    s.settimeout(10)
    if s.recv(100).startswith(b"220 "): greeted += 1
rss = int([l.split()[1] for l in open("/proc/%s/status" % pid) if l.startswith("VmRSS")][0])
print("idle: %d connections open, %d greeted; server RSS now %d KB" % (len(conns), greeted, rss))
open("/tmp/lua-smtp-bench-rss", "w").write(str(rss))
X
rss1=$(cat /tmp/lua-smtp-bench-rss 2>/dev/null || echo 0); rm -f /tmp/lua-smtp-bench-rss
echo "$rss0 $rss1" | awk '{ printf "idle: RSS %d KB before, %d KB with 5,000 connections: %.1f KB per connection\n", $1, $2, ($2-$1)/5000 }'
kill $p
