-- Proxies: the SOCKS5 / HTTP CONNECT handshake (smtp.proxy) byte by byte, then smtp.send through
-- real proxies on loopback (microsocks for SOCKS5, tinyproxy for CONNECT) to aiosmtpd: plaintext,
-- STARTTLS and implicit TLS through the tunnel with the real server's name verified; proxies that
-- need credentials, refuse them or refuse the destination; a hand-written proxy that closes
-- mid-handshake or says nothing; under cqueues and from the command line. The proxy's password
-- never shows in an error.
local helper = require "helper"
local peers = require "support.client_peers"
local proxy = require "smtp.proxy"
local url = require "smtp.url"
local core = require "smtp.core"
local smtp = require "smtp"

local PW = "Prx-s3cr3t"
local BODY = "From: a@example.com\r\nTo: b@example.org\r\nSubject: via proxy\r\n\r\nthrough the tunnel\r\n"

-- Drives a handshake with the proxy's replies given as one string; returns what was written, the
-- handshake, and the error. It checks want() on every read: no byte past the reply is taken.
local function drive(purl, host, port, replies)
  local h = assert(proxy.new(assert(url.proxy(purl)), host, port))
  local wrote, pos = {}, 1
  while true do
    local out = h:output()
    if out then wrote[#wrote + 1] = out end
    if h.done then break end
    local want = h:want()
    assert.is_true(want >= 1)
    if pos > #replies then
      local _, e = h:closed()
      return table.concat(wrote), h, e
    end
    local chunk = replies:sub(pos, pos + want - 1)
    pos = pos + #chunk
    local ok, err = h:feed(chunk)
    if not ok then return table.concat(wrote), h, err end
  end
  return table.concat(wrote), h, nil, replies:sub(pos)
end

describe("smtp.proxy handshake", function()
  it("SOCKS5 without credentials: a name, an IPv4 and an IPv6 address, in the RFC 1928 bytes", function()
    local wrote, h, err, rest = drive("socks5h://127.0.0.1:1080", "mail.example", 587,
      "\5\0" .. "\5\0\0\1\127\0\0\1\4\56" .. "220 greeting")
    assert.is_nil(err)
    assert.is_true(h.done)
    assert.equal("\5\1\0" .. "\5\1\0\3\12mail.example\2\75", wrote)
    assert.equal("220 greeting", rest)
    wrote = drive("socks5://127.0.0.1:1080", "192.0.2.25", 25, "\5\0\5\0\0\1\0\0\0\0\0\0")
    assert.equal("\5\1\0\5\1\0\1\192\0\2\25\0\25", wrote)
    wrote = drive("socks5://127.0.0.1:1080", "2001:db8::25", 465, "\5\0\5\0\0\4" .. ("\0"):rep(18))
    assert.equal("\5\1\0\5\1\0\4\32\1\13\184" .. ("\0"):rep(11) .. "\37\1\209", wrote)
    -- a reply naming a host name as the bound address is read to its end, and no further
    wrote, h, err, rest = drive("socks5h://127.0.0.1:1080", "h", 25, "\5\0\5\0\0\3\5proxy\0\25" .. "220")
    assert.is_nil(err)
    assert.equal("220", rest)
  end)

  it("SOCKS5 with credentials (RFC 1929), and their refusal", function()
    local wrote, h, err = drive("socks5h://user:" .. PW .. "@127.0.0.1", "h", 25, "\5\2\1\0\5\0\0\1\0\0\0\0\0\0")
    assert.is_nil(err)
    assert.equal("\5\2\0\2" .. "\1\4user\10" .. PW .. "\5\1\0\3\1h\0\25", wrote)
    _, h, err = drive("socks5h://user:" .. PW .. "@127.0.0.1", "h", 25, "\5\2\1\1")
    assert.equal("proxy", err.kind)
    assert.equal("connect", err.phase)
    assert.is_false(err.temporary)
    assert.truthy(tostring(err):find("refused the user name and password", 1, true))
    assert.is_nil(tostring(err):find(PW, 1, true))
    _, h, err = drive("socks5h://127.0.0.1", "h", 25, "\5\255")
    assert.truthy(tostring(err):find("requires authentication", 1, true))
  end)

  it("SOCKS5 refusals name the reply, and say whether another try may work", function()
    local _, _, err = drive("socks5h://127.0.0.1", "h", 25, "\5\0\5\2\0\1\0\0\0\0\0\0")
    assert.equal("proxy 127.0.0.1 port 1080: could not connect to h port 25: connection not allowed by ruleset (SOCKS5 reply 2)", err.text)
    assert.is_false(err.temporary)
    assert.equal(2, err.proxy_code)
    _, _, err = drive("socks5h://127.0.0.1", "h", 25, "\5\0\5\4\0\1\0\0\0\0\0\0")
    assert.truthy(err.text:find("host unreachable", 1, true))
    assert.is_true(err.temporary)
    _, _, err = drive("socks5h://127.0.0.1", "h", 25, "HTTP/1.1 400 Bad")
    assert.truthy(err.text:find("not a SOCKS5 proxy", 1, true))
  end)

  it("HTTP CONNECT: the request, Basic credentials, and a head read to its end and no further", function()
    local wrote, h, err, rest = drive("http://127.0.0.1:3128", "mail.example", 587,
      "HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n220 mail.example ESMTP\r\n")
    assert.is_nil(err)
    assert.is_true(h.done)
    assert.equal("CONNECT mail.example:587 HTTP/1.1\r\nHost: mail.example:587\r\n\r\n", wrote)
    assert.equal("220 mail.example ESMTP\r\n", rest)
    wrote = drive("http://u:" .. PW .. "@[::1]:3128", "2001:db8::25", 25, "HTTP/1.0 200 OK\r\n\r\n")
    assert.equal("CONNECT [2001:db8::25]:25 HTTP/1.1\r\nHost: [2001:db8::25]:25\r\nProxy-Authorization: Basic "
      .. core.b64encode("u:" .. PW) .. "\r\n\r\n", wrote)
  end)

  it("HTTP CONNECT refusals name the proxy's status line", function()
    local _, _, err = drive("http://127.0.0.1:3128", "h", 25, "HTTP/1.1 403 Forbidden\r\n\r\n")
    assert.equal("proxy 127.0.0.1 port 3128: refused to connect to h port 25 (HTTP 403 Forbidden)", err.text)
    assert.is_false(err.temporary)
    _, _, err = drive("http://127.0.0.1:3128", "h", 25, "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert.truthy(err.text:find("requires authentication (HTTP 407", 1, true))
    _, _, err = drive("http://u:" .. PW .. "@127.0.0.1:3128", "h", 25, "HTTP/1.1 407 No\r\n\r\n")
    assert.truthy(err.text:find("refused the user name and password (HTTP 407 No)", 1, true))
    _, _, err = drive("http://127.0.0.1:3128", "h", 25, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
    assert.is_true(err.temporary)
    _, _, err = drive("http://127.0.0.1:3128", "h", 25, "SSH-2.0-OpenSSH\r\n\r\n")
    assert.truthy(err.text:find("sent no HTTP reply", 1, true))
    _, _, err = drive("http://127.0.0.1:3128", "h", 25, ("X"):rep(20000))
    assert.truthy(err.text:find("over 16 KB", 1, true))
  end)

  it("a proxy that ends the connection early is a temporary proxy error", function()
    local _, _, err = drive("socks5h://127.0.0.1", "h", 25, "\5\0\5")
    assert.equal("proxy 127.0.0.1 port 1080: closed the connection during the SOCKS5 handshake", err.text)
    assert.is_true(err.temporary)
  end)
end)

describe("smtp.send through real proxies", function()
  local peer, socks, socks_auth, http, http_port, socks_port, socks_auth_port, dir
  setup(function()
    helper.need("microsocks")
    helper.need("tinyproxy")
    peer = peers.aiosmtpd()
    dir = helper.tmpdir()
    socks_port, socks_auth_port, http_port = helper.free_port(), helper.free_port(), helper.free_port()
    socks = helper.spawn({ "microsocks", "-i", "127.0.0.1", "-p", tostring(socks_port) }, { limit = 300 })
    socks_auth = helper.spawn({ "microsocks", "-i", "127.0.0.1", "-p", tostring(socks_auth_port),
      "-u", "puser", "-P", PW }, { limit = 300 })
    -- CONNECT allowed to the two aiosmtpd ports only; Basic credentials required
    helper.write(dir .. "/tinyproxy.conf", table.concat({
      "Port " .. http_port, "Listen 127.0.0.1", "Timeout 30", "MaxClients 20", "LogLevel Info",
      "Allow 127.0.0.1", "ConnectPort " .. peer.port, "ConnectPort " .. peer.tls_port,
      "BasicAuth huser " .. PW, "" }, "\n"))
    http = helper.spawn({ "tinyproxy", "-d", "-c", dir .. "/tinyproxy.conf" }, { limit = 300 })
    for _, p in ipairs { socks_port, socks_auth_port, http_port } do
      assert(helper.wait_port("127.0.0.1", p, 10), "proxy did not start: " .. http:output())
    end
  end)
  teardown(function()
    for _, p in ipairs { socks, socks_auth, http } do p:stop() end
    if peer then peer.stop() end
  end)

  local function send(t)
    local o = { server = "localhost", port = peer.port, cafile = peer.ca, helo = "client.test", timeout = 10,
      from = "a@example.com", to = { "b@example.org" }, message = BODY }
    for k, v in pairs(t) do o[k] = v end
    return smtp.send(o)
  end
  local function socks_url(h) return (h or "socks5h") .. "://127.0.0.1:" .. socks_port end
  local function http_url(pw) return "http://huser:" .. (pw or PW) .. "@127.0.0.1:" .. http_port end

  local cases = {
    { "SOCKS5 (remote names), STARTTLS", function() return { proxy = socks_url() } end },
    { "SOCKS5 (local names), STARTTLS", function() return { proxy = socks_url("socks5") } end },
    { "SOCKS5 with credentials, implicit TLS", function()
      return { proxy = "socks5h://puser:" .. PW .. "@127.0.0.1:" .. socks_auth_port, tls = "implicit", port = peer.tls_port } end },
    { "SOCKS5, plaintext", function() return { proxy = socks_url(), tls = "none", server = "127.0.0.1" } end },
    { "HTTP CONNECT with credentials, STARTTLS", function() return { proxy = http_url() } end },
    { "HTTP CONNECT, implicit TLS", function() return { proxy = http_url(), tls = "implicit", port = peer.tls_port } end },
    { "HTTP CONNECT, plaintext", function() return { proxy = http_url(), tls = "none", server = "127.0.0.1" } end },
  }
  for _, c in ipairs(cases) do
    it("sends through " .. c[1], function()
      local before = #peer.messages()
      local o = c[2]()
      local res, err = send(o)
      assert.is_nil(err)
      assert.equal(250, res.reply.code)
      local tls = o.tls ~= "none"
      assert.equal(tls, res.server.tls ~= false)
      local msgs = peer.messages()
      assert.equal(before + 1, #msgs)
      assert.equal(tls, msgs[#msgs].tls)
      assert.truthy(msgs[#msgs].data:find("through the tunnel", 1, true))
    end)
  end

  it("verifies the real server's name through the tunnel, not the proxy's", function()
    for _, p in ipairs { socks_url(), http_url() } do
      local res, err = send { proxy = p, servername = "wrong.example" }
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.truthy(tostring(err):lower():find("mismatch", 1, true), tostring(err))
      res, err = send { proxy = p, tls = "implicit", port = peer.tls_port, cafile = helper.certs().other_ca }
      assert.is_nil(res)
      assert.equal("tls", err.kind)
    end
  end)

  it("smtp.deliver goes through the proxy to the address it checked", function()
    local before = #peer.messages()
    local res = assert(smtp.deliver { message = BODY, from = "a@example.com", to = { "b@[127.0.0.1]" },
      port = peer.port, tls = "none", destinations = "any", timeout = 10, proxy = socks_url("socks5") })
    assert.equal("sent", res[1].status)
    assert.equal(before + 1, #peer.messages())
    res = assert(smtp.deliver { message = BODY, from = "a@example.com", to = { "b@[127.0.0.1]" },
      port = peer.port, tls = "none", destinations = "any", timeout = 10,
      proxy = "socks5h://127.0.0.1:" .. socks_auth_port })
    assert.equal("deferred", res[1].status)
    assert.truthy(res[1].text:find("requires authentication", 1, true), res[1].text)
  end)

  it("lets AUTH go in plaintext to loopback only when the proxy is on loopback too", function()
    local o = { server = "127.0.0.1", port = 25, tls = "none", auth = { user = "u", password = "p" },
      from = "a@example.com", to = "b@example.org", message = BODY }
    o.proxy = "socks5://192.0.2.1:1080"
    local res, err = smtp.send(o)
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.truthy(err.text:find("auth over a plaintext connection", 1, true))
    local config = require "smtp.config"
    o.proxy = "socks5://127.0.0.1:1080"
    assert(config.connection(o, "send"))
  end)

  it("url = with ?proxy= goes through the proxy", function()
    local res, err = send { server = nil, port = nil, url = ("smtp+starttls://localhost:%d?proxy=%s"):format(peer.port,
      socks_url()) }
    assert.is_nil(err)
    assert.equal("localhost", res.server.host)
  end)

  -- Each refusal: the words, temporary or not; never the proxy's password.
  local refusals = {
    { "SOCKS5 that needs credentials, given none", function() return { proxy = "socks5h://127.0.0.1:" .. socks_auth_port } end,
      "requires authentication", false },
    { "SOCKS5 refusing the password", function()
      return { proxy = "socks5h://puser:wrong" .. PW .. "@127.0.0.1:" .. socks_auth_port } end,
      "refused the user name and password", false },
    { "SOCKS5 that cannot reach the server", function() return { proxy = socks_url(), port = helper.free_port() } end,
      "connection refused (SOCKS5 reply 5)", true },
    { "HTTP CONNECT that needs credentials, given none", function()
      return { proxy = "http://127.0.0.1:" .. http_port } end, "requires authentication (HTTP 407", false },
    { "HTTP CONNECT refusing the password", function() return { proxy = http_url("wrong" .. PW) } end,
      "refused the user name and password", false },
    { "HTTP CONNECT refusing the destination port", function()
      return { proxy = http_url(), port = helper.free_port() } end, "refused to connect to localhost port", false },
    { "a proxy nobody listens on", function() return { proxy = "socks5h://u:" .. PW .. "@127.0.0.1:" .. helper.free_port() } end,
      "proxy 127.0.0.1 port", true, "connect" },
  }
  for _, c in ipairs(refusals) do
    it("fails clearly through " .. c[1], function()
      local res, err = send(c[2]())
      assert.is_nil(res)
      assert.equal(c[5] or "proxy", err.kind)
      assert.equal("connect", err.phase)
      assert.equal(c[4], err.temporary)
      local s = tostring(err)
      assert.truthy(s:find(c[3], 1, true), s)
      assert.is_nil(s:find(PW, 1, true), s)
    end)
  end

  it("works under cqueues", function()
    local ok, cqueues = pcall(require, "cqueues")
    if not ok then helper.need("cqueues") end
    local cq = cqueues.new()
    local results = {}
    for i = 1, 4 do
      cq:wrap(function()
        local res, err = send { proxy = i % 2 == 0 and socks_url() or http_url(), tls = "implicit", port = peer.tls_port }
        results[i] = res and res.reply.code or tostring(err)
      end)
    end
    assert(cq:loop(30))
    assert.same({ 250, 250, 250, 250 }, results)
  end)

  it("lua-smtp send --proxy, and a bad --proxy is a usage error that hides the password", function()
    local bin = helper.root .. "/bin/lua-smtp"
    local out, _, code = helper.sh(("%s %s send --server localhost:%d --cafile %s --from a@example.com --to b@example.org --subject cli --proxy %s --timeout 10 2>&1; echo \"exit=$?\"")
      :format(helper.lua, helper.quote(bin), peer.port, helper.quote(peer.ca), helper.quote(http_url())))
    assert.truthy(out:find("sent: 250", 1, true), out)
    assert.truthy(out:find("exit=0", 1, true), out)
    out = helper.sh(("%s %s send --server localhost:%d --from a@example.com --to b@example.org --proxy %s 2>&1; echo \"exit=$?\"")
      :format(helper.lua, helper.quote(bin), peer.port, helper.quote("socks5://u:" .. PW .. "@127.0.0.1:0")))
    assert.truthy(out:find("bad --proxy: proxy: the port", 1, true), out)
    assert.truthy(out:find("exit=2", 1, true), out)
    assert.is_nil(out:find(PW, 1, true), out)
    local _ = code
  end)
end)

describe("smtp.send through a misbehaving proxy", function()
  local fake
  setup(function() fake = peers.fake() end)
  teardown(function() if fake then fake.stop() end end)

  local function send(p, timeout)
    return smtp.send { server = "localhost", port = 25, tls = "none", timeout = timeout or 10,
      from = "a@example.com", to = { "b@example.org" }, message = BODY,
      proxy = p .. "://u:" .. PW .. "@127.0.0.1:" .. fake.port }
  end

  it("one that closes mid-handshake (SOCKS5 after the method, HTTP mid-head)", function()
    fake.script { { "bytes", 4 }, { "send", "\5\2" }, { "bytes", 4 + #PW }, { "send", "\1\0" },
      { "bytes", 5 + 9 + 2 }, { "send", "\5\0\0" }, { "close" } }
    local res, err = send("socks5h")
    assert.is_nil(res)
    assert.equal("proxy", err.kind)
    assert.equal("connect", err.phase)
    assert.is_true(err.temporary)
    assert.equal("proxy 127.0.0.1 port " .. fake.port .. ": closed the connection during the SOCKS5 handshake", err.text)
    assert.is_nil(tostring(err):find(PW, 1, true))
    -- it got the credentials as RFC 1929 has them
    assert.truthy(fake.received(1):find("\1\1u" .. string.char(#PW) .. PW, 1, true))

    fake.script { { "line" }, { "send", "HTTP/1.1 200 Connection established\r\nVia: fake\r\n" }, { "close" } }
    res, err = send("http")
    assert.is_nil(res)
    assert.equal("proxy 127.0.0.1 port " .. fake.port .. ": closed the connection during the HTTP CONNECT handshake", err.text)
  end)

  it("one that says nothing: the connect timeout ends the handshake", function()
    fake.script { { "sleep", 20 } }
    for _, scheme in ipairs { "socks5h", "http" } do
      local t0 = core.now()
      local res, err = send(scheme, 1)
      local dt = core.now() - t0
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.equal("connect", err.phase)
      assert.is_true(err.temporary)
      assert.truthy(err.text:find("handshake timed out", 1, true), err.text)
      assert.is_true(dt >= 0.9 and dt < 5, "took " .. dt .. " s")
    end
  end)

  it("one that sends the SMTP greeting right after its reply: nothing of it is lost", function()
    fake.script { { "line" }, { "line" }, { "line" }, { "line" },
      { "send", "HTTP/1.1 200 OK\r\n\r\n220 fake ESMTP\r\n" }, { "line" }, { "send", "250 fake\r\n" },
      { "line" }, { "send", "250 ok\r\n" }, { "line" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "354 go\r\n" }, { "data" }, { "send", "250 queued\r\n" }, { "line" }, { "send", "221 bye\r\n" } }
    local res, err = smtp.send { server = "localhost", port = 25, tls = "none", timeout = 10,
      from = "a@example.com", to = { "b@example.org" }, message = BODY,
      proxy = "http://u:" .. PW .. "@127.0.0.1:" .. fake.port }
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.equal("queued", res.reply.text)
  end)
end)
