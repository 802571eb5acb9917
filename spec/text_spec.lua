-- One meaning for base64, xtext and UTF-8 in the whole C core (csrc/text.c): the server engine
-- (AUTH, ENVID, EHLO, SMTPUTF8 addresses) and the codec functions (core.b64decode, xtext_decode,
-- utf8_valid, has_8bit) give the same answer for the same input, and differ only where a mode says
-- so (MIME base64 skips line breaks and takes a missing final padding; AUTH does not).
local core = require "smtp.core"

-- Runs one session on a fresh server engine; accepts every decision and returns the replies
-- (one string) and the events as { kind, a, b, c } tables.
local function session(input, opts)
  local e = core.server_engine(opts or
    { auth = true, auth_plaintext = true, hook_mail = true, hook_rcpt = true })
  local evs, out = {}, {}
  local function pump()
    while true do
      local kind, a, b, c = e:next()
      if not kind then break end
      evs[#evs + 1] = { kind, a, b, c }
      if kind == "mail" or kind == "rcpt" or kind == "auth" then e:decide(true) end
    end
    out[#out + 1] = e:output()
  end
  pump()
  local i = 1
  while i <= #input and not e:closed() do
    i = i + e:feed(input, i)
    pump()
  end
  return table.concat(out), evs
end

local function find(evs, kind)
  for _, ev in ipairs(evs) do if ev[1] == kind then return ev end end
end

-- What AUTH PLAIN makes of a response: the user and secret, or nil and the reply.
local function server_plain(b64)
  local out, evs = session("EHLO c\r\nAUTH PLAIN " .. b64 .. "\r\n")
  local ev = find(evs, "auth")
  if ev then return ev[3] .. "\0" .. ev[4] end
  return nil, out:match("\r\n(5%d%d [^\r]*)\r\n$")
end

describe("base64: AUTH (strict) and core.b64decode (MIME) agree", function()
  local plain = "\0user\0secrets"   -- 13 bytes: the encoding ends in "=="
  local enc = core.b64encode(plain)

  it("decode the strict form to the same bytes", function()
    for _, s in ipairs { plain, "\0u\0p", "\0us\0pw", "\0usr\0pwd!", "az\0\xc3\xa9\0\xff\xfe" } do
      local b = core.b64encode(s)
      assert.equal(s, core.b64decode(b))
      local got = server_plain(b)
      -- the event gives user and secret: the authzid (before the first NUL) is not part of it
      assert.equal(s:match("^[^%z]*%z(.*)$"), got)
    end
  end)

  it("refuse the same malformed input", function()
    local bad = {
      enc:sub(1, -3) .. "!=",                -- outside the alphabet
      "AH=1c2Vy",                            -- padding inside a quad
      enc .. enc,                            -- data after the padding
      "A===",                                -- padding completing a quad of one
      enc:sub(1, 5),                         -- a single dangling character
    }
    for _, b in ipairs(bad) do
      assert.is_nil(core.b64decode(b), b)
      local got, reply = server_plain(b)
      assert.is_nil(got, b)
      assert.equal("501 5.5.2 Invalid base64 data", reply, b)
    end
  end)

  it("differ only where MIME allows more: line breaks, spaces, a missing final padding", function()
    local unpadded = enc:gsub("=+$", "")
    assert.not_equal(enc, unpadded)
    local spaced = { enc:sub(1, 4) .. " " .. enc:sub(5), enc:sub(1, 8) .. "\t" .. enc:sub(9) }
    for _, b in ipairs { unpadded, spaced[1], spaced[2] } do
      assert.equal(plain, core.b64decode(b))
      local got, reply = server_plain(b)
      assert.is_nil(got, b)
      assert.equal("501 5.5.2 Invalid base64 data", reply)
    end
  end)
end)

describe("xtext: ENVID and ORCPT in the server and core.xtext_decode agree", function()
  local function server_envid(x)
    local out, evs = session("EHLO c\r\nMAIL FROM:<a@x.test> ENVID=" .. x .. "\r\n")
    local ev = find(evs, "mail")
    if ev then return ev[3].ENVID end
    return nil, out:match("\r\n(5%d%d [^\r]*)\r\n$")
  end
  local function server_orcpt(x)
    local _, evs = session("EHLO c\r\nMAIL FROM:<a@x.test>\r\n" ..
      "RCPT TO:<b@y.test> ORCPT=rfc822;" .. x .. "\r\n")
    local ev = find(evs, "rcpt")
    return ev and ev[3].ORCPT
  end

  it("decode upper-case escapes the same way", function()
    for _, x in ipairs { "abc", "a+2Bb+3Dc", "+2B+2B", "caf+C3+A9", "x+7E" } do
      local want = core.xtext_decode(x)
      assert.is_string(want)
      assert.equal(want, server_envid(x))
      assert.equal("rfc822;" .. want, server_orcpt(x))
    end
  end)

  it("refuse lower-case hex and short escapes alike (RFC 3461 hexchar is upper-case)", function()
    for _, x in ipairs { "a+2b", "a+2", "a+", "+e9", "+Zz" } do
      assert.is_nil(core.xtext_decode(x), x)
      local v, reply = server_envid(x)
      assert.is_nil(v, x)
      assert.equal("501 5.5.4 Invalid parameter", reply)
      assert.is_nil(server_orcpt(x))
    end
  end)

  it("the server alone refuses values that decode to control characters", function()
    assert.equal("a\rb", core.xtext_decode("a+0Db"))
    assert.is_nil(server_envid("a+0Db"))
    assert.is_nil(server_envid("a+00"))
    assert.is_nil(server_envid("a+7F"))
  end)
end)

describe("UTF-8 and 8-bit: the server and core.utf8_valid / core.has_8bit agree", function()
  local cases = {
    { "caf\xc3\xa9", true }, { "\xf0\x9f\x98\x80", true }, { "\xe2\x82\xac", true },
    { "\xc0\xaf", false },          -- overlong '/'
    { "\xe0\x80\xaf", false },      -- overlong, three bytes
    { "\xed\xa0\x80", false },      -- a surrogate
    { "\xf4\x90\x80\x80", false },  -- past U+10FFFF
    { "\xe2\x82", false },          -- cut short
    { "\x80", false }, { "\xff", false }, { "\xf8\x88\x80\x80\x80", false },
  }

  it("in SMTPUTF8 addresses", function()
    for _, c in ipairs(cases) do
      local local_part = "u" .. c[1]
      assert.equal(c[2], core.utf8_valid(local_part))
      assert.is_true(core.has_8bit(local_part))
      local out, evs = session("EHLO c\r\nMAIL FROM:<" .. local_part .. "@x.test> SMTPUTF8\r\n")
      if c[2] then
        assert.is_table(find(evs, "mail"))
      else
        assert.is_nil(find(evs, "mail"))
        assert.matches("553 5.6.7 Invalid UTF%-8 in address\r\n$", out)
      end
      -- without SMTPUTF8 any 8-bit address is refused, valid or not
      out = session("EHLO c\r\nMAIL FROM:<" .. local_part .. "@x.test>\r\n")
      assert.matches("553 5.6.7 Non%-ASCII address needs SMTPUTF8\r\n$", out)
    end
    assert.is_false(core.has_8bit("plain@x.test"))
  end)

  it("in the EHLO name", function()
    for _, c in ipairs(cases) do
      local out = session("EHLO h" .. c[1] .. "\r\n")
      if c[2] then
        assert.matches("^220 [^\r]*\r\n250%-", out)
      else
        assert.matches("501 5.5.4 Invalid domain name\r\n$", out)
      end
    end
  end)
end)
