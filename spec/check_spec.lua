-- smtp.check: the one set of input checks; the envelope (smtp.send) and the composer
-- (smtp.message) accept and refuse the same addresses.
local check = require "smtp.check"
local message = require "smtp.message"
local smtp = require "smtp"

local GOOD = {
  "bob@example.org", "b.o.b+tag@example.org", "o'hara@example.org", '"john doe"@example.org',
  '"a\\"b"@example.org', "user@[192.0.2.1]", "user@[IPv6:2001:db8::1]", "grüße@bücher.example",
  "x@localhost", ("l"):rep(64) .. "@example.org",
}
local BAD = {
  "", "bob", "@example.org", "bob@", "bob@@example.org", "bo b@example.org", "bob@exa mple.org",
  "bob@example..org", "bob@example.org.", ".bob@example.org", "bob.@example.org", "b..ob@example.org",
  "bob@example.org\r\nRCPT TO:<x@y>", "bob\0@example.org", "bob\t@example.org", "<bob@example.org>",
  ("l"):rep(65) .. "@example.org", "a@" .. ("d"):rep(64) .. "." .. ("d"):rep(64) .. "." .. ("d"):rep(64) .. "." .. ("d"):rep(64),
  '"unterminated@example.org', "\255\254@example.org",
}

describe("smtp.check", function()
  it("address: accepts RFC 5321 mailboxes, UTF-8 ones flagged for SMTPUTF8", function()
    for _, a in ipairs(GOOD) do
      local ok, u8 = check.address(a, "to")
      assert.is_true(ok, a .. ": " .. tostring(u8))
      assert.equal(a:find("[\128-\255]") ~= nil, u8, a)
    end
  end)

  it("address: refuses the rest with kind invalid and the field named", function()
    for _, a in ipairs(BAD) do
      local ok, err = check.address(a, "to")
      assert.is_nil(ok, ("%q"):format(a))
      assert.equal("invalid", err.kind)
      assert.matches("^to: ", err.text)
    end
    assert.is_true((check.address("", "from", true)))   -- the null sender, where allowed
  end)

  it("the envelope and the composer agree on every address", function()
    for _, list in ipairs { GOOD, BAD } do
      for _, a in ipairs(list) do
        if a ~= "" then
          local env = smtp.check_address(a, "to") == true
          local m = message.new { from = "a@example.com", to = { { address = a } }, subject = "s", text = "t" }
          assert.equal(env, m ~= nil, ("%q: envelope %s, composer %s"):format(a, tostring(env), tostring(m ~= nil)))
        end
      end
    end
  end)

  it("has_ctl is any C0 control or DEL; breaks_line only CR, LF, NUL", function()
    for _, c in ipairs { "\0", "\1", "\t", "\n", "\r", "\27", "\127" } do assert.is_true(check.has_ctl("a" .. c)) end
    assert.is_false(check.has_ctl("plain text ~ \128\255"))
    assert.is_true(check.breaks_line("a\r")); assert.is_true(check.breaks_line("a\n")); assert.is_true(check.breaks_line("a\0"))
    assert.is_false(check.breaks_line("a\tb"))
  end)

  it("hostname and is_loopback", function()
    assert.is_true(check.hostname("mail.example.org"))
    assert.is_true(check.hostname("[192.0.2.1]"))
    for _, h in ipairs { "", "a b", "a\r\nb", "<x>", ("h"):rep(256) } do
      local ok, err = check.hostname(h, "helo")
      assert.is_nil(ok, h)
      assert.equal("invalid", err.kind)
    end
    for _, h in ipairs { "localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "::1", "[::1]" } do
      assert.is_true(check.is_loopback(h), h)
    end
    for _, h in ipairs { "example.org", "128.0.0.1", "::2", "localhost.example.org", "10.0.0.1" } do
      assert.is_false(check.is_loopback(h), h)
    end
  end)

  it("xtext is the C codec's (RFC 3461: '+', '=' and anything outside 33..126 as +XX)", function()
    assert.equal("a+2Bb+3Dc+20d+0D+0A+C3+BC", check.xtext("a+b=c d\r\nü"))
    assert.equal(require("smtp.core").xtext_encode, check.xtext)
  end)
end)
