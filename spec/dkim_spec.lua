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

  it("signs From, over-signs it, and leaves out t= when asked", function()
    local k = genkeys()
    local signed = assert(dkim.sign(rfc_msg, { domain = "example.com", selector = "s1", key = k.ed,
      timestamp = false, headers = { "subject" } }))
    local head = signed:match("^(DKIM%-Signature:.-)\r\n%S"):gsub("\r\n", "")
    assert.matches("h=from:subject:from;", head, 1, true)
    assert.is_nil(head:find("t=", 1, true))
    assert.matches("a=ed25519-sha256", head, 1, true)
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
