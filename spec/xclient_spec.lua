-- XCLIENT in smtp.server (issue 17), with Postfix's smtpd_authorized_xclient_hosts semantics:
-- offered and obeyed only for trusted peers (550 5.7.0 to others), values xtext-decoded and
-- checked (501), never inside a transaction (503), and after it the session starts over with a
-- new 220 and the client's facts in every hook and in Received. swaks (--xclient-*) is the real
-- peer; a raw client says what swaks will not.
local peers = require "support.server_peers"
local server = require "smtp.server"

if not pcall(require, "smtp.transport.native") then
  describe("XCLIENT", function() pending("needs smtp.transport.native") end)
  return
end

local function start(opts)
  local got = { msgs = {}, connects = {} }
  local o = {
    port = 0, hostname = "mx.test", timeout = 20, received = true,
    xclient = { trusted = { "127.0.0.0/8" } },
    on_connect = function(s)
      got.connects[#got.connects + 1] = { address = s.address, port = s.port, name = s.name }
      if s.address == "192.0.2.66" then return false, 554, "5.7.1 you are blocked" end
      return true
    end,
    on_message = function(s, env, reader)
      for _ in reader:chunks() do end
      got.msgs[#got.msgs + 1] = { address = s.address, port = s.port, name = s.name, helo = s.helo,
        user = s.user, local_address = s.local_address, local_port = s.local_port, received = s:received(env) }
      return true
    end,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(server.listen(o)), got
end

local function swaks(srv, extra)
  local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port), "--helo", "filter.test",
    "--from", "a@x.test", "--to", "b@y.test" }
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  return peers.run(srv, argv)
end

describe("XCLIENT", function()
  it("swaks --xclient-*: the session starts over as the client it names", function()
    local srv, got = start()
    local out, code = swaks(srv, { "--xclient-addr", "192.0.2.9", "--xclient-port", "4711",
      "--xclient-name", "mail.client.example", "--xclient-destaddr", "198.51.100.25", "--xclient-destport", "25" })
    assert.equal(0, code, out)
    assert.matches("250%-XCLIENT NAME REVERSE_NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT", out)
    assert.matches("%-> XCLIENT [^\n]*ADDR=192%.0%.2%.9", out)
    assert.matches("<%-  220 mx%.test ESMTP lua%-smtp\n %-> EHLO filter%.test", out)
    local m = got.msgs[1]
    assert.is_table(m, out)
    assert.equal("192.0.2.9", m.address)
    assert.equal(4711, m.port)
    assert.equal("mail.client.example", m.name)
    assert.equal("198.51.100.25", m.local_address)
    assert.equal(25, m.local_port)
    assert.matches("^Received: from filter%.test %(mail%.client%.example %[192%.0%.2%.9%]%)\r\n", m.received)
    -- on_connect judged the proxy's connection, then the client it named
    assert.equal("127.0.0.1", got.connects[1].address)
    assert.equal("192.0.2.9", got.connects[2].address)
  end)

  it("HELO, PROTO and LOGIN from XCLIENT stand in for the client's own; [UNAVAILABLE] means unknown", function()
    local srv, got = start()
    local out = peers.raw(srv, {
      { "recv", "220 [^\n]*\n" }, { "send", "EHLO filter.test\r\n" }, { "recv", "250 DSN\r\n" },
      { "send", "XCLIENT ADDR=IPV6:2001:db8::5 NAME=[UNAVAILABLE] HELO=client+2Eexample PROTO=ESMTP LOGIN=alice\r\n" },
      { "recv", "220 [^\n]*\n" },
      { "send", "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" }, { "recv", "354[^\n]*\n" },
      { "send", "Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("\r\n220 mx%.test ESMTP lua%-smtp\r\n250 2%.1%.0 Ok\r\n250 2%.1%.5 Ok\r\n354 [^\n]*\n250 2%.0%.0 Ok: queued\r\n221", out)
    local m = got.msgs[1]
    assert.equal("2001:db8::5", m.address)
    assert.is_nil(m.name)
    assert.equal("client.example", m.helo)
    assert.equal("alice", m.user)
    assert.matches("^Received: from client%.example %(unknown %[IPv6:2001:db8::5%]%)\r\n\tby mx%.test %(lua%-smtp%) with ESMTPA id ", m.received)
  end)

  it("an untrusted peer is not offered XCLIENT (swaks goes on without it) and gets 550 5.7.0", function()
    local srv, got = start { xclient = { trusted = { "10.0.0.0/8" } } }
    local out, code = swaks(srv, { "--xclient-addr", "192.0.2.9", "--xclient-optional" })
    assert.equal(0, code, out)
    assert.not_matches("250%-XCLIENT", out)
    assert.equal("127.0.0.1", got.msgs[1].address)
    srv = start { xclient = { trusted = { "10.0.0.0/8" } } }
    out = peers.raw(srv, { { "recv", "220 [^\n]*\n" }, { "send", "EHLO f\r\n" }, { "recv", "250 DSN\r\n" },
      { "send", "XCLIENT ADDR=192.0.2.9\r\nQUIT\r\n" }, { "eof" } })
    assert.matches("\r\n550 5%.7%.0 Error: insufficient authorization\r\n221", out)
  end)

  it("answers 501 to bad syntax and values, 503 inside a transaction, 500 when not configured", function()
    local srv = start()
    local out = peers.raw(srv, {
      { "recv", "220 [^\n]*\n" }, { "send", "EHLO filter.test\r\n" }, { "recv", "250 DSN\r\n" },
      { "send", "XCLIENT\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT FOO=bar\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT ADDR\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT NAME=a+0Ab\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT ADDR=999.1.1.1\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT PORT=65536\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "XCLIENT PROTO=LMTP\r\n" }, { "recv", "501[^\n]*\n" },
      { "send", "MAIL FROM:<a@x.test>\r\n" }, { "recv", "250[^\n]*\n" },
      { "send", "XCLIENT ADDR=192.0.2.1\r\n" }, { "recv", "503[^\n]*\n" },
      { "send", "RSET\r\nXCLIENT ADDR=192.0.2.66\r\n" }, { "recv", "554[^\n]*\n" },
      { "send", "QUIT\r\n" }, { "eof" } })
    assert.matches("\r\n501 5%.5%.4 Syntax: XCLIENT attribute=value%.%.%.\r\n" ..
      "501 5%.5%.4 Bad XCLIENT attribute name\r\n" ..
      "501 5%.5%.4 Syntax: XCLIENT attribute=value%.%.%.\r\n" ..
      "501 5%.5%.4 Syntax: XCLIENT attribute=value%.%.%.\r\n" ..
      "501 5%.5%.4 Bad XCLIENT ADDR syntax: 999%.1%.1%.1\r\n" ..
      "501 5%.5%.4 Bad XCLIENT PORT syntax: 65536\r\n" ..
      "501 5%.5%.4 Bad XCLIENT PROTO syntax: LMTP\r\n" ..
      "250 2%.1%.0 Ok\r\n503 5%.5%.1 Error: MAIL transaction in progress\r\n" ..
      "250 2%.0%.0 Ok\r\n554 5%.7%.1 you are blocked\r\n221 2%.0%.0 Bye\r\n$", out)
    srv = start { xclient = false }
    out = peers.raw(srv, { { "recv", "220 [^\n]*\n" }, { "send", "EHLO f\r\n" }, { "recv", "250 DSN\r\n" },
      { "send", "XCLIENT ADDR=192.0.2.1\r\nQUIT\r\n" }, { "eof" } })
    assert.not_matches("XCLIENT", out)
    assert.matches("\r\n500 5%.5%.2 Error: command not recognized\r\n221", out)
  end)
end)
