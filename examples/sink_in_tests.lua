-- A test that catches mail: starts `lua-smtp sink` on a free loopback port with a Maildir, runs
-- the code under test (here smtp.send), then checks what the sink stored and that a recipient
-- matching --reject-rcpt bounced. Self-contained: lua5.4 examples/sink_in_tests.lua
-- The same shape fits a busted spec: start the sink in setup, stop it by PID in teardown.
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local native = require "smtp.transport.native"

local function sh(cmd)
  local p = assert(io.popen(cmd)); local out = p:read("*a"); p:close(); return (out:gsub("%s+$", ""))
end

-- the checkout's bin/lua-smtp when run from one, else the installed command
local here = (arg and arg[0] or "./x"):gsub("[^/]*$", "")
local bin = here .. "../bin/lua-smtp"
local cmd = io.open(bin, "r") and ((jit and "luajit " or "lua5.4 ") .. bin) or "lua-smtp"

local dir = sh("mktemp -d /tmp/sink-test.XXXXXX")
local l = assert(native.listen { host = "127.0.0.1", port = 0 })   -- a free port
local port = l.port
l:close()
local pid = sh(("exec timeout 60 %s sink --listen 127.0.0.1:%d --maildir %s/Maildir --reject-rcpt 'bounce@*' " ..
  ">%s/sink.log 2>&1 </dev/null & echo $!"):format(cmd, port, dir, dir))
local function finish(code)
  os.execute("kill " .. pid .. " 2>/dev/null")
  os.execute("rm -rf " .. dir)
  os.exit(code)
end
for _ = 1, 100 do   -- wait until it listens
  local s = native.connect { host = "127.0.0.1", port = port, timeout = 1 }
  if s then s:close(); break end
  os.execute("sleep 0.1")
end

-- the code under test
local res, err = smtp.send {
  server = "127.0.0.1", port = port, tls = "none",   -- the sink runs without TLS here
  from = "app@example.com", to = { "user@example.org", "bounce@example.org" },
  message = "From: app@example.com\r\nTo: user@example.org\r\nSubject: welcome\r\n\r\nHello!\r\n",
}

-- the checks
local function check(cond, what)
  if not cond then io.stderr:write("FAIL: ", what, "\n", sh("cat " .. dir .. "/sink.log"), "\n"); finish(1) end
  print("ok: " .. what)
end
check(res, "the sink accepted the message (" .. tostring(err) .. ")")
check(res.accepted[1] == "user@example.org", "user@example.org accepted")
check(res.rejected[1] and res.rejected[1].code == 550 and res.rejected[1].enhanced == "5.1.1",
  "bounce@example.org refused with 550 5.1.1")
local files = sh("ls " .. dir .. "/Maildir/new")
local f = io.open(dir .. "/Maildir/new/" .. files, "rb")
local stored = f and f:read("*a") or ""
if f then f:close() end
check(stored:find("Return-Path: <app@example.com>\r\nDelivered-To: user@example.org\r\n", 1, true) == 1,
  "stored with Return-Path and Delivered-To")
check(stored:find("Subject: welcome\r\n", 1, true) ~= nil, "the message is stored as sent")
finish(0)
