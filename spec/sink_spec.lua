-- `lua-smtp sink` as a process, with real clients: Maildir and mbox storage byte for byte, the
-- printed lines, --reject-rcpt, --auth, TLS, limits, nothing stored for broken transfers, and
-- Postfix smtp-source filling a Maildir with exactly the messages it sent.
local helper = require "helper"
local dates = require "support.dates"

if not pcall(require, "smtp.transport.native") then
  describe("lua-smtp sink", function() pending("needs smtp.transport.native") end)
  return
end

local BIN = helper.root .. "/bin/lua-smtp"

local function sink(args)
  local port = helper.free_port()
  local argv = { helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = helper.spawn(argv, { limit = 120 })
  assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
  return p, port
end

local function ls(dir)
  local out = helper.sh("ls -1 " .. helper.quote(dir) .. " 2>/dev/null")
  local t = {}
  for l in out:gmatch("[^\n]+") do t[#t + 1] = l end
  return t
end

local function swaks(port, extra)
  local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(port), "--from", "a@x.test" }
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  helper.need_argv(argv) -- fails naming the package when swaks, or its TLS, is missing
  local q = {}
  for i, a in ipairs(argv) do q[i] = helper.quote(a) end
  return (helper.sh(table.concat(q, " ") .. " 2>&1"))
end

-- Raw bytes to the sink, then the replies until it closes.
local function raw(port, data, close_early)
  local dir = helper.tmpdir()
  helper.write(dir .. "/in", data)
  return (helper.sh(helper.python .. " -c " .. helper.quote([[
import socket, sys, time
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)
s.sendall(open(sys.argv[2], 'rb').read())
if sys.argv[3] == 'early':
    time.sleep(0.3); s.close(); sys.exit(0)
s.shutdown(socket.SHUT_WR)
buf = b''
while True:
    d = s.recv(65536)
    if not d: break
    buf += d
sys.stdout.write(buf.decode('latin-1'))
]]) .. " " .. port .. " " .. helper.quote(dir .. "/in") .. " " .. (close_early and "early" or "no")))
end

local MSG = "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@x.test>\r\nFrom: a@x.test\r\n" ..
  "To: b@y.test\r\nSubject: hello sink\r\n\r\nFrom the start\r\n.dot\r\n>From quoted\r\nend\r\n"

describe("lua-smtp sink", function()
  local procs = {}
  after_each(function()
    -- TERM by PID; p:stop() would poll p:alive(), which cannot tell under LuaJIT
    for _, p in ipairs(procs) do helper.sh("kill " .. p.pid .. " 2>/dev/null"); p.stopped = true end
    procs = {}
  end)
  local function start(args)
    local p, port = sink(args)
    procs[#procs + 1] = p
    return p, port
  end

  it("prints usage with --help (0) and refuses bad options (2)", function()
    local out = helper.sh(helper.lua .. " " .. BIN .. " sink --help; echo EXIT:$?")
    assert.matches("usage: lua%-smtp sink", out)
    assert.matches("EXIT:0", out)
    out = helper.sh(helper.lua .. " " .. BIN .. " sink --bogus 2>&1; echo EXIT:$?")
    assert.matches("unknown option %-%-bogus", out)
    assert.matches("EXIT:2", out)
  end)

  it("stores into a Maildir it creates, byte for byte after Return-Path, Delivered-To and Received", function()
    local md = helper.tmpdir() .. "/Maildir"
    local p, port = start { "--maildir", md }
    local f = helper.tmpdir() .. "/m.eml"
    helper.write(f, MSG:sub(1, -3)) -- swaks ends the data with its own CRLF
    local out = swaks(port, { "--to", "b@y.test,c@y.test", "--data", "@" .. f })
    assert.matches("250 2%.0%.0 Ok: queued", out)
    assert.same({}, ls(md .. "/tmp"))
    assert.same({}, ls(md .. "/cur"))
    local files = ls(md .. "/new")
    assert.equal(1, #files)
    local stored = helper.read(md .. "/new/" .. files[1])
    local head = "Return-Path: <a@x.test>\r\nDelivered-To: b@y.test\r\nDelivered-To: c@y.test\r\n"
    assert.equal(head, stored:sub(1, #head))
    -- Postfix's shape; two recipients, so no "for <...>" (spec/received_spec.lua has the rest)
    local when, rest = stored:sub(#head + 1):match("^Received: from %S+ %(unknown %[127%.0%.0%.1%]%)\r\n" ..
      "\tby localhost %(lua%-smtp%) with ESMTP id %x+; ([^\r\n]+)\r\n(.*)$")
    assert.is_truthy(when, stored)
    dates.check(when)
    assert.equal(MSG, rest)
    local line = p:output():match("(from=[^\n]*)\n")
    assert.equal(('from=<a@x.test> to=<b@y.test>,<c@y.test> size=%d subject="hello sink" file=%s/new/%s client=[127.0.0.1]')
      :format(#MSG, md, files[1]), line)
  end)

  it("answers 550 5.1.1 to --reject-rcpt matches and delivers to the others", function()
    local md = helper.tmpdir() .. "/md"
    local _, port = start { "--maildir", md, "--reject-rcpt", "bounce*@*" }
    local out = swaks(port, { "--to", "ok@y.test,bounce-1@y.test" })
    assert.matches("<%*%* 550 5%.1%.1 Recipient address rejected", out)
    local files = ls(md .. "/new")
    assert.equal(1, #files)
    assert.matches("Delivered%-To: ok@y%.test\r\nReceived: [^\r]*\r\n\t[^\r]*\r\n\tfor <ok@y%.test>; [^\r]*\r\nDate:",
      helper.read(md .. "/new/" .. files[1]))
  end)

  it("appends to an mbox with From_ lines quoted", function()
    local mbox = helper.tmpdir() .. "/mail.mbox"
    local _, port = start { "--mbox", mbox }
    local f = helper.tmpdir() .. "/m.eml"
    helper.write(f, MSG:sub(1, -3))
    swaks(port, { "--to", "b@y.test", "--data", "@" .. f })
    swaks(port, { "--to", "c@y.test", "--data", "@" .. f })
    local data = helper.read(mbox)
    local _, froms = ("\n" .. data):gsub("\nFrom a@x%.test ", "")
    assert.equal(2, froms)
    local when = data:match("^From a@x%.test ([^\r\n]*)\r\nReturn%-Path: <a@x%.test>\r\n")
    assert.truthy(when, data:sub(1, 200))
    dates.check(when, "ctime")
    assert.matches("\r\n>From the start\r\n%.dot\r\n>>From quoted\r\nend\r\n\r\nFrom a@x%.test ", data)
    assert.equal(2, select(2, data:gsub("Return%-Path: ", "")))
  end)

  it("stores nothing for an oversized message (552) or a client gone mid-DATA", function()
    local md = helper.tmpdir() .. "/md"
    local _, port = start { "--maildir", md, "--max-size", "1000" }
    local hello = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    local out = raw(port, hello .. ("x"):rep(3000) .. "\r\n.\r\nQUIT\r\n")
    assert.matches("552 5%.3%.4 [^\n]*\n221 2%.0%.0 Bye\r\n$", out)
    raw(port, hello .. "Subject: cut\r\n\r\nhalf a mess", true)
    -- the sink drops its partial file once it sees the client gone: wait for that, not a guess
    for _ = 1, 100 do
      if #ls(md .. "/tmp") == 0 then break end
      helper.sleep(0.1)
    end
    assert.same({}, ls(md .. "/new"))
    assert.same({}, ls(md .. "/tmp"))
  end)

  it("requires AUTH with --auth, and offers STARTTLS with --tls-cert/--tls-key", function()
    local c = helper.certs()
    local md = helper.tmpdir() .. "/md"
    local _, port = start { "--maildir", md, "--auth", "u:p", "--tls-cert", c.server, "--tls-key", c.server_key,
      "--hostname", "sink.test" }
    local out = raw(port, "EHLO c\r\nMAIL FROM:<a@x.test>\r\nQUIT\r\n")
    assert.matches("^220 sink%.test ESMTP", out)
    assert.matches("530 5%.7%.0 Authentication required\r\n", out)
    out = swaks(port, { "--to", "b@y.test", "-tls", "--tls-verify", "--tls-ca-path", c.ca, "-a", "LOGIN",
      "-au", "u", "-ap", "p" })
    assert.matches("235 2%.7%.0", out)
    assert.matches("250 2%.0%.0 Ok: queued", out)
    assert.equal(1, #ls(md .. "/new"))
  end)

  it("escapes envelope addresses in its line, so a quoted local part cannot fake fields (smtplib)", function()
    local md = helper.tmpdir() .. "/md"
    local p, port = start { "--maildir", md }
    local from = '"a to=<x@y.test>"@z.test'
    local rcpts = { '"b> to=<evil@x.test>,<c"@y.test', '"d\\\\ \\"e\\""@y.test', "ok@y.test" }
    local out = helper.sh(helper.python .. " -c " .. helper.quote([[
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30)
s.ehlo('client.test')
print(s.docmd('MAIL FROM:<%s>' % sys.argv[2])[0])
for r in sys.argv[3:]:
    print(s.docmd('RCPT TO:<%s>' % r)[0])
print(s.data(b'Subject: spoof\r\n\r\nhi\r\n')[0])
s.quit()
]]) .. " " .. port .. " " .. helper.quote(from) .. " " .. helper.quote(rcpts[1]) .. " " ..
      helper.quote(rcpts[2]) .. " " .. helper.quote(rcpts[3]) .. " 2>&1")
    assert.equal("250\n250\n250\n250\n250\n", out)
    local line
    for _ = 1, 100 do
      line = p:output():match("(from=[^\n]*)\n")
      if line then break end
      helper.sleep(0.1)
    end
    -- one message: exactly these five space-separated fields, addresses without a space, quote,
    -- comma or angle bracket inside their own <>
    local f, t, size, subject, file = line:match('^from=(%S+) to=(%S+) size=(%d+) subject=("[^"]*") file=(%S+) client=%[127%.0%.0%.1%]$')
    assert.truthy(f, line)
    assert.equal('"spoof"', subject)
    assert.equal(#"Subject: spoof\r\n\r\nhi\r\n", tonumber(size))
    assert.matches("^" .. md:gsub("%p", "%%%0") .. "/new/", file)
    local function unescape(a)
      local inner = a:match("^<([^<>,\"%s\\]*)>$") or a:match("^<(.*\\x.*)>$")
      assert.truthy(inner, a)
      assert.is_nil(inner:find('[%s"<>,]'), a)
      return (inner:gsub("\\x(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
    assert.equal(from, unescape(f))
    local got = {}
    for a in t:gmatch("[^,]+") do got[#got + 1] = unescape(a) end
    assert.same(rcpts, got)
  end)

  -- A process that holds the mbox's flock (as mail readers and MDAs do) until it is killed.
  local function hold_lock(path)
    local ready = helper.tmpdir() .. "/locked"
    local h = helper.spawn({ helper.python, "-c", [[
import fcntl, sys, time
f = open(sys.argv[1], 'a')
fcntl.flock(f, fcntl.LOCK_EX)
open(sys.argv[2], 'w').write('locked')
time.sleep(600)
]], path, ready }, { limit = 120 })
    for _ = 1, 100 do
      if helper.read(ready) then break end
      helper.sleep(0.1)
    end
    assert.equal("locked", helper.read(ready), h:output())
    return h
  end

  it("waits for a locked mbox without blocking other sessions, and delivers once it is free", function()
    local dir = helper.tmpdir()
    local mbox = dir .. "/mail.mbox"
    local p, port = start { "--mbox", mbox, "--lock-wait", "60" }
    local holder = hold_lock(mbox)
    -- a message arrives while the lock is held: its client waits for the reply to the final dot
    local result = helper.tmpdir() .. "/result"
    local client = helper.spawn({ helper.python, "-c", [[
import smtplib, sys, os
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=90)
s.ehlo('c')
s.mail('a@x.test'); s.rcpt('b@y.test')
code, text = s.data(b'Subject: locked\r\n\r\nbody\r\n')
open(sys.argv[2] + '.tmp', 'w').write('%d %s' % (code, text.decode()))
os.rename(sys.argv[2] + '.tmp', sys.argv[2])
s.quit()
]], tostring(port), result }, { limit = 120 })
    -- the sink says when it starts waiting: the message is inside the wait from here on
    for _ = 1, 200 do
      if p:output():find("is locked, waiting", 1, true) then break end
      helper.sleep(0.1)
    end
    assert.matches("mail%.mbox is locked, waiting up to 60 s", p:output())
    -- meanwhile another session is served from greeting to QUIT
    local out = raw(port, "EHLO other\r\nNOOP\r\nQUIT\r\n")
    assert.matches("^220 [^\n]*\n250%-[^\n]*\n.*250 2%.0%.0 [^\n]*\n221 2%.0%.0 Bye\r\n$", out)
    assert.is_nil(helper.read(result), "the locked message was answered before the lock was free")
    holder:stop()
    for _ = 1, 200 do
      if helper.read(result) then break end
      helper.sleep(0.1)
    end
    assert.matches("^250 ", helper.read(result) or client:output())
    assert.matches("^From a@x%.test [^\n]*\r\nReturn%-Path: <a@x%.test>\r\nDelivered%-To: b@y%.test\r\n" ..
      "Received: [^\r]*\r\n\t[^\r]*\r\n\tfor <b@y%.test>; [^\r]*\r\nSubject: locked\r\n\r\nbody\r\n", helper.read(mbox))
  end)

  it("answers 451 4.3.0 when the mbox stays locked past --lock-wait, and stores nothing", function()
    local dir = helper.tmpdir()
    local mbox = dir .. "/mail.mbox"
    local _, port = start { "--mbox", mbox, "--lock-wait", "1" }
    local holder = hold_lock(mbox)
    local out = swaks(port, { "--to", "b@y.test" })
    holder:stop()
    assert.matches("<%*%* 451 4%.3%.0 mailbox locked by another process", out)
    assert.equal("", helper.read(mbox))
    assert.same({ "mail.mbox" }, ls(dir))   -- no temporary file left behind
  end)

  it("answers 451 4.3.0 and keeps no file when the Maildir's directory fsync fails", function()
    -- the fault comes from below the sink: an LD_PRELOAD shim makes fsync() of any directory fail
    -- with EIO (a full or failing disk); the sink itself has no test hook
    local dir = helper.tmpdir()
    local cc = os.getenv("CC") or "cc"
    local built = os.execute(cc .. " -shared -fPIC -Wall -Werror -o " .. dir .. "/fsync_fault.so " ..
      helper.root .. "/spec/support/fsync_fault.c -ldl")
    assert.is_true(built == true or built == 0, "the fsync shim does not build")
    local preload = dir .. "/fsync_fault.so"
    if helper.preload.LD_PRELOAD then preload = helper.preload.LD_PRELOAD .. ":" .. preload end
    local md = dir .. "/Maildir"
    local port = helper.free_port()
    local p = helper.spawn({ helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port, "--maildir", md },
      { limit = 120, env = { LD_PRELOAD = preload } })
    procs[#procs + 1] = p
    assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
    local out = swaks(port, { "--to", "b@y.test" })
    assert.matches("<%*%* 451 4%.3%.0 [^\n]*Input/output error", out)
    assert.same({}, ls(md .. "/new"))
    assert.same({}, ls(md .. "/tmp"))
    assert.is_nil(p:output():find("from=<", 1, true))
  end)

  it("Postfix smtp-source, 20 sessions: exactly as many files as messages", function()
    -- 10,000 messages in the Lua 5.4 run (about 15 s on a quiet machine, fsync'd one by one); 2,000
    -- in the LuaJIT run to keep the suite short. bench/server.sh runs the full count on both.
    -- Under `make test-asan` also 2,000: the sanitized build is several times slower.
    local n = (helper.lua == "lua5.4" and os.getenv("SMTP_BUILD") ~= "asan") and 10000 or 2000
    local md = helper.tmpdir() .. "/md"
    local p, port = start { "--maildir", md }
    local out, ok = helper.sh("/usr/sbin/smtp-source -s 20 -m " .. n .. " -l 512 -d 127.0.0.1:" .. port .. " 2>&1")
    assert.is_true(ok == true or ok == nil, out)
    assert.equal(n, #ls(md .. "/new"))
    assert.same({}, ls(md .. "/tmp"))
    local _, lines = p:output():gsub("from=<", "")
    assert.equal(n, lines)
  end)
end)
