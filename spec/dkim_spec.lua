-- Specs for smtp.dkim and DKIM on smtp.message: the RFC 8463 Appendix A example, and dkimpy
-- verifying rsa-sha256 and ed25519-sha256 signatures over many varied messages.
local dkim = require "smtp.dkim"
local message = require "smtp.message"
local core = require "smtp.core"
local helper = require "helper"
local S = require "support.message"

-- RFC 8463 A.2: the Ed25519 secret key (RFC 8032 7.1 TEST 1) and its key record.
local rfc_seed = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
local rfc_record = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
local function ed25519_pem(seed_b64)
  local der = "\48\46\2\1\0\48\5\6\3\43\101\112\4\34\4\32" .. core.b64decode(seed_b64)
  return "-----BEGIN PRIVATE KEY-----\n" .. core.b64encode(der, 64) .. "\n-----END PRIVATE KEY-----\n"
end

-- RFC 8463 A.1 / RFC 6376 A: the example message.
local rfc_msg = table.concat({
  "From: Joe SixPack <joe@football.example.com>",
  "To: Suzie Q <suzie@shopping.example.net>",
  "Subject: Is dinner ready?",
  "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
  "Message-ID: <20030712040037.46341.5F8J@football.example.com>",
  "",
  "Hi.",
  "",
  "We lost the game.  Are you hungry yet?",
  "",
  "Joe.",
  "" }, "\r\n")

local keys = {}
local function genkeys()
  if keys.rsa then return keys end
  local dir = helper.tmpdir()
  helper.sh("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. dir .. "/rsa.pem 2>/dev/null")
  helper.sh("openssl genpkey -algorithm ED25519 -out " .. dir .. "/ed.pem 2>/dev/null")
  keys.rsa_path, keys.ed_path = dir .. "/rsa.pem", dir .. "/ed.pem"
  keys.rsa, keys.ed = assert(helper.read(keys.rsa_path)), assert(helper.read(keys.ed_path))
  keys.rsa_record = "v=DKIM1; k=rsa; p=" .. assert(core.dkim_key(keys.rsa)):public()
  keys.ed_record = "v=DKIM1; k=ed25519; p=" .. assert(core.dkim_key(keys.ed)):public()
  return keys
end

describe("dkim.sign", function()
  it("signs the RFC 8463 example with the RFC's body hash, verified against the RFC key record", function()
    local signed = assert(dkim.sign(rfc_msg, { domain = "football.example.com", selector = "brisbane",
      key = ed25519_pem(rfc_seed), algorithm = "ed25519-sha256", timestamp = 1528637909 }))
    assert.equal(rfc_msg, signed:sub(-#rfc_msg))
    local sig = signed:sub(1, #signed - #rfc_msg)
    assert.matches("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;", sig, 1, true)
    assert.matches("a=ed25519-sha256; c=relaxed/relaxed;", sig, 1, true)
    assert.matches("t=1528637909;", sig, 1, true)
    local r = S.parse({ signed }, rfc_record)[1]
    assert.is_true(r.verify)
  end)

  it("reproduces the RFC 8463 A.3 signature bytes (Ed25519 is deterministic)", function()
    -- the RFC's own DKIM-Signature field with b= emptied, as the signer hashes it
    local rfc_sig = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n" ..
      " d=football.example.com; i=@football.example.com;\r\n" ..
      " q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n" ..
      " subject : date : message-id : from : subject : date;\r\n" ..
      " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n b="
    local fields = dkim.split_header(rfc_msg)
    local data = {}
    for _, i in ipairs({ 1, 2, 3, 4, 5 }) do data[#data + 1] = core.dkim_header(fields[i], "relaxed") end
    data[#data + 1] = core.dkim_header(rfc_sig, "relaxed"):sub(1, -3)
    local key = assert(core.dkim_key(ed25519_pem(rfc_seed)))
    assert.equal("/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
      core.b64encode(key:sign(table.concat(data))))
  end)

  -- the h= list of a signed message, without its folding
  local function hlist(signed)
    local head = signed:match("^(DKIM%-Signature:.-)\r\n%S")
    return (head:gsub("\r\n[ \t]", ""):match("h=([^;]*);"):gsub("%s", ""))
  end

  it("signs From, names each over-signed field once more than it occurs, leaves out t= when asked", function()
    local k = genkeys()
    local signed = assert(dkim.sign(rfc_msg, { domain = "example.com", selector = "s1", key = k.ed,
      timestamp = false, headers = { "subject" } }))
    local head = signed:match("^(DKIM%-Signature:.-)\r\n%S"):gsub("\r\n", "")
    assert.is_nil(head:find("t=", 1, true))
    assert.matches("a=ed25519-sha256", head, 1, true)
    -- From, Subject, To, Date, Message-ID occur once: twice in h=; the absent ones once
    assert.equal("from:from:subject:subject:to:to:cc:date:date:reply-to:message-id:message-id:" ..
      "content-type:content-transfer-encoding:mime-version", hlist(signed))
    -- the list is the caller's: only From, or nothing over-signed at all
    signed = assert(dkim.sign(rfc_msg, { domain = "example.com", selector = "s1", key = k.ed,
      headers = { "subject" }, oversign = { "From" }, oversign_present = false }))
    assert.equal("from:from:subject", hlist(signed))
    signed = assert(dkim.sign(rfc_msg, { domain = "example.com", selector = "s1", key = k.ed,
      headers = { "subject" }, oversign = false, oversign_present = false }))
    assert.equal("from:subject", hlist(signed))
    -- List-* only when present: twice for a List-Id that is there, not at all for the others
    signed = assert(dkim.sign("List-Id: <l.example.com>\r\n" .. rfc_msg, { domain = "example.com",
      selector = "s1", key = k.ed, headers = { "subject" }, oversign = false }))
    assert.equal("from:subject:list-id:list-id", hlist(signed))
  end)

  -- Every field the default list over-signs, present once, for the prepended-copy specs.
  local displayed = {
    { "From", "Alice <alice@example.com>", "Mallory <ceo@example.com>" },
    { "To", "bob@example.org", "victim@example.net" },
    { "Cc", "carol@example.org", "eve@example.net" },
    { "Subject", "Quarterly numbers", "Urgent: wire transfer" },
    { "Date", "Mon, 2 Jan 2023 10:00:00 +0000", "Tue, 3 Jan 2023 11:00:00 +0000" },
    { "Reply-To", "alice@example.com", "mallory@example.net" },
    { "Message-ID", "<1@example.com>", "<2@example.com>" },
    { "Content-Type", "text/plain; charset=utf-8", "text/html; charset=utf-8" },
    { "Content-Transfer-Encoding", "8bit", "base64" },
    { "MIME-Version", "1.0", "2.0" },
    { "List-Id", "<news.example.com>", "<other.example.net>" },
    { "List-Unsubscribe", "<mailto:unsub@example.com>", "<https://evil.example.net/u>" },
    { "List-Unsubscribe-Post", "List-Unsubscribe=One-Click", "List-Unsubscribe=Two-Click" },
    { "List-Post", "<mailto:news@example.com>", "<mailto:evil@example.net>" },
    { "List-Help", "<mailto:help@example.com>", "<https://evil.example.net/h>" },
    { "List-Archive", "<https://example.com/a>", "<https://evil.example.net/a>" },
    { "List-Owner", "<mailto:owner@example.com>", "<mailto:evil@example.net>" },
    { "List-Subscribe", "<mailto:sub@example.com>", "<mailto:evil@example.net>" },
  }
  local function full_message(skip)
    local lines = {}
    for _, f in ipairs(displayed) do
      if not (skip and skip[f[1]]) then lines[#lines + 1] = f[1] .. ": " .. f[2] end
    end
    return table.concat(lines, "\r\n") .. "\r\n\r\nThe numbers are attached.\r\n"
  end
  -- signs raw with opts, then: the message itself, and one copy per field in `names` with a
  -- different value of that field prepended (above the signature, where readers look first).
  local function tampered(k, raw, opts, names)
    local o = { domain = "example.com", selector = "s1", key = k.ed }
    for key, v in pairs(opts) do o[key] = v end
    local signed = assert(dkim.sign(raw, o))
    local raws = { signed }
    for _, n in ipairs(names) do
      for _, f in ipairs(displayed) do
        if f[1] == n then raws[#raws + 1] = f[1] .. ": " .. f[3] .. "\r\n" .. signed end
      end
    end
    return S.parse(raws, k.ed_record)
  end
  local all = {}
  for i, f in ipairs(displayed) do all[i] = f[1] end

  it("a prepended copy of any displayed field breaks the signature, relaxed and simple (dkimpy)", function()
    local k = genkeys()
    for _, canon in ipairs({ "relaxed/relaxed", "simple/simple" }) do
      local got = tampered(k, full_message(), { canonicalization = canon }, all)
      assert.is_true(got[1].verify, canon .. ": the untouched message")
      for i, n in ipairs(all) do
        assert.is_false(got[i + 1].verify, canon .. ": a prepended " .. n .. " still verifies")
      end
    end
  end)

  it("adding a displayed field the message lacks breaks it too; a List-* field it lacks does not", function()
    local k = genkeys()
    local absent = { "Cc", "Reply-To", "List-Id", "List-Unsubscribe" }
    local skip = {}
    for _, n in ipairs(absent) do skip[n] = true end
    local got = tampered(k, full_message(skip), {}, absent)
    assert.is_true(got[1].verify)
    assert.is_false(got[2].verify, "an added Cc still verifies")
    assert.is_false(got[3].verify, "an added Reply-To still verifies")
    -- a mailing list may add these to a message it passes on unchanged
    assert.is_true(got[4].verify, "an added List-Id breaks the signature")
    assert.is_true(got[5].verify, "an added List-Unsubscribe breaks the signature")
  end)

  it("over-signs what the oversign options name, and nothing with false (dkimpy)", function()
    local k = genkeys()
    -- only Subject and X-Tag always, List-Id when present: a prepended To now verifies
    local got = tampered(k, "X-Tag: a\r\n" .. full_message(), { oversign = { "Subject", "x-tag" },
      oversign_present = { "list-id" } }, { "Subject", "List-Id", "To", "From", "List-Owner" })
    assert.is_true(got[1].verify)
    assert.is_false(got[2].verify, "a prepended Subject still verifies")
    assert.is_false(got[3].verify, "a prepended List-Id still verifies")
    assert.is_true(got[4].verify, "To was not to be over-signed")
    -- dkimpy over-signs From itself when verifying (its bug 644046): a second From fails anyway,
    -- which is why the From entry of h= is checked by its text above
    assert.is_false(got[5].verify)
    assert.is_true(got[6].verify, "List-Owner was not to be over-signed")
    local signed = assert(dkim.sign("X-Tag: a\r\n" .. full_message(), { domain = "example.com",
      selector = "s1", key = k.ed, oversign = { "Subject", "x-tag" }, oversign_present = false }))
    got = S.parse({ signed, "X-Tag: b\r\n" .. signed }, k.ed_record)
    assert.is_true(got[1].verify)
    assert.is_false(got[2].verify, "a prepended X-Tag still verifies")
    -- false: every prepended copy verifies, as it did before over-signing
    got = tampered(k, full_message(), { oversign = false, oversign_present = false }, all)
    for i = 1, #all + 1 do
      if all[i - 1] ~= "From" then assert.is_true(got[i].verify, tostring(all[i - 1])) end
    end
  end)

  it("refuses a bad oversign option with kind invalid", function()
    local k = genkeys()
    for _, o in ipairs({ { oversign = "from" }, { oversign = { "bad name" } }, { oversign_present = 1 },
                         { oversign_present = { 42 } } }) do
      o.domain, o.selector, o.key = "example.com", "s1", k.ed
      local s, err = dkim.sign(rfc_msg, o)
      assert.is_nil(s)
      assert.equal("invalid", err.kind)
      assert.matches("oversign", err.text)
    end
  end)

  it("a body hasher used after __gc raises instead of touching freed memory", function()
    for _, mode in ipairs({ "relaxed", "simple" }) do
      local h = core.dkim_body(mode)
      h:update("some body\r\n")
      local gc = getmetatable(h).__gc
      gc(h)
      gc(h)   -- twice is harmless
      assert.has_error(function() h:update("more\r\n") end, "dkim body hash is closed")
      assert.has_error(function() h:digest() end, "dkim body hash is closed")
    end
  end)

  it("dkimpy verifies many varied messages, RSA and Ed25519, relaxed and simple", function()
    local k = genkeys()
    local dir = helper.tmpdir()
    helper.write(dir .. "/data.bin", string.rep("\0\1\2\255binary", 20000))
    local variants = {}
    local texts = { "", "one line", "trailing blank lines\n\n\n\n", "  spaced \t out  \n\n x \n",
                    "Grüße 日本語 😀\n", string.rep("long line ", 200), ".\n..\nFrom me\n" }
    for _, alg in ipairs({ "rsa", "ed" }) do
      local sigs = {}
      for i, canon in ipairs({ "relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed" }) do
        for j, text in ipairs(texts) do
          local opts = { domain = "example.com", selector = "s1", canonicalization = canon,
                         key = (j % 2 == 0) and k[alg .. "_path"] or k[alg] }
          local m = assert(message.new{ from = "Ålice <alice@example.com>", to = "bob@example.org",
            subject = "Test " .. i .. "/" .. j .. " Grüße", text = text,
            html = (j % 3 == 0) and ("<p>" .. text .. "</p>") or nil,
            attachments = (j % 4 == 1) and { { path = dir .. "/data.bin" } } or nil,
            headers = { { "X-Case", canon } }, dkim = opts })
          local raw = m:tostring()
          local parts = {}
          for c in m:source() do parts[#parts + 1] = c end
          assert.equal(raw, table.concat(parts))
          sigs[#sigs + 1] = raw
          -- a raw message with LF line ends, signed as it will go on the wire
          sigs[#sigs + 1] = assert(dkim.sign("From: a@example.com\nSubject: raw " .. j ..
            "\nTo: b@example.org\n\n" .. text, opts))
        end
      end
      variants[alg] = sigs
    end
    for _, alg in ipairs({ "rsa", "ed" }) do
      local raws = variants[alg]
      -- what the verifier receives: the client ends the data with CRLF when the message does not
      local wire = {}
      for i, r in ipairs(raws) do wire[i] = r:find("\n$") and r or r .. "\r\n" end
      local got = S.parse(wire, k[alg .. "_record"])
      for i, r in ipairs(got) do
        assert.is_true(r.verify, alg .. " message " .. i .. "\n" .. raws[i]:sub(1, 600))
        assert.same({}, r.defects, alg .. " message " .. i)
      end
    end
  end)

  it("fails verification after a change to the body or to a signed header", function()
    local k = genkeys()
    local raws = {}
    for _, key in ipairs({ k.rsa, k.ed }) do
      local good = assert(dkim.sign(rfc_msg, { domain = "example.com", selector = "s1", key = key }))
      raws[#raws + 1] = good
      raws[#raws + 1] = good:gsub("hungry", "Hungry")
      raws[#raws + 1] = good:gsub("Subject: Is dinner ready%?", "Subject: Is lunch ready?")
      raws[#raws + 1] = good:gsub("\r\nTo:", "\r\nFrom: evil@example.net\r\nTo:")
    end
    local rsa = S.parse({ raws[1], raws[2], raws[3], raws[4] }, k.rsa_record)
    local ed = S.parse({ raws[5], raws[6], raws[7], raws[8] }, k.ed_record)
    for _, set in ipairs({ rsa, ed }) do
      assert.is_true(set[1].verify)
      assert.is_false(set[2].verify)
      assert.is_false(set[3].verify)
      assert.is_false(set[4].verify)
    end
  end)

  it("refuses bad options and keys with kind invalid", function()
    local k = genkeys()
    local function bad(opts, pat)
      local s, err = dkim.sign(rfc_msg, opts)
      assert.is_nil(s)
      assert.equal("invalid", err.kind)
      assert.matches(pat, err.text)
    end
    bad({ domain = "example.com", selector = "s1", key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----" }, "does not parse")
    bad({ domain = "example.com", selector = "s1", key = "/nonexistent.pem" }, "cannot be read")
    bad({ domain = "example.com", selector = "s1", key = k.ed, algorithm = "rsa-sha256" }, "does not match")
    bad({ domain = "example.com", selector = "s1", key = k.rsa, algorithm = "rsa-sha1" }, "unknown algorithm")
    bad({ domain = "exa mple.com", selector = "s1", key = k.rsa }, "domain")
    bad({ domain = "example.com", selector = "s1\r\n", key = k.rsa }, "selector")
    bad({ domain = "example.com", selector = "s1", key = k.rsa, canonicalization = "loose" }, "canonicalization")
    local s, err = dkim.sign("Subject: x\r\n\r\nbody", { domain = "example.com", selector = "s1", key = k.rsa })
    assert.is_nil(s); assert.matches("no From", err.text)
    local weak = helper.sh("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:512 2>/dev/null")
    bad({ domain = "example.com", selector = "s1", key = weak }, "1024")
  end)
end)
