#!/bin/sh
# smtp.send inside nginx (one worker, cosockets) to aiosmtpd with STARTTLS verified: N sends in a row
# with the session pool (the default) and without it, beside Python smtplib making one STARTTLS
# connection per message to the same server. Prints sends per second, SMTP connections opened and
# the ratios. N overrides the count (default 200).
set -u
cd "$(dirname "$0")/.."
top=$(pwd)
N=${N:-200}
for b in build/lua5.4/smtp/core.so build/luajit/smtp/core.so; do
  [ -f "$b" ] || make -s "$b" >/dev/null
done
command -v nginx >/dev/null 2>&1 || { echo "nginx not installed: skipped"; exit 0; }
export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;$top/spec/?.lua;;" LUA_CPATH="$top/build/lua5.4/?.so;;"
export SMTP_TEST_LUA=lua5.4
tmp=$(mktemp -d /tmp/lua-smtp-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT INT TERM
cat >"$tmp/bench.lua" <<'L'
local helper = require "helper"
local ns = require "support.nginx"
local n = tonumber(arg[1])
local smtpd = ns.smtpd { tls = true }
local srv = ns.start { locations = [[
  location = /send { content_by_lua_block { require("support.openresty_handlers").send() } } ]] }
local ok, err = pcall(function()
  local function now() return tonumber((helper.sh("date +%s.%N"))) end
  local function run(extra)
    local c0, t0 = smtpd.connections(), now()
    local out = helper.sh("curl -s " .. helper.quote(srv:url("/send?port=" .. smtpd.port .. extra .. "&n=[1-" .. n .. "]")))
    local t1 = now()
    local sent = select(2, out:gsub("b@smtpd%.test 250 ", ""))
    assert(sent == n, "not every send succeeded:\n" .. out:sub(1, 400))
    return n / (t1 - t0), smtpd.connections() - c0
  end
  local pooled, pc = run("")
  local unpooled, uc = run("&pool=0")
  local py = helper.sh(helper.python .. " -c " .. helper.quote([[
import smtplib, ssl, sys, time
port, n, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
msg = b"From: a@client.test\r\nTo: b@smtpd.test\r\nSubject: raw\r\n\r\nbody\r\n"
t0 = time.time()
for i in range(n):
    s = smtplib.SMTP("localhost", port)
    s.starttls(context=ctx)
    s.sendmail("a@client.test", ["b@smtpd.test"], msg)
    s.quit()
print(n / (time.time() - t0))
]]) .. " " .. smtpd.port .. " " .. n .. " " .. helper.quote(helper.certs().ca))
  local pyrate = tonumber(py)
  print(("smtp.send in nginx, pooled:     %6.0f sends/s  (%d SMTP connections for %d sends)"):format(pooled, pc, n))
  print(("smtp.send in nginx, no pool:    %6.0f sends/s  (%d SMTP connections)"):format(unpooled, uc))
  print(("Python smtplib, a connection each: %3.0f sends/s"):format(pyrate or 0))
  print(("ratios: pooled/no pool %.1fx, pooled/smtplib %.1fx, no pool/smtplib %.2fx"):format(
    pooled / unpooled, pooled / (pyrate or 1), unpooled / (pyrate or 1)))
end)
srv.stop()
smtpd.stop()
if not ok then io.stderr:write(tostring(err), "\n"); os.exit(1) end
L
lua5.4 "$tmp/bench.lua" "$N"
