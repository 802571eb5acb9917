-- Specs for the codec part of smtp.core: base64, quoted-printable, xtext, DKIM canonicalization,
-- SHA-256 and DKIM keys.
local core = require "smtp.core"

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- A deterministic byte string of length n (no randomness in specs).
local function bytes(n, seed)
  local t, x = {}, seed or 7
  for i = 1, n do x = (x * 1103515245 + 12345) % 2147483648; t[i] = string.char(x % 256) end
  return table.concat(t)
end

describe("base64", function()
  it("encodes the RFC 4648 test vectors", function()
    local v = { [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v", foob = "Zm9vYg==",
                fooba = "Zm9vYmE=", foobar = "Zm9vYmFy" }
    for k, e in pairs(v) do
      assert.equal(e, core.b64encode(k))
      assert.equal(k, core.b64decode(e))
    end
  end)

  it("wraps at 76 with CRLF between lines and none after the last", function()
    local s = bytes(57 * 3 + 10)
    local e = core.b64encode(s, 76)
    local lines = {}
    for l in (e .. "\r\n"):gmatch("(.-)\r\n") do lines[#lines + 1] = l end
    assert.equal(4, #lines)
    assert.equal(76, #lines[1]); assert.equal(76, #lines[3]); assert.equal(16, #lines[4])
    assert.is_nil(e:find("\r\n$"))
    assert.equal(s, core.b64decode(e))
    assert.equal(core.b64encode(s), (e:gsub("\r\n", "")))
  end)

  it("streams: blocks of 57*k bytes joined with CRLF equal the whole", function()
    local s = bytes(57 * 40 + 33, 3)
    local parts = {}
    for i = 1, #s, 57 * 8 do parts[#parts + 1] = core.b64encode(s:sub(i, i + 57 * 8 - 1), 76) end
    assert.equal(core.b64encode(s, 76), table.concat(parts, "\r\n"))
  end)

  it("round-trips binary data of every length up to 300", function()
    local s = bytes(300, 11)
    for n = 0, 300 do
      assert.equal(s:sub(1, n), core.b64decode(core.b64encode(s:sub(1, n), 76)))
    end
  end)

  it("rejects characters outside the alphabet and misplaced padding", function()
    for _, bad in ipairs({ "Zm9v!", "Z===", "Zg==Zg==", "=Zm9", "Z", "Zm9vY", "Zg=a" }) do
      local v, err = core.b64decode(bad)
      assert.is_nil(v, bad)
      assert.equal("invalid base64", err)
    end
    assert.equal("foo", core.b64decode(" Zm\r\n9v\t"))
  end)
end)

describe("quoted-printable", function()
  it("encodes '=', controls, 8-bit bytes and trailing whitespace", function()
    assert.equal("a=3Db", core.qpencode("a=b"))
    assert.equal("caf=C3=A9", core.qpencode("café"))
    assert.equal("x=20\r\ny=09", core.qpencode("x \ny\t"))
    assert.equal("a b\r\nc", core.qpencode("a b\r\nc"))
    assert.equal("a=0Db", core.qpencode("a\rb"))
    assert.equal("=2E\r\n=2Eend", core.qpencode(".\n.end"))
  end)

  it("keeps every line within 76 characters and never splits an escape", function()
    local s = string.rep("é", 100) .. "\n" .. string.rep("x", 200) .. " \n" .. bytes(500, 5)
    local e = core.qpencode(s)
    for line in (e .. "\r\n"):gmatch("(.-)\r\n") do
      assert.is_true(#line <= 76, line)
      assert.is_nil(line:match("=%x$"), line)
    end
    assert.equal((s:gsub("\r?\n", "\r\n")), core.qpdecode(e))
  end)

  it("decodes soft breaks, lower-case hex and transport padding", function()
    assert.equal("abcdef", core.qpdecode("abc=\r\ndef"))
    assert.equal("abcdef", core.qpdecode("abc=  \r\ndef"))
    assert.equal("\xc3\xa9", core.qpdecode("=c3=a9"))
    assert.equal("a\r\nb", core.qpdecode("a   \r\nb"))
    assert.equal("=Z1 =", core.qpdecode("=Z1 ==")) -- invalid escapes stay as they are
  end)

  it("round-trips binary data with bare LF made CRLF", function()
    for seed = 1, 20 do
      local s = bytes(200 + seed * 13, seed)
      local norm = s:gsub("\r?\n", "\r\n")
      assert.equal(norm, core.qpdecode(core.qpencode(s)))
    end
  end)
end)

describe("xtext", function()
  it("encodes '+', '=', controls and spaces as +XX", function()
    assert.equal("a+2Bb+3Dc+20d+0D+0A", core.xtext_encode("a+b=c d\r\n"))
    assert.equal("a+b=c d\r\n", core.xtext_decode("a+2Bb+3Dc+20d+0D+0A"))
  end)
  it("rejects lower-case hex, short escapes and raw controls", function()
    for _, bad in ipairs({ "a+2b", "a+2", "a+", "a b", "a\r\n", "a=b" }) do
      local v, err = core.xtext_decode(bad)
      assert.is_nil(v); assert.equal("invalid xtext", err)
    end
  end)
  it("round-trips every byte value", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    assert.equal(all, core.xtext_decode(core.xtext_encode(all)))
  end)
end)

describe("DKIM canonicalization", function()
  -- RFC 6376 3.4.5
  it("matches the RFC 6376 example, relaxed and simple", function()
    assert.equal("a:X\r\n", core.dkim_header("A: X\r\n", "relaxed"))
    assert.equal("b:Y Z\r\n", core.dkim_header("B : Y\t\r\n\tZ  \r\n", "relaxed"))
    assert.equal("B : Y\t\r\n\tZ  \r\n", core.dkim_header("B : Y\t\r\n\tZ  ", "simple"))
    local body = " C \r\nD \t E\r\n\r\n\r\n"
    assert.equal(" C\r\nD E\r\n", core.dkim_canon_body(body, "relaxed"))
    assert.equal(" C \r\nD \t E\r\n", core.dkim_canon_body(body, "simple"))
  end)

  it("handles empty bodies and a missing final CRLF", function()
    assert.equal("", core.dkim_canon_body("", "relaxed"))
    assert.equal("\r\n", core.dkim_canon_body("", "simple"))
    assert.equal("", core.dkim_canon_body("\r\n\r\n  \r\n", "relaxed"))
    assert.equal("\r\n", core.dkim_canon_body("\r\n\r\n", "simple"))
    assert.equal("abc\r\n", core.dkim_canon_body("abc", "simple"))
    assert.equal("abc\r\n", core.dkim_canon_body("abc  ", "relaxed"))
  end)

  it("treats bare LF and bare CR as line ends", function()
    assert.equal("a\r\nb\r\nc\r\n", core.dkim_canon_body("a\nb\rc\n\n", "simple"))
  end)

  it("hashes the same across every chunking", function()
    local body = "Hi.\r\n\r\n  We lost \t the game.\r\n \r\n\r\nJoe.  \r\n\r\n\r\n"
    for _, mode in ipairs({ "simple", "relaxed" }) do
      local want = core.sha256(core.dkim_canon_body(body, mode))
      for step = 1, 7 do
        local h = core.dkim_body(mode)
        for i = 1, #body, step do h:update(body:sub(i, i + step - 1)) end
        assert.equal(hex(want), hex(h:digest()))
      end
    end
  end)

  it("gives the RFC 6376 body hash of the RFC 8463 example, simple and relaxed", function()
    local body = "Hi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n"
    assert.equal("4bLNXImK9drULnmePzZNEBleUanJCX5PIsDIFoH4KTQ=",
      core.b64encode(core.dkim_body("simple"):update(body):digest()))
    assert.equal("2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=",
      core.b64encode(core.dkim_body("relaxed"):update(body):digest()))
  end)
end)

describe("sha256 and keys", function()
  it("hashes the FIPS 180-2 example", function()
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
      hex(core.sha256("abc")))
  end)

  it("refuses text that is not a PEM key", function()
    local k, err = core.dkim_key("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    assert.is_nil(k); assert.matches("does not parse", err)
    assert.is_nil((core.dkim_key("")))
  end)

  it("signs deterministically with the RFC 8032 Ed25519 key", function()
    -- RFC 8032 7.1 TEST 1 secret key as PKCS#8 PEM (the RFC 8463 example key)
    local seed = core.b64decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    local der = "\48\46\2\1\0\48\5\6\3\43\101\112\4\34\4\32" .. seed
    local pem = "-----BEGIN PRIVATE KEY-----\n" .. core.b64encode(der, 64) ..
                "\n-----END PRIVATE KEY-----\n"
    local k = assert(core.dkim_key(pem))
    assert.equal("ed25519", k:type())
    assert.equal("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", k:public())
    local s1, s2 = k:sign("data"), k:sign("data")
    assert.equal(64, #s1); assert.equal(s1, s2)
    k:close()
    assert.has_error(function() k:sign("x") end)
  end)

  it("gives random bytes", function()
    assert.equal(16, #core.random(16))
    assert.not_equal(core.random(16), core.random(16))
  end)
end)

describe("is_7bit and utf8_valid", function()
  it("classifies text", function()
    assert.is_true(core.is_7bit("abc\r\ndef\n"))
    assert.is_false(core.is_7bit("caf\xc3\xa9"))
    assert.is_false(core.is_7bit("a\rb"))
    assert.is_false(core.is_7bit("a\0b"))
    assert.is_true(core.is_7bit(string.rep("x", 998) .. "\r\n"))
    assert.is_false(core.is_7bit(string.rep("x", 999)))
    assert.is_true(core.utf8_valid("caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80"))
    assert.is_false(core.utf8_valid("\xc0\xaf"))
    assert.is_false(core.utf8_valid("\xed\xa0\x80"))
    assert.is_false(core.utf8_valid("\xe4\xb8"))
  end)
end)
