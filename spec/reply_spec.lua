-- Reply parsing (csrc/reply.c): codes, continuation lines, enhanced status codes, EHLO
-- capabilities, and the caps that turn malformed or oversized replies into protocol errors.
local core = require "smtp.core"

describe("core.parse_reply", function()
  it("parses a one-line reply with an enhanced status code", function()
    local r, n = core.parse_reply("250 2.1.0 Sender ok\r\nNEXT")
    assert.equal(250, r.code)
    assert.equal("2.1.0", r.enhanced)
    assert.equal("Sender ok", r.text)
    assert.same({ "2.1.0 Sender ok" }, r.lines)
    assert.equal(#"250 2.1.0 Sender ok\r\n", n)
  end)

  it("takes a bare code and a code with empty text", function()
    local r = core.parse_reply("250\r\n")
    assert.equal(250, r.code); assert.equal("", r.text); assert.is_nil(r.enhanced)
    r = core.parse_reply("354 \r\n")
    assert.equal(354, r.code); assert.equal("", r.text)
  end)

  it("joins multi-line replies and strips repeated enhanced codes", function()
    local r = core.parse_reply("550-5.1.1 no such\r\n550 5.1.1 user here\r\n")
    assert.equal(550, r.code)
    assert.equal("5.1.1", r.enhanced)
    assert.equal("no such\nuser here", r.text)
  end)

  it("ignores an enhanced code whose class differs from the reply's", function()
    local r = core.parse_reply("250 5.0.0 odd\r\n")
    assert.is_nil(r.enhanced)
    assert.equal("5.0.0 odd", r.text)
    r = core.parse_reply("250 2.0.0x\r\n")
    assert.is_nil(r.enhanced)
  end)

  it("says nothing yet for an incomplete reply", function()
    assert.is_nil((core.parse_reply("250-first\r\n250 sec")))
    assert.is_nil(select(2, core.parse_reply("250-first\r\n250 sec")))
  end)

  it("rejects malformed lines as protocol errors", function()
    local cases = {
      ["22X OK\r\n"] = "malformed reply code",
      ["220OK\r\n"] = "malformed reply line: no space or '-' after the code",
      ["2\r\n"] = "malformed reply code",
      ["620 x\r\n"] = "malformed reply code",
      ["250-a\r\n251 b\r\n"] = "multi-line reply whose codes disagree",
    }
    for input, why in pairs(cases) do
      local r, err = core.parse_reply(input)
      assert.is_nil(r)
      assert.equal(why, err)
    end
  end)

  it("caps one line at 4096 bytes and a reply at 64 KB", function()
    assert.equal(250, core.parse_reply("250 " .. ("x"):rep(4092) .. "\r\n").code)
    local _, err = core.parse_reply("250 " .. ("x"):rep(4093) .. "\r\n")
    assert.equal("reply line over 4096 bytes", err)
    -- an endless line fails before its end arrives
    _, err = core.parse_reply("250 " .. ("x"):rep(10000))
    assert.equal("reply line over 4096 bytes", err)
    local line = "250-" .. ("y"):rep(96) .. "\r\n"
    _, err = core.parse_reply(line:rep(1 + math.floor(65536 / #line)) .. "250 end\r\n")
    assert.equal("reply over 65536 bytes", err)
    _, err = core.parse_reply(("250-" .. ("z"):rep(1000) .. "\r\n"):rep(1024))
    assert.equal("reply over 65536 bytes", err)
  end)

  it("parses EHLO capabilities with uppercased keywords", function()
    local r = core.parse_reply(table.concat({
      "250-mx.example.test greets you",
      "250-pipelining",
      "250-SIZE 10240000",
      "250-8BITMIME",
      "250-auth PLAIN LOGIN  CRAM-MD5",
      "250-bad_keyword x",
      "250 SMTPUTF8",
    }, "\r\n") .. "\r\n", true)
    assert.same({
      PIPELINING = "", SIZE = "10240000", ["8BITMIME"] = "", AUTH = "PLAIN LOGIN  CRAM-MD5",
      SMTPUTF8 = "",
    }, r.extensions)
  end)
end)
