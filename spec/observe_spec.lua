-- Transcripts, events and counters (smtp.observe) against real peers: the client against aiosmtpd
-- over STARTTLS with every SASL mechanism, smtp.deliver against dnsmasq and aiosmtpd MX hosts, the
-- server against swaks and a raw client. The secret of each login, its base64 (at every
-- alignment) and its xtext never appear in a transcript or an event.
local helper = require "helper"
local core = require "smtp.core"

if not pcall(require, "smtp.transport.native") then
  describe("observe", function() pending("needs smtp.transport.native") end)
  return
end

local smtp = require "smtp"
local server = require "smtp.server"
local loop = require "smtp.loop"
local server_peers = require "support.server_peers"

local USER = "user@auth.test"
local PASSWORD = "Pa55+w0rd/with=marks"
local TOKEN = "ya29.tok3n+Secret/Value=="

-- aiosmtpd over STARTTLS offering PLAIN and LOGIN (its own), CRAM-MD5, XOAUTH2 and OAUTHBEARER
-- (handler methods): each checks the credentials it got and records the mechanism.
local peer_py = [[
import base64, hashlib, hmac, json, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword, MISSING
port, cert, key, user, password, token = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].encode(), sys.argv[5].encode(), sys.argv[6].encode()

def authenticator(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login == user and data.password == password
    return AuthResult(success=ok, handled=False)

class Handler:
    async def auth_CRAM__MD5(self, server, args):
        chal = b'<1896.697170952@aiosmtpd.test>'
        resp = await server.challenge_auth(chal)
        if resp is MISSING:
            return AuthResult(success=False)
        name, _, digest = resp.partition(b' ')
        ok = name == user and digest == hmac.new(password, chal, hashlib.md5).hexdigest().encode()
        return AuthResult(success=ok, handled=False)
    async def bearer(self, server, args, expected):
        if len(args) > 1:
            data = base64.b64decode(args[1])
        else:
            data = await server.challenge_auth('')
        return AuthResult(success=data == expected, handled=False)
    async def auth_XOAUTH2(self, server, args):
        return await self.bearer(server, args, b'user=' + user + b'\x01auth=Bearer ' + token + b'\x01\x01')
    async def auth_OAUTHBEARER(self, server, args):
        return await self.bearer(server, args, b'n,a=' + user + b',\x01auth=Bearer ' + token + b'\x01\x01')
    async def handle_DATA(self, server, session, envelope):
        return '250 2.0.0 OK queued'

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Handler(), hostname='127.0.0.1', port=port, tls_context=ctx, authenticator=authenticator,
               server_hostname='aiosmtpd.test')
c.start()
while True:
    time.sleep(3600)
]]

-- What a transcript must never hold for `secret`: the secret, its xtext, and the base64 of it at
-- each of the three alignments it may have inside a longer SASL payload (the groups wholly made
-- of its bytes: the first and last group may mix with what is around it).
local function forbidden(secret)
  local out = { secret, core.xtext_encode(secret) }
  for k = 0, 2 do
    out[#out + 1] = core.b64encode(("\0"):rep(k) .. secret):sub(5, -5)
  end
  return out
end

local function assert_clean(text, secrets)
  for _, s in ipairs(secrets) do
    for _, f in ipairs(forbidden(s)) do
      assert.is_nil(text:find(f, 1, true), ("%q found in the transcript:\n%s"):format(f, text))
    end
  end
end

-- A transcript collector: lines as "dir line", and the raw events.
local function collector()
  local c = { lines = {}, events = {}, evs = {} }
  c.transcript = function(ev)
    assert.is_number(ev.time)
    c.events[#c.events + 1] = ev
    c.lines[#c.lines + 1] = ev.dir .. " " .. ev.line
  end
  c.on_event = function(ev) c.evs[#c.evs + 1] = ev end
  c.text = function() return table.concat(c.lines, "\n") end
  c.types = function()
    local t = {}
    for _, e in ipairs(c.evs) do t[#t + 1] = e.type end
    return table.concat(t, " ")
  end
  return c
end

-- Every event table holds plain values only (strings, numbers, booleans, nested plain tables).
-- Reads a raw connection until the server closes it.
local function drain(s)
  while s:read(5) do end
end

local function assert_plain(ev)
  for k, v in pairs(ev) do
    local t = type(v)
    assert.is_true(t == "string" or t == "number" or t == "boolean" or t == "table", "field " .. k .. " is " .. t)
  end
end

local function has_line(c, want)
  for _, l in ipairs(c.lines) do if l == want then return true end end
  return false
end

describe("client transcript against aiosmtpd (STARTTLS)", function()
  local peer, certs
  setup(function()
    helper.need("aiosmtpd")
    certs = helper.certs()
    local dir = helper.tmpdir()
    helper.write(dir .. "/peer.py", peer_py)
    local port = helper.free_port()
    local p = helper.spawn({ helper.python, dir .. "/peer.py", tostring(port), certs.server, certs.server_key,
      USER, PASSWORD, TOKEN }, { limit = 300 })
    assert(helper.wait_port("127.0.0.1", port, 15), "aiosmtpd did not start: " .. p:output())
    peer = { port = port, proc = p }
  end)
  teardown(function() if peer then peer.proc:stop() end end)

  local MECHS = {
    PLAIN = { password = PASSWORD }, LOGIN = { password = PASSWORD }, ["CRAM-MD5"] = { password = PASSWORD },
    XOAUTH2 = { token = TOKEN }, OAUTHBEARER = { token = function() return TOKEN end },
  }
  for _, mech in ipairs { "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER" } do
    it(mech .. ": every line with direction, time and connection; the secret never shows", function()
      local c = collector()
      local auth = { user = USER, mechanism = mech, password = MECHS[mech].password, token = MECHS[mech].token }
      local before = smtp.counters()
      local res, err = smtp.send { server = "127.0.0.1", port = peer.port, cafile = certs.ca, auth = auth,
        from = "a@x.test", to = { "b@y.test" }, message = "Subject: t\r\n\r\nhello there\r\n", timeout = 10,
        transcript = c.transcript, on_event = c.on_event }
      assert.truthy(res, tostring(err))
      local text = c.text()
      assert_clean(text, { PASSWORD, TOKEN })
      -- and not in the events either
      for _, ev in ipairs(c.evs) do
        assert_plain(ev)
        for k, v in pairs(ev) do
          if type(v) == "string" then assert_clean(v, { PASSWORD, TOKEN }) end
        end
      end
      -- one connection id, increasing times
      local id = c.events[1].conn
      assert.is_number(id)
      for i, ev in ipairs(c.events) do
        if ev.dir ~= "dns" then assert.equal(id, ev.conn) end
        if i > 1 then assert.is_true(ev.time >= c.events[i - 1].time) end
      end
      assert.truthy(text:find("^info connected to 127%.0%.0%.1 %[127%.0%.0%.1%]:%d+"), text)
      assert.truthy(text:find("\nrecv 220 ", 1, true), text)
      assert.truthy(has_line(c, "send STARTTLS"), text)
      -- the mechanisms after the first resume the TLS session (the line then says so)
      assert.truthy(text:gsub(", resumed, ", ", "):find("\ntls TLS TLSv1%.[23], [%w_-]+, peer CN ?= ?server, verify ok\n"), text)
      if mech == "LOGIN" then
        assert.truthy(has_line(c, "send AUTH LOGIN"), text)
        assert.truthy(text:find("send AUTH LOGIN\nrecv 334 [^\n]+\nsend %[redacted%]\nrecv 334 [^\n]+\nsend %[redacted%]\n"), text)
      elseif mech == "CRAM-MD5" then
        assert.truthy(text:find("send AUTH CRAM%-MD5\nrecv 334 [%w+/=]+\nsend %[redacted%]\n"), text)
      else
        assert.truthy(has_line(c, "send AUTH " .. mech .. " [redacted]"), text)
      end
      assert.truthy(text:find("\nrecv 235 ", 1, true), text)
      -- the body is summarized, not dumped
      assert.is_nil(text:find("hello there", 1, true), text)
      assert.truthy(text:find("send [message data: 27 bytes]", 1, true), text)
      assert.truthy(has_line(c, "send QUIT"), text)
      -- events: connect, tls, auth, transaction
      assert.equal("connect tls auth transaction", c.types())
      assert.same({ true, "127.0.0.1" }, { c.evs[1].ok, c.evs[1].address })
      assert.is_true(c.evs[2].ok and c.evs[2].verified)
      assert.equal("ok", c.evs[2].verify_result)
      assert.truthy(c.evs[2].peer_subject:find("server", 1, true))
      assert.same({ true, mech, USER }, { c.evs[3].ok, c.evs[3].mechanism, c.evs[3].user })
      assert.same({ true, 250, 1, 0 }, { c.evs[4].ok, c.evs[4].code, c.evs[4].accepted, c.evs[4].rejected })
      local after = smtp.counters()
      assert.equal(before.connections + 1, after.connections)
      assert.equal(before.tls + 1, after.tls)
      assert.equal(before.auth + 1, after.auth)
      assert.equal(before.transactions + 1, after.transactions)
      assert.equal(before.recipients_accepted + 1, after.recipients_accepted)
    end)
  end

  it("a refused login: the event says so, the transcript still hides what was sent", function()
    for _, mech in ipairs { "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER" } do
      local c = collector()
      local wrong = "Wr0ng+" .. PASSWORD
      local auth = { user = USER, mechanism = mech }
      if mech == "XOAUTH2" or mech == "OAUTHBEARER" then auth.token = wrong else auth.password = wrong end
      local before = smtp.counters()
      local res, err = smtp.send { server = "127.0.0.1", port = peer.port, cafile = certs.ca, auth = auth,
        from = "a@x.test", to = { "b@y.test" }, message = "Subject: t\r\n\r\nx\r\n", timeout = 10,
        transcript = c.transcript, on_event = c.on_event }
      assert.is_nil(res)
      assert.equal("auth", err.kind)
      assert_clean(c.text(), { wrong })
      assert.equal("connect tls auth", c.types())
      assert.is_false(c.evs[3].ok)
      assert.equal(535, c.evs[3].code)
      assert.equal(before.auth_failures + 1, smtp.counters().auth_failures)
    end
  end)

  it("send_many: one transaction event per message; transcript_body shows the data lines", function()
    local c = collector()
    local conn = assert(smtp.connect { server = "127.0.0.1", port = peer.port, cafile = certs.ca,
      auth = { user = USER, password = PASSWORD }, timeout = 10, transcript = c.transcript,
      transcript_body = true, on_event = c.on_event })
    local out = conn:send_many {
      { from = "a@x.test", to = "b@y.test", message = "Subject: one\r\n\r\n.dot line\r\nbody one\r\n" },
      { from = "a@x.test", to = { "reject@y.test" }, message = "Subject: two\r\n\r\nbody two\r\n" },
      { from = "a@x.test", to = "c@y.test", message = "Subject: three\r\n\r\nbody three\r\n" },
    }
    conn:close()
    assert.truthy(out[1].reply and out[3].reply)
    local text = c.text()
    assert_clean(text, { PASSWORD })
    -- the data as sent (dot-stuffed), line by line
    assert.truthy(has_line(c, "send Subject: one"), text)
    assert.truthy(has_line(c, "send ..dot line"), text)
    assert.truthy(has_line(c, "send body three"), text)
    local tx = {}
    for _, e in ipairs(c.evs) do if e.type == "transaction" then tx[#tx + 1] = e end end
    assert.equal(3, #tx)
    assert.same({ 1, 2, 3 }, { tx[1].index, tx[2].index, tx[3].index })
    assert.is_true(tx[1].ok)
    assert.equal(250, tx[3].code)
  end)

  it("a failed handshake is a tls event and a transcript line saying why", function()
    local c = collector()
    local res, err = smtp.send { server = "127.0.0.1", port = peer.port, cafile = certs.other_ca,
      from = "a@x.test", to = { "b@y.test" }, message = "x\r\n", timeout = 10,
      transcript = c.transcript, on_event = c.on_event }
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.truthy(c.text():find("\ntls TLS handshake failed: ", 1, true), c.text())
    assert.equal("connect tls", c.types())
    assert.is_false(c.evs[2].ok)
  end)

  it("a connect failure is an event and a counter", function()
    local c = collector()
    local before = smtp.counters()
    local port = helper.free_port()
    local res = smtp.send { server = "127.0.0.1", port = port, tls = "none", from = "a@x.test", to = { "b@y.test" },
      message = "x\r\n", timeout = 5, transcript = c.transcript, on_event = c.on_event }
    assert.is_nil(res)
    assert.equal("connect", c.types())
    assert.is_false(c.evs[1].ok)
    assert.truthy(c.text():find("^info connect to 127%.0%.0%.1 failed: "), c.text())
    assert.equal(before.connect_failures + 1, smtp.counters().connect_failures)
  end)

  it("misuse raises", function()
    assert.has_error(function() smtp.send { server = "x.test", from = "a@x.test", to = "b@y.test", message = "x",
      transcript = "stderr" } end, "bad argument #1 to 'send' (transcript: function expected)")
    assert.has_error(function() smtp.connect { server = "x.test", on_event = {} } end,
      "bad argument #1 to 'connect' (on_event: function expected)")
  end)
end)

describe("smtp.deliver transcript against dnsmasq and aiosmtpd MX hosts", function()
  local dnsmasq = require "support.dnsmasq"
  local mxsink = require "support.mxsink"
  local zone, port, s3
  setup(function()
    port = helper.free_port("127.0.0.3")
    s3 = mxsink.start("127.0.0.3", port)
    zone = dnsmasq.start {
      -- mx1 (127.0.0.2) refuses connections; mx2 (127.0.0.3) takes mail.
      "--mx-host=two.test,mx1.two.test,10", "--mx-host=two.test,mx2.two.test,20",
      "--host-record=mx1.two.test,127.0.0.2", "--host-record=mx2.two.test,127.0.0.3",
      "--mx-host=nullmx.test,.,0",
    }
  end)
  teardown(function() zone:stop(); s3:stop() end)

  it("shows the DNS answers used, the retry at the next MX host and each recipient's outcome", function()
    local c = collector()
    local before = smtp.counters()
    local res = assert(smtp.deliver { message = "Subject: d\r\n\r\nhi\r\n", from = "a@sender.test",
      to = { "x@two.test", "z@nullmx.test" }, helo = "client.test", nameservers = { zone.nameserver },
      port = port, timeout = 5, destinations = "any", transcript = c.transcript, on_event = c.on_event })
    assert.equal("sent", res[1].status)
    assert.equal("failed", res[2].status)
    local text = c.text()
    assert.truthy(has_line(c, "dns MX two.test: 10 mx1.two.test [127.0.0.2]"), text)
    assert.truthy(has_line(c, "dns MX two.test: 20 mx2.two.test [127.0.0.3]"), text)
    assert.truthy(text:find("dns MX nullmx%.test: [^\n]*null MX"), text)
    assert.truthy(text:find("info connect to 127.0.0.2 failed: ", 1, true), text)
    assert.truthy(text:find("\ninfo trying mx2.two.test [127.0.0.3] after mx1.two.test [127.0.0.2]: ", 1, true), text)
    assert.truthy(text:find("\ninfo connected to 127.0.0.3 [127.0.0.3]:" .. port, 1, true), text)
    assert.truthy(has_line(c, "send RCPT TO:<x@two.test>"), text)
    local retry, outcomes = nil, {}
    for _, e in ipairs(c.evs) do
      assert_plain(e)
      if e.type == "retry" then retry = e end
      if e.type == "deliver" then outcomes[#outcomes + 1] = e end
    end
    assert.same({ "two.test", "mx2.two.test", "127.0.0.3", "mx1.two.test" },
      { retry.domain, retry.host, retry.address, retry.previous_host })
    assert.equal(2, #outcomes)
    assert.same({ "x@two.test", "sent", 250, "mx2.two.test" },
      { outcomes[1].recipient, outcomes[1].status, outcomes[1].code, outcomes[1].host })
    assert.same({ "z@nullmx.test", "failed" }, { outcomes[2].recipient, outcomes[2].status })
    local after = smtp.counters()
    assert.equal(before.retries + 1, after.retries)
    assert.equal(before.deliver_sent + 1, after.deliver_sent)
    assert.equal(before.deliver_failed + 1, after.deliver_failed)
  end)
end)

describe("server transcript", function()
  local function listening(extra)
    local c = collector()
    local o = { host = "127.0.0.1", port = 0, hostname = "mx.test", timeout = 10,
      auth = function(_, _, user, secret) return user == USER and secret == PASSWORD end,
      transcript = c.transcript, on_event = c.on_event }
    for k, v in pairs(extra or {}) do o[k] = v end
    return assert(server.listen(o)), c
  end

  it("swaks with AUTH PLAIN and LOGIN over STARTTLS: replies, commands, TLS; the secret never shows", function()
    local certs = helper.certs()
    for _, mech in ipairs { "PLAIN", "LOGIN" } do
      local srv, c = listening { tls = { cert = certs.server, key = certs.server_key } }
      local out, code = server_peers.run(srv, { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port),
        "--from", "a@x.test", "--to", "b@y.test", "-tls", "--tls-verify", "--tls-ca-path", certs.ca,
        "-a", mech, "-au", USER, "-ap", PASSWORD, "--body", "body text here" })
      assert.equal(0, code, out)
      local text = c.text()
      assert_clean(text, { PASSWORD })
      assert.truthy(text:find("^info connection from %[127%.0%.0%.1%]:%d+\nsend 220 mx%.test ESMTP"), text)
      assert.truthy(has_line(c, "recv STARTTLS"), text)
      assert.truthy(text:find("\ntls TLS TLSv1%.[23], [%w_-]+"), text)
      if mech == "PLAIN" then
        assert.truthy(has_line(c, "recv AUTH PLAIN [redacted]"), text)
      else
        assert.truthy(text:find("recv AUTH LOGIN\nsend 334 VXNlcm5hbWU6\nrecv %[redacted%]\nsend 334 UGFzc3dvcmQ6\nrecv %[redacted%]\n"), text)
      end
      assert.truthy(has_line(c, "send 235 2.7.0 Authentication successful"), text)
      assert.truthy(text:find("\nrecv %[message data: %d+ bytes%]\nrecv %.\n"), text)
      assert.is_nil(text:find("body text here", 1, true), text)
      assert.truthy(text:find("\ninfo connection closed$"), text)
      assert.equal("session_open tls auth message session_close", c.types())
      assert.same({ true, mech, USER }, { c.evs[3].ok, c.evs[3].mechanism, c.evs[3].user })
      assert.same({ true, 250, "a@x.test", 1 }, { c.evs[4].ok, c.evs[4].code, c.evs[4].from, c.evs[4].recipients })
      for _, e in ipairs(c.evs) do assert_plain(e) end
      local st = srv:stats()
      assert.same({ 1, 1, 1, 0 }, { st.sessions, st.messages, st.auth, st.auth_failures })
    end
  end)

  it("AUTH lines of every shape a client may send are redacted", function()
    local plain = core.b64encode("\0" .. USER .. "\0" .. PASSWORD)
    local srv, c = listening { max_errors = 50, tarpit_delay = 0 }
    local native = require "smtp.transport.native"
    loop.spawn(function()
      srv:serve()
      local s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      local function say(line, want)
        assert(s:write(line .. "\r\n", 5))
        local got = ""
        while not got:find(want) do got = got .. assert(s:read(5)) end
        return got
      end
      say("", "^220 ")   -- the greeting
      say("EHLO raw.test", "250 [^\r]*\r\n$")
      say("auth plain " .. plain, "^235 ")                                       -- lower case, initial response
      say("RSET", "^250 ")
      say("AUTH   PLAIN   " .. plain, "^5")                                     -- already authenticated: refused
      s:close()
      s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      say("", "^220 ")
      say("EHLO raw.test", "250 [^\r]*\r\n$")
      say("AUTH LOGIN " .. core.b64encode(USER), "^334 ")                       -- LOGIN with its user name
      say(core.b64encode(PASSWORD), "^235 ")
      s:close()
      s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      say("", "^220 ")
      say("EHLO raw.test", "250 [^\r]*\r\n$")
      say("AUTH PLAIN", "^334")
      say("*", "^501 ")                                                            -- cancelled
      say("AUTH\tPLAIN " .. plain, "^5")                                           -- not a command, still hidden
      say("AUTH PLAIN", "^334")
      say(core.b64encode("\0" .. USER .. "\0" .. "Wr0ng" .. PASSWORD), "^535 ")
      say("MAIL FROM:<a@x.test> AUTH=" .. core.xtext_encode(USER), "^%d%d%d ")
      say("QUIT", "^221 ")
      s:close()
      loop.sleep(0.2)
      srv:close()
    end)
    loop.run()
    local text = c.text()
    assert_clean(text, { PASSWORD, "Wr0ng" .. PASSWORD })
    assert.truthy(has_line(c, "recv auth plain [redacted]"), text)
    assert.truthy(has_line(c, "recv AUTH   PLAIN [redacted]"), text)
    assert.truthy(has_line(c, "recv AUTH LOGIN [redacted]"), text)
    assert.truthy(text:find("recv AUTH PLAIN\nsend 334 ?\nrecv %*\nsend 501 "), text)
    assert.truthy(has_line(c, "recv AUTH [redacted]"), text)
    assert.truthy(text:find("recv AUTH PLAIN\nsend 334 ?\nrecv %[redacted%]\nsend 535 "), text)
    -- three sessions, each with its own id
    local ids = {}
    for _, e in ipairs(c.events) do ids[e.conn] = true end
    local n = 0
    for _ in pairs(ids) do n = n + 1 end
    assert.equal(3, n)
    assert.equal(2, srv:stats().auth)
    assert.equal(1, srv:stats().auth_failures)
  end)

  it("a limit hit is an event and the counter it always was", function()
    local srv, c = listening { max_errors = 2, tarpit_delay = 0 }
    local native = require "smtp.transport.native"
    loop.spawn(function()
      srv:serve()
      local s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      assert(s:write("BOGUS\r\nBOGUS\r\nBOGUS\r\n", 5))
      drain(s)
      s:close()
      srv:close()
    end)
    loop.run()
    local limit, closed
    for _, e in ipairs(c.evs) do
      if e.type == "limit" then limit = e end
      if e.type == "session_close" then closed = e end
    end
    assert.equal("max_errors", limit.name)
    assert.equal("max_errors", closed.limit)
    assert.equal(1, srv:stats().max_errors)
    assert.truthy(c.text():find("\nrecv BOGUS\nrecv BOGUS\n", 1, true), c.text())
  end)

  it("the 421 of an idle timeout is in the transcript, and the limit in the events", function()
    local srv, c = listening { timeout = 0.3 }
    local native = require "smtp.transport.native"
    loop.spawn(function()
      srv:serve()
      local s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5 })
      drain(s)
      s:close()
      srv:close()
    end)
    loop.run()
    local text = c.text()
    assert.truthy(text:find("\nsend 421 4.4.2 Idle timeout, closing connection\ninfo connection closed$"), text)
    assert.truthy(c.types():find("limit session_close$"), c.types())
  end)
end)
