-- STARTTLS injection (CVE-2011-0411 and kin; Poddebniak et al., USENIX Security 2021):
-- plaintext commands glued after STARTTLS must never run after the handshake on our server, and
-- lines glued to a STARTTLS 220 must never be read by our client as its post-TLS EHLO reply.
local helper = require "helper"
local hard = require "support.hardening"
local client_peers = require "support.client_peers"

if not pcall(require, "smtp.transport.native") then
  describe("starttls injection", function() pending("needs smtp.transport.native") end)
  return
end
local smtp = require "smtp"
local loop = require "smtp.loop"
local native = require "smtp.transport.native"
local core = require "smtp.core"

-- Reads from a native connection until `pattern` matches what arrived (or `t` seconds pass).
local function read_until(s, acc, pattern, t)
  local deadline = core.now() + (t or 5)
  while not acc.buf:find(pattern) do
    local left = deadline - core.now()
    if left <= 0 then return false end
    local chunk, err = s:read(left)
    if not chunk then
      acc.err = err
      return false
    end
    acc.buf = acc.buf .. chunk
  end
  return true
end

-- Runs `client(s, acc)` in smtp.loop against srv over our native transport; returns acc.
local function converse(srv, client)
  local acc = { buf = "" }
  local perr
  loop.spawn(function()
    local ok, e = pcall(function()
      local s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      client(s, acc)
      s:close()
    end)
    if not ok then perr = e end
    loop.sleep(0.05)
    srv:close()
  end)
  srv:serve()
  assert(not perr, perr)
  return acc
end

describe("STARTTLS command injection against smtp.server", function()
  local c = helper.certs()

  local glued = {
    { "MAIL", "MAIL FROM:<evil@x.test>\r\n" },
    { "RSET and NOOP", "RSET\r\nNOOP\r\n" },
    { "a whole transaction", "MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n.\r\n" },
    { "AUTH", "AUTH PLAIN " .. core.b64encode("\0u\0p") .. "\r\n" },
    { "EHLO", "EHLO evil.test\r\n" },
  }
  for _, case in ipairs(glued) do
    it("never runs " .. case[1] .. " glued after STARTTLS in the same packet", function()
      local srv, got = hard.recording { tls = { cert = c.server, key = c.server_key },
        auth = function() return true end, auth_plaintext = true }
      local acc = converse(srv, function(s, acc)
        assert(read_until(s, acc, "^220 [^\n]*\n"))
        assert(s:write("EHLO c.test\r\n", 5))
        assert(read_until(s, acc, "\n250 [^\n]*\n"))
        acc.buf = ""
        assert(s:write("STARTTLS\r\n" .. case[2], 5)) -- one write: one packet on loopback
        assert(read_until(s, acc, "^220 [^\n]*\n"))
        acc.plain = acc.buf
        acc.buf = ""
        assert(s:starttls { servername = "localhost", cafile = c.ca, timeout = 5 })
        -- (a read that times out closes the connection, so silence is proven by what follows:
        -- the first bytes after the handshake must be the answer to our own RCPT)
        loop.sleep(0.2)
        assert(s:write("RCPT TO:<b@y.test>\r\n", 5))
        assert(read_until(s, acc, "^%d%d%d [^\n]*\n"))
        acc.rcpt = acc.buf
        acc.buf = ""
        assert(s:write("EHLO c.test\r\n", 5))
        assert(read_until(s, acc, "\n250 [^\n]*\n"))
        acc.ehlo = acc.buf
        acc.buf = ""
        assert(s:write("QUIT\r\n", 5))
        read_until(s, acc, "^221 [^\n]*\n")
      end)
      assert.equal("220 2.0.0 Ready to start TLS\r\n", acc.plain)
      assert.equal("503 5.5.1 Error: need MAIL command\r\n", acc.rcpt)
      assert.matches("^250%-mx%.test\r\n", acc.ehlo)
      assert.not_matches("STARTTLS", acc.ehlo)
      assert.equal("221 2.0.0 Bye\r\n", acc.buf)
      assert.equal(0, #got.msgs)
    end)
  end

  it("drops glued bytes arriving in a later packet before the ClientHello too", function()
    local srv, got = hard.recording { tls = { cert = c.server, key = c.server_key } }
    -- Python's ssl over a raw socket: STARTTLS, then MAIL in its own packet, then the handshake
    local out = hard.raw(srv, {
      { "replies", 1 }, { "send", "EHLO c\r\n" }, { "replies", 2 }, { "send", "STARTTLS\r\n" },
      { "sleep", 0.05 }, { "send", "MAIL FROM:<evil@x.test>\r\n" }, { "replies", 3 },
      { "tls", c.ca }, { "send", "QUIT\r\n" }, { "eof" },
    })
    -- either the handshake failed on the plaintext bytes, or they were dropped: never run
    assert.not_matches("250 2%.1%.0", out)
    assert.equal(0, #got.msgs)
  end)
end)

describe("STARTTLS response injection against smtp.send", function()
  local f
  setup(function() f = client_peers.fake() end)
  teardown(function() f.stop() end)

  local function run(steps, o)
    f.script(steps)
    local opts = { server = "127.0.0.1", port = f.port, helo = "client.test", timeout = 5,
      from = "a@example.com", to = { "b@example.org" }, message = "Subject: t\r\n\r\nhi\r\n" }
    for k, v in pairs(o) do opts[k] = v end
    local res, err = smtp.send(opts)
    return res, err, f.received(1)
  end
  local HELLO = { { "send", "220 fake ESMTP\r\n" }, { "line" }, { "send", "250-fake.test\r\n250 STARTTLS\r\n" }, { "line" } }
  local function with(...)
    local t = {}
    for _, s in ipairs(HELLO) do t[#t + 1] = s end
    for _, s in ipairs { ... } do t[#t + 1] = s end
    return t
  end

  for _, mode in ipairs { "starttls", "opportunistic" } do
    it("tls=" .. mode .. ": lines glued to the 220 abort the session; no AUTH, no MAIL, in clear or not", function()
      local res, err, got = run(with({ "send", "220 2.0.0 go\r\n250-evil.test\r\n250 AUTH PLAIN\r\n" }),
        { tls = mode, auth = { user = "u", password = "p" } })
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.equal("tls", err.phase)
      assert.is_false(err.temporary)
      assert.truthy(err.text:find("response injection", 1, true))
      assert.equal("#CONNECT\nEHLO client.test\r\nSTARTTLS\r\n", got)
    end)

    it("tls=" .. mode .. ": lines glued in a second packet end the handshake, never read as EHLO", function()
      local res, err, got = run(with({ "send", "220 2.0.0 go\r\n" }, { "sleep", 0.05 },
        { "send", "250-evil.test\r\n250 AUTH PLAIN\r\n" }), { tls = mode })
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.equal("tls", err.phase)
      -- the bytes after STARTTLS are the ClientHello (binary), never a command in clear
      local after = got:match("STARTTLS\r\n(.*)$")
      assert.not_matches("EHLO", after)
      assert.not_matches("MAIL", after)
      assert.not_matches("AUTH", after)
    end)
  end

  it("with a real TLS server behind the injected lines, still aborts and sends nothing over TLS", function()
    local c = helper.certs()
    local dir = helper.tmpdir()
    local port = helper.free_port()
    helper.write(dir .. "/tls_fake.py", [[
import socket, ssl, sys
port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(('127.0.0.1', port)); ls.listen(4)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(cert, key)
while True:
    c, _ = ls.accept()
    rec = open(log, 'ab')
    try:
        f = c.makefile('rb')
        c.sendall(b'220 fake\r\n'); rec.write(f.readline())
        c.sendall(b'250-fake.test\r\n250 STARTTLS\r\n'); rec.write(f.readline())
        c.sendall(b'220 go\r\n250-evil.test\r\n250 AUTH PLAIN\r\n')
        t = ctx.wrap_socket(c, server_side=True)
        rec.write(b'<TLS>\n')
        tf = t.makefile('rb')
        while True:
            l = tf.readline()
            if not l: break
            rec.write(l); rec.flush()
            if l.startswith(b'EHLO'): t.sendall(b'250-fake.test\r\n250 8BITMIME\r\n')
            elif l.startswith(b'QUIT'): t.sendall(b'221 bye\r\n'); break
            else: t.sendall(b'250 ok\r\n')
    except Exception as e:
        rec.write(('<ERR %s>\n' % type(e).__name__).encode())
    rec.write(b'<END>\n'); rec.close(); c.close()  # the spec waits for <END>
]])
    local p = helper.spawn({ helper.python, dir .. "/tls_fake.py", tostring(port), c.server, c.server_key, dir .. "/log" }, { limit = 60 })
    assert(helper.wait_port("127.0.0.1", port, 10))
    local function ended()
      local t0 = core.now()
      while not (helper.read(dir .. "/log") or ""):find("<END>") and core.now() - t0 < 10 do helper.sleep(0.05) end
    end
    ended() -- wait_port's connection, written down before the log starts afresh
    helper.write(dir .. "/log", "")
    local res, err = smtp.send { server = "localhost", port = port, cafile = c.ca, helo = "client.test", timeout = 5,
      from = "a@example.com", to = { "b@example.org" }, message = "Subject: t\r\n\r\nhi\r\n", auth = { user = "u", password = "p" } }
    ended()
    p:stop()
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    local log = helper.read(dir .. "/log")
    assert.matches("^EHLO client%.test\r\nSTARTTLS\r\n", log)
    assert.not_matches("AUTH", log)
    assert.not_matches("MAIL", log)
  end)
end)
