-- smtp.mx: MX ordering, equal preferences with an injected random source, implicit and null MX,
-- CNAMEs, DNS failures (permanent or temporary), bad host names in answers, caps.
local helper = require "helper"
local peers = require "support.dnsmasq"
local mx = require "smtp.mx"

describe("smtp.mx", function()
  local zone, fake
  setup(function()
    local recs = {
      "--mx-host=order.test,c.order.test,30", "--mx-host=order.test,a.order.test,10",
      "--mx-host=order.test,b.order.test,20",
      "--host-record=a.order.test,127.0.0.2", "--host-record=b.order.test,127.0.0.3,::1",
      "--host-record=c.order.test,127.0.0.4",
      "--mx-host=eq.test,x.eq.test,10", "--mx-host=eq.test,y.eq.test,10", "--mx-host=eq.test,z.eq.test,10",
      "--mx-host=eq.test,last.eq.test,20",
      "--host-record=x.eq.test,127.0.0.11", "--host-record=y.eq.test,127.0.0.12",
      "--host-record=z.eq.test,127.0.0.13", "--host-record=last.eq.test,127.0.0.14",
      "--mx-host=nullmx.test,.,0",
      "--host-record=nomx.test,127.0.0.5",
      "--mx-host=example.test,mx1.example.test,10", "--host-record=mx1.example.test,127.0.0.1,::1",
      "--cname=calias.test,example.test",
      "--mx-host=cn.test,alias.example.test,10", "--cname=alias.example.test,mx1.example.test",
      "--mx-host=bad.test,bad_host.test,10", "--mx-host=bad.test,ok.bad.test,20",
      "--mx-host=bad.test,x y.test,5", "--host-record=ok.bad.test,127.0.0.6",
      "--mx-host=allbad.test,bad_host.test,10",
      "--mx-host=noaddr.test,gone.noaddr.test,10",
      "--server=/broken.test/127.0.0.1#9",
    }
    for i = 1, 30 do
      recs[#recs + 1] = ("--mx-host=many.test,h%02d.many.test,%d"):format(i, 100 - i)
      recs[#recs + 1] = ("--host-record=h%02d.many.test,127.0.1.%d"):format(i, i)
    end
    zone = peers.start(recs)
    fake = peers.fake()
  end)
  teardown(function()
    zone:stop()
    fake:stop()
  end)

  local function opts(extra)
    local o = { nameservers = { zone.nameserver }, timeout = 2 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end
  local function names(list)
    local t = {}
    for i, h in ipairs(list) do t[i] = h.host end
    return t
  end

  it("orders hosts by preference, with their addresses (AAAA first)", function()
    local res = assert(mx.lookup("order.test", opts()))
    assert.same({
      { host = "a.order.test", preference = 10, addresses = { "127.0.0.2" } },
      { host = "b.order.test", preference = 20, addresses = { "::1", "127.0.0.3" } },
      { host = "c.order.test", preference = 30, addresses = { "127.0.0.4" } },
    }, res)
  end)

  it("shuffles equal preferences with the injected random source", function()
    local calls = {}
    local function keep(n) calls[#calls + 1] = n; return n end     -- identity shuffle
    assert.same({ "x.eq.test", "y.eq.test", "z.eq.test", "last.eq.test" },
      names(assert(mx.lookup("eq.test", opts { random = keep }))))
    assert.same({ 3, 2 }, calls)
    local function first() return 1 end
    assert.same({ "y.eq.test", "z.eq.test", "x.eq.test", "last.eq.test" },
      names(assert(mx.lookup("eq.test", opts { random = first }))))
  end)

  it("uses every equal-preference host first over many lookups without a random source", function()
    local seen = {}
    for _ = 1, 30 do
      local res = assert(mx.lookup("eq.test", opts()))
      seen[res[1].host] = true
      assert.equal("last.eq.test", res[4].host)
    end
    assert.is_true(seen["x.eq.test"] and seen["y.eq.test"] and seen["z.eq.test"])
  end)

  it("fails a null MX permanently with 5.1.10", function()
    local res, err = mx.lookup("nullmx.test", opts())
    assert.is_nil(res)
    assert.equal("dns", err.kind)
    assert.is_false(err.temporary)
    assert.equal("5.1.10", err.enhanced)
    assert.equal(556, err.code)
  end)

  it("uses the domain itself when it has no MX but an address", function()
    assert.same({ { host = "nomx.test", preference = 0, implicit = true, addresses = { "127.0.0.5" } } },
      mx.lookup("nomx.test", opts()))
  end)

  it("follows CNAMEs for the domain and for MX hosts", function()
    assert.same({ { host = "mx1.example.test", preference = 10, addresses = { "::1", "127.0.0.1" } } },
      mx.lookup("calias.test", opts()))
    assert.same({ { host = "alias.example.test", preference = 10, addresses = { "::1", "127.0.0.1" } } },
      mx.lookup("cn.test", opts()))
  end)

  it("fails NXDOMAIN permanently", function()
    local res, err = mx.lookup("nope.test", opts())
    assert.is_nil(res)
    assert.equal("dns", err.kind)
    assert.equal("nxdomain", err.rcode)
    assert.is_false(err.temporary)
  end)

  it("fails SERVFAIL, REFUSED and timeouts temporarily", function()
    local o = { nameservers = { fake.nameserver }, timeout = 2 }
    local res, err = mx.lookup("servfail.test", o)
    assert.is_nil(res)
    assert.equal("servfail", err.rcode)
    assert.is_true(err.temporary)
    res, err = mx.lookup("refused.test", o)
    assert.equal("refused", err.rcode)
    assert.is_true(err.temporary)
    res, err = mx.lookup("never.broken.test", opts { timeout = 0.6 })
    assert.is_nil(res)
    assert.equal("timeout", err.rcode)
    assert.is_true(err.temporary)
  end)

  it("drops host names with control or other non-hostname bytes", function()
    assert.same({ { host = "ok.bad.test", preference = 20, addresses = { "127.0.0.6" } } },
      mx.lookup("bad.test", opts()))
    local o = { nameservers = { fake.nameserver }, timeout = 2 }
    assert.same({ { host = "good.ctl.test", preference = 50, addresses = { "127.0.0.9" } } },
      mx.lookup("ctl.test", o))
    local res, err = mx.lookup("allbad.test", opts())
    assert.is_nil(res)
    assert.is_false(err.temporary)
  end)

  it("fails when no MX host has an address", function()
    local res, err = mx.lookup("noaddr.test", opts())
    assert.is_nil(res)
    assert.equal("dns", err.kind)
    assert.is_false(err.temporary)
  end)

  it("caps the hosts it returns", function()
    local res = assert(mx.lookup("many.test", opts()))
    assert.equal(mx.max_hosts, #res)
    assert.equal("h30.many.test", res[1].host)
    assert.equal(70, res[1].preference)
  end)

  it("rejects bad input", function()
    local res, err = mx.lookup("exa mple.test", opts())
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.has_error(function() mx.lookup(nil) end, "bad argument #1 to 'lookup' (string expected)")
    assert.has_error(function() mx.lookup("a.test", { random = 3 }) end)
  end)

  describe("lua-smtp mx", function()
    local function run(args)
      local cmd = helper.lua .. " " .. helper.quote(helper.root .. "/bin/lua-smtp") .. " mx " .. args
      local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
      local out = p:read("*a")
      p:close()
      local body, rc = out:match("^(.-)rc=(%d+)%s*$")
      return body, tonumber(rc)
    end

    it("prints the ordered list", function()
      local out, rc = run("order.test --nameserver " .. zone.nameserver)
      assert.equal(0, rc)
      assert.equal("10 a.order.test 127.0.0.2\n20 b.order.test ::1 127.0.0.3\n30 c.order.test 127.0.0.4\n", out)
      out, rc = run("nomx.test --nameserver=" .. zone.nameserver .. " --timeout 2")
      assert.equal(0, rc)
      assert.equal("0 nomx.test (implicit) 127.0.0.5\n", out)
    end)

    it("exits 1 with the reason when the lookup fails, 2 on usage errors", function()
      local out, rc = run("nullmx.test --nameserver " .. zone.nameserver)
      assert.equal(1, rc)
      assert.equal("lua-smtp mx: dns: 556 5.1.10 nullmx.test: domain does not accept mail (null MX)\n", out)
      out, rc = run("")
      assert.equal(2, rc)
      out, rc = run("a.test --bogus")
      assert.equal(2, rc)
    end)
  end)
end)
