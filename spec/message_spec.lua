-- Specs for smtp.message: exact bytes with an injected clock, random source and host name, and
-- every built message parsed by Python's email package (policy.default) with no defects and the
-- decoded subject, names, text, HTML and attachment bytes equal to the inputs.
local message = require "smtp.message"
local core = require "smtp.core"
local helper = require "helper"
local S = require "support.message"

local function bytes(n, seed)
  local t, x = {}, seed or 7
  for i = 1, n do x = (x * 1103515245 + 12345) % 2147483648; t[i] = string.char(x % 256) end
  return table.concat(t)
end

-- The first n bytes of s, not cutting a UTF-8 character.
local function prefix(s, n)
  local j = math.min(n, #s)
  while j < #s and j > 0 and s:byte(j + 1) >= 0x80 and s:byte(j + 1) < 0xC0 do j = j - 1 end
  return s:sub(1, j)
end

local function lf(s) return (s:gsub("\r\n", "\n")) end

local samples = {
  ascii = "Hello world, plain ASCII text.",
  latin = "Grüße aus Köln, café crème à la française — ÀÉÎÕÜ ñ",
  cjk = "日本語のテキストと中文的文本，한국어 텍스트도 있습니다",
  emoji = "Party 🎉🎂 with 👩‍👩‍👧‍👦 and 😀😃😄😁 — done ✅",
  long = string.rep("abcdefghij", 150),                   -- one line of 1500 characters
  spaces = "  two  spaces   inside, and around  ",
}

describe("message.new", function()
  it("produces exact bytes with an injected clock, random source and host name", function()
    local m = assert(message.new(S.fixed{
      from = "Alice <alice@example.com>", to = "bob@example.org", subject = "Hi",
      text = "Hello\nBob\n",
    }))
    assert.equal(table.concat({
      "Date: Tue, 14 Nov 2023 22:13:20 +0000",
      "From: Alice <alice@example.com>",
      "To: bob@example.org",
      "Subject: Hi",
      "Message-ID: <01010101010101010101010101010101@example.com>",
      "MIME-Version: 1.0",
      "Content-Type: text/plain; charset=UTF-8",
      "Content-Transfer-Encoding: 7bit",
      "",
      "Hello",
      "Bob",
      "" }, "\r\n"), m:tostring())
  end)

  it("gives the same bytes from tostring() and source(), every time", function()
    local dir = helper.tmpdir()
    helper.write(dir .. "/a.bin", bytes(300000, 3))
    local m = assert(message.new{ from = "a@example.com", to = "b@example.org", text = "x",
      html = "<b>x</b>", attachments = { { path = dir .. "/a.bin" } } })
    local parts = {}
    for c in m:source() do parts[#parts + 1] = c end
    assert.is_true(#parts > 1)
    assert.equal(table.concat(parts), m:tostring())
    assert.equal(m:tostring(), m:tostring())
  end)

  it("builds every combination of bodies that Python reads back exactly", function()
    local dir = helper.tmpdir()
    local bin = bytes(5000, 9)
    helper.write(dir .. "/photo.png", bin)
    local cases, raws = {}, {}
    local names = { "ascii", "latin", "cjk", "emoji", "long", "spaces" }
    for i, k in ipairs(names) do
      local s = samples[k]
      local combos = {
        { text = s },
        { html = "<p>" .. s .. "</p>" },
        { text = s .. "\n" .. s .. "\n", html = "<p>" .. s .. "</p>\n" },
        { text = s, attachments = { { filename = k .. "-" .. prefix(s, 20) .. ".bin", content = bin } } },
        { html = "<img src=\"cid:logo\">" .. s, inline = { { cid = "logo", path = dir .. "/photo.png" } } },
        { text = s, html = "<p>" .. s .. "</p>", inline = { { cid = "logo@x", path = dir .. "/photo.png" } },
          attachments = { { path = dir .. "/photo.png", filename = s .. ".png" },
                          { content = "", filename = "empty.txt" } } },
        { text = "", html = "" },
        { text = "", attachments = { { content = s, filename = "t.txt", content_type = "text/plain" } } },
      }
      for j, c in ipairs(combos) do
        c.from = { name = "Sender " .. prefix(s, 12), address = "sender@example.com" }
        -- names keep non-ASCII runs within one encoded word (see the next spec for longer ones)
        c.to = { "Plain Name <to@example.org>", { name = prefix(s, 40), address = "to2@example.org" } }
        c.cc = { { name = 'Doe, "JD" John', address = "cc@example.net" } }
        c.subject = s
        c.headers = { { "X-Test", s } }
        local m = assert(message.new(c))
        cases[#cases + 1] = { opts = c, label = k .. "/" .. j }
        raws[#raws + 1] = m:tostring()
      end
      assert(i)
    end
    local got = S.parse(raws)
    for n, r in ipairs(got) do
      local c, label = cases[n].opts, cases[n].label
      assert.same({}, r.defects, label)
      assert.equal(c.subject, r.hdr.subject[1], label)
      assert.equal(c.subject, r.hdr["x-test"][1], label)
      assert.equal(c.from.name, r.addr.from[1].name, label)
      assert.equal("to@example.org", r.addr.to[1].address, label)
      assert.equal(c.to[2].name, r.addr.to[2].name, label)
      assert.equal('Doe, "JD" John', r.addr.cc[1].name, label)
      local texts, htmls, files = {}, {}, {}
      for _, p in ipairs(r.parts) do
        if p.disposition then files[#files + 1] = p
        elseif p.ctype == "text/plain" then texts[#texts + 1] = p.content
        elseif p.ctype == "text/html" then htmls[#htmls + 1] = p.content end
      end
      if c.text then assert.equal(lf(c.text), texts[1], label) end
      if c.html then assert.equal(lf(c.html), htmls[1], label) end
      local want = {}
      for _, a in ipairs(c.inline or {}) do want[#want + 1] = { a, "inline" } end
      for _, a in ipairs(c.attachments or {}) do want[#want + 1] = { a, "attachment" } end
      assert.equal(#want, #files, label)
      for x, w in ipairs(want) do
        local a, f = w[1], files[x]
        assert.equal(w[2], f.disposition, label)
        assert.equal(a.content or bin, f.content, label)
        -- Python's get_filename() strips surrounding whitespace of any name
        assert.equal((a.filename or "photo.png"):match("^%s*(.-)%s*$"), f.filename, label)
        if a.cid then assert.equal("<" .. a.cid .. ">", f.cid, label) end
      end
    end
  end)

  it("splits long non-ASCII names into RFC 2047 words that decode back exactly", function()
    local name = string.rep("日本語のテキスト", 6) .. " and Grüße aus Köln " .. string.rep("😀", 20)
    local m = assert(message.new{ from = "a@example.com", to = { { name = name, address = "b@example.org" } } })
    local to = m:tostring():match("\r\nTo: (.-)\r\n%S"):gsub("\r\n", "")
    -- RFC 2047 6.2: whitespace between adjacent encoded words is not displayed
    local decoded = to:gsub("%?=%s+=%?", "?==?"):gsub("=%?UTF%-8%?B%?(.-)%?=", core.b64decode)
    assert.equal(name .. " <b@example.org>", decoded)
    for w in to:gmatch("=%?[^ ]-%?=") do assert.is_true(#w <= 75) end
  end)

  it("folds headers at 78 and keeps encoded words within 75 characters", function()
    local m = assert(message.new{ from = "a@example.com",
      to = { "x1@example.org", "x2@example.org", "x3@example.org", "x4@example.org",
             "x5@example.org", "x6@example.org" },
      subject = string.rep("Grüße ", 30) .. string.rep("😀", 40) .. string.rep(" word", 30) })
    local head = m:tostring():match("^(.-)\r\n\r\n")
    for line in (head .. "\r\n"):gmatch("(.-)\r\n") do
      assert.is_true(#line <= 78, line)
      for w in line:gmatch("=%?[^ ]-%?=") do
        assert.is_true(#w <= 75, w)
        assert.is_true(core.utf8_valid(core.b64decode(w:match("%?B%?(.-)%?="))))
      end
    end
  end)

  it("keeps Bcc out of the headers and puts everyone in the envelope once", function()
    local m = assert(message.new{ from = "Alice <alice@Example.com>", to = "b@example.org, c@EXAMPLE.org",
      cc = { "c@example.org" }, bcc = { "secret@example.net", "b@example.org" } })
    local s = m:tostring()
    assert.is_nil(s:find("secret", 1, true))
    assert.is_nil(s:lower():find("\nbcc:", 1, true))
    local from, rcpts = m:envelope()
    assert.equal("alice@Example.com", from)
    assert.same({ "b@example.org", "c@EXAMPLE.org", "secret@example.net" }, rcpts)
    assert.same({ smtputf8 = false }, m:needs())
    assert.matches("^<%x+@Example.com>$", m.message_id)
  end)

  it("needs SMTPUTF8 for non-ASCII addresses", function()
    local m = assert(message.new{ from = "jörg@bücher.example", to = "ü@example.org" })
    assert.same({ smtputf8 = true }, m:needs())
    -- the Message-ID's right side: an international From domain as its A-label; the host name
    -- for an address literal
    assert.matches("@xn%-%-bcher%-kva%.example>$", assert(message.new{ hostname = "host.test", from = "jörg@bücher.example" }).message_id)
    assert.matches("@host%.test>$", assert(message.new{ hostname = "host.test", from = "a@[192.0.2.1]" }).message_id)
  end)

  it("quotes display names that need it", function()
    local m = assert(message.new{ from = { name = "Doe, John", address = "j@example.com" },
      to = '"A \\"B\\" C" <abc@example.org>' })
    local s = m:tostring()
    assert.matches('From: "Doe, John" <j@example.com>', s, 1, true)
    assert.matches('To: "A \\"B\\" C" <abc@example.org>', s, 1, true)
  end)

  it("picks 7bit, quoted-printable or base64", function()
    local function cte(o)
      o.from = "a@example.com"
      return assert(message.new(o)):tostring():match("Content%-Transfer%-Encoding: (%S+)")
    end
    assert.equal("7bit", cte{ text = "plain\nascii" })
    assert.equal("quoted-printable", cte{ text = "café" })
    assert.equal("quoted-printable", cte{ text = string.rep("x", 999) })
    assert.equal("quoted-printable", cte{ text = "bare\rcr" })
    local s = assert(message.new{ from = "a@example.com", text = "x",
      attachments = { { filename = "a.csv", content = "1,2\n" } } }):tostring()
    assert.matches("Content-Type: text/csv; name=\"a.csv\"\r\nContent-Transfer-Encoding: base64", s, 1, true)
    s = assert(message.new{ from = "a@example.com", attachments = { { filename = "r.pdf", content = "%PDF" } } }):tostring()
    assert.matches("application/pdf", s, 1, true)
  end)

  it("streams a file attachment in constant memory", function()
    local dir = helper.tmpdir()
    local f = assert(io.open(dir .. "/big.bin", "wb"))
    local block = bytes(65536, 5)
    for _ = 1, 160 do f:write(block) end  -- 10 MB
    f:close()
    local m = assert(message.new{ from = "a@example.com", text = "see attached",
      attachments = { { path = dir .. "/big.bin" } } })
    collectgarbage(); collectgarbage()
    -- what the source keeps alive, measured after full collections every 16 chunks (1 MB of
    -- output): the collector's pacing (which differs between interpreters and builds) decides
    -- how much garbage piles up in between, not the code under test
    local base, peak, total, maxchunk, n = collectgarbage("count"), 0, 0, 0, 0
    for c in m:source() do
      total = total + #c
      if #c > maxchunk then maxchunk = #c end
      n = n + 1
      if n % 16 == 0 then
        collectgarbage()
        local now = collectgarbage("count")
        if now > peak then peak = now end
      end
    end
    assert.is_true(total > 10 * 1024 * 1024 * 4 / 3)
    assert.is_true(maxchunk <= 200 * 1024, "chunk " .. maxchunk)
    assert.is_true(peak - base < 1024, "live heap grew by " .. (peak - base) .. " KB")
  end)

  it("raises an invalid error when an attachment file goes away before it is produced", function()
    local dir = helper.tmpdir()
    helper.write(dir .. "/gone.txt", "data")
    local m = assert(message.new{ from = "a@example.com", attachments = { { path = dir .. "/gone.txt" } } })
    os.remove(dir .. "/gone.txt")
    local ok, err = pcall(function() return m:tostring() end)
    assert.is_false(ok)
    assert.equal("invalid", err.kind)
    assert.matches("cannot be read", err.text)
  end)

  describe("refuses bad input with kind invalid", function()
    local function bad(o, pattern)
      o.from = o.from or "a@example.com"
      local m, err = message.new(o)
      assert.is_nil(m)
      assert.equal("invalid", err.kind)
      if pattern then assert.matches(pattern, err.text) end
    end
    it("CR or LF in header values and names", function()
      bad({ subject = "hi\r\nBcc: x@y.z" }, "subject")
      bad({ subject = "hi\nthere" })
      bad({ to = "b@example.org\r\nRCPT TO:<x@y>" })
      bad({ to = { { name = "x\ny", address = "b@example.org" } } })
      bad({ headers = { { "X-A", "v\r\nBcc: evil@x" } } })
      bad({ headers = { { "X-A\r\nB", "v" } } }, "header name")
      bad({ headers = { { "X A", "v" } } }, "header name")
      bad({ headers = { { "X:A", "v" } } }, "header name")
      bad({ headers = { { "", "v" } } }, "header name")
      bad({ attachments = { { content = "x", filename = "a\r\n.txt" } } })
    end)
    it("single-instance headers given twice", function()
      bad({ subject = "a", headers = { { "Subject", "b" } } }, "twice")
      bad({ headers = { { "From", "b@example.com" } } }, "twice")
      bad({ headers = { { "In-Reply-To", "<a@b>" }, { "in-reply-to", "<c@d>" } } }, "twice")
      bad({ headers = { { "Message-ID", "<a@b>" } } }, "twice")
      assert.truthy(message.new{ from = "a@example.com",
        headers = { { "X-Tag", "1" }, { "X-Tag", "2" }, { "In-Reply-To", "<a@b>" } } })
    end)
    it("addresses that are not addresses", function()
      bad({ from = "nobody" })
      bad({ from = "a@b@c" })
      bad({ to = { string.rep("x", 65) .. "@example.com" } }, "64")
      bad({ to = { "a b@example.com" } })
      bad({ from = { "a@example.com", "b@example.com" } }, "exactly one")
    end)
    it("an attachment path that cannot be read", function()
      bad({ attachments = { { path = "/nonexistent/file.pdf" } } }, "cannot be read")
      bad({ attachments = { { path = "/" } } }, "cannot be read")
    end)
    it("a DKIM key that does not parse", function()
      bad({ dkim = { domain = "example.com", selector = "s1", key = "-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n" } },
          "does not parse")
      bad({ dkim = { domain = "example.com", selector = "s1", key = "/nonexistent/key.pem" } }, "cannot be read")
    end)
  end)
end)
