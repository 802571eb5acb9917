-- Native transport TLS: verification on by default with reasons for each failure, verify=false,
-- server side (tls_accept), implicit TLS, TLS 1.2 minimum against a real openssl s_server.
local helper = require "helper"
local support = require "support.transport"
local native = require "smtp.transport.native"
local loop = require "smtp.loop"

local certs = helper.certs()

-- Runs an in-process TLS echo server with cert/key and a client with `copts` inside smtp.loop.
-- Returns what the client got: reply, err, info.
local function roundtrip(cert, key, copts, host)
  local sctx = assert(native.tls_server_context { cert = cert, key = key })
  local l = assert(native.listen { host = host or "127.0.0.1", port = 0 })
  local reply, cerr, info, serr
  loop.spawn(function()
    local c = assert(l:accept(5))
    local ok, err = c:tls_accept(sctx, 5)
    if not ok then serr = err; return end
    local d = c:read(5)
    if d then c:write(d, 5) end
    c:close()
  end)
  loop.spawn(function()
    local s, err = native.connect { host = copts.host or "127.0.0.1", port = l.port, timeout = 5 }
    if not s then cerr = err; return end
    local ok
    ok, err = s:starttls(copts)
    if not ok then
      cerr = err
      assert.is_nil(s.sock)   -- a failed handshake closes the connection
      return
    end
    info = s:info()
    assert(s:write("ping\r\n", 5))
    reply = s:read(5)
    s:close()
  end)
  loop.run()
  l:close()
  return reply, cerr, info, serr
end

describe("smtp.transport.native (TLS)", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do support.stop(p) end
    procs = {}
  end)

  it("verifies a good certificate and reports version, cipher and peer", function()
    local reply, err, info = roundtrip(certs.server, certs.server_key,
      { servername = "localhost", cafile = certs.ca })
    assert.is_nil(err)
    assert.equal("ping\r\n", reply)
    assert.equal("TLSv1.3", info.tls)
    assert.is_string(info.cipher)
    assert.equal("CN=server", info.peer_subject)
    assert.equal("CN=lua-smtp test CA", info.peer_issuer)
  end)

  it("checks an IP address as an IP address", function()
    local reply, err = roundtrip(certs.server, certs.server_key, { cafile = certs.ca })
    assert.is_nil(err)
    assert.equal("ping\r\n", reply)
    local _, err2 = roundtrip(certs.wrong, certs.wrong_key, { cafile = certs.ca })
    assert.equal("tls", err2.kind)
    assert.equal("certificate verify failed: IP address mismatch (the certificate is not for 127.0.0.1)", err2.text)
  end)

  it("refuses a certificate for another host name, saying so", function()
    local reply, err = roundtrip(certs.wrong, certs.wrong_key, { servername = "localhost", cafile = certs.ca })
    assert.is_nil(reply)
    assert.equal("tls", err.kind)
    assert.equal("certificate verify failed: hostname mismatch (the certificate is not for localhost)", err.text)
  end)

  it("refuses a self-signed certificate, saying so", function()
    local _, err = roundtrip(certs.self, certs.self_key, { servername = "localhost", cafile = certs.ca })
    assert.equal("tls", err.kind)
    assert.equal("certificate verify failed: self-signed certificate", err.text)
  end)

  it("refuses an expired certificate, saying so", function()
    local _, err = roundtrip(certs.expired, certs.expired_key, { servername = "localhost", cafile = certs.ca })
    assert.equal("tls", err.kind)
    assert.equal("certificate verify failed: certificate has expired", err.text)
  end)

  it("refuses a certificate from an unknown CA, saying so", function()
    local _, err = roundtrip(certs.server, certs.server_key, { servername = "localhost", cafile = certs.other_ca })
    assert.equal("tls", err.kind)
    assert.equal("certificate verify failed: unable to get local issuer certificate (issued by an unknown CA)", err.text)
  end)

  it("verifies by default against the system trust store (which does not hold our test CA)", function()
    local _, err = roundtrip(certs.server, certs.server_key, { servername = "localhost" })
    assert.equal("tls", err.kind)
    assert.matches("^certificate verify failed: ", err.text)
  end)

  it("accepts anything with verify = false", function()
    local reply, err, info = roundtrip(certs.self, certs.self_key, { servername = "localhost", verify = false })
    assert.is_nil(err)
    assert.equal("ping\r\n", reply)
    assert.equal("CN=localhost", info.peer_subject)
  end)

  it("upgrades a plain connection in place after a plaintext exchange (STARTTLS)", function()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local l = assert(native.listen { port = 0 })
    local plain, secret
    loop.spawn(function()
      local c = assert(l:accept(5))
      assert.equal("STARTTLS\r\n", c:read(5))
      assert(c:write("220 go ahead\r\n", 5))
      assert(c:tls_accept(sctx, 5))
      assert.equal("EHLO again\r\n", c:read(5))
      assert(c:write("250 secret\r\n", 5))
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "localhost", port = l.port, timeout = 5 })
      assert(s:write("STARTTLS\r\n", 5))
      plain = s:read(5)
      assert.is_false(s:info().tls)
      assert(s:starttls { cafile = certs.ca })
      assert(s:write("EHLO again\r\n", 5))
      secret = s:read(5)
      assert.equal("CN=server", s:info().peer_subject)
      s:close()
    end)
    loop.run()
    l:close()
    assert.equal("220 go ahead\r\n", plain)
    assert.equal("250 secret\r\n", secret)
  end)

  it("does implicit TLS with connect{tls=...} over IPv6", function()
    local sctx = assert(native.tls_server_context { cert = certs.server_chain, key = certs.server_key })
    local l = assert(native.listen { host = "::1", port = 0 })
    local reply
    loop.spawn(function()
      local c = assert(l:accept(5))
      assert(c:tls_accept(sctx, 5))
      assert(c:write("220 hi\r\n", 5))
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "::1", port = l.port, timeout = 5,
        tls = { cafile = certs.ca } })
      reply = s:read(5)
      assert.equal("TLSv1.3", s:info().tls)
      s:close()
    end)
    loop.run()
    l:close()
    assert.equal("220 hi\r\n", reply)
  end)

  it("reports bad server material as kind tls", function()
    local ctx, err = native.tls_server_context { cert = "/nonexistent.pem", key = certs.server_key }
    assert.is_nil(ctx)
    assert.equal("tls", err.kind)
    assert.matches("cannot load certificate /nonexistent.pem", err.text, 1, true)
    assert.has_error(function() native.tls_server_context { cert = certs.server } end,
      "bad argument #1 to 'tls_server_context' (option 'key': string expected, got nil)")
  end)

  it("talks to a real openssl s_server", function()
    local port = helper.free_port()
    local p = helper.spawn({ "openssl", "s_server", "-accept", "127.0.0.1:" .. port, "-cert",
      certs.server, "-key", certs.server_key, "-rev" }, { limit = 60 })
    procs[#procs + 1] = p
    assert(helper.wait_port("127.0.0.1", port, 10))
    local s = assert(native.connect { host = "localhost", port = port, timeout = 5,
      tls = { cafile = certs.ca } })
    assert(s:write("hello\n", 5))
    local got = ""
    while not got:find("olleh") do got = got .. assert(s:read(5)) end
    assert.matches("olleh", got)
    s:close()
  end)

  it("refuses a server limited to TLS 1.1 (our minimum is TLS 1.2)", function()
    local port = helper.free_port()
    local p = helper.spawn({ "openssl", "s_server", "-accept", "127.0.0.1:" .. port, "-cert",
      certs.server, "-key", certs.server_key, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-rev" },
      { limit = 60 })
    procs[#procs + 1] = p
    assert(helper.wait_port("127.0.0.1", port, 10))
    local s, err = native.connect { host = "127.0.0.1", port = port, timeout = 5,
      tls = { cafile = certs.ca } }
    assert.is_nil(s)
    assert.equal("tls", err.kind)
    assert.equal("TLS handshake failed: tlsv1 alert protocol version (no TLS version both sides accept; "
      .. "ours start at TLSv1.2)", err.text)
    -- Control: the same server completes a handshake with a client that allows TLS 1.1, so the
    -- refusal above comes from our minimum, not from a broken server.
    local s2, err2 = native.connect { host = "127.0.0.1", port = port, timeout = 5,
      tls = { cafile = certs.ca, min_version = "TLSv1.1", ciphers = "DEFAULT:@SECLEVEL=0" } }
    assert.is_nil(err2)
    assert.equal("TLSv1.1", s2:info().tls)
    s2:close()
  end)
end)

-- Server name integrity (issue 15): a blank or NUL-holding servername must never turn the name
-- check off, and verifying with no name at all is an error unless the caller said verify_name =
-- false. The peer's certificate is for wrong.example only, signed by the trusted test CA, so only
-- the name check can refuse it.
describe("TLS server name integrity", function()
  local smtp = require "smtp"
  local server = require "smtp.server"
  local core = require "smtp.core"
  local MSG = "From: a@x.test\r\nTo: b@y.test\r\nSubject: t\r\n\r\nbody\r\n"

  -- An in-loop SMTP server with `cert` (implicit TLS, or STARTTLS); `fn(port)` runs as a second
  -- task; returns how many messages the server stored and how many sessions it saw.
  local function with_server(cert, key, implicit, fn)
    local stored, sessions = 0, 0
    local srv = assert(server.listen { host = "127.0.0.1", port = 0, hostname = "mx.test", timeout = 5,
      tls = { cert = cert, key = key, implicit = implicit },
      on_mail = function() sessions = sessions + 1; return true end,
      on_message = function(_, _, reader) helper.read_message(reader); stored = stored + 1; return true end })
    loop.spawn(function()
      srv:serve()
      fn(srv.port)
      srv:close()
    end)
    loop.run()
    return stored, sessions
  end

  local function send(port, o)
    local opts = { server = "127.0.0.1", port = port, tls = "implicit", cafile = certs.ca, helo = "c.test",
      from = "a@x.test", to = { "b@y.test" }, message = MSG, timeout = 5 }
    for k, v in pairs(o) do opts[k] = v end
    return smtp.send(opts)
  end

  it("smtp.send refuses an empty servername before connecting (it used to skip the name check)", function()
    local res, err
    local stored = with_server(certs.wrong, certs.wrong_key, true, function(port)
      res, err = send(port, { servername = "" })
    end)
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.equal("servername: empty name", err.text)
    assert.equal(0, stored)
  end)

  it("smtp.send and smtp.connect refuse a servername holding a NUL, with STARTTLS too", function()
    local r1, e1, c2, e2, r3, e3
    local stored = with_server(certs.wrong, certs.wrong_key, false, function(port)
      r1, e1 = send(port, { tls = "starttls", servername = "\0" })
      c2, e2 = smtp.connect { server = "127.0.0.1", port = port, tls = "starttls", cafile = certs.ca,
        servername = "wrong.example\0.localhost", timeout = 5 }
      r3, e3 = send(port, { tls = "starttls", servername = "localhost\0" })
    end)
    assert.is_nil(r1); assert.is_nil(c2); assert.is_nil(r3)
    for _, e in ipairs { e1, e2, e3 } do
      assert.equal("invalid", e.kind)
      assert.equal("servername: control character (NUL, CR, LF, ...)", e.text)
    end
    assert.equal(0, stored)
  end)

  it("a trusted CA's certificate for another name is refused; the right name or verify_name = false passes", function()
    local bad, bad_err, ip_res, ip_err, good, chain
    local stored = with_server(certs.wrong, certs.wrong_key, true, function(port)
      bad, bad_err = send(port, { servername = "localhost" })
      ip_res, ip_err = send(port, {})                    -- checked against 127.0.0.1 as an IP
      good = send(port, { servername = "wrong.example" })
      chain = send(port, { servername = "localhost", verify_name = false })
    end)
    assert.is_nil(bad)
    assert.equal("tls", bad_err.kind)
    assert.equal("certificate verify failed: hostname mismatch (the certificate is not for localhost)", bad_err.text)
    assert.is_nil(ip_res)
    assert.equal("certificate verify failed: IP address mismatch (the certificate is not for 127.0.0.1)", ip_err.text)
    assert.equal(250, good.reply.code)
    assert.equal(250, chain.reply.code)
    assert.equal(2, stored)
    assert.has_error(function() smtp.send { server = "127.0.0.1", verify_name = "no", message = MSG,
      from = "a@x.test", to = "b@y.test" } end, "bad argument #1 to 'send' (verify_name: boolean expected)")
  end)

  it("the native transport's starttls refuses an empty or NUL-holding servername and closes", function()
    local errs = {}
    with_server(certs.wrong, certs.wrong_key, true, function(port)
      for i, name in ipairs { "", "wrong.example\0" } do
        local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
        local ok, err = s:starttls { servername = name, cafile = certs.ca, timeout = 5 }
        assert.is_nil(ok)
        assert.is_nil(s.sock)
        errs[i] = err
      end
    end)
    for _, e in ipairs(errs) do
      assert.equal("invalid", e.kind)
      assert.equal("tls", e.phase)
      assert.equal("starttls: servername is empty or holds a NUL", e.text)
    end
  end)

  it("in C, verifying with no name to check is an error unless verify_name is false", function()
    local ctx = assert(native.tls_client_context { cafile = certs.ca })
    local got = {}
    with_server(certs.wrong, certs.wrong_key, true, function(port)
      local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
      got.ok, got.msg, got.code = s.sock:tls_start(ctx, nil)
      got.empty = select(2, pcall(s.sock.tls_start, s.sock, ctx, ""))
      got.nul = select(2, pcall(s.sock.tls_start, s.sock, ctx, "a\0b"))
      s:close()
      -- The explicit opt-out: chain only, and this certificate's chain is good.
      s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
      got.chain = { s:starttls { ctx = ctx, verify_name = false, timeout = 5 } }
      got.subject = s:info().peer_subject
      s:close()
    end)
    assert.is_nil(got.ok)
    assert.equal("no server name to check the certificate against (give one, or turn the name check off explicitly)", got.msg)
    assert.equal("EINVAL", got.code)
    assert.matches("bad argument #3 to '%?' %(server name is empty or holds a NUL%)", got.empty)
    assert.matches("bad argument #3 to '%?' %(server name is empty or holds a NUL%)", got.nul)
    assert.is_true(got.chain[1], tostring(got.chain[2]))
    assert.equal("CN=wrong", got.subject)
  end)

  it("core.tls_context keeps option strings alive while it uses them (fresh strings from __index)", function()
    -- Each option is a new long string nobody else holds; reading a later option collects
    -- garbage and makes same-sized strings, so a path used after it was dropped would be garbage.
    local pad = ("/."):rep(40)
    local paths = { cafile = certs.ca, cert = certs.server, key = certs.server_key }
    local keep = {}
    local opts = setmetatable({}, { __index = function(_, k)
      if k == "mode" then return "client" end
      if paths[k] then
        local d, f = paths[k]:match("^(.*)/([^/]*)$")
        return d .. pad .. "/" .. f
      end
      collectgarbage("collect")
      for i = 1, 200 do keep[i] = ("Z"):rep(#certs.ca + #pad + i % 3) .. i end
      return nil
    end })
    for _ = 1, 3 do
      local ctx, err = core.tls_context(opts)
      assert.is_nil(err)
      assert.equal("smtp.tls_context (client)", tostring(ctx))
      keep = {}
    end
  end)
end)
