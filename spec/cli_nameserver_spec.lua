-- --nameserver on the command line: `lua-smtp send` without --server (direct delivery) asks the
-- DNS server it names — a real dnsmasq on loopback whose MX for direct.test points at a real
-- aiosmtpd on port 25 of a loopback address — and the message arrives byte for byte; bad values
-- exit 2 with the reason before any query or connection. `send` and `mx` share the parsing
-- (smtp.cli.args).
local helper = require "helper"
local dnsmasq = require "support.dnsmasq"
local mxhost = require "support.mxhost"

local args = require "smtp.cli.args"

describe("smtp.cli.args.nameserver", function()
  it("takes HOST[:PORT] with an IP address and gives the resolver's spelling", function()
    assert.equal("192.0.2.1", args.nameserver("192.0.2.1"))
    assert.equal("192.0.2.1:5353", args.nameserver("192.0.2.1:5353"))
    assert.equal("::1", args.nameserver("::1"))
    assert.equal("::1", args.nameserver("[::1]"))
    assert.equal("[::1]:5353", args.nameserver("[::1]:5353"))
    assert.equal("[2001:db8::1]:53", args.nameserver("[2001:db8::1]:053"))
  end)

  it("refuses names, bad ports, lists and empty values with the reason", function()
    local cases = {
      { "ns.example.org", "HOST must be an IP address" },
      { "ns.example.org:53", "HOST must be an IP address" },
      { "256.0.0.1", "HOST must be an IP address" },
      { "127.0.0.1:0", "port must be 1 to 65535" },
      { "127.0.0.1:65536", "port must be 1 to 65535" },
      { "127.0.0.1:x", "HOST must be an IP address" },
      { "[::1]:999999", "port must be 1 to 65535" },
      { "[example]:53", "not an IPv6 address in brackets" },
      { "127.0.0.1,127.0.0.2", "one address per --nameserver (repeat the option)" },
      { "", "an IP address expected" },
    }
    for _, c in ipairs(cases) do
      local v, why = args.nameserver(c[1])
      assert.is_nil(v, c[1])
      assert.equal(c[2], why, c[1])
    end
  end)

  it("adds at most as many servers as the resolver takes", function()
    local list = {}
    for i = 1, args.max_nameservers do assert.is_true(args.add_nameserver(list, "127.0.0." .. i)) end
    local ok, why = args.add_nameserver(list, "127.0.0.99")
    assert.is_nil(ok)
    assert.equal("at most 8 --nameserver options", why)
    assert.equal(8, #list)
  end)
end)

describe("lua-smtp send --nameserver, direct delivery", function()
  local mxh, zone
  setup(function()
    mxh = mxhost.mxhost()
    zone = dnsmasq.start { "--log-queries", "--log-facility=-",
      "--mx-host=direct.test,mx.direct.test,10", "--host-record=mx.direct.test," .. mxh.ip }
  end)
  teardown(function()
    if zone then zone:stop() end
    if mxh then mxh.stop() end
  end)

  -- Runs the real bin/lua-smtp (bounded by timeout): exit status, stdout, stderr.
  local function run(cmd, argv)
    local errf = helper.tmpdir() .. "/stderr"
    local parts = { "timeout 60", helper.lua, helper.quote(helper.root .. "/bin/lua-smtp"), cmd }
    for _, a in ipairs(argv) do parts[#parts + 1] = helper.quote(a) end
    local p = io.popen(table.concat(parts, " ") .. " 2>" .. helper.quote(errf) .. "; echo \"rc=$?\"")
    local out = p:read("*a")
    p:close()
    local body, rc = out:match("^(.-)rc=(%d+)%s*$")
    return tonumber(rc), body, helper.read(errf) or ""
  end

  local function queries()
    local n = 0
    for _ in zone.proc:output():gmatch("query%[") do n = n + 1 end
    return n
  end

  it("delivers a raw message byte for byte to the MX host the named server gives, exit 0", function()
    local raw = "From: a@example.com\r\nTo: b@direct.test\r\nSubject: direct\r\n\r\nline one\r\n" ..
      ".leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
    local path = helper.tmpdir() .. "/raw.eml"
    helper.write(path, raw)
    local before = #mxh.messages()
    local rc, out, err = run("send", { "--nameserver", zone.nameserver, "--from", "a@example.com",
      "--to", "b@direct.test", "--to", "c@direct.test", "--raw", path, "--timeout", "20", "--helo", "client.test",
      "--destinations", "any" })
    assert.equal("", err)
    assert.equal(0, rc)
    local got = mxh.messages()
    assert.equal(before + 1, #got)
    local m = got[#got]
    assert.equal(raw, m.data)
    assert.equal("a@example.com", m.from)
    assert.same({ "b@direct.test", "c@direct.test" }, m.to)
    local n = #got
    assert.equal(("b@direct.test: sent 250 2.0.0 stored %d (mx.direct.test)\n" ..
      "c@direct.test: sent 250 2.0.0 stored %d (mx.direct.test)\n"):format(n, n), out)
    assert.truthy(zone.proc:output():find("query[MX] direct.test from 127.0.0.1", 1, true))
  end)

  it("takes --nameserver=VALUE and composes a message too", function()
    local before = #mxh.messages()
    local rc, out, err = run("send", { "--nameserver=" .. zone.nameserver, "--from", "a@example.com",
      "--to", "d@direct.test", "--subject", "composed", "--body", "hello", "--timeout", "20",
      "--destinations=any" })
    assert.equal("", err)
    assert.equal(0, rc)
    assert.truthy(out:find("^d@direct.test: sent 250 2.0.0 stored"))
    local got = mxh.messages()
    assert.equal(before + 1, #got)
    assert.truthy(got[#got].data:find("\r\nSubject: composed\r\n", 1, true))
    assert.same({ "d@direct.test" }, got[#got].to)
  end)

  it("refuses an MX host on loopback unless --destinations any, saying why (exit 1)", function()
    local before, conns = #mxh.messages(), mxh.connections()
    local rc, out, err = run("send", { "--nameserver", zone.nameserver, "--from", "a@example.com",
      "--to", "f@direct.test", "--subject", "s", "--body", "b", "--timeout", "20" })
    assert.equal(1, rc)
    assert.equal("", out)
    assert.equal(("f@direct.test: failed 550 5.4.4 refusing to deliver to %s (loopback address) of "
      .. "mx.direct.test: destinations = \"remote\" allows no loopback, link-local, multicast or reserved "
      .. "address (mx.direct.test)\n"):format(mxh.ip), err)
    rc, out, err = run("send", { "--nameserver", zone.nameserver, "--from", "a@example.com",
      "--to", "f@direct.test", "--subject", "s", "--body", "b", "--destinations", "public" })
    assert.equal(1, rc)
    assert.truthy(err:find('destinations = "public" allows public addresses only', 1, true), err)
    rc, _, err = run("send", { "--nameserver", zone.nameserver, "--from", "a@example.com",
      "--to", "f@direct.test", "--subject", "s", "--body", "b", "--destinations", "local" })
    assert.equal(2, rc)
    assert.equal("lua-smtp send: bad --destinations 'local' (remote, public or any)\n", err:match("^[^\n]*\n"))
    assert.equal(before, #mxh.messages())
    assert.equal(conns, mxh.connections())
  end)

  it("resolves the --server name through the named server too", function()
    local before = #mxh.messages()
    local rc, out, err = run("send", { "--server", "mx.direct.test:25", "--tls", "none",
      "--nameserver", zone.nameserver, "--from", "a@example.com", "--to", "e@elsewhere.test",
      "--subject", "smarthost", "--body", "via a named server", "--timeout", "20" })
    assert.equal("", err)
    assert.equal(0, rc)
    assert.equal(("sent: 250 2.0.0 stored %d\n  accepted: e@elsewhere.test\n"):format(before + 1), out)
    assert.same({ "e@elsewhere.test" }, mxh.messages()[before + 1].to)
    assert.truthy(zone.proc:output():find("query[A] mx.direct.test from 127.0.0.1", 1, true))
  end)

  it("exits 2 with the reason on a bad --nameserver and asks nothing, connects nowhere", function()
    local path = helper.tmpdir() .. "/raw.eml"
    helper.write(path, "Subject: x\r\n\r\nx\r\n")
    local conns, asked, stored = mxh.connections(), queries(), #mxh.messages()
    local cases = {
      { { "--nameserver", "mx.direct.test" }, "bad --nameserver 'mx.direct.test': HOST must be an IP address" },
      { { "--nameserver", "127.0.0.1:70000" }, "bad --nameserver '127.0.0.1:70000': port must be 1 to 65535" },
      { { "--nameserver", zone.nameserver .. ",127.0.0.2" },
        "bad --nameserver '" .. zone.nameserver .. ",127.0.0.2': one address per --nameserver (repeat the option)" },
      { { "--nameserver", zone.nameserver, "--nameserver=" }, "bad --nameserver '': an IP address expected" },
    }
    for _, c in ipairs(cases) do
      local argv = { "--from", "a@example.com", "--to", "b@direct.test", "--raw", path }
      for _, a in ipairs(c[1]) do argv[#argv + 1] = a end
      local rc, out, err = run("send", argv)
      assert.equal(2, rc, c[2])
      assert.equal("", out)
      assert.equal("lua-smtp send: " .. c[2] .. "\n", err:match("^[^\n]*\n"))
      assert.truthy(err:find("usage: lua-smtp send", 1, true))
    end
    -- the value is missing altogether
    local rc, _, err = run("send", { "--from", "a@example.com", "--to", "b@direct.test", "--raw", path, "--nameserver" })
    assert.equal(2, rc)
    assert.equal("lua-smtp send: --nameserver needs a value\n", err:match("^[^\n]*\n"))
    -- mx refuses the same values with the same words
    rc, _, err = run("mx", { "direct.test", "--nameserver", "mx.direct.test" })
    assert.equal(2, rc)
    assert.equal("lua-smtp mx: bad --nameserver 'mx.direct.test': HOST must be an IP address\n", err:match("^[^\n]*\n"))
    assert.equal(conns, mxh.connections())
    assert.equal(asked, queries())
    assert.equal(stored, #mxh.messages())
  end)
end)
