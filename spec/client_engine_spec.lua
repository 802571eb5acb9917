-- The sans-I/O client engine (csrc/client.c) at the byte level: exact bytes out, replies matched
-- to their commands, the STARTTLS input drop, SASL exchanges, and the dot-stuffing filter.
local core = require "smtp.core"

local function b64(s)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, byte = "", x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

-- Feeds `input` to a fresh engine (in `step`-byte pieces) after running `setup`, and returns the
-- replies as "COMMAND code enhanced text" strings.
local function replies(e, input, step)
  local out = {}
  step = step or #input
  for i = 1, #input, step do
    assert(e:feed(input:sub(i, i + step - 1)))
    while true do
      local r, err = e:reply()
      if err then out[#out + 1] = "error: " .. err; return out end
      if not r then break end
      out[#out + 1] = r.command .. " " .. r.code .. " " .. (r.enhanced or "-") .. " " .. r.text
    end
  end
  return out
end

describe("client engine", function()
  it("writes a pipelined transaction in one buffer and matches each reply", function()
    local server = "220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n" ..
      "250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go\r\n"
    local seen = {}
    for _, step in ipairs { #server, 1, 7 } do
      local e = core.client_engine()
      assert.equal("greeting", e:state())
      assert(e:ehlo("client.example"))
      assert(e:mail("a@example.com", "SIZE=42"))
      assert(e:rcpt("b@example.org"))
      assert(e:rcpt("c@example.org", "NOTIFY=NEVER"))
      assert(e:data())
      assert.equal("EHLO client.example\r\nMAIL FROM:<a@example.com> SIZE=42\r\n" ..
        "RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org> NOTIFY=NEVER\r\nDATA\r\n", e:take())
      assert.equal("", e:take())
      seen[#seen + 1] = replies(e, server, step)
      assert.equal("body", e:state())
      assert.equal(0, e:pending())
    end
    assert.same({
      "GREETING 220 - mx ESMTP", "EHLO 250 - mx\nPIPELINING\nSIZE 100", "MAIL 250 2.1.0 ok",
      "RCPT 250 2.1.5 ok", "RCPT 550 5.1.1 no such user", "DATA 354 - go",
    }, seen[1])
    assert.same(seen[1], seen[2])
    assert.same(seen[1], seen[3])
  end)

  it("shrinks only when idle, and works on after it", function()
    local e = core.client_engine()
    e:shrink()   -- the greeting is awaited: nothing is freed under it
    assert(e:ehlo("me"))
    e:shrink()   -- EHLO not written yet: kept
    assert.equal("EHLO me\r\n", e:take())
    assert.same({ "GREETING 220 - hi" }, replies(e, "220 hi\r\n250-mx\r\n250 PIPE"))
    e:shrink()   -- half an EHLO reply held: kept
    assert.same({ "EHLO 250 - mx\nPIPELINING" }, replies(e, "LINING\r\n"))
    e:shrink()   -- idle: the buffers go
    assert.equal("ready", e:state())
    assert(e:mail("a@example.com"))
    assert(e:rcpt("b@example.org"))
    assert.equal("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n", e:take())
    assert.same({ "MAIL 250 2.1.0 ok", "RCPT 250 2.1.5 ok" },
      replies(e, "250 2.1.0 ok\r\n250 2.1.5 ok\r\n", 3))
    e:shrink()
    assert(e:quit())
    assert.equal("QUIT\r\n", e:take())
    assert.same({ "QUIT 221 - bye" }, replies(e, "221 bye\r\n"))
  end)

  it("reports the capabilities of an EHLO reply", function()
    local e = core.client_engine()
    e:ehlo("me")
    e:feed("220 hi\r\n250-mx\r\n250-8bitmime\r\n250-AUTH PLAIN XOAUTH2\r\n250 CHUNKING\r\n")
    assert.equal("GREETING", e:reply().command)
    local r = e:reply()
    assert.same({ ["8BITMIME"] = "", AUTH = "PLAIN XOAUTH2", CHUNKING = "" }, r.extensions)
  end)

  it("sends the body dot-stuffed with the end-of-data in the same buffer, then the next transaction", function()
    local e = core.client_engine()
    e:feed("220 hi\r\n")
    e:reply()
    e:mail("a@x.test"); e:rcpt("b@y.test"); e:data()
    e:take()
    assert.is_nil((e:body("x")))           -- no 354 yet
    e:feed("250 ok\r\n250 ok\r\n354 go\r\n")
    for _ = 1, 3 do e:reply() end
    assert(e:body(".first\nsecond\r"))
    assert(e:body("\n.\r\nbare\rcr."))
    assert(e:body_end())
    assert(e:mail("c@x.test")); assert(e:rcpt("d@y.test")); assert(e:data())
    assert.equal("..first\r\nsecond\r\n..\r\nbare\r\ncr.\r\n.\r\n" ..
      "MAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n", e:take())
    e:feed("250 2.0.0 queued\r\n250 ok\r\n")
    local r = e:reply()
    assert.equal("DATA_END", r.command); assert.equal("2.0.0", r.enhanced); assert.equal("queued", r.text)
    assert.equal("MAIL", e:reply().command)
  end)

  it("refuses CR, LF and NUL in every command value and writes nothing", function()
    local e = core.client_engine()
    for _, bad in ipairs { "a@b\r\nRCPT TO:<x@y>", "a@b\n", "a@b\r", "a\0@b" } do
      assert.same({ nil, "CR, LF or NUL in a command value" }, { e:mail(bad) })
      assert.same({ nil, "CR, LF or NUL in a command value" }, { e:rcpt(bad) })
      assert.same({ nil, "CR, LF or NUL in a command value" }, { e:mail("a@b", "ENVID=" .. bad) })
      assert.same({ nil, "CR, LF or NUL in a command value" }, { e:ehlo(bad) })
      assert.is_nil((e:auth("PLAIN", bad, "p")))
      assert.is_nil((e:auth("XOAUTH2", "u", "tok\1en")))
    end
    assert.equal("", e:take())
    assert.equal(1, e:pending())  -- only the greeting
  end)

  it("drops every byte that came with the STARTTLS 220 and reports how many", function()
    local e = core.client_engine()
    e:ehlo("me"); e:starttls()
    e:take()
    local injected = "250-evil\r\n250 AUTH PLAIN\r\n"
    e:feed("220 hi\r\n250-mx\r\n250 STARTTLS\r\n220 2.0.0 go ahead\r\n" .. injected)
    assert.equal("GREETING", e:reply().command)
    assert.equal("EHLO", e:reply().command)
    local r = e:reply()
    assert.equal("STARTTLS", r.command); assert.equal(220, r.code)
    assert.equal("tls", e:state())
    assert.is_nil((e:reply()))              -- the injected lines are never parsed
    assert.is_nil((e:ehlo("me")))           -- nothing is queued before the upgrade
    assert.equal(#injected, e:upgrade())
    assert.equal("ready", e:state())
    e:ehlo("me")
    assert.equal("EHLO me\r\n", e:take())
    e:feed("250-mx\r\n250 SIZE 5\r\n")
    assert.same({ SIZE = "5" }, e:reply().extensions)
  end)

  it("counts a partial line held at the upgrade as dropped", function()
    local e = core.client_engine()
    e:starttls()
    e:feed("220 hi\r\n220 go\r\n250-par")
    e:reply(); e:reply()
    assert.equal(7, e:upgrade())
    assert.equal(0, e:upgrade())
  end)

  it("rejects replies nobody asked for and malformed ones, and stays failed", function()
    local e = core.client_engine()
    assert.same({ "GREETING 220 - hi", "error: a reply that no command asked for" },
      replies(e, "220 hi\r\n250 extra\r\n"))
    assert.equal("failed", e:state())
    for input, why in pairs {
      ["22X OK\r\n"] = "malformed reply code",
      ["220OK\r\n"] = "malformed reply line: no space or '-' after the code",
      ["220-a\r\n221 b\r\n"] = "multi-line reply whose codes disagree",
    } do
      for _, step in ipairs { 1, 100 } do
        assert.same({ "error: " .. why }, replies(core.client_engine(), input, step))
      end
    end
  end)

  it("stops holding input past its cap", function()
    local e = core.client_engine()
    local ok, err
    for _ = 1, 40 do
      ok, err = e:feed(("250-" .. ("x"):rep(60) .. "\r\n"):rep(200))
      if not ok then break end
    end
    assert.is_nil(ok)
    assert.equal("too many unanswered bytes from the server", err)
  end)

  it("marks the session closed on 421 and on the QUIT reply", function()
    local e = core.client_engine()
    e:mail("a@b")
    assert.same({ "GREETING 220 - hi", "MAIL 421 4.3.2 shutting down" },
      replies(e, "220 hi\r\n421 4.3.2 shutting down\r\n"))
    assert.equal("closed", e:state())
    assert.is_nil((e:rset()))
    e = core.client_engine()
    e:quit()
    replies(e, "220 hi\r\n221 bye\r\n")
    assert.equal("closed", e:state())
  end)

  it("sends BDAT chunks verbatim", function()
    local e = core.client_engine()
    e:mail("a@b"); e:rcpt("c@d"); e:bdat("ab\r\n.\r\n", false); e:bdat("", true)
    assert.equal("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 7\r\nab\r\n.\r\nBDAT 0 LAST\r\n", e:take())
    assert.same({ "GREETING 220 - hi", "MAIL 250 - ok", "RCPT 250 - ok", "BDAT 250 - 7", "BDAT 250 - done" },
      replies(e, "220 hi\r\n250 ok\r\n250 ok\r\n250 7\r\n250 done\r\n", 3))
  end)

  describe("AUTH", function()
    local function ready()
      local e = core.client_engine()
      e:feed("220 hi\r\n"); e:reply()
      return e
    end

    it("PLAIN sends one initial response", function()
      local e = ready()
      assert(e:auth("PLAIN", "user", "pässword"))
      assert.equal("AUTH PLAIN " .. b64("\0user\0pässword") .. "\r\n", e:take())
      e = ready()
      e:auth("PLAIN", "user", "pw", "admin")
      assert.equal("AUTH PLAIN " .. b64("admin\0user\0pw") .. "\r\n", e:take())
      e:feed("235 2.7.0 ok\r\n")
      local r = e:reply()
      assert.equal("AUTH", r.command); assert.equal(235, r.code)
    end)

    it("LOGIN answers the two challenges, then cancels a third", function()
      local e = ready()
      e:auth("LOGIN", "user", "secret")
      assert.equal("AUTH LOGIN\r\n", e:take())
      e:feed("334 VXNlcm5hbWU6\r\n")
      assert.is_nil((e:reply()))
      assert.equal(b64("user") .. "\r\n", e:take())
      e:feed("334 UGFzc3dvcmQ6\r\n")
      assert.is_nil((e:reply()))
      assert.equal(b64("secret") .. "\r\n", e:take())
      e:feed("334 more?\r\n")
      assert.is_nil((e:reply()))
      assert.equal("*\r\n", e:take())
      e:feed("501 cancelled\r\n")
      assert.equal(501, e:reply().code)
    end)

    it("CRAM-MD5 answers with the RFC 2195 digest", function()
      local e = ready()
      e:auth("CRAM-MD5", "tim", "tanstaaftanstaaf")
      assert.equal("AUTH CRAM-MD5\r\n", e:take())
      e:feed("334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
      assert.is_nil((e:reply()))
      assert.equal("dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n", e:take())
    end)

    it("XOAUTH2 and OAUTHBEARER send the token and answer an error challenge", function()
      local e = ready()
      e:auth("XOAUTH2", "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
      assert.equal("AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==\r\n",
        e:take())
      e:feed("334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")
      e:reply()
      assert.equal("\r\n", e:take())
      e = ready()
      e:auth("OAUTHBEARER", "a,b=c@example.com", "tok")
      assert.equal("AUTH OAUTHBEARER " .. b64("n,a=a=2Cb=3Dc@example.com,\1auth=Bearer tok\1\1") .. "\r\n", e:take())
      e:feed("334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")
      e:reply()
      assert.equal("AQ==\r\n", e:take())
    end)
  end)
end)

describe("client engine mark and rollback", function()
  local function ready()
    local e = core.client_engine()
    e:feed("220 hi\r\n"); e:reply()
    return e
  end

  it("e:mail returns the mark before MAIL, the one e:mark() gives", function()
    local e = ready()
    assert(e:ehlo("me"))
    local m = e:mark()
    local ok, m2 = e:mail("a@x.test")
    assert.is_true(ok)
    assert.equal(m, m2)
    assert(e:rcpt("b@y.test"))
    assert.same({ true }, { e:rollback(m2) })
    assert.equal("EHLO me\r\n", e:take())
    assert.same({ nil, "CR, LF or NUL in a command value" }, { e:mail("a@x.test\r\n") })
  end)

  it("takes back a transaction's queued MAIL and RCPTs when a later command cannot be queued", function()
    local e = ready()
    assert(e:ehlo("me"))
    local m = e:mark()
    assert.equal("number", type(m))
    assert(e:mail("a@x.test", "SIZE=10")); assert(e:rcpt("b@y.test"))
    assert.equal(3, e:pending())
    assert.same({ nil, "CR, LF or NUL in a command value" }, { e:rcpt("c@y.test\r\nRSET") })
    assert.same({ true }, { e:rollback(m) })
    assert.equal(1, e:pending())
    assert.equal("EHLO me\r\n", e:take())
    -- the next transaction goes out alone, and replies still match their commands
    assert(e:mail("d@x.test"))
    assert.equal("MAIL FROM:<d@x.test>\r\n", e:take())
    e:feed("250 mx\r\n250 2.1.0 ok\r\n")
    assert.equal("EHLO", e:reply().command)
    assert.equal("MAIL", e:reply().command)
    assert.is_nil((e:reply()))
    assert.equal(0, e:pending())
  end)

  it("keeps a mark valid while earlier bytes are taken", function()
    local e = ready()
    assert(e:ehlo("me"))
    local m = e:mark()
    assert.equal("EHLO me\r\n", e:take())
    assert(e:mail("a@x.test")); assert(e:rcpt("b@y.test"))
    assert(e:rollback(m))
    assert.equal("", e:take())
    assert.equal(1, e:pending())
  end)

  it("refuses once a byte after the mark was taken, and changes nothing", function()
    local e = ready()
    local m = e:mark()
    assert(e:mail("a@x.test")); assert(e:rcpt("b@y.test"))
    assert.equal("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n", e:take())
    assert.same({ nil, "already written" }, { e:rollback(m) })
    assert.equal(2, e:pending())
    assert(e:data())
    local m2 = e:mark()
    assert(e:rset())
    assert.equal(4, e:pending())
    assert.equal("DATA\r\nRSET\r\n", e:take())
    assert.same({ nil, "already written" }, { e:rollback(m2) })
    assert.equal(4, e:pending())
    -- still so once everything after the mark was answered too
    e:feed("250 ok\r\n250 ok\r\n503 no\r\n250 ok\r\n")
    for _ = 1, 4 do assert.is_table(e:reply()) end
    assert.same({ nil, "already written" }, { e:rollback(m) })
    assert.equal(0, e:pending())
  end)

  it("refuses when a command after the mark was answered, or a body follows it", function()
    local e = ready()
    local m = e:mark()
    assert(e:mail("a@x.test"))
    e:feed("250 ok\r\n")                     -- an answer before the bytes were even taken
    assert.equal("MAIL", e:reply().command)
    assert.same({ nil, "already answered" }, { e:rollback(m) })
    e = ready()
    assert(e:mail("a@x.test")); assert(e:rcpt("b@y.test")); assert(e:data())
    e:take()
    e:feed("250 ok\r\n250 ok\r\n354 go\r\n")
    for _ = 1, 3 do e:reply() end
    m = e:mark()
    assert(e:body("text\r\n"))
    assert.same({ nil, "a message body or SASL answer follows the mark" }, { e:rollback(m) })
    assert(e:body_end())
    assert.equal("text\r\n.\r\n", e:take())
  end)

  it("refuses what is not one of its marks", function()
    local e = ready()
    assert(e:mail("a@x.test"))
    local m = e:mark()
    assert.same({ nil, "not a mark of this engine" }, { e:rollback(m + 1) })
    assert.same({ nil, "not a mark of this engine" }, { e:rollback(m - 1) })
    assert.same({ nil, "not a mark of this engine" }, { e:rollback(-1) })
    assert.has_error(function() e:rollback("x") end)
    assert.equal("MAIL FROM:<a@x.test>\r\n", e:take())
  end)

  it("drops a queued AUTH with its credentials", function()
    local e = ready()
    local m = e:mark()
    assert(e:auth("LOGIN", "user", "secret"))
    assert(e:rollback(m))
    assert.equal("", e:take())
    assert.equal(0, e:pending())
    -- a 334 now finds no exchange to answer
    e:feed("334 VXNlcm5hbWU6\r\n")
    assert.same({ nil, "a reply that no command asked for" }, { e:reply() })
  end)
end)

describe("core.stuffer", function()
  local function run(chunks, dot)
    local s = core.stuffer(dot)
    local out = {}
    for _, c in ipairs(chunks) do out[#out + 1] = s:feed(c) end
    out[#out + 1] = s:finish()
    return table.concat(out)
  end

  it("normalizes bare CR and LF to CRLF and doubles leading dots", function()
    assert.equal("a\r\nb\r\nc\r\n\r\n..d\r\n.\r\n", run { "a\rb\nc\r\n\n.d" })
    assert.equal(".\r\n", run {})
    assert.equal("x\r\n.\r\n", run { "x\r\n" })
    assert.equal("..\r\n.\r\n", run { "." })
  end)

  it("carries its state across chunk boundaries", function()
    local input = "line\r\n.dot\r\r\n\n..two\rend."
    local whole = run { input }
    for step = 1, 5 do
      local chunks = {}
      for i = 1, #input, step do chunks[#chunks + 1] = input:sub(i, i + step - 1) end
      assert.equal(whole, run(chunks))
    end
    assert.equal("line\r\n..dot\r\n\r\n\r\n...two\r\nend.\r\n.\r\n", whole)
  end)

  it("cannot be made to end the data early: no body produces CRLF.CRLF before the end", function()
    for _, body in ipairs { "a\n.\nb", "a\r.\rb", "a\r\n.\r\nb", "a\n.\r\nb", "\0.\r\n", ".\n" } do
      local out = run { body }
      assert.equal(#out - 4, out:find("\r\n.\r\n", 1, true))
    end
  end)

  it("without dots only normalizes line ends (for BDAT)", function()
    assert.equal(".a\r\nb\r\n", run({ ".a\r", "\nb\r" }, false))
  end)

  it("holds a BDAT chunk in C (add, add_end) that e:bdat_from queues and empties", function()
    local st, e = core.stuffer(false), core.client_engine()
    assert.equal(2, st:add(".a\r"))      -- the CR waits to see whether an LF follows
    assert.equal(5, st:add("\nb"))
    e:mail("a@b"); e:rcpt("c@d")
    assert.is_true(e:bdat_from(st, false))
    assert.equal(0, st:add(""))
    assert.equal(1, st:add("c\r"))
    assert.equal(3, st:add_end())         -- a bare CR at the end becomes CRLF
    assert.is_true(e:bdat_from(st, true))
    assert.equal(0, st:add_end())
    assert.equal("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\n.a\r\nbBDAT 3 LAST\r\nc\r\n", e:take())
  end)
end)
