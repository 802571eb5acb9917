-- smtp.deliver: direct delivery through MX lookup against dnsmasq and real SMTP servers (aiosmtpd)
-- listening on 127.0.0.2, 127.0.0.3, ... as MX hosts, all on one free port.
local helper = require "helper"
local peers = require "support.dnsmasq"
local mxsink = require "support.mxsink"

local have_client = type(require("smtp").connect) == "function"

describe("smtp.deliver", function()
  if not have_client then
    pending("needs the SMTP client (smtp.connect, branch `client`), which has not landed on main yet")
    return
  end
  local deliver = require("smtp.deliver").deliver
  local zone, port, s3, s4, s5, s6
  setup(function()
    port = helper.free_port("127.0.0.3")
    s3 = mxsink.start("127.0.0.3", port)
    s4 = mxsink.start("127.0.0.4", port, { mode = "busy" })
    s5 = mxsink.start("127.0.0.5", port, { reject = { "nobody" } })
    local certs = helper.certs()
    s6 = mxsink.start("127.0.0.6", port, { mode = "badtls", cert = certs.server, key = certs.server_key })
    zone = peers.start {
      -- mx1 (127.0.0.2) refuses connections; mx2 (127.0.0.3) takes mail.
      "--mx-host=two.test,mx1.two.test,10", "--mx-host=two.test,mx2.two.test,20",
      "--host-record=mx1.two.test,127.0.0.2", "--host-record=mx2.two.test,127.0.0.3",
      "--mx-host=busy.test,mx.busy.test,10", "--mx-host=busy.test,mx2.two.test,20",
      "--host-record=mx.busy.test,127.0.0.4",
      "--mx-host=good.test,mx.good.test,10", "--host-record=mx.good.test,127.0.0.3",
      "--mx-host=rej.test,mx.rej.test,10", "--host-record=mx.rej.test,127.0.0.5",
      "--mx-host=nullmx.test,.,0",
      "--host-record=nomx.test,127.0.0.3",
      "--server=/broken.test/127.0.0.1#9",
      "--mx-host=eq.test,a.eq.test,10", "--mx-host=eq.test,b.eq.test,10",
      "--host-record=a.eq.test,127.0.0.3", "--host-record=b.eq.test,127.0.0.5",
      "--mx-host=badtls.test,mx.badtls.test,10", "--mx-host=badtls.test,mx2.two.test,20",
      "--host-record=mx.badtls.test,127.0.0.6",
      -- Destinations a user-given domain must not steer us to (all refused before any connect).
      "--mx-host=lh.test,localhost,10",
      "--host-record=zero.test,0.0.0.0",
      "--mx-host=meta.test,mx.meta.test,10", "--host-record=mx.meta.test,169.254.169.254",
      "--host-record=ll6.test,fe80::1",
      "--host-record=mcast.test,224.0.0.1",
      "--host-record=mapped.test,::ffff:127.0.0.3",
      "--host-record=priv.test,10.0.0.1", "--host-record=cgnat.test,100.64.0.1",
      "--host-record=ula.test,fd00::1",
      -- Two MX hosts: the first on loopback (skipped), the second private (refused by "public").
      "--mx-host=mixed.test,mx.good.test,10", "--mx-host=mixed.test,mx.priv.test,20",
      "--host-record=mx.priv.test,192.168.0.1",
    }
  end)
  teardown(function()
    zone:stop(); s3:stop(); s4:stop(); s5:stop(); s6:stop()
  end)

  local raw = "From: a@sender.test\r\nTo: x@two.test\r\nSubject: deliver\r\n\r\nhello\r\n"
  local function opts(to, extra)
    -- The MX hosts here are on loopback, which only destinations = "any" allows.
    local o = { message = raw, from = "a@sender.test", to = to, helo = "client.test",
                nameservers = { zone.nameserver }, port = port, timeout = 5, destinations = "any" }
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end

  it("delivers through the second MX when the preferred one refuses connections", function()
    local before = #s3:transactions()
    local res = assert(deliver(opts { "x@two.test" }))
    assert.same({ { recipient = "x@two.test", status = "sent", code = 250, enhanced = "2.0.0",
                    text = "queued", host = "mx2.two.test", address = "127.0.0.3" } }, res)
    local t = s3:transactions()
    assert.equal(before + 1, #t)
    assert.same({ "x@two.test" }, t[#t].to)
  end)

  it("moves on from a host that greets with 421", function()
    local res = assert(deliver(opts { "y@busy.test" }))
    assert.equal("sent", res[1].status)
    assert.equal("mx2.two.test", res[1].host)
  end)

  it("moves on from a host whose STARTTLS handshake fails (opportunistic TLS)", function()
    local res = assert(deliver(opts { "t@badtls.test" }))
    assert.equal("sent", res[1].status)
    assert.equal("mx2.two.test", res[1].host)
    assert.equal(0, #s6:transactions())
  end)

  it("never falls back to plaintext when tls = \"starttls\" is asked for", function()
    local before = #s3:transactions()
    local res = assert(deliver(opts({ "t@badtls.test" }, { tls = "starttls" })))
    assert.equal("deferred", res[1].status)
    assert.equal("mx2.two.test", res[1].host)     -- the last host tried: no STARTTLS offered
    assert.equal(before, #s3:transactions())
    assert.equal(0, #s6:transactions())
  end)

  it("tries equal-preference hosts in the order the injected random source gives", function()
    local res = assert(deliver(opts({ "e@eq.test" }, { random = function(n) return n end })))
    assert.equal("a.eq.test", res[1].host)
    res = assert(deliver(opts({ "e@eq.test" }, { random = function() return 1 end })))
    assert.equal("b.eq.test", res[1].host)
    assert.equal("127.0.0.5", res[1].address)
  end)

  it("fails a null MX domain permanently without connecting", function()
    local res = assert(deliver(opts { "z@nullmx.test" }))
    assert.same({ { recipient = "z@nullmx.test", status = "failed", code = 556, enhanced = "5.1.10",
                    text = "nullmx.test: domain does not accept mail (null MX)" } }, res)
  end)

  it("delivers to the domain's own address when it has no MX", function()
    local res = assert(deliver(opts { "n@nomx.test" }))
    assert.equal("sent", res[1].status)
    assert.equal("nomx.test", res[1].host)
    assert.equal("127.0.0.3", res[1].address)
  end)

  it("fails NXDOMAIN and defers a domain whose name servers never answer, within the timeout", function()
    local res = assert(deliver(opts { "q@nope.test" }))
    assert.equal("failed", res[1].status)
    assert.equal(550, res[1].code)
    assert.equal("5.1.2", res[1].enhanced)
    local now = require("smtp.core").now
    local t0 = now()
    res = assert(deliver(opts({ "q@x.broken.test" }, { timeout = 1 })))
    local took = now() - t0
    assert.equal("deferred", res[1].status)
    assert.equal(451, res[1].code)
    assert.equal("4.4.3", res[1].enhanced)
    assert.is_true(took >= 0.9 and took < 3, "took " .. took)
  end)

  it("delivers to address literals without DNS", function()
    local res = assert(deliver(opts({ "lit@[127.0.0.3]" }, { nameservers = { "127.0.0.1:9" } })))
    assert.same({ { recipient = "lit@[127.0.0.3]", status = "sent", code = 250, enhanced = "2.0.0",
                    text = "queued", host = "[127.0.0.3]", address = "127.0.0.3" } }, res)
  end)

  it("gives per-recipient results over three domains, one transaction per domain", function()
    local before = #s3:transactions()
    local res = assert(deliver(opts { "a@good.test", "b@nullmx.test", "c@rej.test", "nobody@rej.test",
                                      "d@Good.Test" }))
    assert.same({
      { recipient = "a@good.test", status = "sent", code = 250, enhanced = "2.0.0", text = "queued",
        host = "mx.good.test", address = "127.0.0.3" },
      { recipient = "b@nullmx.test", status = "failed", code = 556, enhanced = "5.1.10",
        text = "nullmx.test: domain does not accept mail (null MX)" },
      { recipient = "c@rej.test", status = "sent", code = 250, enhanced = "2.0.0", text = "queued",
        host = "mx.rej.test", address = "127.0.0.5" },
      { recipient = "nobody@rej.test", status = "failed", code = 550, enhanced = "5.1.1",
        text = "no such user", host = "mx.rej.test", address = "127.0.0.5" },
      { recipient = "d@Good.Test", status = "sent", code = 250, enhanced = "2.0.0", text = "queued",
        host = "mx.good.test", address = "127.0.0.3" },
    }, res)
    local t = s3:transactions()
    assert.equal(before + 1, #t)
    assert.same({ "a@good.test", "d@Good.Test" }, t[#t].to)
    local r = s5:transactions()
    assert.same({ "c@rej.test" }, r[#r].to)
  end)

  it("runs the domains concurrently", function()
    local core = require "smtp.core"
    local t0 = core.now()
    -- four domains whose name servers never answer, 1 s each: at least 4 s one after the other
    local res = assert(deliver(opts({ "a@one.broken.test", "b@two.broken.test", "c@good.test",
                                      "d@three.broken.test", "e@four.broken.test" }, { timeout = 1 })))
    local took = core.now() - t0
    assert.equal("deferred", res[1].status)
    assert.equal("deferred", res[2].status)
    assert.equal("sent", res[3].status)
    assert.equal("deferred", res[4].status)
    assert.equal("deferred", res[5].status)
    assert.is_true(took < 3.5, "took " .. took)
  end)

  it("works from inside an smtp.loop task", function()
    local loop = require "smtp.loop"
    local res
    loop.spawn(function() res = deliver(opts { "a@good.test", "b@rej.test" }) end)
    loop.run()
    assert.equal("sent", res[1].status)
    assert.equal("sent", res[2].status)
    assert.equal("mx.rej.test", res[2].host)
  end)

  it("rejects bad input before connecting", function()
    local res, err = deliver(opts {})
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    res, err = deliver(opts { "no-domain" })
    assert.equal("invalid", err.kind)
    res, err = deliver(opts { "a@bad domain.test" })
    assert.equal("invalid", err.kind)
    res, err = deliver(opts { "a@good.test", "b\r\nRCPT TO:<x@good.test>@good.test" })
    assert.equal("invalid", err.kind)
    res, err = deliver(opts({ "a@good.test" }, { helo = "bad\r\nhelo" }))
    assert.equal("invalid", err.kind)
    assert.has_error(function() deliver(opts({ "a@good.test" }, { tls = "maybe" })) end)
    assert.has_error(function() deliver(opts({ "a@good.test" }, { destinations = "local" })) end,
      "bad argument #1 to 'deliver' (destinations: \"remote\", \"public\" or \"any\" expected)")
  end)

  -- Recipient domains may come from users: by default nothing on this host or its link
  -- (request forgery into the local MTA or a metadata service); "public" refuses private ranges too.
  local function refusal(to, address, why, host, policy)
    return { recipient = to, status = "failed", code = 550, enhanced = "5.4.4", host = host, address = address,
      text = ("refusing to deliver to %s (%s) of %s: destinations = %q allows %s"):format(address, why, host,
        policy or "remote", policy == "public" and "public addresses only"
          or "no loopback, link-local, multicast or reserved address") }
  end

  it("refuses loopback, unspecified, link-local, multicast and mapped-loopback destinations by default", function()
    local before = #s3:transactions()
    local o = opts { "a@[127.0.0.3]", "b@[IPv6:::1]", "c@good.test", "d@lh.test", "e@zero.test",
      "f@meta.test", "g@ll6.test", "h@mcast.test", "i@mapped.test", "j@[0.0.0.0]" }
    o.destinations = nil          -- the default
    local res = assert(deliver(o))
    assert.same({
      refusal("a@[127.0.0.3]", "127.0.0.3", "loopback address", "[127.0.0.3]"),
      refusal("b@[IPv6:::1]", "::1", "loopback address", "[ipv6:::1]"),
      refusal("c@good.test", "127.0.0.3", "loopback address", "mx.good.test"),
      refusal("d@lh.test", "::1", "loopback address", "localhost"),
      refusal("e@zero.test", "0.0.0.0", "unspecified address", "zero.test"),
      refusal("f@meta.test", "169.254.169.254", "link-local address", "mx.meta.test"),
      refusal("g@ll6.test", "fe80::1", "link-local address", "ll6.test"),
      refusal("h@mcast.test", "224.0.0.1", "multicast address", "mcast.test"),
      refusal("i@mapped.test", "::ffff:127.0.0.3", "loopback address", "mapped.test"),
      refusal("j@[0.0.0.0]", "0.0.0.0", "unspecified address", "[0.0.0.0]"),
    }, res)
    assert.equal(before, #s3:transactions())
  end)

  it("with destinations = \"public\" refuses private, CGNAT and ULA addresses too", function()
    local res = assert(deliver(opts({ "a@priv.test", "b@cgnat.test", "c@ula.test", "d@mixed.test",
      "e@[192.168.1.1]" }, { destinations = "public" })))
    assert.same({
      refusal("a@priv.test", "10.0.0.1", "private address", "priv.test", "public"),
      refusal("b@cgnat.test", "100.64.0.1", "shared address", "cgnat.test", "public"),
      refusal("c@ula.test", "fd00::1", "private address", "ula.test", "public"),
      refusal("d@mixed.test", "127.0.0.3", "loopback address", "mx.good.test", "public"),
      refusal("e@[192.168.1.1]", "192.168.1.1", "private address", "[192.168.1.1]", "public"),
    }, res)
  end)

  it("connects to the very address it checked (no second lookup between check and connect)", function()
    local smtp = require "smtp"
    local real, servers = smtp.connect, {}
    smtp.connect = function(o) servers[#servers + 1] = o.server; return real(o) end
    local ok, res = pcall(deliver, opts({ "x@two.test", "y@[127.0.0.3]" }))
    smtp.connect = real
    assert.is_true(ok, tostring(res))
    assert.equal("sent", res[1].status)
    table.sort(servers)            -- the two domains go concurrently
    assert.same({ "127.0.0.2", "127.0.0.3", "127.0.0.3" }, servers)
  end)
end)
