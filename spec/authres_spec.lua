-- Specs for smtp.auth: the Authentication-Results field (RFC 8601) parsed back by python3-authres
-- (what we wrote is what it reads: ids, methods, results, reasons, properties), its folding, and
-- auth.check running DKIM and DMARC over a message for a DATA handler.
local auth = require "smtp.auth"
local dkim = require "smtp.dkim"
local core = require "smtp.core"
local helper = require "helper"
local S = require "support.message"

-- Parses fields with python3-authres -> { { id=, results = { {method=, result=, reason=, props = {"type.name=value"...}} } } | { err = } }
local function parse_back(fields)
  helper.need("python3 authres")
  local dir = helper.tmpdir()
  local args = {}
  for i, f in ipairs(fields) do
    local p = dir .. "/f" .. i
    helper.write(p, f)
    args[i] = helper.quote(p)
  end
  local out = helper.sh(helper.python .. " " .. helper.quote(helper.root .. "/spec/support/authres_check.py") ..
    " " .. table.concat(args, " ") .. " 2>&1")
  local all, cur = {}, nil
  for line in out:gmatch("[^\n]+") do
    local w = {}
    -- python3-authres hands out a quoted-string's content with its quoted-pairs as written
    -- (\" stays \"): undo them, as a reader of the value would
    for x in line:gmatch("%S+") do w[#w + 1] = S.unhex(x) and S.unhex(x):gsub("\\(.)", "%1") end
    local tag = line:match("^%S+")
    if tag == "AR" then cur = { id = w[2], results = {} }; all[#all + 1] = cur
    elseif tag == "ERR" then all[#all + 1] = { err = w[2] }
    elseif tag == "RES" then cur.results[#cur.results + 1] = { method = w[2], result = w[3], reason = w[4], props = {} }
    elseif tag == "PROP" then
      local r = cur.results[#cur.results]
      r.props[#r.props + 1] = w[2] .. "." .. w[3] .. "=" .. w[4]
    elseif tag == "END" then cur = nil
    else error("authres_check.py: " .. out) end
  end
  assert(#all == #fields, "authres_check.py: " .. out)
  return all
end

local function check_lines(field)
  assert.matches("^Authentication%-Results: ", field)
  assert.equal("\r\n", field:sub(-2))
  for line in field:sub(1, -3):gmatch("[^\n]+") do
    line = line:gsub("\r$", "")
    assert.is_true(#line <= 78, "line longer than 78: " .. line)
  end
  -- no CR or LF other than the folds
  assert.is_nil(field:sub(1, -3):gsub("\r\n[ \t]", ""):find("[\r\n]"))
end

describe("auth.authentication_results", function()
  local full = {
    dkim = {
      { result = "pass", d = "example.com", i = "@example.com", s = "s2023", a = "rsa-sha256", header_b = "abc+/12=" },
      { result = "fail", reason = "body hash did not verify", d = "example.net", i = "alice@mail.example.net",
        s = "sel", a = "ed25519-sha256", header_b = "XyZ12345" },
    },
    spf = { result = "softfail", identity = "mailfrom", sender = "bounce+x=y@example.com", domain = "example.com",
            reason = "matched ~all" },
    dmarc = { result = "pass", policy = "reject", disposition = "none", domain = "example.com" },
    { method = "auth", result = "pass", props = { ["smtp.auth"] = "alice" } },
  }

  it("writes dkim, spf, dmarc and other entries that python3-authres reads back as given", function()
    local f = auth.authentication_results("mx.example.org", full)
    check_lines(f)
    assert.equal(table.concat({
      "Authentication-Results: mx.example.org;",
      " dkim=pass header.d=example.com header.i=@example.com header.s=s2023",
      ' header.a=rsa-sha256 header.b="abc+/12=";',
      ' dkim=fail reason="body hash did not verify" header.d=example.net',
      " header.i=alice@mail.example.net header.s=sel header.a=ed25519-sha256",
      " header.b=XyZ12345;",
      ' spf=softfail reason="matched ~all" smtp.mailfrom=bounce+x=y@example.com;',
      " dmarc=pass (p=reject dis=none) header.from=example.com;",
      " auth=pass smtp.auth=alice", "" }, "\r\n"), f)
    local p = parse_back({ f })[1]
    assert.is_nil(p.err)
    assert.equal("mx.example.org", p.id)
    assert.same({
      { method = "dkim", result = "pass", props = { "header.d=example.com", "header.i=@example.com",
        "header.s=s2023", "header.a=rsa-sha256", "header.b=abc+/12=" } },
      { method = "dkim", result = "fail", reason = "body hash did not verify", props = { "header.d=example.net",
        "header.i=alice@mail.example.net", "header.s=sel", "header.a=ed25519-sha256", "header.b=XyZ12345" } },
      { method = "spf", result = "softfail", reason = "matched ~all", props = { "smtp.mailfrom=bounce+x=y@example.com" } },
      { method = "dmarc", result = "pass", props = { "header.from=example.com" } },
      { method = "auth", result = "pass", props = { "smtp.auth=alice" } },
    }, p.results)
  end)

  it("says none when there is nothing to report, and smtp.helo for a HELO check", function()
    local f1 = auth.authentication_results("mx.example.org", {})
    assert.equal("Authentication-Results: mx.example.org; none\r\n", f1)
    local f2 = auth.authentication_results("mx.example.org", { spf = { result = "pass", identity = "helo",
      domain = "client.example.com" }, dkim = { { result = "none", reason = "no signatures" } } })
    local p = parse_back({ f1, f2 })
    assert.equal("mx.example.org", p[1].id)
    assert.same({}, p[1].results)
    assert.same({ { method = "dkim", result = "none", reason = "no signatures", props = {} },
                  { method = "spf", result = "pass", props = { "smtp.helo=client.example.com" } } }, p[2].results)
  end)

  it("quotes what is not a token, escapes quotes and backslashes, folds a long reason at its spaces", function()
    local reason = 'key "s1" was \\ revoked ' .. string.rep("and then some more words ", 6) .. "end"
    local f = auth.authentication_results("mx.example.org", {
      { method = "dkim", result = "permerror", reason = reason, props = { { "header.d", "example.com" },
        { "header.i", "odd local@example.com" } } },
      { method = "x-custom", result = "pass", comment = "a (nested) comment \\ here",
        props = { { "policy.name", "a;b" } } },
    })
    check_lines(f)
    local p = parse_back({ f })[1]
    assert.is_nil(p.err)
    assert.same({
      { method = "dkim", result = "permerror", reason = reason,
        props = { "header.d=example.com", "header.i=odd local@example.com" } },
      { method = "x-custom", result = "pass", props = { "policy.name=a;b" } },
    }, p.results)
  end)

  it("raises on misuse: a bad authserv-id, method, result or property name", function()
    assert.has_error(function() auth.authentication_results("", {}) end,
      "bad argument #1 to 'authentication_results' (authserv-id expected)")
    assert.has_error(function() auth.authentication_results("mx example", {}) end,
      "bad argument #1 to 'authentication_results' (authserv-id expected)")
    assert.has_error(function() auth.authentication_results("mx", { { method = "a b", result = "pass" } }) end,
      "bad argument #2 to 'authentication_results' (bad method a b)")
    assert.has_error(function() auth.authentication_results("mx", { { method = "spf", result = "pass;" } }) end,
      "bad argument #2 to 'authentication_results' (bad result for spf)")
    assert.has_error(function() auth.authentication_results("mx", { { method = "spf", result = "pass",
      props = { { "mailfrom", "x" } } } }) end, "bad argument #2 to 'authentication_results' (bad property mailfrom)")
  end)

  it("makes control characters in reasons, comments and values a space: no field can be injected", function()
    local f = auth.authentication_results("mx.example.org", { { method = "spf", result = "permerror",
      reason = "from DNS:\r\nInjected: yes", comment = "a\tb\0c", props = { { "smtp.mailfrom", "x\n@example.com" } } } })
    check_lines(f)
    assert.is_nil(f:find("\r\nInjected", 1, true))
    local p = parse_back({ f })[1]
    assert.same({ { method = "spf", result = "permerror", reason = "from DNS: Injected: yes",
      props = { "smtp.mailfrom=x @example.com" } } }, p.results)
  end)
end)

describe("auth.check", function()
  it("runs DKIM and DMARC over a signed message and builds the field python3-authres reads", function()
    helper.need("publicsuffix")
    helper.need("openssl")
    local dir = helper.tmpdir()
    helper.sh("openssl genpkey -algorithm ED25519 -out " .. dir .. "/ed.pem 2>/dev/null")
    local pem = assert(helper.read(dir .. "/ed.pem"))
    local rec = "v=DKIM1; k=ed25519; p=" .. assert(core.dkim_key(pem)):public()
    local raw = "From: Alice <alice@news.example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello\r\n"
    local signed = assert(dkim.sign(raw, { domain = "example.com", selector = "s1", key = pem }))
    local txt = { ["_dmarc.example.com"] = { "v=DMARC1; p=reject; sp=quarantine; adkim=r" } }
    local opts = {
      authserv_id = "mx.example.org",
      dkim = { key = function(s, d) if s == "s1" and d == "example.com" then return rec end end },
      dmarc = { txt = function(name) return txt[name] or {} end },
    }
    local r = assert(auth.check(signed, opts))
    assert.equal("pass", r.dkim[1].result)
    assert.equal("pass", r.dmarc.result)
    assert.equal("quarantine", r.dmarc.policy)       -- sp= of the organizational domain
    assert.equal("example.com", r.dmarc.dkim_domain)
    check_lines(r.header)
    local p = parse_back({ r.header })[1]
    assert.equal("dkim", p.results[1].method); assert.equal("pass", p.results[1].result)
    assert.same({ method = "dmarc", result = "pass", props = { "header.from=news.example.com" } }, p.results[#p.results])
    -- the body changed: DKIM fails, and with it DMARC, whose disposition is the subdomain policy
    r = assert(auth.check(signed:gsub("Hello", "Hellp"), opts))
    assert.equal("fail", r.dkim[1].result)
    assert.equal("fail", r.dmarc.result)
    assert.equal("quarantine", r.dmarc.disposition)
    assert.matches("dmarc=fail (p=quarantine dis=quarantine) header.from=news.example.com", r.header, 1, true)
    -- with SPF: the MAIL FROM domain passes and aligns, so DMARC passes though DKIM failed
    local spf_dns = function(name, qtype)
      if qtype == "TXT" and name == "example.com" then return { "v=spf1 ip4:192.0.2.0/24 -all" } end
      return nil, { rcode = "nxdomain" }
    end
    local o = { ip = "192.0.2.7", mail_from = "<bounce@example.com>", helo = "mail.example.com",
      spf = { dns = spf_dns } }
    for key, v in pairs(opts) do o[key] = v end
    r = assert(auth.check(signed:gsub("Hello", "Hellp"), o))
    assert.equal("fail", r.dkim[1].result)
    assert.equal("pass", r.spf.result)
    assert.equal("pass", r.dmarc.result)
    assert.is_true(r.dmarc.spf_aligned)
    p = parse_back({ r.header })[1]
    assert.same({ "fail", "pass", "pass" }, { p.results[1].result, p.results[2].result, p.results[3].result })
    assert.same({ "smtp.mailfrom=bounce@example.com" }, p.results[2].props)
    o.ip = "198.51.100.1"
    r = assert(auth.check(signed, o))
    assert.equal("fail", r.spf.result)
    assert.equal("pass", r.dmarc.result)   -- DKIM still aligns
    -- two From fields: DMARC cannot pick one
    r = assert(auth.check("From: x@example.net\r\n" .. signed, opts))
    assert.equal("permerror", r.dmarc.result)
    assert.equal("several From fields", r.dmarc.reason)
  end)
end)

describe("auth.check in a server's on_message", function()
  it("verifies a DKIM-signed message as it arrives and prepends the field to what it stores", function()
    helper.need("publicsuffix")
    helper.need("openssl")
    local smtp = require "smtp"
    local server = require "smtp.server"
    local loop = require "smtp.loop"
    local message = require "smtp.message"
    local dir = helper.tmpdir()
    helper.sh("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. dir .. "/rsa.pem 2>/dev/null")
    local pem = assert(helper.read(dir .. "/rsa.pem"))
    local rec = "v=DKIM1; k=rsa; p=" .. assert(core.dkim_key(pem)):public()
    local stored = {}
    local srv = assert(server.listen {
      host = "127.0.0.1", port = 0,
      on_message = function(session, envelope, reader)
        -- the reader streams into the DKIM hashes; a handler that also stores the message
        -- keeps the chunks as they pass
        local kept = {}
        local src = reader:chunks()
        local r = assert(auth.check(function()
          local c = src()
          kept[#kept + 1] = c
          return c
        end, { authserv_id = "mx.example.org",
               dkim = { key = function(s, d) if s == "s1" and d == "example.com" then return rec end end },
               dmarc = { txt = function(name)
                 if name == "_dmarc.example.com" then return { "v=DMARC1; p=reject" } end
               end } }))
        stored[#stored + 1] = r.header .. table.concat(kept)
        return true
      end,
    })
    local err
    loop.spawn(function()
      local ok, e = pcall(function()
        srv:serve()
        for _, text in ipairs({ "Hello Bob", string.rep("A long body line. ", 20000) }) do
          local m = assert(message.new { from = "Alice <alice@example.com>", to = { "bob@example.org" },
            subject = "signed", text = text, dkim = { domain = "example.com", selector = "s1", key = pem } })
          assert(smtp.send { server = "127.0.0.1", port = srv.port, tls = "none", from = "alice@example.com",
            to = { "bob@example.org" }, message = m })
        end
      end)
      err = not ok and e or nil
      srv:close()
    end)
    loop.run()
    assert(not err, err)
    assert.equal(2, #stored)
    for _, s in ipairs(stored) do
      local field = s:match("^(Authentication%-Results:.-\r\n)[^ ]")
      assert.truthy(field, s:sub(1, 300))
      local p = parse_back({ field })[1]
      assert.equal("mx.example.org", p.id)
      assert.equal("dkim", p.results[1].method); assert.equal("pass", p.results[1].result)
      assert.same({ method = "dmarc", result = "pass", props = { "header.from=example.com" } }, p.results[2])
      -- what was stored still verifies, with the field in front
      local again = assert(dkim.verify(s, { key = function() return rec end }))
      assert.equal("pass", again[1].result)
    end
  end)
end)
