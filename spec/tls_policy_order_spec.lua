-- Which transport security policy governs a domain in smtp.deliver: DANE, when its policy for the
-- domain is active, takes the domain and MTA-STS is not consulted (RFC 8461 §2); otherwise
-- MTA-STS is. The two policies are stood in for here (their own specs run them against a DNSSEC
-- bed and an HTTPS policy server); the MX lookup and the delivery are real (dnsmasq, smtp.server).
local helper = require "helper"
local zone_peer = require "support.dnsmasq"
local server = require "smtp.server"
local loop = require "smtp.loop"
local smtp = require "smtp"
local mtasts = require "smtp.mtasts"

describe("smtp.deliver's policy order", function()
  local zone, srv, got
  setup(function()
    zone = zone_peer.start { "--mx-host=both.test,mx.both.test,10", "--host-record=mx.both.test,127.0.0.1" }
  end)
  teardown(function() zone:stop() end)

  local function deliver_with(active)
    got = 0
    srv = assert(server.listen { host = "127.0.0.1", port = 0,
      on_message = function(_, _, reader) for _ in reader:chunks() do end got = got + 1 return true end })
    local consulted = {}
    local real_dane, real_plan = package.loaded["smtp.dane"], mtasts.plan
    package.loaded["smtp.dane"] = {
      mode = function(v) return v and "opportunistic" or nil end,
      domain = function(domain)
        consulted[#consulted + 1] = "dane " .. domain
        return { active = active, hosts = {},
          describe = function() return {} end,
          connect = function(_, _, copts, connect) return connect(copts) end,
          fields = function() return active and { tls_policy = "dane" } or {} end }
      end,
    }
    mtasts.plan = function(domain)
      consulted[#consulted + 1] = "mta-sts " .. domain
      return nil
    end
    local results, err
    local ok, e = pcall(function()
      loop.spawn(function()
        srv:serve()
        results, err = smtp.deliver { message = "Subject: x\r\n\r\nx\r\n", from = "a@example.com",
          to = { "b@both.test" }, helo = "client.test", port = srv.port, destinations = "any",
          nameservers = { zone.nameserver }, timeout = 10, dane = true }
        srv:close()
      end)
      loop.run()
    end)
    package.loaded["smtp.dane"], mtasts.plan = real_dane, real_plan
    assert(ok, e)
    assert(results, tostring(err))
    return results[1], consulted
  end

  it("does not consult MTA-STS for a domain an active DANE policy governs", function()
    local r, consulted = deliver_with(true)
    assert.equal("sent", r.status, r.text)
    assert.equal("dane", r.tls_policy)
    assert.same({ "dane both.test" }, consulted)
    assert.equal(1, got)
  end)

  it("consults MTA-STS when DANE does not govern the domain", function()
    local r, consulted = deliver_with(false)
    assert.equal("sent", r.status, r.text)
    assert.same({ "dane both.test", "mta-sts both.test" }, consulted)
  end)
end)
