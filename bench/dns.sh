#!/bin/sh
# Name resolution throughput against dnsmasq on loopback: the core's c-ares resolver from Lua
# (N A queries in flight at once on one resolver, and smtp.dns.resolve one name per call) beside
# dnspython (the peer: one query at a time, and N at once with dns.asyncresolver). DNS_QUERIES=N.
set -u
cd "$(dirname "$0")/.."
top=$(pwd)
N=${DNS_QUERIES:-2000}
PY=/usr/bin/python3
export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;;"
port=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
dir=$(mktemp -d)
chmod 755 "$dir"   # dnsmasq reads the hosts file after dropping to nobody
i=1; : > "$dir/hosts"
while [ $i -le 500 ]; do echo "127.0.$((i / 250)).$((i % 250 + 1)) h$i.bench.test" >> "$dir/hosts"; i=$((i + 1)); done
timeout 300 /usr/sbin/dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --addn-hosts="$dir/hosts" --port="$port" --listen-address=127.0.0.1 --bind-interfaces --pid-file= \
  --local=/test/ --local-ttl=300 >"$dir/dnsmasq.log" 2>&1 &
dpid=$!
sleep 0.5

cat > "$dir/ours.lua" <<'X'
local core = require "smtp.core"
local dns = require "smtp.dns"
local ns, n, mode = arg[1], tonumber(arg[2]), arg[3]
local t0 = core.now()
if mode == "batch" then
  local r = assert(core.resolver { nameservers = { ns }, timeout = 2, tries = 2 })
  local ids, ok = {}, 0
  local done = 0
  while done < n do
    local k = math.min(200, n - done)   -- 200 in flight at once (the resolver allows 256)
    for i = 1, k do ids[i] = r:query("h" .. ((done + i) % 500 + 1) .. ".bench.test", "A") end
    while r:process() > 0 do r:wait(1) end
    for i = 1, k do if r:result(ids[i]) then ok = ok + 1 end end
    done = done + k
  end
  r:close()
  assert(ok == n, "answers: " .. ok)
else
  for i = 1, n do assert(dns.resolve("h" .. (i % 500 + 1) .. ".bench.test", { nameservers = { ns } })) end
end
print(string.format("%.0f", n / (core.now() - t0)))
X

cat > "$dir/peer.py" <<'X'
import sys, time, asyncio
import dns.message, dns.query, dns.asyncresolver, dns.resolver, dns.rcode
ns, port = sys.argv[1].split(":"); port = int(port); n = int(sys.argv[2]); mode = sys.argv[3]
t0 = time.monotonic()
if mode == "seq":
    for i in range(n):
        r = dns.query.udp(dns.message.make_query("h%d.bench.test" % (i % 500 + 1), "A"), ns, port=port, timeout=2)
        assert r.answer, (dns.rcode.to_text(r.rcode()), str(r))
else:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = [ns]; res.port = port; res.lifetime = 5
    async def main():
        sem = asyncio.Semaphore(200)
        async def one(i):
            async with sem:
                await res.resolve("h%d.bench.test" % (i % 500 + 1), "A")
        await asyncio.gather(*(one(i) for i in range(n)))
    asyncio.run(main())
print("%.0f" % (n / (time.monotonic() - t0)))
X

status=0
ns="127.0.0.1:$port"
py_seq=$($PY "$dir/peer.py" "$ns" "$N" seq) || status=1
py_async=$($PY "$dir/peer.py" "$ns" "$N" async) || status=1
for lua in lua5.4 luajit; do
  [ -f "build/$lua/smtp/core.so" ] || { echo "$lua: build/$lua/smtp/core.so missing (run make)"; continue; }
  export LUA_CPATH="$top/build/$lua/?.so;;"
  batch=$($lua "$dir/ours.lua" "$ns" "$N" batch) || { status=1; continue; }
  single=$($lua "$dir/ours.lua" "$ns" $((N / 4)) single) || { status=1; continue; }
  echo "$lua: c-ares 200 in flight: $batch queries/s (x$(echo "scale=2; $batch / $py_async" | bc) dnspython async);" \
       "dns.resolve one by one (AAAA+A, new resolver each): $single names/s (x$(echo "scale=2; $single / $py_seq" | bc) dnspython one query at a time)"
done
echo "peer dnspython: one at a time $py_seq queries/s; asyncio 200 in flight $py_async queries/s"
kill "$dpid" 2>/dev/null
rm -rf "$dir"
exit $status
