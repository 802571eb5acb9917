-- smtp.dnsutil: the pure-Lua part both resolvers (smtp.dns, smtp.transport.ngx_dns) share. It
-- must load nothing native (inside nginx the C resolver would block the worker); the lookups
-- themselves are tested through both resolvers in dns_spec, mx_spec and openresty_spec.
local helper = require "helper"
local util = require "smtp.dnsutil"

describe("smtp.dnsutil", function()
  it("loads, with ngx_dns, without smtp.core or smtp.dns", function()
    local probe = "package.preload['smtp.core'] = function() error('smtp.core loaded') end " ..
      "require 'smtp.dnsutil'; require 'smtp.transport.ngx_dns'; require 'smtp.cli.args' " ..
      "print(package.loaded['smtp.core'] == nil, package.loaded['smtp.dns'] == nil)"
    local p = assert(io.popen(helper.lua .. " -e " .. helper.quote(probe) .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    assert.equal("true\ttrue\n", out)
  end)

  it("tells address literals from names", function()
    assert.equal("192.0.2.1", util.literal("192.0.2.1"))
    assert.equal("192.0.2.1", util.literal("[192.0.2.1]"))
    assert.equal("::1", util.literal("[::1]"))
    assert.equal("2001:db8::1", util.literal("2001:db8::1"))
    assert.equal("::ffff:192.0.2.1", util.literal("::ffff:192.0.2.1"))
    for _, s in ipairs { "example.org", "256.1.1.1", "1.2.3", "de.ad:53", "a:b", "::g", "[example.org]", "" } do
      assert.is_nil(util.literal(s), s)
    end
    assert.is_true(util.is_ipv4("10.0.0.1"))
    assert.is_false(util.is_ipv4("10.0.0.1000"))
    assert.is_true(util.is_ipv6("::"))
    assert.is_false(util.is_ipv6("beef:1"))
    assert.is_true(util.is_localhost("localhost"))
    assert.is_true(util.is_localhost("a.localhost"))
    assert.is_false(util.is_localhost("notlocalhost"))
  end)

  it("makes dns errors with the rcode, its text and whether a retry may cure it", function()
    local e = util.error("a.test", "servfail")
    assert.equal("dns", e.kind)
    assert.equal("servfail", e.rcode)
    assert.equal("a.test", e.name)
    assert.equal("a.test: server failure (SERVFAIL)", e.text)
    assert.is_true(e.temporary)
    e = util.error("a.test", "nxdomain", "a.test: gone")
    assert.equal("a.test: gone", e.text)
    assert.is_false(e.temporary)
    e = util.error("a.test", "nullmx", { text = "no mail", temporary = false, enhanced = "5.1.10" })
    assert.equal("5.1.10", e.enhanced)
    assert.is_false(e.temporary)
  end)

  it("checks options and raises at the caller's level", function()
    assert.same({}, util.check_opts(nil, 1))
    local ok, err = pcall(function() util.check_opts(5, 1) end)
    assert.is_false(ok)
    assert.truthy(err:find("bad argument #1 to 'resolver' (table expected", 1, true))
    assert.has_error(function() util.check_opts({ nameservers = "127.0.0.1" }, 1) end)
    assert.has_error(function() util.check_opts({ timeout = "1" }, 1) end)
  end)

  describe("A/AAAA lookup of one host", function()
    -- A resolver stand-in: answers by query id; `hosts` for the hosts file.
    local function fake(answers, hosts)
      local r = { ids = {}, n = 0 }
      function r:query(host, qtype)
        self.n = self.n + 1
        self.ids[self.n] = qtype
        return self.n
      end
      function r:hosts(host) return hosts and hosts[host] end
      local function collect(rr, id, name)
        local a = answers[rr.ids[id]]
        if type(a) == "string" then return nil, util.error(name, a) end
        return a
      end
      return r, collect
    end

    it("gives AAAA first, then A, up to the cap", function()
      local r, collect = fake { AAAA = { "2001:db8::1", "2001:db8::2" }, A = { "192.0.2.1", "192.0.2.2" } }
      local p = util.start_addresses(r, "mx.test", { nameservers = { "127.0.0.1" } })
      assert.same({ "2001:db8::1", "2001:db8::2", "192.0.2.1" }, util.finish_addresses(collect, r, p, 3))
    end)

    it("takes one family when the other fails, and NXDOMAIN over other failures", function()
      local r, collect = fake { AAAA = "servfail", A = { "192.0.2.1" } }
      local p = util.start_addresses(r, "mx.test", { nameservers = {} })
      assert.same({ "192.0.2.1" }, util.finish_addresses(collect, r, p, 8))
      r, collect = fake { AAAA = "servfail", A = "nxdomain" }
      p = util.start_addresses(r, "mx.test", { nameservers = {} })
      local res, err = util.finish_addresses(collect, r, p, 8)
      assert.is_nil(res)
      assert.equal("nxdomain", err.rcode)
      r, collect = fake { AAAA = {}, A = {} }
      p = util.start_addresses(r, "mx.test", { nameservers = {} })
      res, err = util.finish_addresses(collect, r, p, 8)
      assert.is_nil(res)
      assert.equal("nodata", err.rcode)
      assert.equal("mx.test: no address records", err.text)
      assert.is_false(err.temporary)
    end)

    it("answers localhost itself and reads the hosts file only without explicit nameservers", function()
      local r, collect = fake({ AAAA = {}, A = { "192.0.2.9" } }, { ["mx.test"] = { "192.0.2.7" } })
      local p = util.start_addresses(r, "localhost", nil)
      assert.same({ "::1", "127.0.0.1" }, util.finish_addresses(collect, r, p, 8))
      assert.equal(0, r.n)
      p = util.start_addresses(r, "mx.test", {})
      assert.same({ "192.0.2.7" }, util.finish_addresses(collect, r, p, 8))
      assert.equal(0, r.n)
      p = util.start_addresses(r, "mx.test", { nameservers = { "127.0.0.1" } })
      assert.same({ "192.0.2.9" }, util.finish_addresses(collect, r, p, 8))
      assert.equal(2, r.n)
    end)
  end)

  it("classifies addresses for smtp.deliver's destinations policy", function()
    local cases = {
      { "127.0.0.1", "loopback" }, { "127.255.0.9", "loopback" }, { "0.0.0.0", "unspecified" },
      { "0.1.2.3", "unspecified" }, { "169.254.169.254", "link-local" }, { "224.0.0.1", "multicast" },
      { "239.255.255.250", "multicast" }, { "240.0.0.1", "reserved" }, { "255.255.255.255", "reserved" },
      { "10.1.2.3", "private" }, { "172.16.0.1", "private" }, { "172.31.255.255", "private" },
      { "172.32.0.1", "public" }, { "192.168.1.1", "private" }, { "100.64.0.1", "shared" },
      { "100.127.255.255", "shared" }, { "100.128.0.1", "public" }, { "192.0.2.1", "documentation" },
      { "198.51.100.7", "documentation" }, { "203.0.113.9", "documentation" }, { "198.18.0.1", "special" },
      { "192.0.0.8", "special" }, { "8.8.8.8", "public" },
      { "::", "unspecified" }, { "::1", "loopback" }, { "[::1]", "loopback" },
      { "::ffff:127.0.0.1", "loopback" }, { "::ffff:7f00:1", "loopback" }, { "::ffff:10.0.0.1", "private" },
      { "::ffff:8.8.8.8", "public" }, { "::127.0.0.1", "reserved" }, { "64:ff9b::7f00:1", "loopback" },
      { "64:ff9b::808:808", "public" }, { "2002:7f00:1::1", "loopback" }, { "2002:808:808::1", "public" },
      { "fe80::1", "link-local" }, { "fe80::1%eth0", "link-local" }, { "febf::1", "link-local" },
      { "fec0::1", "private" }, { "fc00::1", "private" }, { "fd12:3456::1", "private" },
      { "ff02::1", "multicast" }, { "2001:db8::1", "documentation" }, { "4000::1", "special" },
      { "2a00:1450:4001:80b::200e", "public" }, { "2606:4700::1111", "public" },
    }
    for _, c in ipairs(cases) do assert.equal(c[2], util.address_scope(c[1]), c[1]) end
    -- What connect would read differently, or not at all, is no address here.
    for _, bad in ipairs { "010.0.0.1", "1.2.3", "1.2.3.256", "1::2::3", "1:2:3:4:5:6:7:8:9", "12345::",
        "::ffff:1.2.3.4.5", "localhost", "" } do
      assert.is_nil(util.address_scope(bad), bad)
    end
    assert.equal("loopback address", util.destination_refused("127.0.0.1", "remote"))
    assert.is_nil(util.destination_refused("10.0.0.1", "remote"))
    assert.is_nil(util.destination_refused("100.64.0.1", "remote"))
    assert.equal("private address", util.destination_refused("10.0.0.1", "public"))
    assert.equal("shared address", util.destination_refused("100.64.0.1", "public"))
    assert.equal("private address", util.destination_refused("fd00::1", "public"))
    assert.is_nil(util.destination_refused("8.8.8.8", "public"))
    assert.is_nil(util.destination_refused("127.0.0.1", "any"))
    assert.equal("not an IP address", util.destination_refused("mx.example.org", "remote"))
  end)
end)
