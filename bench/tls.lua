-- TLS benchmark driver (bench/tls.sh runs it under lua5.4): starts each server, drives it with a
-- load generator in this process, and prints sessions and messages per second and per CPU-second
-- of each server's whole process tree, beside the peers from the same run. Usage:
--   lua5.4 bench/tls.lua server|client
local helper = require "helper"
local native = require "smtp.transport.native"
local loop = require "smtp.loop"
local core = require "smtp.core"
local smtp = require "smtp"

local what = arg[1] or "server"
local SESSIONS = tonumber(os.getenv("TLS_SESSIONS") or "400")
local MESSAGES = tonumber(os.getenv("TLS_MESSAGES") or "2000")
local CONC = tonumber(os.getenv("TLS_CONCURRENCY") or "20")
local ROUNDS = tonumber(os.getenv("TLS_ROUNDS") or "3")
local TICK = 100   -- clock ticks per second (getconf CLK_TCK on Linux)
local certs = helper.certs()
local tmp = helper.tmpdir()
local BODY = ("Subject: bench\r\n\r\n" .. ("x"):rep(76) .. "\r\n"):rep(52):sub(1, 4096 - 5) .. "\r\n"

-- CPU seconds used by a process and all its descendants, the dead ones included (their time is
-- in their parents' cutime/cstime once reaped). A live process's own time comes from its tasks'
-- schedstat (nanoseconds; /proc/PID/stat counts 10 ms ticks, 4 % of a 400-session run).
local function read_first(path)
  local f = io.open(path)
  if not f then return nil end
  local s = f:read("l"); f:close()
  return s
end

local function own_cpu(pid, ticks)
  local status = io.open("/proc/" .. pid .. "/status")
  local threads = 1
  if status then
    local st = status:read("a"); status:close()
    threads = tonumber(st:match("\nThreads:%s*(%d+)")) or 1
  end
  local paths = { "/proc/" .. pid .. "/schedstat" }   -- a single thread's own
  if threads > 1 then
    paths = {}
    local p = io.popen("ls /proc/" .. pid .. "/task 2>/dev/null")
    for t in p:lines() do paths[#paths + 1] = "/proc/" .. pid .. "/task/" .. t .. "/schedstat" end
    p:close()
  end
  local ns, found = 0, false
  for _, path in ipairs(paths) do
    local line = read_first(path)
    local v = line and tonumber(line:match("^(%d+)"))
    if v then ns, found = ns + v, true end
  end
  return found and ns / 1e9 or ticks
end

local function stat(pid)
  local s = read_first("/proc/" .. pid .. "/stat")
  local rest = s and s:match("%) (.*)$")
  if not rest then return nil end   -- it ended meanwhile
  local v = {}
  for x in rest:gmatch("%S+") do v[#v + 1] = x end
  -- fields from 3 on: state=1 ppid=2 ... utime=12 stime=13 cutime=14 cstime=15
  return tonumber(v[2]), (tonumber(v[12]) + tonumber(v[13])) / TICK, (tonumber(v[14]) + tonumber(v[15])) / TICK
end

local function tree_cpu(root)
  local kids, own, reaped = {}, {}, {}
  local p = io.popen("ls /proc")
  for name in p:lines() do
    if name:match("^%d+$") then
      local ppid, o, c = stat(name)
      if ppid then
        local pid = tonumber(name)
        kids[ppid] = kids[ppid] or {}
        table.insert(kids[ppid], pid)
        own[pid], reaped[pid] = o, c
      end
    end
  end
  p:close()
  local total, stack = 0, { root }
  while #stack > 0 do
    local pid = table.remove(stack)
    if own[pid] then total = total + own_cpu(pid, own[pid]) + reaped[pid] end
    for _, k in ipairs(kids[pid] or {}) do stack[#stack + 1] = k end
  end
  return total
end

local function self_cpu() local _, o, c = stat("self"); return own_cpu("self", o) + c end

-- A line reader over a native connection: one SMTP reply (all its lines).
local function reply(c, buf)
  while true do
    local code, last = buf.data:match("^(%d%d%d) [^\n]*\n()")
    if not code then
      local pos = 1
      while true do
        local lcode, sep, nxt = buf.data:match("^(%d%d%d)([ -])[^\n]*\n()", pos)
        if not lcode then break end
        if sep == " " then code, last = lcode, nxt; break end
        pos = nxt
      end
    end
    if code then buf.data = buf.data:sub(last); return tonumber(code) end
    local d, err = c:read(30)
    if not d then error("read: " .. tostring(err)) end
    buf.data = buf.data .. d
  end
end

local function cmd(c, buf, line, want)
  assert(c:write(line .. "\r\n", 30))
  local code = reply(c, buf)
  if want and code ~= want then error(line .. " -> " .. code) end
  return code
end

local cctx = assert(native.tls_client_context { cafile = os.getenv("TLS_CA") or certs.ca })

-- One client session: connect, EHLO, STARTTLS, EHLO, `msgs` messages of 4 KB, QUIT.
local resumed = 0
local function session(port, resume, msgs, bare)
  local c = assert(native.connect { host = "127.0.0.1", port = port, timeout = 30 })
  local buf = { data = "" }
  if bare then
    assert(c:starttls { ctx = cctx, servername = "localhost", session_cache = resume })
    if c:info().resumed then resumed = resumed + 1 end
    c:close()
    return
  end
  reply(c, buf)
  cmd(c, buf, "EHLO bench.test", 250)
  cmd(c, buf, "STARTTLS", 220)
  assert(c:starttls { ctx = cctx, servername = "localhost", session_cache = resume })
  if c:info().resumed then resumed = resumed + 1 end
  cmd(c, buf, "EHLO bench.test", 250)
  for _ = 1, msgs do
    cmd(c, buf, "MAIL FROM:<a@bench.test>", 250)
    cmd(c, buf, "RCPT TO:<b@example.org>", 250)
    cmd(c, buf, "DATA", 354)
    assert(c:write(BODY .. ".\r\n", 30))
    local code = reply(c, buf)
    if code ~= 250 then error("data -> " .. code) end
  end
  cmd(c, buf, "QUIT")
  c:close()
end

-- Runs `total` sessions from CONC coroutines; returns wall seconds, generator CPU, server CPU.
local function drive(pid, port, total, resume, msgs, bare)
  cctx:forget_sessions()
  if resume then loop.spawn(function() session(port, true, 1, bare) end); loop.run() end
  local c0, g0, t0 = tree_cpu(pid), self_cpu(), core.now()
  resumed = 0
  local left = total
  for _ = 1, CONC do
    loop.spawn(function()
      while left > 0 do
        left = left - 1
        session(port, resume, msgs, bare)
      end
    end)
  end
  loop.run()
  return core.now() - t0, self_cpu() - g0, tree_cpu(pid) - c0
end

local function wait_port(port)
  for _ = 1, 200 do
    local s = native.connect { host = "127.0.0.1", port = port, timeout = 1 }
    if s then s:close(); return true end
    helper.sleep(0.05)
  end
  error("nothing listens on port " .. port)
end

local procs = {}
local function spawn(argv, env)
  local p = helper.spawn(argv, { limit = 900, env = env })
  procs[#procs + 1] = p
  return p
end

local function ours(lua)
  local port = helper.free_port()
  local script = tmp .. "/ours.lua"
  helper.write(script, ([[
local server = require "smtp.server"
local srv = assert(server.listen { host = "127.0.0.1", port = %d, max_connections = 10000,
  max_transactions = false, hostname = "bench.test", tls = { cert = %q, key = %q },
  on_message = function() return true end })
srv:serve()
]]):format(port, certs.server, certs.server_key))
  local p = spawn({ lua, script }, { LUA_CPATH = helper.root .. "/build/" .. lua .. "/?.so;;" })
  wait_port(port)
  return p.pid, port, p
end

local function aiosmtpd()
  local port = helper.free_port()
  helper.write(tmp .. "/aio.py", ([[
import ssl, time
from aiosmtpd.controller import Controller
class H:
    async def handle_DATA(self, server, session, envelope):
        return '250 OK'
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(%q, %q)
c = Controller(H(), hostname='127.0.0.1', port=%d, tls_context=ctx, require_starttls=False)
c.start()
while True: time.sleep(3600)
]]):format(certs.server, certs.server_key, port))
  local p = spawn({ helper.python, tmp .. "/aio.py" })
  wait_port(port)
  return p.pid, port, p
end

local function sserver()
  local port = helper.free_port()
  -- Configured as smtp.server's context is: no trust store (by default s_server loads the
  -- system's and looks up the certificate's issuers in its directory on every handshake: 11 more
  -- system calls and 4.6 % more instructions per handshake here) and one TLS 1.3 ticket (its
  -- default is two).
  local p = spawn({ "openssl", "s_server", "-quiet", "-naccept", "1000000", "-accept", "127.0.0.1:" .. port,
    "-cert", certs.server, "-key", certs.server_key, "-no-CAfile", "-no-CApath", "-no-CAstore",
    "-num_tickets", "1" })
  wait_port(port)
  return p.pid, port, p
end

local function fmt(x, n) return string.format("%." .. (n or 0) .. "f", x) end
local function load() local f = io.open("/proc/loadavg"); local s = f:read("l"); f:close(); return s end

local function report(name, n, unit, wall, gcpu, scpu)
  print(("  %-24s %6s %s/s %7s per server CPU-s, server CPU %6s us/%s, generator CPU share %s%%%s")
    :format(name, fmt(n / wall), unit, fmt(n / scpu), fmt(scpu * 1e6 / n), unit,
      fmt(100 * gcpu / (gcpu + scpu)), resumed > 0 and (", " .. resumed .. " resumed") or ""))
  return n / scpu
end

local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c[(#c + 1) // 2]
end

-- One line from several rounds of one server: medians, and each round's rate per server CPU-s.
local function report_rounds(name, n, unit, runs)
  local rate, wall, share, each, res = {}, {}, {}, {}, nil
  for i, x in ipairs(runs) do
    rate[i], wall[i], share[i] = n / x.s, n / x.w, 100 * x.g / (x.g + x.s)
    each[i] = fmt(rate[i])
    res = res and math.min(res, x.resumed) or x.resumed
  end
  local m = median(rate)
  print(("  %-24s %6s %s/s %7s per server CPU-s, server CPU %6s us/%s, generator CPU share %s%% (rounds: %s)%s")
    :format(name, fmt(median(wall)), unit, fmt(m), fmt(1e6 / m), unit, fmt(median(share)),
      table.concat(each, ", "), res > 0 and (", " .. res .. " of " .. n .. " resumed in each") or ""))
  return m
end

if what == "resume-check" then
  -- how many sessions resume against smtp.server, for checking the client cache under concurrency
  local pid, port = ours("lua5.4")
  if os.getenv("TLS_PORT") then pid, port = tonumber(os.getenv("TLS_PID")), tonumber(os.getenv("TLS_PORT")) end
  local w, g, s = drive(pid, port, SESSIONS, os.getenv("TLS_FULL") == nil, 1)
  report("smtp.server (Lua 5.4)", SESSIONS, "session", w, g, s)
elseif what == "server" then
  print(("load at start: %s"):format(load()))
  local postfix = require "support.postfix"
  local pf = assert(postfix.start { main = "default_transport = discard\nrelay_transport = discard\n" ..
    "smtpd_tls_security_level = may\n" })
  local pf_pid = tonumber(helper.read(pf.dir .. "/queue/pid/master.pid"):match("%d+"))
  local sp, sport = sserver()
  local r = {}
  local l54, p54 = ours("lua5.4")
  local ljit, pjit = ours("luajit")
  local aio, paio = aiosmtpd()
  local servers = { { "smtp.server (Lua 5.4)", l54, p54, "ours54" }, { "smtp.server (LuaJIT)", ljit, pjit, "oursjit" },
    { "Postfix smtpd", pf_pid, pf.port, "postfix" }, { "aiosmtpd", aio, paio, "aio" } }
  -- The floor: a bare TLS 1.3 handshake against openssl s_server (it serves one at a time).
  local floor = { "openssl s_server handshake", sp, sport, "floor", bare = true }
  -- Rounds take turns among the servers, so a change in the machine's load (other work shares
  -- it) reaches each of them alike; each figure is the median of its rounds.
  for _, mode in ipairs { "full", "resumed" } do
    print(("sessions (connect, EHLO, STARTTLS, one 4 KB message, QUIT), %d from %d clients, %s handshakes, " ..
      "%d rounds; load %s:"):format(SESSIONS, CONC, mode, ROUNDS, load()))
    local list = { table.unpack(servers) }
    if mode == "full" then table.insert(list, 1, floor) end
    local runs = {}
    for _ = 1, ROUNDS do
      for _, sv in ipairs(list) do
        local w, g, s = drive(sv[2], sv[3], SESSIONS, mode == "resumed", sv.bare and 0 or 1, sv.bare)
        runs[sv] = runs[sv] or {}
        table.insert(runs[sv], { w = w, g = g, s = s, resumed = resumed })
      end
    end
    for _, sv in ipairs(list) do
      r[sv.bare and "floor" or sv[4] .. mode] = report_rounds(sv[1], SESSIONS, sv.bare and "hs" or "session", runs[sv])
    end
  end
  local w, g, s
  print(("messages over %d long-lived TLS sessions, %d messages; load %s:"):format(CONC, MESSAGES, load()))
  for _, sv in ipairs(servers) do
    w, g, s = drive(sv[2], sv[3], CONC, false, MESSAGES // CONC)
    r[sv[4] .. "msg"] = report(sv[1], MESSAGES, "msg", w, g, s)
  end
  local function ratio(a, b) return fmt(r[a] / r[b], 2) .. "x" end
  print("ratios per server CPU-second:")
  print(("  full handshakes:  smtp.server / Postfix smtpd = %s (Lua 5.4), %s (LuaJIT) (target >= 1x)")
    :format(ratio("ours54full", "postfixfull"), ratio("oursjitfull", "postfixfull")))
  print(("  full handshakes:  bare handshake floor / smtp.server = %s (Lua 5.4), %s (LuaJIT) (target <= 1.3x)")
    :format(ratio("floor", "ours54full"), ratio("floor", "oursjitfull")))
  print(("  resumed:          smtp.server / aiosmtpd = %s (Lua 5.4), %s (LuaJIT) (target >= 5x)")
    :format(ratio("ours54resumed", "aioresumed"), ratio("oursjitresumed", "aioresumed")))
  print(("  resumed:          smtp.server / Postfix smtpd = %s (Lua 5.4), %s (LuaJIT)")
    :format(ratio("ours54resumed", "postfixresumed"), ratio("oursjitresumed", "postfixresumed")))
  print(("  long-lived TLS:   smtp.server / Postfix smtpd = %s, / aiosmtpd = %s (Lua 5.4)")
    :format(ratio("ours54msg", "postfixmsg"), ratio("ours54msg", "aiomsg")))
  pf.stop()
else
  -- Client: smtp.send (CONC at a time) against one smtp.server, with and without resumption,
  -- beside Python smtplib from the same number of threads; the client's own CPU per session.
  print(("load at start: %s"):format(load()))
  local pid, port = ours("lua5.4")
  local function ours_client(resume)
    local g0, t0 = self_cpu(), core.now()
    local left = SESSIONS
    cctx:forget_sessions()
    for _ = 1, CONC do
      loop.spawn(function()
        while left > 0 do
          left = left - 1
          assert(smtp.send { server = "127.0.0.1", port = port, cafile = certs.ca, helo = "bench.test",
            servername = "localhost", session_cache = resume, from = "a@bench.test", to = "b@example.org",
            message = BODY, timeout = 30 })
        end
      end)
    end
    loop.run()
    return core.now() - t0, self_cpu() - g0
  end
  helper.write(tmp .. "/cli.py", [[
import smtplib, ssl, sys, threading, time, resource
port, n, resume, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == '1', sys.argv[4]
body = sys.stdin.buffer.read()
ctx = ssl.create_default_context(cafile=ca)
last = [None]
class Ctx:
    # smtplib's starttls takes no session: hand the last one in (resumption) when asked
    def wrap_socket(self, sock, server_hostname=None):
        s = ctx.wrap_socket(sock, server_hostname=server_hostname, session=last[0] if resume else None)
        return s
left = [n]
lock = threading.Lock()
def work():
    while True:
        with lock:
            if left[0] <= 0: return
            left[0] -= 1
        c = smtplib.SMTP('127.0.0.1', port, local_hostname='bench.test')
        c.starttls(context=Ctx())
        c.sendmail('a@bench.test', ['b@example.org'], body)
        if resume: last[0] = c.sock.session
        c.quit()
t0 = time.time()
ts = [threading.Thread(target=work) for _ in range(20)]
for t in ts: t.start()
for t in ts: t.join()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(time.time() - t0, ru.ru_utime + ru.ru_stime)
]])
  helper.write(tmp .. "/body", BODY)
  for _, resume in ipairs { false, true } do
    local label = resume and "resumed" or "full handshakes"
    print(("client sessions (EHLO, STARTTLS, one 4 KB message, QUIT), %d from %d at a time, %s; load %s:")
      :format(SESSIONS, CONC, label, load()))
    local w, g = ours_client(resume)
    print(("  %-30s %6s sessions/s  client CPU %6s us/session"):format("smtp.send (Lua 5.4)", fmt(SESSIONS / w),
      fmt(g * 1e6 / SESSIONS)))
    local out = helper.sh(("%s %s %d %d %s %s < %s"):format(helper.python, tmp .. "/cli.py", port, SESSIONS,
      resume and "1" or "0", certs.ca, tmp .. "/body"))
    local pw, pc = out:match("([%d.]+) ([%d.]+)")
    pw, pc = tonumber(pw), tonumber(pc)
    if pw then
      print(("  %-30s %6s sessions/s  client CPU %6s us/session"):format("Python smtplib", fmt(SESSIONS / pw),
        fmt(pc * 1e6 / SESSIONS)))
      print(("  ratio per client CPU-second: smtp.send / smtplib = %sx"):format(fmt(pc / g, 2)))
    else
      print("  Python smtplib failed: " .. out)
    end
  end
  local _ = pid
end
for _, p in ipairs(procs) do p:stop() end
