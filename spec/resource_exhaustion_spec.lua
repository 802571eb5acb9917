-- Resource exhaustion against smtp.server (run as its own process, memory read from
-- /proc/<pid>/status): a line that never ends, tens of MB of junk, 10,000 RCPTs, a thousand
-- connections at once, and a client that pipelines NOOPs without ever reading the replies.
-- Memory must stay bounded and other sessions must still be served.
-- The junk data is 1 GB in the plain Lua 5.4 run (50 MB on LuaJIT and under ASan, for CI time);
-- the server buffers at most one line or one chunk per session either way.
local helper = require "helper"
local hard = require "support.hardening"

if not pcall(require, "smtp.transport.native") then
  describe("resource exhaustion", function() pending("needs smtp.transport.native") end)
  return
end

local client_py = [[
import socket, sys, time, re
mode, port = sys.argv[1], int(sys.argv[2])
def conn():
    s = socket.create_connection(('127.0.0.1', port), 10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
def read_finals(s, n, t=20):
    buf = b''; end = time.time() + t
    while len(re.findall(rb'(?m)^\d\d\d ', buf)) < n and time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try: d = s.recv(1 << 16)
        except (socket.timeout, OSError): break
        if not d: break
        buf += d
    return buf
def read_all(s, t=20):
    buf = b''; end = time.time() + t
    while time.time() < end:
        s.settimeout(max(0.01, end - time.time()))
        try: d = s.recv(1 << 16)
        except socket.timeout: break
        except OSError: buf += b'<RESET>'; break
        if not d: buf += b'<EOF>'; break
        buf += d
    return buf
def other():
    # a second, well-behaved session while the first misbehaves
    s = conn(); out = read_finals(s, 1)
    s.sendall(b'EHLO ok.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n')
    out += read_finals(s, 4)
    s.sendall(b'Subject: ok\r\n\r\nfine\r\n.\r\nQUIT\r\n')
    out += read_all(s, 10)
    s.close()
    ok = b'250 2.0.0' in out and b'221 ' in out
    print('other: ' + ('served' if ok else 'NOT SERVED ' + repr(out[-200:])))
if mode == 'noeol':
    s = conn(); read_finals(s, 1)
    chunk = b'A' * 65536
    sent = 0
    try:
        for i in range(64):          # up to 4 MB of one line
            s.sendall(chunk); sent += len(chunk)
    except OSError: pass
    out = read_all(s, 5)
    print('noeol sent %d reply %r' % (sent, out[:200]))
    other()
elif mode == 'junk':
    s = conn(); read_finals(s, 1)
    s.sendall(b'EHLO j.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n')
    read_finals(s, 4)
    line = (b'J' * 998 + b'\r\n')
    block = line * 1024
    sent = 0
    total = int(sys.argv[3]) * 1024 * 1024 if len(sys.argv) > 3 else 50 * 1024 * 1024
    try:
        while sent < total:
            s.sendall(block); sent += len(block)
        s.sendall(b'.\r\nQUIT\r\n')
    except OSError: pass
    out = read_all(s, 20)
    print('junk sent %d reply %r' % (sent, out[-200:]))
    s = conn(); read_finals(s, 1)
    sent = 0
    try:
        while sent < 50 * 1024 * 1024:
            s.sendall(b'\xff\x00junk' * 100000); sent += 600000
    except OSError: pass
    out = read_all(s, 5)
    print('junkcmd sent %d reply %r' % (sent, out[-120:]))
    other()
elif mode == 'rcpts':
    s = conn(); read_finals(s, 1)
    s.sendall(b'EHLO r.test\r\nMAIL FROM:<a@x.test>\r\n')
    read_finals(s, 2)
    s.sendall(b''.join(b'RCPT TO:<r%d@y.test>\r\n' % i for i in range(10000)))
    out = read_finals(s, 10000, 60)
    codes = re.findall(rb'(?m)^(\d\d\d)[ -](\S*)', out)
    c250 = sum(1 for c, e in codes if c == b'250')
    c452 = sum(1 for c, e in codes if c == b'452' and e == b'4.5.3')
    s.sendall(b'DATA\r\n'); out = read_finals(s, 1)
    s.sendall(b'Subject: many\r\n\r\nx\r\n.\r\nQUIT\r\n'); out += read_all(s, 10)
    print('rcpts 250=%d 452=%d other=%d end=%r' % (c250, c452, len(codes) - c250 - c452, out))
elif mode == 'conns':
    n = int(sys.argv[3])
    socks = []
    for i in range(n):
        try: socks.append(conn())
        except OSError as e: print('connect failed at %d: %s' % (i, e)); break
    c220 = c421 = cother = 0
    for s in socks:
        g = read_finals(s, 1, 10)
        if g.startswith(b'220 '): c220 += 1
        elif g.startswith(b'421 '): c421 += 1
        else: cother += 1
    print('conns opened=%d 220=%d 421=%d other=%d' % (len(socks), c220, c421, cother))
    # one of the admitted sessions still works while all are held
    held = None
    for s in socks:
        try:
            s.sendall(b'NOOP\r\n')
            r = read_finals(s, 1, 5)
            if r.startswith(b'250 '): held = s; break
        except OSError: pass
    print('held session answers NOOP: %s' % (held is not None))
    for s in socks: s.close()
    time.sleep(0.5)
    other()
elif mode == 'slowread':
    s = conn(); read_finals(s, 1)
    s.sendall(b'EHLO s.test\r\n'); read_finals(s, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(2)
    noops = b'NOOP\r\n' * 10000
    sent = 0
    try:
        for i in range(500):         # up to 5,000,000 NOOPs, 30 MB, never reading a reply
            s.sendall(noops); sent += 10000
        print('slowread sent %d NOOPs: all' % sent)
    except (socket.timeout, OSError):
        print('slowread sent %d NOOPs: blocked' % sent)
    other()
    s.close()
]]

-- Under make test-asan the server keeps the ASan runtime; its quarantine holds freed memory back
-- (256 MB by default), which would read as growth: turn it off for these measurements.
local env = { LUA_PATH = os.getenv("LUA_PATH"), LUA_CPATH = os.getenv("LUA_CPATH") }
if helper.preload.ASAN_OPTIONS then
  env.ASAN_OPTIONS = helper.preload.ASAN_OPTIONS .. ":quarantine_size_mb=0:thread_local_quarantine_size_kb=0"
end

local function start_server(maxc)
  local dir = helper.tmpdir()
  local port = helper.free_port()
  local p = helper.spawn({ helper.lua, helper.root .. "/spec/support/hardening_server.lua", tostring(port),
    tostring(maxc or 1000), dir .. "/status" }, {
    limit = 300, env = env })
  assert(helper.wait_port("127.0.0.1", port, 10), p:output())
  -- helper.spawn's PID is `timeout`; the interpreter is its only child
  local child
  for _ = 1, 50 do
    child = tonumber((helper.read("/proc/" .. p.pid .. "/task/" .. p.pid .. "/children") or ""):match("%d+"))
    if child then break end
    helper.sleep(0.05)
  end
  assert(child, "no child")
  local s = { proc = p, port = port, pid = child, dir = dir }
  function s.status() return helper.read(dir .. "/status") or "" end
  function s.mem()
    local st = helper.read("/proc/" .. child .. "/status") or ""
    return tonumber(st:match("VmRSS:%s*(%d+)")), tonumber(st:match("VmHWM:%s*(%d+)"))
  end
  function s.active()
    for _ = 1, 100 do
      local a = tonumber(s.status():match("active (%d+)"))
      if a == 0 then return 0 end
      helper.sleep(0.1)
    end
    return tonumber(s.status():match("active (%d+)"))
  end
  return s
end

local function client(mode, port, ...)
  local dir = helper.tmpdir()
  helper.write(dir .. "/c.py", client_py)
  local args = { helper.python, dir .. "/c.py", mode, tostring(port), ... }
  for i, a in ipairs(args) do args[i] = helper.quote(a) end
  return (helper.sh("timeout 120 " .. table.concat(args, " ") .. " 2>&1"))
end

-- The server's peak memory may grow by at most this much over its idle size (kB).
local BOUND = 16 * 1024

describe("resource exhaustion against smtp.server", function()
  local srv
  after_each(function() if srv then srv.proc:stop() end end)

  it("a line that never ends: 421 at 64 KB, closed, memory bounded, others served", function()
    srv = start_server()
    local _, base = srv.mem()
    local out = client("noeol", srv.port)
    local _, peak = srv.mem()
    assert.matches("reply b'421 4%.7%.0 Line too long, closing connection\\r\\n<EOF>'", out)
    assert.matches("other: served", out)
    assert.is_true(peak - base < BOUND, ("peak grew %d kB"):format(peak - base))
    assert.equal(0, srv.active())
  end)

  -- 1 GB of junk data in the plain Lua 5.4 run, as the issue asks; 50 MB on LuaJIT and under ASan
  -- to keep CI short (the bound is the same: the server holds at most one chunk per session).
  local junk_mb = (helper.lua == "lua5.4" and os.getenv("SMTP_BUILD") ~= "asan") and 1024 or 50
  it(junk_mb .. " MB of junk as data (552, nothing stored) and 50 MB as commands (421), memory bounded", function()
    srv = start_server()
    local _, base = srv.mem()
    local out = client("junk", srv.port, tostring(junk_mb))
    local _, peak = srv.mem()
    assert.is_true((tonumber(out:match("junk sent (%d+)")) or 0) >= junk_mb * 1024 * 1024, out)
    assert.matches("junk sent %d+ reply b'552 5%.3%.4 [^']*\\r\\n221 [^']*\\r\\n<EOF>'", out)
    assert.matches("junkcmd sent %d+ reply b'.*421 4%.7%.0 [^']*\\r\\n<EOF>'", out)
    assert.matches("other: served", out)
    assert.not_matches("msg %d+ 1 5", srv.proc:output()) -- the 50 MB message was never handed over
    assert.is_true(peak - base < BOUND, ("peak grew %d kB"):format(peak - base))
    assert.equal(0, srv.active())
  end)

  it("10,000 RCPTs: 100 accepted, 9,900 times 452 4.5.3, no disconnect, the message goes to 100", function()
    srv = start_server()
    local _, base = srv.mem()
    local out = client("rcpts", srv.port)
    local _, peak = srv.mem()
    assert.matches("rcpts 250=100 452=9900 other=0 end=b'354 [^']*\\r\\n250 2%.0%.0 [^']*\\r\\n221 [^']*<EOF>'", out)
    assert.matches("msg 1 100 ", srv.proc:output())
    assert.is_true(peak - base < BOUND, ("peak grew %d kB"):format(peak - base))
  end)

  it("1,000 connections at once against max_connections = 200: 421 beyond, held sessions and new ones served", function()
    srv = start_server(200)
    local _, base = srv.mem()
    local out = client("conns", srv.port, "1000")
    local _, peak = srv.mem()
    assert.matches("conns opened=1000 220=200 421=800 other=0", out)
    assert.matches("held session answers NOOP: True", out)
    assert.matches("other: served", out)
    assert.equal(0, srv.active())
    assert.is_true(peak - base < 4 * BOUND, ("peak grew %d kB"):format(peak - base))
  end)

  it("a client pipelining NOOPs without reading: the server stops reading, memory bounded, others served", function()
    srv = start_server()
    local _, base = srv.mem()
    local out = client("slowread", srv.port)
    local _, peak = srv.mem()
    assert.matches("slowread sent %d+ NOOPs: blocked", out)
    assert.matches("other: served", out)
    assert.is_true(peak - base < BOUND, ("peak grew %d kB"):format(peak - base))
  end)
end)
