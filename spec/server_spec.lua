-- smtp.server against real clients (swaks, Python smtplib, msmtp, curl, Postfix smtp-source) and a
-- scripted raw client for misbehaviour: messages arrive byte for byte, hooks decide, limits hold.
local helper = require "helper"
local peers = require "support.server_peers"
local server = require "smtp.server"

-- The native transport lands separately; until it is there these specs wait.
if not pcall(require, "smtp.transport.native") then
  describe("smtp.server", function() pending("needs smtp.transport.native") end)
  return
end

local MSG = "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@x.test>\r\nFrom: a@x.test\r\nTo: b@y.test\r\nSubject: hello\r\n\r\nline one\r\n.leading dot\r\n" ..
  "..two dots\r\n\r\nend\r\n"

-- swaks ends the data with a CRLF of its own
local SWAKS_MSG = MSG:sub(1, -3)

-- A server that records envelopes and messages (read in small pieces to exercise the reader).
local function recording(opts)
  local got = { msgs = {} }
  opts = opts or {}
  local o = {
    port = 0, hostname = "mx.test", timeout = 10,
    on_message = function(session, env, reader)
      local data = helper.read_message(reader, 7)
      if not data then return false end
      got.msgs[#got.msgs + 1] = { env = env, data = data, user = session.user, tls = session.tls }
      return true
    end,
  }
  for k, v in pairs(opts) do o[k] = v end
  local srv = assert(server.listen(o))
  return srv, got
end

local function file_with(data)
  local p = helper.tmpdir() .. "/msg.eml"
  helper.write(p, data)
  return p
end

describe("smtp.server with real clients", function()
  it("swaks, pipelined: the message arrives byte for byte", function()
    local srv, got = recording()
    local out, code = peers.run(srv, { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port),
      "--from", "a@x.test", "--to", "b@y.test", "--pipeline", "--data", "@" .. file_with(SWAKS_MSG) })
    assert.equal(0, code, out)
    assert.matches("PIPELINING", out)
    assert.equal(1, #got.msgs)
    assert.equal(MSG, got.msgs[1].data)
    assert.same({ "b@y.test" }, got.msgs[1].env.to)
    assert.equal("a@x.test", got.msgs[1].env.from)
  end)

  it("swaks over STARTTLS with --tls-verify against the test CA, AUTH PLAIN and LOGIN", function()
    local c = helper.certs()
    for _, mech in ipairs { "PLAIN", "LOGIN" } do
      local srv, got = recording {
        host = "127.0.0.1", tls = { cert = c.server, key = c.server_key }, auth_plaintext = false,
        auth = function(_, m, u, p) return m == mech and u == "u" and p == "p" end, require_auth = true,
      }
      local out, code = peers.run(srv, { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port),
        "--from", "a@x.test", "--to", "b@y.test", "-tls", "--tls-verify", "--tls-ca-path", c.ca,
        "-a", mech, "-au", "u", "-ap", "p", "--data", "@" .. file_with(SWAKS_MSG) })
      assert.equal(0, code, out)
      assert.matches("235 2%.7%.0", out)
      assert.equal(1, #got.msgs)
      assert.equal(MSG, got.msgs[1].data)
      assert.equal("u", got.msgs[1].user)
      assert.is_true(got.msgs[1].tls)
    end
  end)

  it("swaks over implicit TLS (tls.implicit): no STARTTLS offered, the message arrives", function()
    local c = helper.certs()
    local srv, got = recording { tls = { cert = c.server, key = c.server_key, implicit = true } }
    local out, code = peers.run(srv, { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port),
      "--from", "a@x.test", "--to", "b@y.test", "-tlsc", "--tls-verify", "--tls-ca-path", c.ca,
      "--data", "@" .. file_with(SWAKS_MSG) })
    assert.equal(0, code, out)
    assert.not_matches("STARTTLS", out)
    assert.equal(MSG, got.msgs[1].data)
    assert.is_true(got.msgs[1].tls)
  end)

  it("serve() inside smtp.loop is one more task; srv.port is the bound port", function()
    local loop = require "smtp.loop"
    local srv, got = recording()
    assert.is_true(srv.port > 0)
    local res
    loop.spawn(function()
      assert.is_true(srv:serve()) -- returns at once inside the loop
      local smtp = require "smtp"
      res = { smtp.send { server = "127.0.0.1", port = srv.port, tls = "none", helo = "c.test",
        from = "a@x.test", to = { "b@y.test" }, message = MSG, timeout = 10 } }
      srv:close()
    end)
    loop.run()
    assert.is_table(res[1], tostring(res[2]))
    assert.equal(250, res[1].reply.code)
    assert.equal(MSG, got.msgs[1].data)
  end)

  it("swaks with a wrong password gets 535", function()
    local srv, got = recording { auth = function(_, _, u, p) return u == "u" and p == "p" end }
    local out = peers.run(srv, { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port),
      "--from", "a@x.test", "--to", "b@y.test", "-a", "PLAIN", "-au", "u", "-ap", "wrong" })
    assert.matches("535 5%.7%.8", out)
    assert.equal(0, #got.msgs)
  end)

  it("Python smtplib: send_message, and sendmail over starttls with login", function()
    local c = helper.certs()
    local dir = helper.tmpdir()
    helper.write(dir .. "/c.py", peers.smtplib_py)
    local srv, got = recording()
    local out, code = peers.run(srv, { helper.python, dir .. "/c.py", tostring(srv.port), file_with(MSG), "send_message" })
    assert.equal(0, code, out)
    assert.equal(1, #got.msgs)
    assert.equal("hello", got.msgs[1].data:match("Subject: (%w+)"))
    assert.matches("line one\r\n%.leading dot\r\n%.%.two dots\r\n\r\nend\r\n$", got.msgs[1].data)

    srv, got = recording { tls = { cert = c.server, key = c.server_key },
      auth = function(_, _, u, p) return u == "u" and p == "p" end }
    out, code = peers.run(srv, { helper.python, dir .. "/c.py", tostring(srv.port), file_with(MSG), "sendmail", c.ca })
    assert.equal(0, code, out)
    assert.equal(MSG, got.msgs[1].data)
    assert.same({ "b@y.test", "c@y.test" }, got.msgs[1].env.to)
    assert.is_true(got.msgs[1].tls)
  end)

  it("msmtp and curl: byte for byte", function()
    local srv, got = recording()
    local f = file_with(MSG)
    local out, code = peers.run(srv, "msmtp --host=127.0.0.1 --port=" .. srv.port ..
      " --tls=off --auth=off --from=a@x.test b@y.test < " .. helper.quote(f))
    assert.equal(0, code, out)
    assert.equal(MSG, got.msgs[1].data)
    srv, got = recording()
    out, code = peers.run(srv, { "curl", "-sS", "smtp://127.0.0.1:" .. srv.port, "--mail-from", "a@x.test",
      "--mail-rcpt", "b@y.test", "-T", f })
    assert.equal(0, code, out)
    assert.equal(MSG, got.msgs[1].data)
  end)

  it("Perl Net::SMTP (two messages on one session, two recipients): byte for byte", function()
    local srv, got = recording()
    local script = helper.tmpdir() .. "/send.pl"
    helper.write(script, [[
use strict; use Net::SMTP;
my ($port, $file) = @ARGV;
open(my $fh, '<:raw', $file) or die $!; local $/; my $msg = <$fh>; close $fh;
my $s = Net::SMTP->new('127.0.0.1', Port => $port, Hello => 'perl.test', Timeout => 10) or die "connect: $@";
for my $i (1, 2) {
  $s->mail('a@x.test') or die 'MAIL: ' . $s->message;
  $s->to('b@y.test', 'c@y.test') or die 'RCPT: ' . $s->message;
  $s->data() or die 'DATA: ' . $s->message;
  $s->datasend($msg); $s->dataend() or die 'end: ' . $s->message;
}
$s->quit; print "sent\n";
]])
    local out, code = peers.run(srv, { "perl", script, tostring(srv.port), file_with(MSG) })
    assert.equal(0, code, out)
    assert.matches("sent", out)
    assert.equal(2, #got.msgs)
    for i = 1, 2 do
      assert.equal(MSG, got.msgs[i].data)
      assert.same({ "b@y.test", "c@y.test" }, got.msgs[i].env.to)
    end
  end)

  it("Postfix smtp-source: 20 sessions, 2,000 messages, all counted", function()
    local n = 0
    local srv = assert(server.listen { port = 0, max_connections = 100,
      on_message = function() n = n + 1 return true end })
    local out, code = peers.run(srv, { "/usr/sbin/smtp-source", "-s", "20", "-m", "2000", "-l", "1024", "-d",
      "127.0.0.1:" .. srv.port }, 60)
    assert.equal(0, code, out)
    assert.equal(2000, n)
  end)
end)

describe("smtp.server against misbehaving clients", function()
  local HELLO = "EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"

  it("never takes a look-alike end of data as the end (no smuggling over the wire)", function()
    local srv, got = recording()
    local out = peers.raw(srv, {
      { "send", HELLO }, { "recv", "354 " },
      { "send", "x\r\n\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\nDATA\r\nhidden\r\n\r\n.\r\n" },
      { "recv", "55\\d " }, { "send", "QUIT\r\n" }, { "eof" },
    })
    assert.matches("550 5%.6%.11 Bare CR or LF in message data not allowed\r\n221 2%.0%.0 Bye\r\n$", out)
    assert.equal(0, #got.msgs)
  end)

  it("drops a command glued after STARTTLS", function()
    local c = helper.certs()
    local srv, got = recording { tls = { cert = c.server, key = c.server_key } }
    local out = peers.raw(srv, {
      { "recv", "220 " }, { "send", "EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n" }, { "recv", "220 2\\.0\\.0[^\n]*\n" },
      { "tls", c.ca }, { "send", "RCPT TO:<b@y.test>\r\n" }, { "recv", "\n5\\d\\d [^\n]*\n" },
      { "send", "EHLO c\r\n" }, { "recv", "250 DSN\r\n" }, { "send", "STARTTLS\r\nQUIT\r\n" }, { "eof" },
    })
    assert.matches("<TLS>\r\n503 5%.5%.1 Error: need MAIL command\r\n", out) -- the glued MAIL was never run
    local after = out:match("<TLS>\r\n(.*)$")
    assert.not_matches("STARTTLS", after:match("250%-.-250 DSN"))
    assert.matches("503 5%.5%.1 Error: TLS already active\r\n221 ", after)
    assert.equal(0, #got.msgs)
  end)

  it("AUTH with bad base64 is 501, the session goes on", function()
    local srv = recording { auth = function() return true end }
    local out = peers.raw(srv, { { "send", "EHLO c\r\nAUTH PLAIN %%%%\r\nAUTH LOGIN\r\n*\r\nNOOP\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("501 5%.5%.2 Invalid base64 data\r\n334 VXNlcm5hbWU6\r\n501 5%.7%.0 Authentication cancelled\r\n250 2%.0%.0 Ok\r\n221 ", out)
  end)

  it("answers pipelined commands with one write (RFC 2920): the client's first read has every reply", function()
    local srv = recording()
    local dir = helper.tmpdir()
    -- one send of four commands, then one recv: had the server written a reply per command, that
    -- recv would return the first reply alone
    helper.write(dir .. "/one.py", [[
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), 10)
buf = b""
while not buf.endswith(b"\r\n"): buf += s.recv(1000)
s.sendall(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nNOOP\r\n")
sys.stdout.write(s.recv(65536).decode())
s.sendall(b"QUIT\r\n")
s.recv(1000)
]])
    local out = peers.run(srv, { helper.python, dir .. "/one.py", tostring(srv.port) }, 20)
    assert.matches("^250%-mx%.test[^\n]*\r\n.*250 DSN\r\n250 2%.1%.0 Ok\r\n250 2%.1%.5 Ok\r\n250 2%.0%.0 Ok\r\n$", out)
  end)

  it("answers 20,000 pipelined commands sent at once, all in order", function()
    local srv = recording()
    local out = peers.raw(srv, { { "send", ("NOOP\r\n"):rep(20000) .. "QUIT\r\n" }, { "eof" } })
    local _, n = out:gsub("250 2%.0%.0 Ok\r\n", "")
    assert.equal(20000, n)
    assert.matches("250 2%.0%.0 Ok\r\n221 2%.0%.0 Bye\r\n$", out)
  end)

  it("200 recipients: 100 accepted, 100 times 452, and the message goes to the 100", function()
    local srv, got = recording()
    local t = { "EHLO c\r\nMAIL FROM:<a@x.test>\r\n" }
    for i = 1, 200 do t[#t + 1] = ("RCPT TO:<r%d@y.test>\r\n"):format(i) end
    t[#t + 1] = "DATA\r\n"
    local out = peers.raw(srv, { { "send", table.concat(t) }, { "recv", "354 " }, { "send", "x\r\n.\r\nQUIT\r\n" }, { "eof" } })
    local _, n452 = out:gsub("452 4%.5%.3 ", "")
    assert.equal(100, n452)
    assert.equal(100, #got.msgs[1].env.to)
    assert.matches("221 2%.0%.0 Bye\r\n$", out)
  end)

  it("an oversized message gets 552 and nothing is delivered", function()
    local srv, got = recording { max_message_size = 1000 }
    local out = peers.raw(srv, { { "send", HELLO }, { "recv", "354 " },
      { "send", ("x"):rep(5000) .. "\r\n.\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("552 5%.3%.4 Message size exceeds fixed maximum message size\r\n221 ", out)
    assert.equal(0, #got.msgs)
  end)

  it("closes an idle client with 421 after the timeout", function()
    local srv = recording { timeout = 0.5 }
    local out = peers.raw(srv, { { "send", "EHLO c\r\n" }, { "eof", 5 } })
    assert.matches("250 DSN\r\n421 4%.4%.2 Idle timeout, closing connection\r\n$", out)
  end)

  it("a client that disconnects in the middle of DATA leaves nothing, the reader says so", function()
    local seen
    local srv = assert(server.listen { port = 0, on_message = function(_, _, reader)
      while true do
        local c, err = reader:read(100)
        if not c then seen = err; return true end
      end
    end })
    peers.raw(srv, { { "send", HELLO }, { "recv", "354 " }, { "send", "partial data\r\nmore" }, { "close" } })
    assert.equal("closed", seen and seen.kind)
  end)

  it("hooks that raise give 451 for that command, and the session goes on", function()
    local srv = assert(server.listen { port = 0,
      on_rcpt = function(_, rcpt) if rcpt:match("^boom") then error("hook failure") end return true end,
      on_message = function() error("message hook failure") end })
    local out = peers.raw(srv, { { "send", "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<boom@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" },
      { "recv", "354 " }, { "send", "x\r\n.\r\nNOOP\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("451 4%.3%.0 Temporary error, try again later\r\n250 2%.1%.5 Ok\r\n354 [^\n]*\n" ..
      "451 4%.3%.0 Error processing message, try again later\r\n250 2%.0%.0 Ok\r\n221 ", out)
  end)

  it("hooks reject with their own code and text", function()
    local srv = assert(server.listen { port = 0,
      on_mail = function(_, from) return from ~= "spam@x.test", 550, "5.7.1 Go away" end,
      on_rcpt = function(_, rcpt, params) return params.NOTIFY == "NEVER", 550, "No such user" end,
      on_message = function() return false, 554, "5.6.0 Not today" end })
    local out = peers.raw(srv, { { "send", "EHLO c\r\nMAIL FROM:<spam@x.test>\r\nMAIL FROM:<a@x.test>\r\n" ..
      "RCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test> NOTIFY=NEVER\r\nDATA\r\n" }, { "recv", "354 " },
      { "send", "x\r\n.\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("550 5%.7%.1 Go away\r\n250 2%.1%.0 Ok\r\n550 5%.1%.1 No such user\r\n250 2%.1%.5 Ok\r\n354 [^\n]*\n" ..
      "554 5%.6%.0 Not today\r\n221 ", out)
  end)

  it("answers 421 beyond max_connections", function()
    local srv = recording { max_connections = 1 }
    local dir = helper.tmpdir()
    helper.write(dir .. "/two.py", [[
import socket, sys, time
a = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
print(a.recv(100).decode().strip())
b = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
b.settimeout(5)
print(b.recv(100).decode().strip())
]])
    local out = peers.run(srv, { helper.python, dir .. "/two.py", tostring(srv.port) })
    assert.matches("^220 mx%.test ESMTP lua%-smtp\n421 4%.3%.2 Too many connections", out)
  end)

  it("srv:close() ends waiting sessions with 421", function()
    local loop = require "smtp.loop"
    local srv = recording()
    local dir = helper.tmpdir()
    helper.write(dir .. "/wait.py", [[
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
s.settimeout(10)
buf = b''
while True:
    d = s.recv(1000)
    if not d: break
    buf += d
print(buf.decode().replace('\r\n', '|'))
]])
    local p = helper.spawn({ helper.python, dir .. "/wait.py", tostring(srv.port) }, { limit = 20 })
    loop.spawn(function()
      -- close once the client's session is open (Python may take a while to start)
      local t0 = loop.now()
      while srv.active < 1 and loop.now() - t0 < 15 do loop.sleep(0.05) end
      loop.sleep(0.05) -- yields: the session's task, queued at accept, writes its greeting first
      srv:close()
    end)
    srv:serve()
    for _ = 1, 150 do if p:output() ~= "" then break end helper.sleep(0.1) end
    assert.equal("220 mx.test ESMTP lua-smtp|421 4.3.2 Service shutting down|\n", p:output())
  end)

  it("streams a large message through the reader in bounded memory", function()
    local size, peak = 0, 0
    local srv = assert(server.listen { port = 0, max_message_size = 0, on_message = function(_, _, reader)
      -- Live memory, not garbage: every 4 MB a full collection, then the count. A reader that
      -- kept the message would show it here; chunks already read and dropped would not.
      local next_check = 0
      for chunk in reader:chunks() do
        size = size + #chunk
        if size >= next_check then
          next_check = next_check + 4 * 1024 * 1024
          collectgarbage()
          local kb = collectgarbage("count")
          if kb > peak then peak = kb end
        end
      end
      return true
    end })
    collectgarbage()
    local base = collectgarbage("count")
    local dir = helper.tmpdir()
    helper.write(dir .. "/big.py", [[
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
f = s.makefile('rb')
f.readline()
s.sendall(b'EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n')
for _ in range(7): f.readline()
line = b'x' * 1022 + b'\r\n'
block = line * 1024
for _ in range(48): s.sendall(block)
s.sendall(b'.\r\nQUIT\r\n')
print(f.read().decode())
]])
    local out = peers.run(srv, { helper.python, dir .. "/big.py", tostring(srv.port) })
    assert.matches("250 2%.0%.0 Ok: queued\r\n221 ", out)
    assert.equal(48 * 1024 * 1024, size)
    assert.is_true(peak - base < 8 * 1024, "live memory grew by " .. (peak - base) .. " KB (message: 48 MB)")
  end)
end)
