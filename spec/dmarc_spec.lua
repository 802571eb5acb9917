-- Specs for smtp.dmarc and smtp.psl: the Public Suffix List's rules on Debian's list, record
-- parsing with RFC 7489's own examples, policy discovery, alignment (RFC 7489 Appendix B.1),
-- pct= sampling with an injected random source, and a policy served by dnsmasq.
local dmarc = require "smtp.dmarc"
local psl = require "smtp.psl"
local helper = require "helper"

describe("smtp.psl", function()
  it("reads Debian's list and applies normal, wildcard and exception rules", function()
    helper.need("publicsuffix")
    local l = assert(psl.load())
    assert.is_true(l.rules > 5000)
    assert.equal(l, psl.load())   -- read once
    local cases = {
      -- domain, public suffix, organizational domain (nil: the domain is a public suffix)
      { "com", "com", nil }, { "example.com", "com", "example.com" }, { "b.example.com", "com", "example.com" },
      { "Mail.Example.COM.", "com", "example.com" },
      { "example.co.uk", "co.uk", "example.co.uk" }, { "a.b.example.co.uk", "co.uk", "example.co.uk" },
      -- *.ck with !www.ck
      { "ck", "ck", nil }, { "test.ck", "test.ck", nil }, { "b.test.ck", "test.ck", "b.test.ck" },
      { "www.ck", "ck", "www.ck" }, { "www.www.ck", "ck", "www.ck" },
      -- *.kobe.jp with !city.kobe.jp
      { "c.kobe.jp", "c.kobe.jp", nil }, { "b.c.kobe.jp", "c.kobe.jp", "b.c.kobe.jp" },
      { "city.kobe.jp", "kobe.jp", "city.kobe.jp" }, { "www.city.kobe.jp", "kobe.jp", "city.kobe.jp" },
      { "k12.ak.us", "k12.ak.us", nil }, { "test.k12.ak.us", "k12.ak.us", "test.k12.ak.us" },
      -- internationalized rules and names compare as A-labels
      { "食狮.com.cn", "com.cn", "xn--85x722f.com.cn" }, { "xn--85x722f.com.cn", "com.cn", "xn--85x722f.com.cn" },
      { "公司.cn", "xn--55qx5d.cn", nil }, { "shishi.中国", "xn--fiqs8s", "shishi.xn--fiqs8s" },
      -- a private-section suffix is a boundary too; an unlisted top-level label is one (rule "*")
      { "foo.github.io", "github.io", "foo.github.io" }, { "a.b.unlisted", "unlisted", "b.unlisted" },
    }
    for _, c in ipairs(cases) do
      assert.equal(c[2], l:public_suffix(c[1]), c[1])
      assert.equal(c[3], l:organizational_domain(c[1]), c[1])
    end
    assert.is_nil(l:public_suffix("a..b"))
  end)

  it("parses any list text, and says which package is missing when the list is", function()
    local l = psl.parse("// comment\nexample\n*.wild.example\n!keep.wild.example\n")
    assert.equal(3, l.rules)
    assert.equal("x.wild.example", l:public_suffix("a.x.wild.example"))
    assert.equal("wild.example", l:public_suffix("a.keep.wild.example"))
    assert.equal("keep.wild.example", l:organizational_domain("a.keep.wild.example"))
    local none, err = psl.load("/nonexistent/list.dat")
    assert.is_nil(none)
    assert.equal("invalid", err.kind)
    assert.matches("publicsuffix", tostring(err), 1, true)
  end)
end)

describe("dmarc.parse", function()
  -- RFC 7489 Appendix B.2's records
  it("reads RFC 7489's example records", function()
    local r = assert(dmarc.parse("v=DMARC1; p=none; rua=mailto:dmarc-feedback@example.com"))
    assert.equal("none", r.p); assert.equal("r", r.adkim); assert.equal("r", r.aspf); assert.equal(100, r.pct)
    assert.same({ "mailto:dmarc-feedback@example.com" }, r.rua)
    r = assert(dmarc.parse("v=DMARC1; p=none; rua=mailto:dmarc-feedback@example.com; " ..
      "ruf=mailto:auth-reports@thirdparty.example.net"))
    assert.same({ "mailto:auth-reports@thirdparty.example.net" }, r.ruf)
    r = assert(dmarc.parse("v=DMARC1; p=quarantine; rua=mailto:dmarc-feedback@example.com," ..
      "mailto:tld-test@thirdparty.example.net!10m; pct=25"))
    assert.equal("quarantine", r.p); assert.equal(25, r.pct)
    assert.same({ "mailto:dmarc-feedback@example.com", "mailto:tld-test@thirdparty.example.net!10m" }, r.rua)
    r = assert(dmarc.parse("v=DMARC1;p=Reject;sp=none;np=quarantine;adkim=s;aspf=s;fo=1;ri=3600;future=1"))
    assert.equal("reject", r.p); assert.equal("none", r.sp); assert.equal("quarantine", r.np)
    assert.equal("s", r.adkim); assert.equal("s", r.aspf); assert.equal("1", r.fo); assert.equal(3600, r.ri)
  end)

  it("refuses what is not a usable record; a record without p= but with rua= stands for p=none", function()
    local bad = {
      { "v=DMARC2; p=none", "not a DMARC1 record" }, { "p=none; v=DMARC1", "not a DMARC1 record" },
      { "v=dmarc1; p=none", "not a DMARC1 record" }, { "v=DMARC1; p=block", "bad p=block" },
      { "v=DMARC1", "record lacks p=" }, { "v=DMARC1; p=none; adkim=x", "bad adkim=x" },
      { "v=DMARC1; p=none; pct=101", "bad pct=101" }, { "v=DMARC1; p=none; sp=all", "bad sp=all" },
      { "v=DMARC1; p=none; p=reject", "record syntax: duplicate tag p" },
    }
    for _, c in ipairs(bad) do
      local r, why = dmarc.parse(c[1])
      assert.is_nil(r, c[1])
      assert.equal(c[2], why)
    end
    local r = assert(dmarc.parse("v=DMARC1; rua=mailto:r@example.com"))
    assert.equal("none", r.p)
  end)
end)

describe("dmarc.from_domain", function()
  it("takes the domain of the From field's address", function()
    local cases = {
      { "Alice <alice@Example.COM>", "example.com" },
      { '"Smith, J (x@evil.example)" <j@example.com>', "example.com" },
      { "bob@example.com (Bob <b@evil.example>)", "example.com" },
      { "a@example.com, B <b@EXAMPLE.com>", "example.com" },
      { "Team: a@example.com, b@example.com;", "example.com" },
      { "Jörg <j@bücher.example>", "xn--bcher-kva.example" },
      { "example.org", "example.org" },
      { "Alice\r\n <alice@example.com>", "example.com" },
    }
    for _, c in ipairs(cases) do assert.equal(c[2], dmarc.from_domain(c[1]), c[1]) end
    assert.same({ nil, "From has addresses in several domains" }, { dmarc.from_domain("a@x.example, b@y.example") })
    assert.same({ nil, "From has no address" }, { dmarc.from_domain("undisclosed-recipients:;") })
  end)
end)

describe("dmarc.check", function()
  local l
  local function list()
    helper.need("publicsuffix")
    l = l or assert(psl.load())
    return l
  end
  -- TXT answers for tests: name -> list of records, or an error
  local function txt(t)
    return function(name)
      local v = t[name]
      if v == "temp" then return nil, { temporary = true, text = "timeout" } end
      if v == nil then return nil, { rcode = "nxdomain" } end
      return v
    end
  end
  local function check(o)
    o.psl = list()
    return assert(dmarc.check(o))
  end
  local pass_d = function(d) return { { result = "pass", d = d } } end

  -- RFC 7489 Appendix B.1: alignment of DKIM d= and the SPF domain with the From domain
  local align = {
    { "B.1.2 identical DKIM", dkim = "example.com", from = "sender@example.com", relaxed = true, strict = true },
    { "B.1.2 parent/child DKIM", dkim = "child.example.com", from = "sender@example.com", relaxed = true, strict = false },
    { "B.1.2 other domain DKIM", dkim = "example.net", from = "sender@example.com", relaxed = false, strict = false },
    { "B.1.1 identical SPF", spf = "example.com", from = "sender@example.com", relaxed = true, strict = true },
    { "B.1.1 parent/child SPF", spf = "child.example.com", from = "sender@example.com", relaxed = true, strict = false },
    { "B.1.1 other domain SPF", spf = "example.net", from = "sender@example.com", relaxed = false, strict = false },
    { "siblings under one organization", dkim = "a.example.com", from = "x@b.example.com", relaxed = true, strict = false },
    { "siblings under a multi-label suffix", dkim = "mail.example.co.uk", from = "x@example.co.uk", relaxed = true, strict = false },
    { "two organizations under co.uk", dkim = "other.co.uk", from = "x@example.co.uk", relaxed = false, strict = false },
    { "case and IDN", dkim = "XN--BCHER-KVA.example", from = "j@Bücher.example", relaxed = true, strict = true },
  }
  for _, c in ipairs(align) do
    it("aligns as RFC 7489 says: " .. c[1], function()
      local from_dom = dmarc.from_domain(c.from)
      local org = list():organizational_domain(from_dom) or from_dom
      for _, mode in ipairs({ "relaxed", "strict" }) do
        local m = mode == "strict" and "s" or "r"
        local rec = "v=DMARC1; p=reject; adkim=" .. m .. "; aspf=" .. m
        local r = check { from = c.from, txt = txt({ ["_dmarc." .. org] = { rec } }),
          dkim = c.dkim and pass_d(c.dkim), spf = c.spf and { result = "pass", domain = c.spf } }
        assert.equal(c[mode] and "pass" or "fail", r.result, mode)
        assert.equal(c[mode] and "none" or "reject", r.disposition, mode)
        if c.dkim then assert.equal(c[mode], r.dkim_aligned, mode) end
        if c.spf then assert.equal(c[mode], r.spf_aligned, mode) end
      end
    end)
  end

  it("counts only passing results: an aligned DKIM fail or SPF softfail is no pass", function()
    local r = check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = { "v=DMARC1; p=quarantine" } }),
      dkim = { { result = "fail", d = "example.com" }, { result = "pass", d = "example.net" } },
      spf = { result = "softfail", domain = "example.com" } }
    assert.equal("fail", r.result)
    assert.equal("quarantine", r.disposition)
    assert.equal("no aligned DKIM or SPF pass", r.reason)
  end)

  it("discovers the policy at the From domain, else at its organizational domain with sp=", function()
    local t = txt({
      ["_dmarc.example.com"] = { "v=spf1 -all", "v=DMARC1; p=none; sp=reject" },
      ["_dmarc.own.example.com"] = { "v=DMARC1; p=quarantine" },
    })
    local r = check { from = "a@example.com", txt = t }
    assert.equal("fail", r.result); assert.equal("none", r.policy); assert.equal("example.com", r.policy_domain)
    r = check { from = "a@deep.sub.example.com", txt = t }
    assert.equal("reject", r.policy); assert.equal("reject", r.disposition)
    assert.equal("example.com", r.policy_domain); assert.equal("example.com", r.org_domain)
    r = check { from = "a@own.example.com", txt = t }
    assert.equal("quarantine", r.policy); assert.equal("own.example.com", r.policy_domain)
    -- without sp= the organizational domain's p= applies to its subdomains
    r = check { from = "a@x.example.org", txt = txt({ ["_dmarc.example.org"] = { "v=DMARC1; p=reject" } }) }
    assert.equal("reject", r.policy)
  end)

  it("is none without a record or with several, permerror for a broken one, temperror when DNS fails", function()
    local r = check { from = "a@example.com", txt = txt({}) }
    assert.equal("none", r.result); assert.equal("no DMARC record for example.com", r.reason)
    assert.equal("none", r.disposition)
    r = check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = { "v=DMARC1; p=none", "v=DMARC1; p=reject" } }) }
    assert.equal("none", r.result); assert.equal("several DMARC records at _dmarc.example.com", r.reason)
    r = check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = { "v=DMARC1; p=bogus" } }) }
    assert.equal("permerror", r.result); assert.equal("_dmarc.example.com: bad p=bogus", r.reason)
    r = check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = "temp" }) }
    assert.equal("temperror", r.result)
    r = check { from = "a@sub.example.com", txt = txt({ ["_dmarc.example.com"] = "temp" }) }
    assert.equal("temperror", r.result)
  end)

  it("applies pct= with the injected random source: outside the sample, the next milder policy", function()
    local function run(rec, x)
      return check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = { rec } }),
        random = function() return x end }
    end
    local r = run("v=DMARC1; p=quarantine; pct=25", 0.2)
    assert.is_true(r.sampled); assert.equal("quarantine", r.disposition)
    r = run("v=DMARC1; p=quarantine; pct=25", 0.25)
    assert.is_false(r.sampled); assert.equal("none", r.disposition)
    r = run("v=DMARC1; p=reject; pct=50", 0.6)
    assert.equal("reject", r.policy); assert.equal("quarantine", r.disposition)
    r = run("v=DMARC1; p=reject; pct=0", 0)
    assert.equal("quarantine", r.disposition)
    -- a passing message is never sampled
    r = check { from = "a@example.com", txt = txt({ ["_dmarc.example.com"] = { "v=DMARC1; p=reject; pct=50" } }),
      dkim = pass_d("example.com"), random = function() error("not asked") end }
    assert.equal("pass", r.result); assert.equal("none", r.disposition)
  end)

  it("returns nil, err for a From without a usable domain, and raises on misuse", function()
    local r, err = dmarc.check { from = "a@x.example, b@y.example", txt = txt({}), psl = list() }
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
    assert.equal("invalid: dmarc: From has addresses in several domains", tostring(err))
    assert.has_error(function() dmarc.check() end, "bad argument #1 to 'check' (options table expected)")
    assert.has_error(function() dmarc.check({}) end, "bad argument #1 to 'check' (from must be a string)")
  end)

  it("looks the policy up in DNS (dnsmasq)", function()
    list()
    local peers = require "support.dnsmasq"
    local zone = peers.start {
      "--txt-record=_dmarc.example.test,v=DMARC1; p=reject; sp=quarantine; rua=mailto:agg@example.test",
      "--server=/broken.test/127.0.0.1#9",
    }
    local ok, err = pcall(function()
      local ns = { "127.0.0.1:" .. zone.port }
      local r = assert(dmarc.check { from = "a@mail.example.test", nameservers = ns, timeout = 2,
        dkim = pass_d("example.test") })
      assert.equal("pass", r.result); assert.equal("quarantine", r.policy)
      assert.same({ "mailto:agg@example.test" }, r.record.rua)
      r = assert(dmarc.check { from = "a@example.test", nameservers = ns, timeout = 2 })
      assert.equal("fail", r.result); assert.equal("reject", r.disposition)
      r = assert(dmarc.check { from = "a@nothing.test", nameservers = ns, timeout = 2 })
      assert.equal("none", r.result)
      r = assert(dmarc.check { from = "a@broken.test", nameservers = ns, timeout = 1 })
      assert.equal("temperror", r.result)
    end)
    zone:stop()
    assert(ok, err)
  end)
end)
