-- REQUIRETLS (RFC 8689): the server engine advertises it only over TLS and takes the MAIL
-- parameter only then; smtp.send and smtp.deliver refuse to send a requiretls message over a hop
-- that is not TLS with a verified certificate offering REQUIRETLS; smtp.server (its own process)
-- records it in the envelope.
local helper = require "helper"
local core = require "smtp.core"

local function ehlo_lines(e)
  e:feed("EHLO client.test\r\n")
  while e:next() do end
  return e:output()
end

describe("REQUIRETLS in the server engine", function()
  it("is advertised only once TLS is on, and only when asked for", function()
    local plain = core.server_engine { hostname = "mx.test", tls = true, requiretls = true }
    assert.is_nil(ehlo_lines(plain):find("REQUIRETLS", 1, true))
    local on = core.server_engine { hostname = "mx.test", tls_active = true, requiretls = true }
    assert.truthy(ehlo_lines(on):find("250-REQUIRETLS\r\n", 1, true))
    local off = core.server_engine { hostname = "mx.test", tls_active = true }
    assert.is_nil(ehlo_lines(off):find("REQUIRETLS", 1, true))
  end)

  it("takes MAIL ... REQUIRETLS over TLS into the envelope, refuses it without TLS", function()
    local e = core.server_engine { hostname = "mx.test", tls_active = true, requiretls = true }
    ehlo_lines(e)
    e:feed("MAIL FROM:<a@b.test> REQUIRETLS\r\nRCPT TO:<c@d.test>\r\n")
    while e:next() do end
    assert.matches("^250 [^\n]*\n250 ", e:output())
    local env = e:envelope()
    assert.is_true(env.requiretls)
    assert.is_true(env.params.REQUIRETLS)

    local p = core.server_engine { hostname = "mx.test", tls = true, requiretls = true }
    ehlo_lines(p)
    p:feed("MAIL FROM:<a@b.test> REQUIRETLS\r\n")
    while p:next() do end
    assert.matches("^530 5%.7%.10 ", p:output())
    local q = core.server_engine { hostname = "mx.test", tls_active = true, requiretls = true }
    ehlo_lines(q)
    q:feed("MAIL FROM:<a@b.test> REQUIRETLS=yes\r\n")
    while q:next() do end
    assert.matches("^501 ", q:output())
  end)
end)

describe("REQUIRETLS from the client", function()
  local smtp = require "smtp"
  local certs, with, without, port_with, port_without
  local function start(rt)
    local port = helper.free_port("127.0.0.1")
    local p = helper.spawn({ helper.lua, helper.root .. "/spec/support/requiretls_server.lua", "127.0.0.1",
      tostring(port), certs.server, certs.server_key, rt and "1" or "0" }, { limit = 300 })
    assert(helper.wait_port("127.0.0.1", port, 10), "server did not start: " .. p:output())
    return p, port
  end
  setup(function()
    certs = helper.certs()
    with, port_with = start(true)
    without, port_without = start(false)
  end)
  teardown(function() with:stop(); without:stop() end)

  local msg = "From: a@sender.test\r\nTo: b@rcpt.test\r\nSubject: rt\r\n\r\nsecret\r\n"
  local function send(port, extra)
    local o = { server = "127.0.0.1", port = port, tls = "starttls", cafile = certs.ca, helo = "client.test",
      message = msg, from = "a@sender.test", to = "b@rcpt.test", requiretls = true, timeout = 10 }
    for k, v in pairs(extra or {}) do o[k] = v end
    return smtp.send(o)
  end
  local function count(p, pat)
    local n = 0
    for _ in p:output():gmatch(pat) do n = n + 1 end
    return n
  end

  it("sends MAIL ... REQUIRETLS over verified TLS, and the server records it", function()
    local res = assert(send(port_with))
    assert.equal(250, res.reply.code)
    assert.equal(1, count(with, "msg a@sender.test requiretls=true tls=true"))
  end)

  it("refuses a server that does not offer REQUIRETLS (nothing is sent)", function()
    local res, err = send(port_without)
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.equal("5.7.10", err.enhanced)
    assert.matches("does not offer REQUIRETLS", err.text)
    assert.equal(0, count(without, "msg "))
  end)

  it("refuses a session whose certificate was not verified, or without TLS", function()
    local before = count(with, "msg ")
    local res, err = send(port_with, { verify = false })
    assert.is_nil(res)
    assert.matches("verified certificate", err.text)
    res, err = send(port_with, { tls = "none" })
    assert.is_nil(res)
    assert.equal("5.7.10", err.enhanced)
    res, err = send(port_with, { tls = "opportunistic", verify = false })
    assert.is_nil(res)
    assert.equal(before, count(with, "msg "))
    -- without requiretls the same plaintext session sends
    assert(send(port_with, { tls = "none", requiretls = false }))
    assert.equal(1, count(with, "requiretls=false tls=false"))
  end)

  -- Runs the real bin/lua-smtp (bounded by timeout): exit status, stdout, stderr.
  local function cli(argv)
    local errf = helper.tmpdir() .. "/stderr"
    local parts = { "timeout 60", helper.lua, helper.quote(helper.root .. "/bin/lua-smtp") }
    for _, a in ipairs(argv) do parts[#parts + 1] = helper.quote(a) end
    local p = io.popen(table.concat(parts, " ") .. " 2>" .. helper.quote(errf) .. "; echo \"rc=$?\"")
    local out = p:read("*a")
    p:close()
    local body, rc = out:match("^(.-)rc=(%d+)%s*$")
    return tonumber(rc), body, helper.read(errf) or ""
  end

  it("lua-smtp send --requiretls", function()
    local base = { "send", "--tls", "starttls", "--cafile", certs.ca, "--from", "a@sender.test",
      "--to", "b@rcpt.test", "--subject", "rt", "--body", "x", "--requiretls", "--server" }
    local argv = { table.unpack(base) }
    argv[#argv + 1] = "127.0.0.1:" .. port_with
    local before = count(with, "requiretls=true")
    local rc, _, err = cli(argv)
    assert.equal(0, rc, err)
    assert.equal(before + 1, count(with, "requiretls=true"))
    argv[#argv] = "127.0.0.1:" .. port_without
    rc, _, err = cli(argv)
    assert.equal(1, rc)
    assert.matches("REQUIRETLS", err)
  end)

  it("raises on a non-boolean requiretls", function()
    assert.has_error(function() send(port_with, { requiretls = "yes" }) end,
      "bad argument #1 to 'send' (requiretls: boolean expected)")
  end)
end)

describe("REQUIRETLS through smtp.deliver", function()
  local bed_mod = require "support.mtasts_bed"
  local deliver = require("smtp.deliver").deliver
  local mtasts = require "smtp.mtasts"
  local bed, lua_mx
  local function policy(mx)
    return "version: STSv1\nmode: enforce\nmx: " .. mx .. "\nmax_age: 86400\n"
  end
  setup(function()
    bed = bed_mod.start {
      domains = {
        ["rtls.test"] = { txt = "v=STSv1; id=1;", policy = policy("mx.rtls.test"), mx = { "mx.rtls.test" } },
        ["aio.test"] = { txt = "v=STSv1; id=1;", policy = policy("mx.enf.test"), mx = { "mx.enf.test" } },
        ["nopolicy.test"] = { mx = { "mx.rtls.test" } },
      },
      hosts = { ["mx.rtls.test"] = "127.0.19.7", ["mx.enf.test"] = "127.0.19.2" },
      mx = { { name = "mx.enf.test", ip = "127.0.19.2", good = true } },
    }
    local cert, key = bed_mod.cert(bed.dir, "rtls", { "mx.rtls.test" }, helper.certs())
    lua_mx = helper.spawn({ helper.lua, helper.root .. "/spec/support/requiretls_server.lua", "127.0.19.7",
      tostring(bed.port), cert, key, "1" }, { limit = 300 })
    assert(helper.wait_port("127.0.19.7", bed.port, 10), "server did not start: " .. lua_mx:output())
  end)
  teardown(function() bed:stop(); lua_mx:stop() end)

  local function opts(to)
    return { message = "From: a@sender.test\r\nSubject: rt\r\n\r\nx\r\n", from = "a@sender.test", to = { to },
      helo = "client.test", nameservers = { bed.nameserver }, port = bed.port, timeout = 5,
      destinations = "any", cafile = bed.cafile, requiretls = true,
      mta_sts = { port = bed.web_port, cache = mtasts.new_cache() } }
  end

  it("delivers to an MX the policy authenticates, over verified TLS, with REQUIRETLS", function()
    local res = assert(deliver(opts "x@rtls.test"))
    assert.equal("sent", res[1].status, res[1].text)
    assert.truthy(lua_mx:output():find("requiretls=true tls=true", 1, true))
  end)

  it("defers when the MX host does not offer REQUIRETLS", function()
    local n = #bed:messages()
    local res = assert(deliver(opts "x@aio.test"))
    assert.equal("deferred", res[1].status)
    assert.matches("REQUIRETLS", res[1].text)
    assert.equal(n, #bed:messages())
  end)

  it("fails when no policy authenticates the MX hosts", function()
    local res = assert(deliver(opts "x@nopolicy.test"))
    assert.equal("failed", res[1].status)
    assert.equal("5.7.10", res[1].enhanced)
  end)
end)
