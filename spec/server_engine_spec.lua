-- The sans-I/O server engine (core.server_engine) at the byte level: replies, sequencing, DATA and
-- BDAT decoding, AUTH, STARTTLS, limits, and the same results whatever the input chunking.
local core = require "smtp.core"

-- Feeds `input` in pieces of `step` bytes (nil: all at once), answers every decision with
-- `decide(kind, ...)` (default: accept), and returns the replies, the messages and the events.
local function run(input, opts, step, decide)
  opts = opts or {}
  local e = core.server_engine(opts)
  local out, msgs, evs, all = {}, {}, {}, {}
  local cur
  local function pump()
    while true do
      local kind, a, b, c = e:next()
      if not kind then break end
      if kind ~= "data" then evs[#evs + 1] = kind end
      if kind == "begin" then
        cur = { env = e:envelope(), parts = {} }
      elseif kind == "data" then
        cur.parts[#cur.parts + 1] = a
      elseif kind == "end" then
        cur.data = table.concat(cur.parts)
        cur.parts = nil
        if a then
          cur.refused = a
        else
          local ok, code, enh, text = true, nil, nil, nil
          if decide then ok, code, enh, text = decide("end", cur) end
          e:decide(ok, code, enh, text)
          if ok then msgs[#msgs + 1] = cur end
        end
        all[#all + 1] = cur
        cur = nil
      elseif kind == "mail" or kind == "rcpt" or kind == "auth" then
        local ok, code, enh, text = true, nil, nil, nil
        if decide then ok, code, enh, text = decide(kind, a, b, c) end
        e:decide(ok, code, enh, text)
      end
    end
    local o = e:output()
    if o then out[#out + 1] = o end
  end
  pump()
  local i, n = 1, #input
  step = step or n
  while i <= n and not e:closed() do
    local piece = input:sub(i, math.min(n, i + step - 1))
    local j = 1
    while j <= #piece do
      local took = e:feed(piece, j)
      j = j + took
      pump()
      if e:closed() then break end
      assert(took > 0 or e:space() > 0, "engine stalled")
    end
    i = i + step
  end
  pump()
  return { out = table.concat(out), msgs = msgs, all = all, events = evs, engine = e }
end

-- The reply codes in order (first line of multi-line replies only).
local function codes(out)
  local t = {}
  for line in out:gmatch("([^\r\n]*)\r\n") do
    local code, sep = line:match("^(%d%d%d)([ -])")
    if sep == " " then t[#t + 1] = tonumber(code) end
  end
  return t
end

local HELLO = "EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"

describe("server engine", function()
  it("greets, answers EHLO with the extensions, and closes on QUIT", function()
    local r = run("EHLO client.test\r\nQUIT\r\n", { hostname = "mx.test", max_message_size = 1000 })
    assert.equal("220 mx.test ESMTP lua-smtp\r\n" ..
      "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n" ..
      "250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n221 2.0.0 Bye\r\n", r.out)
    assert.same({ "close" }, r.events)
  end)

  it("offers STARTTLS and AUTH only when configured", function()
    local r = run("EHLO c\r\n", { tls = true, auth = true })
    assert.matches("250%-STARTTLS\r\n", r.out)
    assert.not_matches("AUTH", r.out) -- AUTH waits for TLS
    r = run("EHLO c\r\n", { tls = true, auth = true, auth_plaintext = true })
    assert.matches("250%-AUTH PLAIN LOGIN\r\n", r.out)
    r = run("EHLO c\r\n", { tls = false, auth = true, tls_active = true })
    assert.matches("250%-AUTH PLAIN LOGIN\r\n", r.out)
    assert.not_matches("STARTTLS", r.out)
  end)

  it("takes a pipelined transaction and answers in order in one output", function()
    local r = run(HELLO .. "Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert.same({ 220, 250, 250, 250, 354, 250, 221 }, codes(r.out))
    assert.matches("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n" ..
      "250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n$", r.out)
    assert.equal(1, #r.msgs)
    assert.equal("Subject: hi\r\n\r\nbody\r\n", r.msgs[1].data)
    assert.same({ from = "a@x.test", to = { "b@y.test" }, params = {}, rcpt_params = { {} } },
      r.msgs[1].env)
  end)

  it("e:recv reads a socket straight into its input; e:next(true) gives data as true, not strings", function()
    local l = assert(core.listen("127.0.0.1", 0, 1))
    local c = assert(core.connect_start("127.0.0.1", l:port()))
    local s
    for _ = 1, 200 do
      s = l:accept()
      if s then break end
      core.wait(l:fd(), "r", 0.05)
    end
    assert.truthy(s)
    local e = core.server_engine {}
    assert.equal("220 localhost ESMTP lua-smtp\r\n", e:output())
    local nothing, want = e:recv(s)
    assert.is_nil(nothing)
    assert.equal("wantread", want)
    local input = "HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
    for _ = 1, 100 do
      if c:connect_finish() then break end
      core.wait(c:fd(), "w", 0.1)
    end
    assert.equal(#input, c:write(input))
    assert(core.wait(s:fd(), "r", 5))
    assert.equal(3, e:recv(s, 3))     -- at most max bytes
    assert.equal(#input - 3, e:recv(s))
    local kinds = {}
    while true do
      local kind = e:next()
      if not kind then break end
      kinds[#kinds + 1] = kind
    end
    assert.same({ "begin" }, kinds)
    local body = "line\r\n..dot\r\n.\r\n"
    assert.equal(#body, c:write(body))
    assert(core.wait(s:fd(), "r", 5))
    assert.equal(#body, e:recv(s))
    local kind, a = e:next(true)
    assert.equal("data", kind)
    assert.equal(true, a)
    assert.equal("end", e:next(true))
    e:decide(true)
    assert.matches("250 2%.0%.0 Ok: queued\r\n$", e:output())
    c:close()
    assert(core.wait(s:fd(), "r", 5))
    local gone, why = e:recv(s)
    assert.is_nil(gone)
    assert.equal("closed", why)
    assert.has_error(function() e:recv(e) end)
    assert.has_error(function() e.recv(s, s) end)
    s:close(); l:close()
  end)

  it("unstuffs leading dots", function()
    local r = run(HELLO .. "..one\r\n..\r\n...\r\n.x\r\n\r\n.\r\n")
    assert.equal(".one\r\n.\r\n..\r\nx\r\n\r\n", r.msgs[1].data)
  end)

  describe("only CRLF.CRLF ends DATA, and bare CR/LF refuse the message whole", function()
    local lookalikes = {
      ["LF.LF"] = "\n.\n", ["CR.CR"] = "\r.\r", ["LF.CRLF"] = "\n.\r\n", ["CRLF.LF"] = "\r\n.\n",
      ["CRLF.CR"] = "\r\n.\r", ["CR.LF"] = "\r.\n", ["CRLF NUL.CRLF"] = "\r\n\0.\r\n",
      ["CRLF .CRLF"] = "\r\n .\r\n", ["CRLF.NUL CRLF"] = "\r\n.\0\r\n",
      ["LF.CRLF after CR"] = "\r\n\r\n.\r\r\n", ["CRLF..CRLF"] = "\r\n..\r\n",
    }
    for name, seq in pairs(lookalikes) do
      it("with " .. name .. " inside one DATA, one message or none, never two", function()
        local smuggled = "From: a\r\n\r\nfirst" .. seq ..
          "MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n.\r\n"
        local r = run(HELLO .. smuggled .. "QUIT\r\n")
        for _, step in ipairs { 1, 2, 7 } do
          local r2 = run(HELLO .. smuggled .. "QUIT\r\n", nil, step)
          assert.equal(r.out, r2.out)
          assert.equal(#r.msgs, #r2.msgs)
        end
        -- never a MAIL command taken from inside the data
        assert.not_matches("2%.1%.0.*2%.1%.0", r.out)
        assert.is_true(#r.msgs <= 1)
        if seq:find("[^\r]\n") or seq:find("\r[^\n]") or seq:match("\r$") or seq:match("^\n") then
          -- a bare CR or LF: refused with 550 5.6.11, nothing delivered
          assert.equal(0, #r.msgs)
          assert.matches("550 5%.6%.11 ", r.out)
        else
          assert.equal(1, #r.msgs)
          assert.matches("MAIL FROM:<evil@x.test>", r.msgs[1].data, 1, true)
        end
      end)
    end

    it("normalizes bare CR and LF to CRLF when asked, still without ending the data", function()
      -- a "." line after a bare line end is an empty line: never a lone "." for the reader
      local r = run(HELLO .. "a\nb\rc\n.\nd\r\n.\r\n", { normalize = true })
      assert.equal(1, #r.msgs)
      assert.equal("a\r\nb\r\nc\r\n\r\nd\r\n", r.msgs[1].data)
    end)

    it("with normalize, unstuffs a leading dot after a bare LF or CR like after CRLF", function()
      for _, step in ipairs { 1, 3, 1000 } do
        local r = run(HELLO .. "a\n..b\r..c\r\n..d\n.e\n.\r\nf\r\n.\r\nQUIT\r\n", { normalize = true }, step)
        assert.same({ 220, 250, 250, 250, 354, 250, 221 }, codes(r.out), step)
        assert.equal(1, #r.msgs)
        assert.equal("a\r\n.b\r\n.c\r\n.d\r\ne\r\n\r\nf\r\n", r.msgs[1].data, step)
      end
      -- LF.LF, CR.CR, LF.CRLF, CRLF.LF, CRLF.CR: data, never an end; the message ends at CRLF.CRLF
      local r = run(HELLO .. "x\n.\nMAIL\r.\rRCPT\n.\r\nDATA\r\n.\nA\r\n.\rB\r\n.\r\n", { normalize = true })
      assert.same({ 220, 250, 250, 250, 354, 250 }, codes(r.out))
      assert.equal("x\r\n\r\nMAIL\r\n\r\nRCPT\r\n\r\nDATA\r\n\r\nA\r\n\r\nB\r\n", r.msgs[1].data)
    end)

    it("refuses a message with a bare LF with 550 and goes on", function()
      local r = run(HELLO .. "a\nb\r\n.\r\nRSET\r\n" .. HELLO:sub(19) .. "ok\r\n.\r\n")
      assert.same({ 220, 250, 250, 250, 354, 550, 250, 250, 250, 354, 250 }, codes(r.out))
      assert.equal(1, #r.msgs)
      assert.equal("ok\r\n", r.msgs[1].data)
    end)
  end)

  it("gives the same replies and messages whether input comes at once or byte by byte", function()
    local input = "EHLO c.test\r\nHELP\r\nVRFY x\r\nNOOP\r\nMAIL FROM:<a@x.test> SIZE=100 BODY=8BITMIME\r\n" ..
      "RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@y.test\r\nDATA\r\n" ..
      "..x\r\n..\r\n\r\n.\r\n" ..
      "MAIL FROM:<>\r\nRCPT TO:<c@y.test>\r\nBDAT 5\r\nab\r\nzBDAT 3 LAST\r\n.\r\n" ..
      "BOGUS\r\n" .. string.rep("x", 700) .. "\r\nEHLO \0\r\nRSET\r\nQUIT\r\n"
    local whole = run(input, { auth = true, auth_plaintext = true })
    for _, step in ipairs { 1, 3, 64 } do
      local r = run(input, { auth = true, auth_plaintext = true }, step)
      assert.equal(whole.out, r.out)
      assert.same(whole.msgs, r.msgs)
    end
    assert.equal(2, #whole.msgs)
    assert.equal(".x\r\n.\r\n\r\n", whole.msgs[1].data)
    assert.same({ SIZE = 100, BODY = "8BITMIME" }, whole.msgs[1].env.params)
    assert.same({ { NOTIFY = "SUCCESS,FAILURE", ORCPT = "rfc822;b+x@y.test" } }, whole.msgs[1].env.rcpt_params)
    assert.equal("ab\r\nz.\r\n", whole.msgs[2].data)
    assert.equal("", whole.msgs[2].env.from)
    assert.same({ 220, 250, 214, 252, 250, 250, 250, 354, 250, 250, 250, 250, 250, 500, 500, 500, 250, 221 },
      codes(whole.out))
  end)

  describe("sequencing and syntax", function()
    local cases = {
      { "MAIL before EHLO", "MAIL FROM:<a@x.test>\r\n", 503, "5.5.1" },
      { "RCPT before MAIL", "EHLO c\r\nRCPT TO:<a@x.test>\r\n", 503, "5.5.1" },
      { "DATA before MAIL", "EHLO c\r\nDATA\r\n", 503, "5.5.1" },
      { "DATA without recipients", "EHLO c\r\nMAIL FROM:<a@x.test>\r\nDATA\r\n", 554, "5.5.1" },
      { "nested MAIL", "EHLO c\r\nMAIL FROM:<a@x.test>\r\nMAIL FROM:<a@x.test>\r\n", 503, "5.5.1" },
      { "unknown verb", "EHLO c\r\nFROB\r\n", 500, "5.5.2" },
      { "EXPN is not ours", "EHLO c\r\nEXPN x\r\n", 500, "5.5.2" },
      { "bad path", "EHLO c\r\nMAIL FROM:a@x.test\r\n", 501, "5.1.7" },
      { "double dot local", "EHLO c\r\nMAIL FROM:<a..b@x.test>\r\n", 501, "5.1.7" },
      { "empty RCPT", "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\n", 501, "5.1.7" },
      { "local part over 64", "EHLO c\r\nMAIL FROM:<" .. ("l"):rep(65) .. "@x.test>\r\n", 501, "5.1.7" },
      { "unknown parameter", "EHLO c\r\nMAIL FROM:<a@x.test> FOO=1\r\n", 555, "5.5.4" },
      { "parameters after HELO", "HELO c\r\nMAIL FROM:<a@x.test> SIZE=1\r\n", 555, "5.5.4" },
      { "bad BODY", "EHLO c\r\nMAIL FROM:<a@x.test> BODY=BINARYMIME\r\n", 501, "5.5.4" },
      { "bad RET", "EHLO c\r\nMAIL FROM:<a@x.test> RET=ALL\r\n", 501, "5.5.4" },
      { "NOTIFY NEVER with others", "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test> NOTIFY=NEVER,DELAY\r\n", 501, "5.5.4" },
      { "xtext decoding to CR", "EHLO c\r\nMAIL FROM:<a@x.test> ENVID=a+0Db\r\n", 501, "5.5.4" },
      { "duplicate SIZE", "EHLO c\r\nMAIL FROM:<a@x.test> SIZE=1 SIZE=2\r\n", 501, "5.5.4" },
      { "SIZE over the limit", "EHLO c\r\nMAIL FROM:<a@x.test> SIZE=1001\r\n", 552, "5.3.4" },
      { "8-bit sender without SMTPUTF8", "EHLO c\r\nMAIL FROM:<j\195\182rg@x.test>\r\n", 553, "5.6.7" },
      { "invalid UTF-8 with SMTPUTF8", "EHLO c\r\nMAIL FROM:<j\195\195rg@x.test> SMTPUTF8\r\n", 553, "5.6.7" },
      { "8-bit recipient without SMTPUTF8", "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<\226\130\172@x.test>\r\n", 553, "5.6.7" },
      { "invalid UTF-8 in EHLO", "EHLO \255\254\r\n", 501, "5.5.4" },
      { "EHLO without a name", "EHLO\r\n", 501, "5.5.4" },
      { "NUL in a command", "EHLO c\0d\r\n", 500, "5.5.2" },
      { "RSET with an argument", "RSET x\r\n", 501, "5.5.4" },
      { "STARTTLS not offered", "EHLO c\r\nSTARTTLS\r\n", 502, "5.5.1" },
      { "AUTH not enabled", "EHLO c\r\nAUTH PLAIN\r\n", 502, "5.5.1" },
      { "VRFY", "VRFY bob\r\n", 252, "2.5.0" },
      { "BDAT before MAIL", "EHLO c\r\nBDAT 3\r\nabc", 503, "5.5.1" },
    }
    for _, c in ipairs(cases) do
      it(c[1] .. " -> " .. c[3], function()
        local r = run(c[2] .. "NOOP\r\n", { max_message_size = 1000 })
        local cs = codes(r.out)
        assert.equal(c[3], cs[#cs - 1])
        assert.equal(250, cs[#cs]) -- the session goes on
        local lines = {}
        for l in r.out:gmatch("[^\r\n]+") do lines[#lines + 1] = l end
        assert.matches("^" .. c[3] .. " " .. c[4]:gsub("%.", "%%.") .. " ", lines[#lines - 1])
      end)
    end

    it("accepts the quoted local parts, address literals, source routes and <postmaster>", function()
      local r = run('EHLO c\r\nMAIL FROM:<@relay.test:"a b"@[127.0.0.1]>\r\nRCPT TO:<Postmaster>\r\n' ..
        "RCPT TO:<x@y.test> NOTIFY=NEVER\r\nDATA\r\nz\r\n.\r\n")
      assert.equal(1, #r.msgs)
      assert.same({ '"a b"@[127.0.0.1]', { "Postmaster", "x@y.test" } },
        { r.msgs[1].env.from, r.msgs[1].env.to })
    end)

    it("accepts UTF-8 addresses under SMTPUTF8", function()
      local r = run("EHLO c\r\nMAIL FROM:<j\195\182rg@x.test> SMTPUTF8\r\nRCPT TO:<\226\130\172@x.test>\r\nDATA\r\nz\r\n.\r\n")
      assert.equal(1, #r.msgs)
      assert.equal("\226\130\172@x.test", r.msgs[1].env.to[1])
      assert.is_true(r.msgs[1].env.params.SMTPUTF8)
    end)
  end)

  describe("limits", function()
    it("answers an over-long line with 500 and goes on; 10 KB EHLO too", function()
      local r = run("EHLO " .. ("a"):rep(10 * 1024) .. "\r\nEHLO " .. ("b"):rep(600) .. "\r\nNOOP\r\n")
      assert.same({ 220, 500, 500, 250 }, codes(r.out))
      assert.matches("500 5%.5%.2 Error: line too long\r\n", r.out)
    end)

    it("takes a longer line when max_line allows it", function()
      local r = run("EHLO c " .. ("b"):rep(600) .. "\r\n", { max_line = 1000 })
      assert.same({ 220, 250 }, codes(r.out))
    end)

    it("closes with 421 past 64 KB without a line end", function()
      local r = run(("x"):rep(70 * 1024), nil, 4096)
      assert.same({ 220, 421 }, codes(r.out))
      assert.same({ "close" }, r.events)
    end)

    it("452 past max_recipients, not counted as errors", function()
      local t = { "EHLO c\r\nMAIL FROM:<a@x.test>\r\n" }
      for i = 1, 200 do t[#t + 1] = "RCPT TO:<r" .. i .. "@y.test>\r\n" end
      t[#t + 1] = "DATA\r\nx\r\n.\r\n"
      local r = run(table.concat(t), { max_recipients = 100, max_errors = 5 })
      local cs = codes(r.out)
      local n250, n452 = 0, 0
      for _, c in ipairs(cs) do
        if c == 250 then n250 = n250 + 1 elseif c == 452 then n452 = n452 + 1 end
      end
      assert.equal(100, n452)
      assert.equal(1 + 1 + 100 + 1, n250)
      assert.equal(100, #r.msgs[1].env.to)
    end)

    it("closes with 421 after too many errors", function()
      local r = run(("FROB\r\n"):rep(5) .. "NOOP\r\n", { max_errors = 3 })
      assert.same({ 220, 500, 500, 500, 421 }, codes(r.out))
      assert.matches("421 4%.7%.0 Too many errors", r.out)
    end)

    it("refuses an oversized message with 552 after the whole data, then goes on", function()
      local r = run(HELLO .. ("y"):rep(2000) .. "\r\n.\r\nNOOP\r\n", { max_message_size = 1000 })
      assert.same({ 220, 250, 250, 250, 354, 552, 250 }, codes(r.out))
      assert.equal(0, #r.msgs)
      assert.matches("552 5%.3%.4 ", r.out)
    end)

    it("gives the reader of an oversized message exactly its first max_message_size bytes, however cut", function()
      local body = ("abcdefghi\r\n"):rep(300)
      for _, step in ipairs { 1, 7, 100000 } do
        local r = run(HELLO .. body .. ".\r\nNOOP\r\n", { max_message_size = 1000 }, step)
        assert.same({ 220, 250, 250, 250, 354, 552, 250 }, codes(r.out), step)
        assert.equal(1, #r.all)
        assert.equal(body:sub(1, 1000), r.all[1].data, step)
      end
      local r = run("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 1500 LAST\r\n" ..
        body:sub(1, 1500) .. "NOOP\r\n", { max_message_size = 1000 }, 9)
      assert.equal(body:sub(1, 1000), r.all[1].data)
    end)

    it("stops taking input while the client does not read its replies", function()
      local e = core.server_engine { out_cap = 1024 }
      local taken = 0
      local input = ("NOOP\r\n"):rep(10000)
      for _ = 1, 100 do
        taken = taken + e:feed(input, taken + 1)
        while e:next() do end
      end
      assert.is_true(taken < 10000) -- input left waiting: nothing buffered without bound
      assert.same({ nil, "write" }, { e:next() })
      local out = e:output()
      assert.is_true(#out < 1024 + 100)
    end)
  end)

  describe("BDAT", function()
    it("honours sizes exactly, LAST, and answers each chunk", function()
      local r = run("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5\r\n\r\n.\r\nBDAT 0 LAST\r\nQUIT\r\n")
      assert.same({ 220, 250, 250, 250, 250, 250, 221 }, codes(r.out))
      assert.matches("250 2%.0%.0 5 octets received\r\n", r.out)
      assert.equal("\r\n.\r\n", r.msgs[1].data)
    end)

    it("swallows the chunk of a refused BDAT", function()
      local r = run("EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n")
      assert.same({ 220, 250, 503, 250 }, codes(r.out))
    end)

    it("does not mix with DATA", function()
      local r = run("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 1\r\nxDATA\r\nBDAT 1 LAST\r\ny")
      assert.same({ 220, 250, 250, 250, 250, 503, 250 }, codes(r.out))
      assert.equal("xy", r.msgs[1].data)
    end)

    it("refuses a bare CR or LF in BDAT data like in DATA; a CRLF split across chunks is fine", function()
      local tx = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
      for _, body in ipairs { "a\nb", "a\rb", "a\r", "\n", "a\r\r\nb" } do
        for _, step in ipairs { 1, 1000 } do
          local r = run(tx .. "BDAT " .. #body .. " LAST\r\n" .. body .. "NOOP\r\n", nil, step)
          assert.same({ 220, 250, 250, 250, 550, 250 }, codes(r.out), body)
          assert.matches("550 5%.6%.11 ", r.out)
          assert.equal(0, #r.msgs)
        end
      end
      local r = run(tx .. "BDAT 2\r\na\rBDAT 2 LAST\r\n\nb")
      assert.same({ 220, 250, 250, 250, 250, 250 }, codes(r.out))
      assert.equal("a\r\nb", r.msgs[1].data)
      -- a bare CR/LF in a first chunk refuses the message at LAST, whatever the later chunks hold
      r = run(tx .. "BDAT 2\r\na\nBDAT 1 LAST\r\nb")
      assert.same({ 220, 250, 250, 250, 250, 550 }, codes(r.out))
    end)

    it("with normalize, turns bare CR and LF in BDAT data into CRLF, across chunks too", function()
      local tx = "EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
      local cases = {
        { "BDAT 3 LAST\r\na\nb", "a\r\nb" },
        { "BDAT 5 LAST\r\na\rb\n.", "a\r\nb\r\n." },
        { "BDAT 2\r\na\rBDAT 2 LAST\r\n\nb", "a\r\nb" },
        { "BDAT 2\r\na\rBDAT 1 LAST\r\nb", "a\r\nb" },
        { "BDAT 2\r\na\rBDAT 0 LAST\r\n", "a\r\n" },
        { "BDAT 2 LAST\r\na\r", "a\r\n" },
        { "BDAT 4 LAST\r\n\r\r\n\n", "\r\n\r\n\r\n" },
      }
      for _, c in ipairs(cases) do
        for _, step in ipairs { 1, 1000 } do
          local r = run(tx .. c[1] .. "NOOP\r\n", { normalize = true }, step)
          assert.equal(1, #r.msgs, c[1])
          assert.equal(c[2], r.msgs[1].data, c[1])
          assert.equal(250, codes(r.out)[#codes(r.out)], c[1])
        end
      end
    end)

    it("refuses an oversized BDAT message with 552", function()
      local r = run("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 20\r\n" ..
        ("z"):rep(20) .. "BDAT 1 LAST\r\nzNOOP\r\n", { max_message_size = 10 })
      assert.same({ 220, 250, 250, 250, 552, 503, 250 }, codes(r.out))
      assert.same({ "begin", "end" }, r.events)
      assert.equal(0, #r.msgs)
    end)
  end)

  describe("STARTTLS", function()
    it("drops the input glued after STARTTLS, resets the session, is not offered again", function()
      local r = run("EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n", { tls = true })
      assert.same({ 220, 250, 220 }, codes(r.out))
      assert.matches("220 2%.0%.0 Ready to start TLS\r\n$", r.out)
      assert.same({ "starttls" }, r.events)
      local e = r.engine
      assert.is_true(e:tls())
      e:feed("MAIL FROM:<a@x.test>\r\nEHLO c\r\nSTARTTLS\r\n")
      while e:next() do end
      local out = e:output()
      assert.matches("^503 5%.5%.1 ", out)   -- a new EHLO first
      assert.not_matches("STARTTLS\r\n", out)
      assert.matches("503 5%.5%.1 Error: TLS already active\r\n$", out)
    end)
  end)

  describe("AUTH", function()
    local function auth(input, check)
      return run("EHLO c\r\n" .. input, { auth = true, auth_plaintext = true, require_auth = true }, nil,
        function(kind, mech, user, secret)
          if kind ~= "auth" then return true end
          if check then check(mech, user, secret) end
          return user == "u" and secret == "p"
        end)
    end

    it("PLAIN with an initial response", function()
      local seen
      local r = auth("AUTH PLAIN AHUAcA==\r\nMAIL FROM:<a@x.test>\r\n", function(...) seen = { ... } end)
      assert.same({ "PLAIN", "u", "p" }, seen)
      assert.same({ 220, 250, 235, 250 }, codes(r.out))
      assert.equal("u", r.engine:user())
    end)

    it("PLAIN after 334, LOGIN step by step, and one byte at a time", function()
      for _, step in ipairs { 1, 1000 } do
        local r = auth("AUTH PLAIN\r\nAHUAcA==\r\n", nil)
        assert.matches("334 \r\n235 2%.7%.0 ", r.out)
        r = run("EHLO c\r\nAUTH LOGIN\r\ndQ==\r\ncA==\r\n", { auth = true, auth_plaintext = true }, step,
          function(kind, mech, user, secret) return mech == "LOGIN" and user == "u" and secret == "p" end)
        assert.matches("334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2%.7%.0 Authentication successful\r\n$", r.out)
      end
    end)

    it("535 on wrong credentials, 501 on bad base64, 501 on *, 530 for MAIL before AUTH", function()
      local r = auth("AUTH PLAIN AHUAeA==\r\nAUTH PLAIN AHU!cA==\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN dQ==\r\nMAIL FROM:<a@x.test>\r\nNOOP\r\n")
      assert.same({ 220, 250, 535, 501, 334, 501, 501, 530, 250 }, codes(r.out))
      assert.matches("535 5%.7%.8 ", r.out)
      assert.matches("501 5%.5%.2 Invalid base64", r.out)
      assert.matches("501 5%.7%.0 Authentication cancelled", r.out)
      assert.matches("530 5%.7%.0 Authentication required", r.out)
    end)

    it("needs TLS unless allowed in clear", function()
      local r = run("EHLO c\r\nAUTH PLAIN AHUAcA==\r\n", { auth = true })
      assert.matches("538 5%.7%.11 ", r.out)
    end)
  end)

  it("hooks decide MAIL and RCPT with their own replies", function()
    local r = run(HELLO, { hook_mail = true, hook_rcpt = true }, nil, function(kind, a)
      if kind == "rcpt" then return false, 550, "5.1.1", "no such user " .. a end
      return true
    end)
    assert.matches("250 2%.1%.0 Ok\r\n550 5%.1%.1 no such user b@y%.test\r\n554 5%.5%.1 ", r.out)
  end)

  it("shutdown queues 421 and closes", function()
    local e = core.server_engine {}
    e:shutdown(421, "4.4.2", "Idle timeout")
    assert.equal("220 localhost ESMTP lua-smtp\r\n421 4.4.2 Idle timeout\r\n", e:output())
    assert.equal("close", e:next())
    assert.is_true(e:closed())
  end)

  it("shutdown with a code that is no final reply code is refused, never sent as a malformed line", function()
    -- The binding refuses; the engine's own guard (421 for C callers) is exercised by fuzz/replybuild.
    for _, code in ipairs { 42, 250, 1234, -1 } do
      local e = core.server_engine {}
      assert.has_error(function() e:shutdown(code, "4.3.2", "Going down") end,
        "bad argument #1 to 'shutdown' (reply code out of range)")
      assert.equal("220 localhost ESMTP lua-smtp\r\n", e:output(), code)
    end
  end)

  describe("session limits (issue 15)", function()
    it("refusals of MAIL and RCPT count toward max_errors; 452 does not", function()
      local input = "EHLO c\r\nMAIL FROM:<a@x.test>\r\n" .. ("RCPT TO:<b@y.test>\r\n"):rep(5) .. "NOOP\r\n"
      local n = 0
      local r = run(input, { hook_rcpt = true, max_errors = 3 }, nil, function(kind)
        if kind ~= "rcpt" then return true end
        n = n + 1
        if n <= 2 then return false, 452, "4.5.3", "later" end
        return false, 550, "5.1.1", "no"
      end)
      assert.matches("452 4%.5%.3 later\r\n452 4%.5%.3 later\r\n550 5%.1%.1 no\r\n550 5%.1%.1 no\r\n550 5%.1%.1 no\r\n"
        .. "421 4%.7%.0 Too many errors, closing connection\r\n$", r.out)
      local _, errors, _, limit = r.engine:usage()
      assert.equal(3, errors)
      assert.equal("errors", limit)
    end)

    it("max_commands and max_transactions close with 421 4.7.0 and say which limit it was", function()
      local r = run(("NOOP\r\n"):rep(4), { max_commands = 3 })
      assert.matches("250 2%.0%.0 Ok\r\n421 4%.7%.0 Too many commands in one session, closing connection\r\n$", r.out)
      local commands, _, _, limit = r.engine:usage()
      assert.equal(4, commands)
      assert.equal("commands", limit)
      r = run("EHLO c\r\n" .. ("MAIL FROM:<a@x.test>\r\nRSET\r\n"):rep(3), { max_transactions = 2 })
      assert.matches("250 2%.0%.0 Ok\r\n421 4%.7%.0 Too many transactions in one session, closing connection\r\n$", r.out)
      assert.equal("transactions", select(4, r.engine:usage()))
      assert.equal(2, select(5, r.engine:usage()))
    end)

    it("space() and usage() say when part of a command line waits, an over-long one too", function()
      local e = core.server_engine {}
      assert.is_false(select(2, e:space()))
      e:feed("NOOP")
      assert.is_nil(e:next())
      assert.is_true(select(2, e:space()))
      assert.is_true(select(3, e:usage()))
      e:feed("\r\n")
      e:next()
      assert.is_false(select(2, e:space()))
      e:feed(("x"):rep(600))
      e:next()
      assert.equal("skipline", e:state())
      assert.is_true(select(2, e:space()))
    end)

    it("decide and shutdown refuse an enhanced code outside class.subject.detail of 1-3 digits", function()
      local e = core.server_engine { hook_rcpt = true }
      e:feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n")
      while e:next() ~= "rcpt" do end
      for _, bad in ipairs { "5.12345678.1", "5.1.1234", "5.1", "6.1.1", "5.1.1 ", "5..1", "5.1.1.1" } do
        assert.has_error(function() e:decide(false, 550, bad, "no") end)
        assert.has_error(function() e:shutdown(421, bad, "bye") end)
      end
      e:decide(false, 550, "5.999.999", "no")
      assert.matches("550 5%.999%.999 no\r\n$", e:output())
    end)
  end)
end)
