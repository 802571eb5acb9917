-- smtp.dns and the core resolver: A/AAAA through dnsmasq, timeouts, NXDOMAIN, SERVFAIL/REFUSED,
-- literals and localhost without DNS.
local helper = require "helper"
local peers = require "support.dnsmasq"
local core = require "smtp.core"
local dns = require "smtp.dns"

describe("smtp.dns", function()
  local zone, fake
  setup(function()
    zone = peers.start {
      "--host-record=mx1.example.test,127.0.0.1,::1",
      "--host-record=v4.example.test,192.0.2.7",
      "--host-record=v6.example.test,2001:db8::7",
      "--cname=alias.example.test,mx1.example.test",
      "--mx-host=example.test,mx1.example.test,10",
      "--server=/broken.test/127.0.0.1#9",
      "--txt-record=example.test,v=spf1 ip4:192.0.2.0/24, -all",   -- two strings, one record
      "--txt-record=example.test,second record",
      "--txt-record=_dmarc.example.test,v=DMARC1; p=reject",
      "--txt-record=sel._domainkey.example.test," .. string.rep("k", 300),
      "--ptr-record=7.2.0.192.in-addr.arpa,v4.example.test",
      "--ptr-record=7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa,V6.Example.Test.",
    }
    fake = peers.fake()
  end)
  teardown(function()
    zone:stop()
    fake:stop()
  end)

  local function ns() return { nameservers = { zone.nameserver }, timeout = 2 } end

  it("resolves AAAA then A", function()
    assert.same({ "::1", "127.0.0.1" }, dns.resolve("mx1.example.test", ns()))
    assert.same({ "192.0.2.7" }, dns.resolve("v4.example.test", ns()))
    assert.same({ "2001:db8::7" }, dns.resolve("V6.Example.Test.", ns()))
  end)

  it("follows CNAMEs", function()
    assert.same({ "::1", "127.0.0.1" }, dns.resolve("alias.example.test", ns()))
  end)

  it("answers literals and localhost without DNS", function()
    local nowhere = { nameservers = { "127.0.0.1:9" }, timeout = 0.2 }
    assert.same({ "192.0.2.1" }, dns.resolve("192.0.2.1", nowhere))
    assert.same({ "2001:db8::1" }, dns.resolve("[2001:db8::1]", nowhere))
    assert.same({ "::1", "127.0.0.1" }, dns.resolve("localhost", nowhere))
  end)

  it("reports NXDOMAIN as permanent", function()
    local res, err = dns.resolve("nope.example.test", ns())
    assert.is_nil(res)
    assert.equal("dns", err.kind)
    assert.equal("nxdomain", err.rcode)
    assert.is_false(err.temporary)
    assert.equal("dns: nope.example.test: domain does not exist (NXDOMAIN)", tostring(err))
  end)

  it("honours the timeout for a name that never answers, as temporary", function()
    local t0 = os.time()
    local c0 = os.clock()
    local start = core.now and core.now()
    local res, err = dns.resolve("x.broken.test", { nameservers = { zone.nameserver }, timeout = 1 })
    assert.is_nil(res)
    assert.equal("timeout", err.rcode)
    assert.is_true(err.temporary)
    if start then
      local took = core.now() - start
      assert.is_true(took >= 0.9 and took < 3, "took " .. took)
    else
      assert.is_true(os.time() - t0 <= 4)
    end
    assert.is_true(os.clock() - c0 < 0.5, "busy waiting")
  end)

  it("reports SERVFAIL and REFUSED as temporary", function()
    local opts = { nameservers = { fake.nameserver }, timeout = 2 }
    local res, err = dns.query("servfail.test", "A", opts)
    assert.is_nil(res)
    assert.equal("servfail", err.rcode)
    assert.is_true(err.temporary)
    res, err = dns.query("refused.test", "MX", opts)
    assert.is_nil(res)
    assert.equal("refused", err.rcode)
    assert.is_true(err.temporary)
  end)

  it("answers NOERROR without records as an empty list", function()
    assert.same({}, dns.query("v4.example.test", "AAAA", ns()))
    local res, err = dns.resolve("example.test", ns())
    assert.is_nil(res)
    assert.equal("nodata", err.rcode)
    assert.is_false(err.temporary)
  end)

  it("queries MX", function()
    local res = assert(dns.query("example.test", "MX", ns()))
    assert.same({ host = "mx1.example.test", preference = 10 }, res[1])
    assert.equal(1, #res)
  end)

  it("queries TXT: each record's strings joined, underscores allowed, long records whole", function()
    local res = assert(dns.query("example.test", "TXT", ns()))
    table.sort(res)
    assert.same({ "second record", "v=spf1 ip4:192.0.2.0/24 -all" }, { res[1], res[2] })
    assert.equal(2, #res)
    assert.same({ "v=DMARC1; p=reject" }, { (assert(dns.query("_DMARC.example.test.", "TXT", ns())))[1] })
    local long = assert(dns.query("sel._domainkey.example.test", "TXT", ns()))
    assert.equal(string.rep("k", 300), long[1])
    assert.same({}, { table.unpack(assert(dns.query("v4.example.test", "TXT", ns()))) })
    local nx, err = dns.query("nope.example.test", "TXT", ns())
    assert.is_nil(nx)
    assert.equal("nxdomain", err.rcode)
  end)

  it("queries PTR by reverse name or by address, IPv4 and IPv6", function()
    assert.equal("7.2.0.192.in-addr.arpa", dns.reverse_name("192.0.2.7"))
    assert.equal("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
      dns.reverse_name("2001:db8::1"))
    assert.is_nil(dns.reverse_name("example.test"))
    assert.same({ "v4.example.test" }, { table.unpack(assert(dns.query("192.0.2.7", "PTR", ns()))) })
    assert.same({ "v4.example.test" }, { table.unpack(assert(dns.query("7.2.0.192.in-addr.arpa", "PTR", ns()))) })
    assert.same({ "v6.example.test" }, { table.unpack(assert(dns.query("2001:db8::7", "PTR", ns()))) })
  end)

  it("rejects bad names and misuse", function()
    local res, err = dns.resolve("bad name.test", ns())
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    res, err = dns.resolve("a\r\nb.test", ns())
    assert.equal("invalid", err.kind)
    assert.has_error(function() dns.resolve(42) end, "bad argument #1 to 'resolve' (string expected)")
    assert.has_error(function() dns.query("a.test", "SRV") end)
    res, err = dns.query("a b.test", "TXT", ns())
    assert.equal("invalid", err.kind)
    res, err = dns.query("a\\b.test", "TXT", ns())
    assert.equal("invalid", err.kind)
    assert.has_error(function() core.resolver { nameservers = { "1.2.3.4,5.6.7.8" } } end)
  end)

  describe("core resolver", function()
    it("is pollable: one fd, a timeout, results by id", function()
      local r = assert(core.resolver { nameservers = { zone.nameserver }, timeout = 1, tries = 1 })
      assert.is_number(r:fd())
      assert.equal(r:fd(), r:pollfd())
      assert.equal("r", r:events())
      assert.is_nil(r:timeout())
      local a = r:query("v4.example.test", "A")
      local b = r:query("nope.example.test", "A")
      assert.is_number(r:timeout())
      assert.same({ nil, "pending" }, { r:result(a) })
      while r:process() > 0 do r:wait(1) end
      assert.same({ "192.0.2.7" }, r:result(a))
      assert.same({ nil, "nxdomain" }, { r:result(b) })
      assert.has_error(function() r:result(a) end)   -- consumed
      r:close()
      assert.matches("closed", tostring(r))
    end)

    it("frees queries still out when collected", function()
      local r = assert(core.resolver { nameservers = { zone.nameserver }, timeout = 1, tries = 1 })
      for i = 1, 20 do r:query("x" .. i .. ".broken.test", "A") end
      r:cancel(r:query("y.broken.test", "MX"))
      r = nil
      collectgarbage()
      collectgarbage()
    end)

    it("can be waited on by cqueues (pollfd, events, timeout)", function()
      local ok, cqueues = pcall(require, "cqueues")
      if not ok then helper.need("cqueues") end
      local r = assert(core.resolver { nameservers = { zone.nameserver }, timeout = 1, tries = 1 })
      local out = {}
      local cq = cqueues.new()
      cq:wrap(function()
        local a = r:query("mx1.example.test", "A")
        local b = r:query("example.test", "MX")
        local polls = 0
        while r:process() > 0 do
          cqueues.poll(r)
          polls = polls + 1
        end
        out.a, out.b, out.polls = r:result(a), r:result(b), polls
      end)
      assert(cq:loop())
      assert.same({ "127.0.0.1" }, out.a)
      assert.equal("mx1.example.test", out.b[1].host)
      assert.is_true(out.polls < 10, "polls: " .. tostring(out.polls))
      r:close()
    end)

    it("reads the hosts file only when asked", function()
      local r = assert(core.resolver {})
      local l = r:hosts("localhost")
      assert.is_table(l)
      r:close()
    end)
  end)
end)
