-- smtp.server's front-door hooks (issue 17): on_connect (refuses before the greeting), on_helo,
-- on_auth (hears every outcome, may veto a success), on_rset and on_close, each given the
-- session's facts (addresses, HELO name, TLS, AUTH identity, counts). Real clients (swaks) where
-- they can say it; a raw client for what must be byte-exact.
local helper = require "helper"
local peers = require "support.server_peers"
local server = require "smtp.server"

if not pcall(require, "smtp.transport.native") then
  describe("smtp.server hooks", function() pending("needs smtp.transport.native") end)
  return
end

-- A copy of the facts a hook saw (the session table changes as the session goes on).
local FACTS = { "address", "port", "local_address", "local_port", "helo", "esmtp", "user", "tls",
  "tls_version", "tls_cipher", "tls_bits", "auth_mechanism", "messages", "recipients", "commands",
  "errors", "transactions" }
local function snap(session)
  local t = {}
  for _, k in ipairs(FACTS) do t[k] = session[k] end
  return t
end

local function start(opts)
  local got = { calls = {}, log = {}, msgs = 0 }
  local o = {
    port = 0, hostname = "mx.test", timeout = 20,
    log = function(s) got.log[#got.log + 1] = s end,
    on_message = function(session, _, reader)
      for _ in reader:chunks() do end
      got.msgs = got.msgs + 1
      got.at_message = snap(session)
      return true
    end,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(server.listen(o)), got
end

local function swaks(srv, extra)
  local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port), "--helo", "client.test",
    "--from", "a@x.test", "--to", "b@y.test" }
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  return peers.run(srv, argv)
end

describe("smtp.server front-door hooks", function()
  it("on_connect sees both ends of the connection before the greeting and lets the client in", function()
    local seen
    local srv, got = start { on_connect = function(s) seen = snap(s); return true end }
    local out, code = swaks(srv)
    assert.equal(0, code, out)
    assert.equal(1, got.msgs)
    assert.equal("127.0.0.1", seen.address)
    assert.is_true(seen.port > 0 and seen.port < 65536)
    assert.equal("127.0.0.1", seen.local_address)
    assert.equal(srv.port, seen.local_port)
    assert.is_nil(seen.helo)
    assert.equal(0, seen.commands)
    assert.equal(0, srv.counters.connect_refused)
  end)

  it("on_connect refuses with 554 (or the hook's 4xx) instead of the greeting, then closes", function()
    local srv = start { on_connect = function() return false, 554, "5.7.1 no service for you" end }
    local out = peers.raw(srv, { { "eof" } })
    assert.equal("554 5.7.1 no service for you\r\n", out)
    assert.equal(1, srv.counters.connect_refused)
    srv = start { on_connect = function() return false, 421, "4.7.0", "try later" end }
    assert.equal("421 4.7.0 try later\r\n", peers.raw(srv, { { "eof" } }))
    -- what cannot go on the wire is replaced and logged, as for every hook
    local got
    srv, got = start { on_connect = function() return false, 250, "2.0.0 x" end }
    assert.equal("554 5.7.1 x\r\n", peers.raw(srv, { { "eof" } }))
    assert.matches("invalid reply code: 250", got.log[1])
    srv, got = start { on_connect = function() error("boom") end }
    assert.equal("421 4.3.0 Temporary server error, try again later\r\n", peers.raw(srv, { { "eof" } }))
    assert.matches("on_connect raised: .*boom", got.log[1])
  end)

  it("on_helo gets the name and the verb, and can refuse it (the client may try again)", function()
    local names = {}
    local srv = start { on_helo = function(s, name, verb)
      names[#names + 1] = verb .. " " .. name
      if name == "bad.example" then return false, 550, "5.7.1 Helo command rejected: go away" end
      return true
    end }
    local out = peers.raw(srv, {
      { "recv", "220 [^\n]*\n" }, { "send", "EHLO bad.example\r\n" }, { "recv", "go away\r\n" },
      { "send", "MAIL FROM:<a@x.test>\r\n" }, { "recv", "503[^\n]*\n" },
      { "send", "HELO good.example\r\n" }, { "recv", "250 mx.test\r\n" },
      { "send", "EHLO good.example\r\n" }, { "recv", "250 DSN\r\n" }, { "send", "QUIT\r\n" }, { "eof" } })
    assert.same({ "EHLO bad.example", "HELO good.example", "EHLO good.example" }, names)
    assert.matches("^220 mx%.test ESMTP lua%-smtp\r\n550 5%.7%.1 Helo command rejected: go away\r\n" ..
      "503 5%.5%.1 Error: send HELO/EHLO first\r\n250 mx%.test\r\n250%-mx%.test\r\n.*250 DSN\r\n221 2%.0%.0 Bye\r\n$", out)
  end)

  it("on_auth hears failures and successes (mechanism, user) and can veto a success", function()
    local heard = {}
    local srv = start {
      auth = function(_, _, u, p) return p == "right" end,
      on_auth = function(s, r)
        heard[#heard + 1] = ("%s %s %s"):format(tostring(r.ok), r.mechanism, r.user)
        if r.ok and r.user == "mallory" then return false, 535, "5.7.8 not you" end
        return true
      end,
    }
    local out = swaks(srv, { "-a", "PLAIN", "-au", "alice", "-ap", "wrong" })
    assert.matches("535 5%.7%.8", out)
    srv = start { auth = function(_, _, _, p) return p == "right" end, on_auth = function(s, r)
      heard[#heard + 1] = ("%s %s %s"):format(tostring(r.ok), r.mechanism, r.user)
      if r.ok and r.user == "mallory" then return false, 535, "5.7.8 not you" end
      return true
    end }
    out = swaks(srv, { "-a", "LOGIN", "-au", "mallory", "-ap", "right" })
    assert.matches("535 5%.7%.8 not you", out)
    local got
    srv, got = start { auth = function(_, _, _, p) return p == "right" end, on_auth = function(s, r)
      heard[#heard + 1] = ("%s %s %s"):format(tostring(r.ok), r.mechanism, r.user)
      return true
    end }
    local code
    out, code = swaks(srv, { "-a", "PLAIN", "-au", "alice", "-ap", "right" })
    assert.equal(0, code, out)
    assert.same({ "false PLAIN alice", "true LOGIN mallory", "true PLAIN alice" }, heard)
    assert.equal("alice", got.at_message.user)
    assert.equal("PLAIN", got.at_message.auth_mechanism)
    assert.equal(1, srv.counters.auth)
  end)

  it("on_rset and on_close: counts of messages, recipients, commands and errors", function()
    local rsets, closed = 0, nil
    local srv = start {
      on_rset = function() rsets = rsets + 1 end,
      on_close = function(s) closed = snap(s) end,
      on_rcpt = function(_, r) if r:match("^nobody") then return false, 550, "5.1.1 no" end return true end,
    }
    peers.raw(srv, {
      { "recv", "220 [^\n]*\n" }, { "send", "EHLO c.test\r\n" }, { "recv", "250 DSN\r\n" },
      { "send", "MAIL FROM:<a@x.test>\r\n" }, { "recv", "250[^\n]*\n" }, { "send", "RSET\r\n" }, { "recv", "250[^\n]*\n" },
      { "send", "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nRCPT TO:<nobody@y.test>\r\nDATA\r\n" },
      { "recv", "354[^\n]*\n" }, { "send", "Subject: x\r\n\r\nhi\r\n.\r\n" }, { "recv", "250 2.0.0[^\n]*\n" },
      { "send", "QUIT\r\n" }, { "eof" } })
    assert.equal(1, rsets)
    assert.is_table(closed)
    assert.equal(1, closed.messages)
    assert.equal(2, closed.recipients)
    assert.equal(9, closed.commands) -- EHLO, MAIL, RSET, MAIL, 3 RCPT, DATA, QUIT
    assert.equal(1, closed.errors)
    assert.equal("c.test", closed.helo)
    assert.is_true(closed.esmtp)
  end)

  it("TLS facts: version, cipher and bits after STARTTLS (swaks -tls)", function()
    local c = helper.certs()
    local srv, got = start { tls = { cert = c.server, key = c.server_key }, on_close = function() end }
    local out, code = swaks(srv, { "-tls", "--tls-verify", "--tls-ca-path", c.ca })
    assert.equal(0, code, out)
    local f = got.at_message
    assert.is_true(f.tls)
    assert.matches("^TLSv1%.[23]$", f.tls_version)
    assert.is_string(f.tls_cipher)
    assert.is_true(f.tls_bits >= 128)
  end)

  it("server.listen checks the new options", function()
    assert.has_error(function() server.listen { on_connect = 1 } end,
      "bad argument #1 to 'listen' (option 'on_connect': function expected)")
    assert.has_error(function() server.listen { proxy_protocol = { trusted = { "10.0.0.0/33" } } } end,
      "bad argument #1 to 'listen' (option 'proxy_protocol.trusted': entry 1: prefix length out of range: 10.0.0.0/33)")
    assert.has_error(function() server.listen { xclient = { trusted = "127.0.0.1" } } end,
      "bad argument #1 to 'listen' (option 'xclient.trusted': a list of addresses expected)")
    assert.has_error(function() server.listen { received = "yes" } end,
      "bad argument #1 to 'listen' (option 'received': boolean expected)")
  end)
end)
