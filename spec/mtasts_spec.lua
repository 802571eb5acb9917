-- MTA-STS (smtp.mtasts and smtp.deliver's mta_sts): policies parsed strictly, then fetched over
-- HTTPS from a loopback server with the test CA, published in dnsmasq, and applied to deliveries
-- to aiosmtpd MX hosts whose certificates match or do not, and through a STARTTLS stripper.
local helper = require "helper"
local bed_mod = require "support.mtasts_bed"
local mtasts = require "smtp.mtasts"

local function policy(mode, mx, max_age)
  local lines = { "version: STSv1", "mode: " .. mode }
  for _, m in ipairs(mx) do lines[#lines + 1] = "mx: " .. m end
  lines[#lines + 1] = "max_age: " .. tostring(max_age or 86400)
  return table.concat(lines, "\r\n") .. "\r\n"
end

describe("mtasts.parse", function()
  it("takes a policy with LF or CRLF lines, extension fields and wildcards", function()
    local p = assert(mtasts.parse("version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.Example.NET\n" ..
      "max_age: 604800\next: ignored\n"))
    assert.equal("enforce", p.mode)
    assert.equal(604800, p.max_age)
    assert.same({ "mail.example.com", "*.example.net" }, p.mx)
    assert.is_true(mtasts.matches(p, "mail.example.com"))
    assert.is_true(mtasts.matches(p, "MX1.example.net."))
    assert.is_false(mtasts.matches(p, "a.b.example.net"))   -- the wildcard is one label
    assert.is_false(mtasts.matches(p, "example.net"))
    assert.is_false(mtasts.matches(p, "xmail.example.com"))
    assert.truthy(mtasts.parse(policy("testing", { "a.test" })))
  end)

  it("refuses what RFC 8461 does not allow", function()
    local bad = {
      "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
      "version: STSv1\nmode: always\nmx: a.test\nmax_age: 1\n",
      "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
      "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
      "version: STSv1\nmode: enforce\nmax_age: 86400\n",                  -- no mx
      "version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1\n",
      "mode: enforce\nmx: a.test\nmax_age: 1\n",                           -- no version
      "version: STSv1\nmode: enforce\nmx: *.*.a.test\nmax_age: 1\n",
      "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\ngarbage line\n",
      "version: STSv1\rmode: enforce\rmx: a.test\rmax_age: 1\r",
    }
    for _, text in ipairs(bad) do
      local p, why = mtasts.parse(text)
      assert.is_nil(p, text)
      assert.is_string(why)
    end
    assert.truthy(mtasts.parse("version: STSv1\nmode: none\nmax_age: 1\n"))
  end)

  it("reads the TXT record", function()
    assert.same({ id = "20160831085700Z" }, mtasts.parse_txt("v=STSv1; id=20160831085700Z;"))
    assert.same({ id = "abc" }, mtasts.parse_txt("v=STSv1;id=abc; ext=1"))
    assert.is_nil(mtasts.parse_txt("v=STSv1; id=has-dash;"))
    assert.is_nil(mtasts.parse_txt("v=STSv1; id=" .. ("a"):rep(33)))
    assert.is_nil(mtasts.parse_txt("v=STSv1;"))
    assert.is_nil(mtasts.parse_txt("v=spf1 -all"))
  end)
end)

describe("MTA-STS delivery", function()
  local bed, deliver, tlsrpt
  local raw = "From: a@sender.test\r\nTo: x@enf.test\r\nSubject: sts\r\n\r\nhello\r\n"
  setup(function()
    deliver = require("smtp.deliver").deliver
    tlsrpt = require "smtp.tlsrpt"
    local domains = {
      ["enf.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.enf.test" }), mx = { "mx.enf.test" } },
      ["wild.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "*.wild.test" }), mx = { "a.wild.test" } },
      ["badcert.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.badcert.test" }), mx = { "mx.badcert.test" } },
      ["notin.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.enf.test" }), mx = { "other.notin.test" } },
      ["strip.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.strip.test" }), mx = { "mx.strip.test" } },
      ["testing.test"] = { txt = "v=STSv1; id=1;", policy = policy("testing", { "mx.testing.test" }), mx = { "mx.testing.test" } },
      ["cached.test"] = { txt = "v=STSv1; id=new;", mx = { "mx.cached.test" } },   -- 404 now
      ["redirect.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.redirect.test" }), mx = { "mx.redirect.test" } },
      ["big.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.big.test" }), mx = { "mx.big.test" } },
      ["html.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.html.test" }), mx = { "mx.html.test" } },
      ["chunked.test"] = { txt = "v=STSv1; id=1;", policy = policy("enforce", { "mx.chunked.test" }), mx = { "mx.chunked.test" } },
      ["idchange.test"] = { txt = "v=STSv1; id=1;", policy = policy("testing", { "mx.enf.test" }) },
      ["nosts.test"] = { mx = { "mx.badcert.test" } },
    }
    bed = bed_mod.start {
      domains = domains,
      hosts = {
        ["mx.enf.test"] = "127.0.19.2", ["a.wild.test"] = "127.0.19.5", ["mx.badcert.test"] = "127.0.19.3",
        ["other.notin.test"] = "127.0.19.2", ["mx.strip.test"] = "127.0.19.4",
        ["mx.testing.test"] = "127.0.19.3", ["mx.cached.test"] = "127.0.19.3",
        ["mx.redirect.test"] = "127.0.19.3", ["mx.big.test"] = "127.0.19.3", ["mx.html.test"] = "127.0.19.3",
        ["mx.chunked.test"] = "127.0.19.6",
      },
      mx = {
        { name = "mx.enf.test", ip = "127.0.19.2", good = true },
        { name = "mx.badcert.test", ip = "127.0.19.3", good = false },
        { name = "a.wild.test", ip = "127.0.19.5", good = true },
        { name = "mx.chunked.test", ip = "127.0.19.6", good = true },
      },
      strip = { { ip = "127.0.19.4", to = "127.0.19.2" } },
    }
  end)
  teardown(function() if bed then bed:stop() end end)

  local function opts(to, extra)
    local o = { message = raw, from = "a@sender.test", to = { to }, helo = "client.test",
      nameservers = { bed.nameserver }, port = bed.port, timeout = 5, destinations = "any",
      cafile = bed.cafile, mta_sts = { port = bed.web_port, cache = mtasts.new_cache() } }   -- each case its own
    for k, v in pairs(extra or {}) do o[k] = v end
    return o
  end

  it("enforce + a matching MX with a good certificate: sent over verified TLS", function()
    local n = #bed:messages()
    local res = assert(deliver(opts "x@enf.test"))
    assert.equal("sent", res[1].status, res[1].text)
    assert.equal("enforce", res[1].mta_sts.mode)
    assert.equal("fetched", res[1].mta_sts.source)
    assert.is_true(res[1].mta_sts.verified)
    local m = bed:messages()
    assert.equal(n + 1, #m)
    assert.is_true(m[#m].tls)
    assert.equal("mx.enf.test", m[#m].mx)
  end)

  it("enforce + a wildcard mx pattern: sent", function()
    local res = assert(deliver(opts "x@wild.test"))
    assert.equal("sent", res[1].status, res[1].text)
    assert.is_true(res[1].mta_sts.verified)
  end)

  it("enforce + a certificate for another name: deferred, reported as certificate-host-mismatch", function()
    local n = #bed:messages()
    local r = tlsrpt.new { organization_name = "t", contact_info = "t@t.test", report_id = "1" }
    local res = assert(deliver(opts("x@badcert.test", { tlsrpt = r })))
    assert.equal("deferred", res[1].status)
    assert.equal("certificate-host-mismatch", res[1].mta_sts.failures[1].result_type)
    assert.equal(n, #bed:messages())
    assert.matches('"result%-type":"certificate%-host%-mismatch"', r:report(0, 86400))
  end)

  it("enforce + an MX host the policy does not list: not contacted, deferred", function()
    local n = #bed:messages()
    local res = assert(deliver(opts "x@notin.test"))
    assert.equal("deferred", res[1].status)
    assert.matches("not in the MTA%-STS policy", res[1].text)
    assert.equal("validation-failure", res[1].mta_sts.failures[1].result_type)
    assert.equal(n, #bed:messages())
  end)

  it("enforce + STARTTLS stripped on the way: deferred, never plaintext", function()
    local n = #bed:messages()
    local res = assert(deliver(opts "x@strip.test"))
    assert.equal("deferred", res[1].status)
    assert.equal("starttls-not-supported", res[1].mta_sts.failures[1].result_type)
    assert.equal(n, #bed:messages())
    -- without a policy the same stripped host gets the message in plaintext (as MTAs do)
    local plain = assert(deliver(opts("x@strip.test", { mta_sts = false })))
    assert.equal("sent", plain[1].status)
    assert.is_false(bed:messages()[#bed:messages()].tls)
  end)

  it("testing + a certificate mismatch: sent, and the failure reported", function()
    local r = tlsrpt.new { organization_name = "t", contact_info = "t@t.test", report_id = "2" }
    local res = assert(deliver(opts("x@testing.test", { tlsrpt = r })))
    assert.equal("sent", res[1].status, res[1].text)
    assert.equal("testing", res[1].mta_sts.mode)
    assert.equal("certificate-host-mismatch", res[1].mta_sts.failures[1].result_type)
    local json = r:report(0, 86400)
    -- the report of real sessions has the RFC's shape too (spec/support/tlsrpt_check.py)
    local dir = helper.tmpdir()
    helper.write(dir .. "/r.json", json)
    local p = io.popen(helper.python .. " " .. helper.quote(helper.root .. "/spec/support/tlsrpt_check.py") ..
      " < " .. helper.quote(dir .. "/r.json") .. " 2>&1")
    assert.equal("ok\n", p:read("*a"))
    p:close()
    assert.matches('"policy%-type":"sts"', json)
    assert.matches('"total%-failure%-session%-count":1', json)
    assert.matches('"receiving%-mx%-hostname":"mx.testing.test"', json)
  end)

  it("a failed fetch with a still valid cached policy: the cached policy applies (cache_dir)", function()
    local cdir = helper.tmpdir()
    -- what an earlier run left: id "old", enforce, fetched a moment ago
    helper.write(cdir .. "/cached.test.sts", ("old %d\n"):format(os.time()) .. policy("enforce", { "mx.cached.test" }))
    local o = opts "x@cached.test"
    o.mta_sts = { port = bed.web_port, cache_dir = cdir }
    local before = bed:gets("mta-sts.cached.test")
    local res = assert(deliver(o))
    assert.equal(before + 1, bed:gets("mta-sts.cached.test"))   -- the new id was asked for (404)
    assert.equal("cache", res[1].mta_sts.source)
    assert.equal("enforce", res[1].mta_sts.mode)
    assert.equal("deferred", res[1].status)                     -- mx.cached.test's certificate is wrong
    -- the same without the cache: no policy, sent opportunistically
    local res2 = assert(deliver(opts "x@cached.test"))
    assert.equal("sent", res2[1].status)
    assert.equal("none", res2[1].mta_sts.mode)
  end)

  it("refuses a redirect, an oversized policy and a non-text/plain one (no policy, reported)", function()
    for d, rt in pairs { ["redirect.test"] = "sts-policy-fetch-error", ["big.test"] = "sts-policy-invalid",
                         ["html.test"] = "sts-policy-invalid" } do
      local r = tlsrpt.new { organization_name = "t", contact_info = "t@t.test", report_id = d }
      local res = assert(deliver(opts("x@" .. d, { tlsrpt = r })))
      assert.equal("sent", res[1].status, d)          -- without a policy, as today
      assert.equal("none", res[1].mta_sts.mode, d)
      assert.is_string(res[1].mta_sts.error, d)
      assert.matches('"result%-type":"' .. rt:gsub("%-", "%%-") .. '"', r:report(0, 1), d)
    end
    local _, err = mtasts.fetch("redirect.test", { nameservers = { bed.nameserver }, port = bed.web_port,
      cafile = bed.cafile, destinations = "any" })
    assert.matches("redirects are not followed", err.text)
    _, err = mtasts.fetch("big.test", { nameservers = { bed.nameserver }, port = bed.web_port,
      cafile = bed.cafile, destinations = "any" })
    assert.matches("limit", err.text)
  end)

  it("counts sessions without a policy and verified ones in the report", function()
    local r = tlsrpt.new { organization_name = "t", contact_info = "t@t.test", report_id = "3" }
    assert.equal("sent", assert(deliver(opts("x@nosts.test", { tlsrpt = r })))[1].status)
    assert.equal("sent", assert(deliver(opts("x@enf.test", { tlsrpt = r })))[1].status)
    local json = r:report(0, 1)
    assert.matches('{"policy":{"policy%-type":"no%-policy%-found","policy%-domain":"nosts.test"},' ..
      '"summary":{"total%-successful%-session%-count":1,"total%-failure%-session%-count":0}}', json)
    assert.matches('"policy%-domain":"enf.test","mx%-host":%["mx.enf.test"%]},' ..
      '"summary":{"total%-successful%-session%-count":1,"total%-failure%-session%-count":0}}', json)
  end)

  it("reads a chunked response", function()
    local res = assert(deliver(opts "x@chunked.test"))
    assert.equal("sent", res[1].status, res[1].text)
    assert.equal("enforce", res[1].mta_sts.mode)
  end)

  it("fetches again when the TXT id changes, not before", function()
    local c = mtasts.new_cache()
    local o = { nameservers = { bed.nameserver }, port = bed.web_port, cafile = bed.cafile,
      destinations = "any", cache = c }
    local host = "mta-sts.idchange.test"
    local before = bed:gets(host)
    local st = mtasts.policy("idchange.test", o)
    assert.equal("testing", st.mode)
    assert.equal("fetched", st.source)
    st = mtasts.policy("idchange.test", o)
    assert.equal("cache", st.source)
    assert.equal(before + 1, bed:gets(host))
    -- the domain publishes a new policy and a new id
    bed:policy("idchange.test", policy("enforce", { "mx.enf.test" }))
    o.nameservers = { bed:dns { ["idchange.test"] = { txt = "v=STSv1; id=2;" } } }
    st = mtasts.policy("idchange.test", o)
    assert.equal("fetched", st.source)
    assert.equal("2", st.id)
    assert.equal("enforce", st.mode)
    assert.equal(before + 2, bed:gets(host))
  end)

  it("refreshes a policy past half its max_age beside the caller, inside smtp.loop", function()
    local c = mtasts.new_cache()
    local old = assert(mtasts.parse(policy("testing", { "mx.enf.test" }, 100)))
    c:put("enf.test", { id = "1", policy = old, fetched = 1000 })
    local o = { nameservers = { bed.nameserver }, port = bed.web_port, cafile = bed.cafile,
      destinations = "any", cache = c, now = function() return 1080 end }
    local before = bed:gets("mta-sts.enf.test")
    -- outside any loop there is nothing to run it beside: the cached policy, no fetch
    local st = mtasts.policy("enf.test", o)
    assert.equal("cache", st.source)
    assert.equal(before, bed:gets("mta-sts.enf.test"))
    local loop = require "smtp.loop"
    loop.spawn(function() st = mtasts.policy("enf.test", o) end)
    loop.run()
    assert.equal("cache", st.source)
    assert.equal("testing", st.mode)                      -- this delivery used the cached one
    assert.equal(before + 1, bed:gets("mta-sts.enf.test"))
    assert.equal(1080, c:get("enf.test").fetched)        -- the next one gets the fresh policy
    assert.equal("enforce", c:get("enf.test").policy.mode)
  end)

  it("a certificate the test CA did not sign makes the policy host invalid (sts-webpki-invalid)", function()
    local st = mtasts.policy("enf.test", { nameservers = { bed.nameserver }, port = bed.web_port,
      destinations = "any", cache = mtasts.new_cache(),
      cafile = helper.certs().other_ca })
    assert.is_nil(st.mode)
    assert.equal("sts-webpki-invalid", st.failure.result_type)
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
    -- DANE's lines (this bed's zones are unsigned: "insecure") are dane_spec's business
    body = body and body:gsub("dane: [^\n]*\n", "")
    return tonumber(rc), body, helper.read(errf) or ""
  end

  it("lua-smtp mx --tls prints the policy state", function()
    local base = { "mx", "--nameserver", bed.nameserver, "--tls", "--cafile", bed.cafile,
      "--destinations", "any", "--mta-sts-port", tostring(bed.web_port) }
    local argv = { table.unpack(base) }
    argv[#argv + 1] = "notin.test"
    local rc, out = cli(argv)
    assert.equal(0, rc)
    assert.equal("10 other.notin.test 127.0.19.2\nmta-sts: policy mode=enforce id=1 max_age=86400\n" ..
      "mta-sts: mx mx.enf.test\nmta-sts: other.notin.test not in the policy (not used)\n", out)
    argv[#argv] = "nosts.test"
    rc, out = cli(argv)
    assert.equal(0, rc)
    assert.matches("mta%-sts: none %(no _mta%-sts record%)", out)
    argv[#argv] = "html.test"
    rc, out = cli(argv)
    assert.matches("mta%-sts: none %(sts%-policy%-invalid: .*text/html", out)
    rc = cli { "mx", "--cafile", bed.cafile, "a.test" }
    assert.equal(2, rc)
    rc = cli { "send", "--server", "127.0.0.1:1", "--mta-sts", "--from", "a@b.test", "--to", "c@d.test" }
    assert.equal(2, rc)
  end)

  -- Inside nginx (its own LuaJIT; once, in the lua5.4 run): the TXT lookup over the nginx resolver,
  -- the policy fetched over a cosocket checked against lua_ssl_trusted_certificate (the test CA),
  -- the MX sessions over cosockets.
  local asan = os.getenv("SMTP_BUILD") == "asan"
  local in_nginx = helper.lua == "lua5.4" and not asan
  local inside = in_nginx and it or pending
  inside("applies policies inside nginx (cosockets, lua_ssl_trusted_certificate)", function()
    local nginx_support = require "support.nginx"
    assert(nginx_support.available(), "needs nginx with its Lua module (libnginx-mod-http-lua)")
    local srv = nginx_support.start { locations = [[
    location = /sts { content_by_lua_block {
      local smtp = require "smtp"
      local a = ngx.req.get_uri_args()
      local res, err = smtp.deliver { message = "From: a@sender.test\r\nSubject: x\r\n\r\nx\r\n",
        from = "a@sender.test", to = { a.to }, helo = "client.test", nameservers = { a.ns },
        port = tonumber(a.port), timeout = 5, destinations = "any",
        mta_sts = { port = tonumber(a.web), cache = require("smtp.mtasts").new_cache() } }
      if not res then ngx.say("error ", tostring(err)) return end
      local r, m = res[1], res[1].mta_sts or {}
      ngx.say(r.status, " ", tostring(m.mode), " ", tostring(m.verified), " ",
        tostring(m.failures and m.failures[1] and m.failures[1].result_type))
    } }
]] }
    local function get(to)
      local status, body = nginx_support.request(srv:url(("/sts?to=%s&ns=%s&port=%d&web=%d"):format(
        to, bed.nameserver, bed.port, bed.web_port)), nil, 60)
      return status, body
    end
    local n = #bed:messages()
    local cases = {
      { "x@enf.test", "sent enforce true nil\n" },
      -- (validation-failure when Debian's lua-resty-core loses nginx's reason: see transport/ngx.lua)
      { "x@badcert.test", "^deferred enforce false (%S+)\n$", { ["certificate-host-mismatch"] = true, ["validation-failure"] = true } },
      { "x@strip.test", "deferred enforce false starttls-not-supported\n" },
      { "x@testing.test", "^sent testing false (%S+)\n$", { ["certificate-host-mismatch"] = true, ["validation-failure"] = true } },
      { "x@big.test", "sent none false nil\n" },
    }
    local ok, failure = pcall(function()
      for _, c in ipairs(cases) do
        local status, body = get(c[1])
        assert.equal(200, status, c[1] .. ": " .. tostring(body) .. "\n" .. srv:error_log())
        if c[3] then
          assert.truthy(c[3][body:match(c[2]) or ""], c[1] .. ": " .. body .. "\n" .. srv:error_log())
        else
          assert.equal(c[2], body, c[1] .. "\n" .. srv:error_log())
        end
      end
    end)
    srv:stop()
    assert(ok, failure)
    assert.equal(n + 3, #bed:messages())   -- enf (verified), testing and big (opportunistic)
  end)

  it("the policy host is subject to destinations", function()
    local st = mtasts.policy("enf.test", { nameservers = { bed.nameserver }, port = bed.web_port,
      cafile = bed.cafile, cache = mtasts.new_cache() })
    assert.is_nil(st.mode)
    assert.matches("refusing", st.failure.text)
  end)
end)
