-- The PROXY protocol in front of smtp.server (issue 17): HAProxy as the real peer with
-- send-proxy (v1) and send-proxy-v2, over IPv4 and IPv6; curl --haproxy-protocol and swaks
-- --proxy-*; hand-written headers for what HAProxy never sends (LOCAL, UNIX, TLVs, malformed,
-- late); untrusted peers closed; the real client's address in the hooks, the per-client
-- limits, the sink's log line and its Received header. core.proxy_parse, the C parser, on its own first.
local helper = require "helper"
local peers = require "support.server_peers"
local haproxy = require "support.haproxy"
local server = require "smtp.server"
local core = require "smtp.core"

if not pcall(require, "smtp.transport.native") then
  describe("PROXY protocol", function() pending("needs smtp.transport.native") end)
  return
end

local SIG = "\r\n\r\n\0\r\nQUIT\n"
local function be16(n) return string.char(math.floor(n / 256), n % 256) end
local function v2(cmd, fam, addr, tlv)
  local body = (addr or "") .. (tlv or "")
  return SIG .. string.char(0x20 + cmd, fam) .. be16(#body) .. body
end
local V4 = "\192\0\2\1" .. "\198\51\100\2" .. be16(56324) .. be16(25)
local V6 = "\32\1\13\184" .. ("\0"):rep(11) .. "\1" .. "\32\1\13\184" .. ("\0"):rep(11) .. "\2" .. be16(4000) .. be16(25)

describe("core.proxy_parse", function()
  it("reads v1 TCP4, TCP6 and UNKNOWN lines and says how long the header was", function()
    local n, h = core.proxy_parse("PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n")
    assert.equal(44, n)
    assert.same({ version = 1, ["local"] = false, family = 4, src = "192.0.2.1", dst = "198.51.100.2",
      sport = 56324, dport = 25 }, h)
    n, h = core.proxy_parse("PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 4000 25\r\n")
    assert.equal("2001:db8::1", h.src) -- written back in one form
    assert.equal(6, h.family)
    n, h = core.proxy_parse("PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert.equal(35, n)
    assert.is_true(h["local"])
    assert.equal(0, h.family)
  end)

  it("reads v2 PROXY over IPv4 and IPv6 (TLVs skipped), LOCAL, and UNIX (addresses not used)", function()
    local hdr = v2(1, 0x11, V4)
    local n, h = core.proxy_parse(hdr .. "EHLO")
    assert.equal(#hdr, n)
    assert.same({ version = 2, ["local"] = false, family = 4, src = "192.0.2.1", dst = "198.51.100.2",
      sport = 56324, dport = 25 }, h)
    hdr = v2(1, 0x21, V6, "\1\0\2h2\4\0\0")
    n, h = core.proxy_parse(hdr)
    assert.equal(#hdr, n)
    assert.equal("2001:db8::1", h.src)
    assert.equal(4000, h.sport)
    n, h = core.proxy_parse(v2(0, 0x00))
    assert.equal(16, n)
    assert.is_true(h["local"])
    n, h = core.proxy_parse(v2(1, 0x31, ("\0"):rep(216)))
    assert.equal(16 + 216, n)
    assert.is_true(h["local"])
  end)

  it("asks for more bytes while a header may still come right, and refuses a wrong one at once", function()
    local hdr = v2(1, 0x11, V4)
    for i = 0, #hdr - 1 do assert.equal(0, (core.proxy_parse(hdr:sub(1, i)))) end
    assert.equal(0, (core.proxy_parse("PROXY TCP4 1.2.3.4")))
    local bad = {
      ["EHLO x\r\n"] = "not a PROXY protocol header",
      ["PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"] = "PROXY v1 line does not end in CRLF",
      ["PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"] = "PROXY v1 line has the wrong number of fields",
      ["PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"] = "PROXY v1 line has the wrong number of fields",
      ["PROXY TCP4 ::1 5.6.7.8 1 2\r\n"] = "PROXY v1 address is not one of its family",
      ["PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n"] = "PROXY v1 port is not a number within 0..65535",
      ["PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n"] = "PROXY v1 port is not a number within 0..65535",
      ["PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"] = "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN",
      ["PROXY " .. ("x"):rep(120)] = "PROXY v1 line too long",
      [SIG .. "\49\17\0\12" .. V4] = "PROXY v2 version is not 2",
      [SIG .. "\34\17\0\12" .. V4] = "PROXY v2 command is neither LOCAL nor PROXY",
      [SIG .. "\33\65\0\12" .. V4] = "PROXY v2 address family or transport unknown",
      [SIG .. "\33\33\0\12" .. V4] = "PROXY v2 address block shorter than its family needs",
    }
    for input, why in pairs(bad) do
      local n, err = core.proxy_parse(input)
      assert.is_nil(n, input)
      assert.equal(why, err)
    end
  end)
end)

-- A server behind a proxy that records what its hooks saw.
local function start(opts)
  local got = { connects = {}, msgs = {}, log = {} }
  local o = {
    port = 0, hostname = "mx.test", timeout = 20, received = true,
    proxy_protocol = { trusted = { "127.0.0.1" }, timeout = 2 },
    log = function(s) got.log[#got.log + 1] = s end,
    on_connect = function(s)
      got.connects[#got.connects + 1] = { address = s.address, port = s.port, local_address = s.local_address,
        local_port = s.local_port, proxied = s.proxied and s.proxied.address }
      return true
    end,
    on_message = function(s, env, reader)
      for _ in reader:chunks() do end
      got.msgs[#got.msgs + 1] = { address = s.address, received = s:received(env) }
      return true
    end,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(server.listen(o)), got
end

local function swaks(srv, port, host, from)
  return peers.run(srv, { "swaks", "--server", host or "127.0.0.1", "--port", tostring(port),
    "--local-interface", from or "127.0.0.2", "--helo", "client.test", "--from", "a@x.test", "--to", "b@y.test" })
end

describe("smtp.server behind HAProxy", function()
  local ok6 = helper.sh("ip -6 addr show lo 2>/dev/null; cat /proc/net/if_inet6 2>/dev/null"):match("00000000000000000000000000000001")

  it("send-proxy (v1) and send-proxy-v2: the hooks and Received see the client, not the proxy", function()
    local srv, got = start()
    local hp = haproxy.start(srv.port, { { name = "v1", send = "send-proxy" }, { name = "v2", send = "send-proxy-v2" } })
    local out1, c1 = swaks(srv, hp.port.v1, "127.0.0.1", "127.0.0.2")
    hp.stop()
    local srv2, got2 = start()
    assert.equal(0, c1, out1)
    local hp2 = haproxy.start(srv2.port, { { name = "v2", send = "send-proxy-v2" } })
    local out2, c2 = swaks(srv2, hp2.port.v2, "127.0.0.1", "127.0.0.3")
    hp2.stop()
    assert.equal(0, c2, out2)
    for i, g in ipairs { { got, "127.0.0.2", hp.port.v1 }, { got2, "127.0.0.3", hp2.port.v2 } } do
      local m = g[1].msgs[1]
      assert.is_table(m, "message " .. i)
      assert.equal(g[2], m.address)
      assert.matches("^Received: from client%.test %(unknown %[" .. g[2]:gsub("%.", "%%.") .. "%]%)\r\n", m.received)
      -- the connection whose message arrived: the client's address and the proxy's frontend port
      local seen
      for _, c in ipairs(g[1].connects) do if c.address == g[2] then seen = c end end
      assert.is_table(seen)
      assert.equal("127.0.0.1", seen.local_address)
      assert.equal(g[3], seen.local_port)
      assert.equal("127.0.0.1", seen.proxied)
    end
  end)

  it("send-proxy-v2 and send-proxy from an IPv6 client (curl): the address is the client's IPv6 one", function()
    if not ok6 then return pending("no IPv6 loopback here") end
    local f = helper.tmpdir() .. "/m.eml"
    helper.write(f, "Subject: six\r\n\r\nhi\r\n")
    -- swaks needs IO::Socket::INET6 for IPv6; curl has it
    local function curl(srv, port)
      return peers.run(srv, { "curl", "-sS", "smtp://[::1]:" .. port .. "/client.test",
        "--mail-from", "a@x.test", "--mail-rcpt", "b@y.test", "-T", f })
    end
    local srv, got = start()
    local hp = haproxy.start(srv.port, { { name = "v6", bind = "::1", send = "send-proxy-v2" } })
    local out, code = curl(srv, hp.port.v6)
    hp.stop()
    assert.equal(0, code, out)
    local srv2, got2 = start()
    local hp2 = haproxy.start(srv2.port, { { name = "v6v1", bind = "::1", send = "send-proxy" } })
    out, code = curl(srv2, hp2.port.v6v1)
    hp2.stop()
    assert.equal(0, code, out)
    for _, g in ipairs { got, got2 } do
      assert.equal("::1", g.msgs[1].address)
      assert.matches("%(unknown %[IPv6:::1%]%)", g.msgs[1].received)
    end
  end)

  it("per-client limits count the client behind the proxy, not the proxy", function()
    local srv = start { client_exempt = false, max_client_rate = 1 }
    local hp = haproxy.start(srv.port, { { name = "v2", send = "send-proxy-v2" } })
    local dir = helper.tmpdir()
    -- three connections through HAProxy: two from 127.0.0.2 (the second over the rate), one from 127.0.0.3
    helper.write(dir .. "/c.py", [[
import socket, sys
port = int(sys.argv[1])
for src in ('127.0.0.2', '127.0.0.2', '127.0.0.3'):
    s = socket.create_connection(('127.0.0.1', port), 10, (src, 0))
    f = s.makefile('rb')
    print(src, f.readline().decode().strip())
    s.sendall(b'QUIT\r\n')
    f.read()
    s.close()
]])
    local out, code = peers.run(srv, { helper.python, dir .. "/c.py", tostring(hp.port.v2) })
    hp.stop()
    assert.equal(0, code, out)
    assert.equal("127.0.0.2 220 mx.test ESMTP lua-smtp\n" ..
      "127.0.0.2 421 4.7.0 Connection rate limit exceeded for your address, try again later\n" ..
      "127.0.0.3 220 mx.test ESMTP lua-smtp\n", out)
    -- (the proxy's own address has an entry too: helper.wait_port's probe came from it)
    assert.equal(2, srv.clients["127.0.0.2"].c)
    assert.equal(1, srv.clients["127.0.0.3"].c)
    assert.equal(1, srv.counters.client_rate)
  end)
end)

describe("smtp.server PROXY protocol by hand", function()
  it("curl --haproxy-protocol (v1) delivers a message", function()
    local srv, got = start()
    local f = helper.tmpdir() .. "/m.eml"
    helper.write(f, "Subject: curl\r\n\r\nhi\r\n")
    local out, code = peers.run(srv, { "curl", "-sS", "--haproxy-protocol", "smtp://127.0.0.1:" .. srv.port,
      "--mail-from", "a@x.test", "--mail-rcpt", "b@y.test", "-T", f })
    assert.equal(0, code, out)
    assert.equal(1, #got.msgs)
    assert.equal("127.0.0.1", got.msgs[1].address)
  end)

  it("swaks --proxy-*: v1 TCP4 and v2 AF_INET6", function()
    local cases = {
      { { "--proxy-version", "1", "--proxy-family", "TCP4", "--proxy-source", "192.0.2.44",
        "--proxy-source-port", "1044", "--proxy-dest", "198.51.100.25", "--proxy-dest-port", "25" }, "192.0.2.44", 1044 },
      { { "--proxy-version", "2", "--proxy-family", "AF_INET6", "--proxy-source", "2001:db8::7",
        "--proxy-source-port", "1234", "--proxy-dest", "2001:db8::25", "--proxy-dest-port", "25" }, "2001:db8::7", 1234 },
      -- (not --proxy-command LOCAL: swaks 20201014 writes it as command 2 with a one-byte length,
      -- which is no v2 header; the hand-written LOCAL below stands for it)
    }
    for _, c in ipairs(cases) do
      local srv, got = start()
      local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(srv.port), "--helo", "client.test",
        "--from", "a@x.test", "--to", "b@y.test" }
      for _, a in ipairs(c[1]) do argv[#argv + 1] = a end
      local out, code = peers.run(srv, argv)
      assert.equal(0, code, out)
      assert.equal(c[2], got.msgs[1].address, out)
      if c[3] then assert.equal(c[3], got.connects[1].port) end
    end
  end)

  it("takes a v2 header with TLVs, a LOCAL one (the socket's address stands) and one in pieces", function()
    local srv, got = start()
    local out = peers.raw(srv, { { "send", v2(1, 0x21, V6, "\1\0\2h2\4\0\0") }, { "recv", "220 [^\n]*\n" },
      { "send", "QUIT\r\n" }, { "eof" } })
    assert.equal("220 mx.test ESMTP lua-smtp\r\n221 2.0.0 Bye\r\n", out)
    local srv2, got2 = start()
    out = peers.raw(srv2, { { "send", v2(0, 0) }, { "recv", "220 [^\n]*\n" }, { "send", "QUIT\r\n" }, { "eof" } })
    assert.equal("220 mx.test ESMTP lua-smtp\r\n221 2.0.0 Bye\r\n", out)
    local srv3, got3 = start()
    local h = "PROXY TCP4 192.0.2.7 198.51.100.2 4242 25\r\n"
    out = peers.raw(srv3, { { "send", h:sub(1, 9) }, { "sleep", 0.3 }, { "send", h:sub(10) },
      { "recv", "220 [^\n]*\n" }, { "send", "QUIT\r\n" }, { "eof" } })
    assert.equal("220 mx.test ESMTP lua-smtp\r\n221 2.0.0 Bye\r\n", out)
    assert.same({ address = "2001:db8::1", port = 4000, local_address = "2001:db8::2", local_port = 25,
      proxied = "127.0.0.1" }, got.connects[1])
    assert.equal("127.0.0.1", got2.connects[1].address)
    assert.equal(srv2.port, got2.connects[1].local_port)
    assert.same({ address = "192.0.2.7", port = 4242, local_address = "198.51.100.2", local_port = 25,
      proxied = "127.0.0.1" }, got3.connects[1])
  end)

  it("closes without a word on a malformed header, a missing one (timeout) and an untrusted peer", function()
    for _, steps in ipairs {
      { { "send", "EHLO client.test\r\n" }, { "eof" } },
      { { "send", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" }, { "eof" } },
      { { "send", SIG .. "\33\33\0\12" .. V4 }, { "eof" } },
      { { "eof", 8 } },
    } do
      local srv, got = start()
      local t0 = os.time()
      assert.equal("", peers.raw(srv, steps))
      assert.is_true(os.time() - t0 < 8)
      assert.equal(0, #got.connects)
      assert.equal(1, srv.counters.proxy_refused)
      assert.matches("^PROXY protocol from 127%.0%.0%.1: .*connection closed$", got.log[1])
    end
    local srv, got = start { proxy_protocol = { trusted = { "10.0.0.0/8", "::1" } } }
    assert.equal("", peers.raw(srv, { { "send", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n" }, { "eof" } }))
    assert.equal(0, #got.connects)
    assert.equal("PROXY protocol: 127.0.0.1 is not a trusted proxy, connection closed", got.log[1])
  end)
end)

describe("lua-smtp sink --proxy-trusted behind HAProxy", function()
  it("logs the client's address and writes it in the stored message's Received header", function()
    local port = helper.free_port()
    local md = helper.tmpdir() .. "/Maildir"
    local sink = helper.spawn({ "lua5.4", helper.root .. "/bin/lua-smtp", "sink", "--listen", "127.0.0.1:" .. port,
      "--maildir", md, "--hostname", "sink.test", "--proxy-trusted", "127.0.0.1" }, { limit = 60 })
    assert(helper.wait_port("127.0.0.1", port, 10), sink:output())
    local hp = haproxy.start(port, { { name = "v2", send = "send-proxy-v2" } })
    local out = helper.sh("swaks --server 127.0.0.1 --port " .. hp.port.v2 .. " --local-interface 127.0.0.2" ..
      " --helo client.test --from a@x.test --to b@y.test 2>&1")
    local line
    for _ = 1, 50 do
      line = sink:output():match("(from=[^\n]*)\n")
      if line then break end
      helper.sleep(0.1)
    end
    hp.stop()
    sink:stop()
    assert.matches("250 2%.0%.0", out)
    assert.matches(" client=%[127%.0%.0%.2%]$", line)
    local file = helper.sh("ls " .. helper.quote(md .. "/new")):match("^(%S+)\n$")
    local data = helper.read(md .. "/new/" .. file)
    assert.matches("\r\nReceived: from client%.test %(unknown %[127%.0%.0%.2%]%)\r\n\tby sink%.test %(lua%-smtp%) with ESMTP id %x+\r\n\tfor <b@y%.test>; ", data)
  end)
end)
