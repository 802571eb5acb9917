-- The client against a real, full Postfix MTA (not smtp-sink): a private instance on loopback
-- (spec/support/postfix.lua, with Postfix 3.9's strict pipelining and bare-LF settings) that
-- relays what it accepts to a recording sink. Checks what only a real MTA shows: its EHLO, BDAT
-- with real CHUNKING semantics (several chunks), STARTTLS verified against the test CA and failing
-- closed, recipients refused by an access map, send_many batches (with failures mid-window), SIZE
-- refused locally and by the server, 421 mid-pipeline and after an idle timeout, SMTPUTF8, DSN
-- parameters as Postfix decodes and relays them, an smtp.message, the lower-level session methods,
-- AUTH PLAIN and LOGIN through Postfix's SASL. Every message is compared byte for byte after the
-- Received field Postfix adds, and each session against smtpd's own command counts from its log.
local helper = require "helper"
local postfix = require "support.postfix"
local dates = require "support.dates"
local smtp = require "smtp"

local BODY = table.concat({
  "From: Alice <a@example.com>",
  "To: b@example.org",
  "Subject: real MTA check",
  "Date: Mon, 23 Nov 2026 01:00:00 +0000",
  "Message-ID: <pf1@example.com>",
  "MIME-Version: 1.0",
  "Content-Type: text/plain; charset=utf-8",
  "Content-Transfer-Encoding: 8bit",
  "",
  "first line",
  ".a line that starts with a dot",
  ".",
  "..",
  "Grüße, 8-bit text: \226\130\172 \195\169",
  "",
  "\tindented, and a long one: " .. ("x"):rep(900),
  "last line",
  "",
}, "\r\n")

-- A message of about `size` bytes: headers, then 76-column lines that differ from each other,
-- some starting with a dot (stuffed on the wire for DATA, not for BDAT).
local function big_message(size, id)
  local parts = { "From: a@example.com\r\nTo: b@example.org\r\nSubject: big " .. id ..
    "\r\nMessage-ID: <" .. id .. "@example.com>\r\n\r\n" }
  local n, i = #parts[1], 0
  while n < size do
    i = i + 1
    local line = (i % 97 == 0 and "." or "") .. ("%08d"):format(i) ..
      ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"):rep(2):sub(i % 64 + 1, i % 64 + 66) .. "\r\n"
    parts[#parts + 1] = line
    n = n + #line
  end
  return table.concat(parts)
end

describe("the client against a real Postfix MTA", function()
  local pf, why
  setup(function() pf, why = postfix.start() end)
  -- Without Postfix installed the spec fails, naming the package; only a run without root skips.
  local function without_postfix()
    if tostring(why):match("^missing peer") then error(why, 2) end
    return pending(why)
  end
  teardown(function()
    if pf then pf.stop() end
    -- the multi-megabyte strings above are garbage now: collect them here, so the specs that
    -- run next in this process (some measure heap growth) start from a small heap
    collectgarbage()
    collectgarbage()
  end)

  local function opts(t)
    local o = { server = "127.0.0.1", port = pf.port, cafile = pf.ca, helo = "client.test", timeout = 15,
      from = "a@example.com", to = { "b@example.org" }, message = BODY }
    for k, v in pairs(t or {}) do o[k] = v end
    return o
  end

  -- The relayed messages Postfix got from us after `before` were already there, by queue ID.
  local function relayed(before, n)
    local recs = pf.wait_relayed(before + n, 25, before)
    local by_id = {}
    for _, r in ipairs(recs) do
      local id = r.data:match("^Received: [^\r\n]*\r\n\tby postfix%.test %(Postfix%) with %w+ id (%w+)")
      assert(id, "no Received field from Postfix: " .. r.data:sub(1, 300))
      assert(by_id[id] == nil, "queue ID relayed twice: " .. id)
      by_id[id] = r
    end
    return by_id, #recs
  end

  -- Checks one relayed message: Postfix's Received field (exact shape; Postfix names the
  -- recipient when there is one, though not always), then our bytes unchanged.
  local function check_relayed(r, qid, original, proto, rcpt)
    local received, rest = postfix.split_received(r.data)
    local head = "^Received: from client%.test %(localhost %[127%.0%.0%.1%]%)\r\n" ..
      "\tby postfix%.test %(Postfix%) with " .. proto .. " id " .. qid
    -- The date after the last ";" is Postfix's clock in its time zone ("Sat,  5 Dec 2026 ...
    -- +0100 (CET)"): checked by its grammar, not its value.
    local before, when = (received or ""):match("^(.*);(.-)\r\n$")
    local ok = before and (before:match(head .. "$") or
      (rcpt and before:match(head .. "\r\n\tfor <" .. rcpt:gsub("%p", "%%%0") .. ">$")))
    assert.is_truthy(ok, "Received field: " .. tostring(received))
    local date, bad = dates.parse(when)
    assert.is_truthy(date, "Received field's date (" .. tostring(bad) .. "): " .. tostring(received))
    assert.equal(#original, #rest)
    assert.is_true(original == rest, "the relayed bytes differ from the bytes sent")
  end

  local function qid_of(res)
    local id = postfix.queue_id(res.reply.text)
    assert(id, "no queue ID in " .. tostring(res.reply.text))
    return id
  end

  it("sees Postfix's EHLO after STARTTLS: PIPELINING, SIZE, CHUNKING, 8BITMIME, DSN, SMTPUTF8, ENHANCEDSTATUSCODES", function()
    if not pf then return without_postfix() end
    local mark = pf.mark()
    local conn, err = smtp.connect(opts())
    assert.is_nil(err)
    local ext = conn:extensions()
    assert.same({ PIPELINING = "", SIZE = "20000000", VRFY = "", ETRN = "", ENHANCEDSTATUSCODES = "",
      ["8BITMIME"] = "", DSN = "", SMTPUTF8 = "", CHUNKING = "" }, ext)
    local info = conn:info()
    assert.equal("TLSv1.3", info.tls)
    assert.same(ext, info.extensions)
    conn:close()
    assert.equal("ehlo=2 starttls=1 quit=1 commands=4", pf.session(mark))
    assert.is_truthy(pf.log(mark):find("Anonymous TLS connection established from localhost%[127%.0%.0%.1%]: TLSv1%.3"))
  end)

  it("sends with BDAT (one chunk) and the message arrives byte for byte", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send(opts())
    assert.is_nil(err)
    assert.same({ "b@example.org" }, res.accepted)
    assert.same({}, res.rejected)
    assert.equal(250, res.reply.code)
    assert.equal("2.0.0", res.reply.enhanced)
    assert.is_truthy(res.reply.text:match("^Ok: " .. #BODY .. " bytes queued as %w+$"), res.reply.text)
    assert.equal("<pf1@example.com>", res.message_id)
    assert.equal("TLSv1.3", res.server.tls)
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7", pf.session(mark))
    local qid = qid_of(res)
    local by_id, n = relayed(before, 1)
    assert.equal(1, n)
    local r = by_id[qid]
    check_relayed(r, qid, BODY, "ESMTPS", "b@example.org")
    assert.equal("a@example.com", r.from)
    assert.same({ "b@example.org" }, r.to)
    assert.is_truthy(r.mail:match("^FROM:<a@example%.com> SIZE=%d+ BODY=8BITMIME$"), r.mail)
  end)

  it("sends a 3 MB message with BDAT from a string and, in 1 MB chunks, from a file, and with DATA; all arrive intact", function()
    if not pf then return without_postfix() end
    local big = big_message(3 * 1024 * 1024 + 12345, "big1")
    local path = helper.tmpdir() .. "/big.eml"
    helper.write(path, big)
    local before, mark = pf.count(), pf.mark()
    local r1, e1 = smtp.send(opts { message = big })
    assert.is_nil(e1)
    -- a string goes in 1 MB chunks too: BDAT n three times, then BDAT n LAST
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=4 quit=1 commands=10", pf.session(mark))
    local f = assert(io.open(path, "rb"))
    local mark1 = pf.mark()
    local r2, e2 = smtp.send(opts { message = f })
    f:close()
    assert.is_nil(e2)
    -- a file streams: 3 MB in 1 MB chunks, BDAT n three times, then BDAT n LAST
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=4 quit=1 commands=10", pf.session(mark1))

    local mark2 = pf.mark()
    local dconn = assert(smtp.connect(opts { chunking = false }))
    local r3, e3 = dconn:send { from = "a@example.com", to = "b@example.org", message = big }
    assert.is_nil(e3)
    dconn:close()
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 commands=7", pf.session(mark2))
    assert.equal("<big1@example.com>", r1.message_id)
    assert.equal("<big1@example.com>", r3.message_id)
    assert.is_truthy(r1.reply.text:match("^Ok: " .. #big .. " bytes queued as %w+$"), r1.reply.text)
    assert.is_truthy(r3.reply.text:match("^Ok: queued as %w+$"), r3.reply.text)

    local by_id, n = relayed(before, 3)
    assert.equal(3, n)
    for _, res in ipairs { r1, r2, r3 } do
      check_relayed(by_id[qid_of(res)], qid_of(res), big, "ESMTPS", "b@example.org")
    end
  end)

  it("verifies Postfix's certificate against the CA, and fails closed (kind tls, no MAIL) without it", function()
    if not pf then return without_postfix() end
    local c = helper.certs()
    for _, case in ipairs {
      { what = "system CAs only", o = { cafile = false } },
      { what = "another CA", o = { cafile = c.other_ca } },
      { what = "a name the certificate lacks", o = { servername = "mail.example.net" } },
    } do
      local o = opts(case.o)
      if o.cafile == false then o.cafile = nil end
      local mark = pf.mark()
      local res, err = smtp.send(o)
      assert.is_nil(res, case.what)
      assert.equal("tls", err.kind, case.what)
      assert.equal("tls", err.phase, case.what)
      -- smtpd saw EHLO and STARTTLS, then the handshake fail: no MAIL, RCPT or data in clear
      assert.equal("ehlo=1 starttls=0/1 commands=1/2", pf.session(mark), case.what)
    end
  end)

  it("with tls = none speaks plaintext ESMTP; with opportunistic and verify = false uses STARTTLS unverified", function()
    if not pf then return without_postfix() end
    for _, case in ipairs {
      { o = { tls = "none" }, proto = "ESMTP", stats = "ehlo=1 mail=1 rcpt=1 bdat=1 quit=1 commands=5", tls = false },
      { o = { tls = "opportunistic", verify = false, cafile = false }, proto = "ESMTPS",
        stats = "ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7", tls = "TLSv1.3" },
    } do
      local o = opts(case.o)
      if o.cafile == false then o.cafile = nil end
      local before, mark = pf.count(), pf.mark()
      local res, err = smtp.send(o)
      assert.is_nil(err)
      assert.equal(case.tls, res.server.tls)
      assert.equal(case.stats, pf.session(mark))
      local by_id = relayed(before, 1)
      check_relayed(by_id[qid_of(res)], qid_of(res), BODY, case.proto, "b@example.org")
    end
  end)

  it("reports recipients refused by Postfix's access map and delivers to the others", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send(opts { to = { "b@example.org", "bad@example.org", "gone@example.org", "c@example.org" } })
    assert.is_nil(err)
    assert.same({ "b@example.org", "c@example.org" }, res.accepted)
    assert.same({
      { recipient = "bad@example.org", code = 554, enhanced = "5.7.1",
        text = "<bad@example.org>: Recipient address rejected: Access denied" },
      { recipient = "gone@example.org", code = 550, enhanced = "5.1.1",
        text = "<gone@example.org>: Recipient address rejected: mailbox gone" },
    }, res.rejected)
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=2/4 bdat=1 quit=1 commands=8/10", pf.session(mark))
    local by_id, n = relayed(before, 1)
    assert.equal(1, n)
    local r = by_id[qid_of(res)]
    assert.same({ "b@example.org", "c@example.org" }, r.to)
    check_relayed(r, qid_of(res), BODY, "ESMTPS", nil)
  end)

  it("gets kind rejected when Postfix refuses every recipient, and the session goes on", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local conn = assert(smtp.connect(opts()))
    local res, err = conn:send { from = "a@example.com", to = { "bad@example.org", "gone@example.org" }, message = BODY }
    assert.is_nil(res)
    assert.equal("rejected", err.kind)
    assert.equal("rcpt", err.phase)
    assert.equal(554, err.code)
    assert.equal("5.7.1", err.enhanced)
    assert.is_false(err.temporary)
    assert.equal(2, #err.rejected)
    assert.equal("gone@example.org", err.rejected[2].recipient)
    local ok, err2 = conn:send { from = "a@example.com", to = "b@example.org", message = BODY }
    assert.is_nil(err2)
    conn:close()
    local stats = pf.session(mark)
    -- the refused transaction's BDAT (pipelined with the RCPTs) got "no valid recipients"
    assert.is_truthy(stats:match("^ehlo=2 starttls=1 mail=2 rcpt=1/3 bdat=1/2 rset=%d quit=1 commands="), stats)
    local by_id, n = relayed(before, 1)
    assert.equal(1, n)
    check_relayed(by_id[qid_of(ok)], qid_of(ok), BODY, "ESMTPS", "b@example.org")
  end)

  for _, chunking in ipairs { true, false } do
    local how = chunking and "BDAT" or "DATA"
    it("sends 50 messages with send_many over one session (pipelining, " .. how .. "): each delivered once, intact", function()
      if not pf then return without_postfix() end
      local before, mark = pf.count(), pf.mark()
      local conn = assert(smtp.connect(opts { chunking = chunking }))
      local list, bodies = {}, {}
      for i = 1, 50 do
        bodies[i] = ("From: a@example.com\r\nTo: n%d@example.org\r\nSubject: %s %d\r\nMessage-ID: <%s%d@example.com>\r\n\r\n" ..
          "body of %d\r\n.dot\r\n"):format(i, how, i, how, i, i) .. ("y"):rep(i * 17) .. "\r\n"
        list[i] = { from = "a@example.com", to = ("n%d@example.org"):format(i), message = bodies[i] }
      end
      local out = conn:send_many(list)
      conn:close()
      assert.equal(50, #out)
      local ids = {}
      for i, res in ipairs(out) do
        assert.is_nil(res.kind, tostring(res))
        assert.same({ ("n%d@example.org"):format(i) }, res.accepted)
        assert.equal(250, res.reply.code)
        assert.equal(("<%s%d@example.com>"):format(how, i), res.message_id)
        local id = qid_of(res)
        assert.is_nil(ids[id], "queue ID given twice")
        ids[id] = i
      end
      local stats = pf.session(mark)
      if chunking then
        assert.equal("ehlo=2 starttls=1 mail=50 rcpt=50 bdat=50 rset=49 quit=1 commands=203", stats)
      else
        assert.equal("ehlo=2 starttls=1 mail=50 rcpt=50 data=50 quit=1 commands=154", stats)
      end
      local by_id, n = relayed(before, 50)
      assert.equal(50, n)
      for id, i in pairs(ids) do
        assert.is_not_nil(by_id[id], "message " .. i .. " not relayed")
        check_relayed(by_id[id], id, bodies[i], "ESMTPS", ("n%d@example.org"):format(i))
      end
    end)
  end

  for _, chunking in ipairs { true, false } do
    local how = chunking and "BDAT" or "DATA"
    it("turns bare LF and CR into CRLF, so Postfix's smtpd_forbid_bare_newline = reject takes the message (" .. how .. ")", function()
      if not pf then return without_postfix() end
      local raw = "From: a@example.com\nTo: b@example.org\nSubject: bare\nMessage-ID: <bare@example.com>\n\n" ..
        "unix line\nold mac line\rmixed\r\n.\n..dots\rlast line without an end"
      local normalized = raw:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n") .. "\r\n"
      local before, mark = pf.count(), pf.mark()
      local res, err = smtp.send(opts { message = raw, chunking = chunking })
      assert.is_nil(err)
      assert.same({ "b@example.org" }, res.accepted)
      assert.is_truthy(pf.session(mark):match(chunking and " bdat=1 " or " data=1 "))
      local by_id = relayed(before, 1)
      check_relayed(by_id[qid_of(res)], qid_of(res), normalized, "ESMTPS", "b@example.org")
    end)
  end

  it("keeps a pipelined send_many batch in step when messages in the middle fail (Postfix's real replies)", function()
    if not pf then return without_postfix() end
    local function msg(i)
      return ("From: a@example.com\r\nSubject: batch %d\r\nMessage-ID: <batch%d@example.com>\r\n\r\nbody %d\r\n"):format(i, i, i)
    end
    local list = {
      { from = "a@example.com", to = "b@example.org", message = msg(1) },
      { from = "a@example.com", to = { "bad@example.org" }, message = msg(2) },
      { from = "a@example.com", to = { "gone@example.org", "c@example.org" }, message = msg(3) },
      { from = "a@example.com", to = { "b@example.org" }, message = msg(4) },
      { from = "a@example.com", to = { "gone@example.org", "bad@example.org" }, message = msg(5) },
      { from = "a@example.com", to = {}, message = msg(6) },
      { from = "a@example.com", to = "c@example.org", message = msg(7) },
    }
    local before, mark = pf.count(), pf.mark()
    local conn = assert(smtp.connect(opts()))
    local out = conn:send_many(list)
    -- and the session is still in step afterwards
    local after, aerr = conn:send { from = "a@example.com", to = "b@example.org", message = msg(8) }
    assert.is_nil(aerr)
    conn:close()
    assert.equal(7, #out)
    local sent = { [1] = 1, [3] = 3, [4] = 4, [7] = 7 }
    for i in pairs(sent) do assert.is_nil(out[i].kind, tostring(out[i])) end
    assert.same({ "c@example.org" }, out[3].accepted)
    assert.same({ { recipient = "gone@example.org", code = 550, enhanced = "5.1.1",
      text = "<gone@example.org>: Recipient address rejected: mailbox gone" } }, out[3].rejected)
    for _, i in ipairs { 2, 5 } do
      assert.equal("rejected", out[i].kind)
      assert.equal("rcpt", out[i].phase)
    end
    assert.equal(554, out[2].code)
    assert.equal(550, out[5].code)
    assert.equal(2, #out[5].rejected)
    assert.equal("invalid", out[6].kind)
    local stats = pf.session(mark)
    -- 7 transactions reach the server (the empty recipient list does not); the refused ones'
    -- BDAT get "no valid recipients"
    assert.is_truthy(stats:match("^ehlo=2 starttls=1 mail=7 rcpt=5/9 bdat=5/7 rset=%d+ quit=1 commands="), stats)
    local by_id, n = relayed(before, 5)
    assert.equal(5, n)
    sent[8] = 8
    for i in pairs(sent) do
      local res = i == 8 and after or out[i]
      check_relayed(by_id[qid_of(res)], qid_of(res), msg(i), "ESMTPS", res.accepted[1])
    end
  end)

  it("reports Postfix's 421 in the middle of a pipelined group (too many errors) as kind closed, temporary", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send(opts { port = pf.strict_port,
      to = { "bad@example.org", "gone@example.org", "b@example.org" } })
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_true(err.temporary)
    assert.equal(421, err.code)
    assert.equal("4.7.0", err.enhanced)
    assert.equal("postfix.test Error: too many errors", err.text)
    local stats = pf.session(mark)
    assert.is_truthy(stats:match("^ehlo=2 starttls=1 mail=1 rcpt=0/2 commands=4/6$"), stats)
    assert.is_truthy(pf.log(mark):find("too many errors after RCPT from localhost"))
    assert.equal(before, pf.count())
  end)

  it("refuses locally what is over Postfix's SIZE, before MAIL, and the session stays usable", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local conn = assert(smtp.connect(opts { port = pf.small_port }))
    assert.equal("100000", conn:extensions().SIZE)
    local res, err = conn:send { from = "a@example.com", to = "b@example.org", message = big_message(150000, "s1") }
    assert.is_nil(res)
    assert.equal("rejected", err.kind)
    assert.equal(552, err.code)
    assert.equal("5.3.4", err.enhanced)
    assert.equal("mail", err.phase)
    local ok, err2 = conn:send { from = "a@example.com", to = "b@example.org", message = BODY }
    assert.is_nil(err2)
    conn:close()
    -- one MAIL only: the big message never reached the wire
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7", pf.session(mark))
    local by_id = relayed(before, 1)
    check_relayed(by_id[qid_of(ok)], qid_of(ok), BODY, "ESMTPS", "b@example.org")
  end)

  for _, chunking in ipairs { true, false } do
    local how = chunking and "BDAT" or "DATA"
    it("takes Postfix's 552 for a streamed message of unknown size over its limit (" .. how .. "), then sends the next", function()
      if not pf then return without_postfix() end
      local before, mark = pf.count(), pf.mark()
      local conn = assert(smtp.connect(opts { port = pf.small_port, chunking = chunking }))
      local big = big_message(300000, "s2")
      local done = false
      local function source()
        if done then return nil end
        done = true
        return big
      end
      local res, err = conn:send { from = "a@example.com", to = "b@example.org", message = source }
      assert.is_nil(res)
      assert.equal("rejected", err.kind)
      assert.equal(552, err.code)
      assert.equal("5.3.4", err.enhanced)
      assert.equal("data_end", err.phase)
      local ok, err2 = conn:send { from = "a@example.com", to = "b@example.org", message = BODY }
      assert.is_nil(err2)
      conn:close()
      local stats = pf.session(mark)
      assert.is_truthy(stats:match("^ehlo=2 starttls=1 mail=2 rcpt=2 "), stats)
      local by_id, n = relayed(before, 1)
      assert.equal(1, n)
      check_relayed(by_id[qid_of(ok)], qid_of(ok), BODY, "ESMTPS", "b@example.org")
    end)
  end

  it("sends SMTPUTF8 addresses and headers; Postfix relays them with SMTPUTF8", function()
    if not pf then return without_postfix() end
    local to = "bj\195\182rn@example.org"
    local body = "From: a@example.com\r\nTo: " .. to .. "\r\nSubject: Gr\195\188\195\159e\r\n" ..
      "Message-ID: <u1@example.com>\r\n\r\nhej\r\n"
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send(opts { to = to, message = body })
    assert.is_nil(err)
    assert.same({ to }, res.accepted)
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7", pf.session(mark))
    local by_id = relayed(before, 1)
    local r = by_id[qid_of(res)]
    check_relayed(r, qid_of(res), body, "UTF8SMTPS", to)
    assert.same({ to }, r.to)
    assert.is_truthy(r.mail:match("^FROM:<a@example%.com> SIZE=%d+ BODY=8BITMIME SMTPUTF8$"), r.mail)
  end)

  it("passes DSN NOTIFY, RET, ENVID and ORCPT (xtext) that Postfix takes and relays on", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send(opts {
      to = { "b@example.org", "x+y=z@example.org" },
      dsn = { notify = { "SUCCESS", "FAILURE" }, ret = "HDRS", envid = "env 42+x" },
    })
    assert.is_nil(err)
    assert.same({ "b@example.org", "x+y=z@example.org" }, res.accepted)
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=2 bdat=1 quit=1 commands=8", pf.session(mark))
    local by_id = relayed(before, 1)
    local r = by_id[qid_of(res)]
    check_relayed(r, qid_of(res), BODY, "ESMTPS", nil)
    assert.is_truthy(r.mail:match("^FROM:<a@example%.com> SIZE=%d+ BODY=8BITMIME ENVID=env%+2042%+2Bx RET=HDRS$"), r.mail)
    assert.same({
      "TO:<b@example.org> ORCPT=rfc822;b@example.org NOTIFY=SUCCESS,FAILURE",
      "TO:<x+y=z@example.org> ORCPT=rfc822;x+2By+3Dz@example.org NOTIFY=SUCCESS,FAILURE",
    }, r.rcpts)
  end)

  it("sends DSN ORCPT for a non-ASCII recipient as utf-8 (RFC 6533); Postfix decodes it to the same address", function()
    if not pf then return without_postfix() end
    local to = "x+\195\182=y@example.org"
    local before = pf.count()
    local res, err = smtp.send(opts { to = { to }, dsn = { notify = "SUCCESS", envid = "e1" },
      message = "Subject: orcpt\r\n\r\nx\r\n" })
    assert.is_nil(err)
    assert.same({ to }, res.accepted)
    local r = relayed(before, 1)[qid_of(res)]
    assert.is_truthy(r.mail:match("^FROM:<a@example%.com> SIZE=%d+ BODY=8BITMIME ENVID=e1 SMTPUTF8$"), r.mail)
    -- Postfix passes it on as utf-8-addr-xtext: the same address, '+', 'ö' and '=' escaped
    assert.same({ "TO:<" .. to .. "> ORCPT=utf-8;x\\x{2B}\\x{F6}\\x{3D}y@example.org NOTIFY=SUCCESS" }, r.rcpts)
  end)

  it("sends an smtp.message (encoded subject, a long line, an attachment, Bcc) that arrives as msg:tostring()", function()
    if not pf then return without_postfix() end
    local message = require "smtp.message"
    local bin = {}
    for i = 0, 4095 do bin[#bin + 1] = string.char(i % 256) end
    local msg = message.new {
      from = "Alice <a@example.com>", to = { "Bob <b@example.org>" }, bcc = { "hidden@example.org" },
      subject = "Gr\195\188\195\159e aus K\195\182ln " .. ("\195\188"):rep(40),
      text = "plain " .. ("long "):rep(400) .. "\n.\nline 3 \226\130\172\n",
      html = "<p>html</p>",
      attachments = { { filename = "a.bin", content = table.concat(bin), content_type = "application/octet-stream" } },
    }
    local before, mark = pf.count(), pf.mark()
    local res, err = smtp.send { server = "127.0.0.1", port = pf.port, cafile = pf.ca, helo = "client.test",
      timeout = 15, message = msg }
    assert.is_nil(err)
    assert.same({ "b@example.org", "hidden@example.org" }, res.accepted)
    assert.equal(msg.message_id, res.message_id)
    assert.is_truthy(pf.session(mark):match("^ehlo=2 starttls=1 mail=1 rcpt=2 bdat=%d+ quit=1 commands=%d+$"))
    local by_id = relayed(before, 1)
    local r = by_id[qid_of(res)]
    assert.same({ "b@example.org", "hidden@example.org" }, r.to)
    local wire = msg:tostring()
    assert.is_nil(wire:find("hidden@example.org", 1, true))
    check_relayed(r, qid_of(res), wire, "ESMTPS", nil)
    -- Postfix had nothing to fold: every line within 998 octets
    assert.is_nil(pf.log(mark):find("breaking line", 1, true))
  end)

  it("drives the lower-level session methods (noop, mail, rcpt, data, rset) against Postfix", function()
    if not pf then return without_postfix() end
    local before, mark = pf.count(), pf.mark()
    local conn = assert(smtp.connect(opts()))
    local function reply(r) return { r.code, r.enhanced, r.text } end
    assert.same({ 250, "2.0.0", "Ok" }, reply(assert(conn:noop())))
    assert.same({ 250, "2.1.0", "Ok" }, reply(assert(conn:mail("a@example.com"))))
    assert.same({ 554, "5.7.1", "<bad@example.org>: Recipient address rejected: Access denied" },
      reply(assert(conn:rcpt("bad@example.org"))))
    assert.same({ 250, "2.1.5", "Ok" }, reply(assert(conn:rcpt("b@example.org"))))
    local d = assert(conn:data(BODY))
    assert.equal(250, d.code)
    assert.equal("2.0.0", d.enhanced)
    local qid = assert(postfix.queue_id(d.text))
    assert.same({ 250, "2.0.0", "Ok" }, reply(assert(conn:rset())))
    conn:close()
    assert.equal("ehlo=2 starttls=1 mail=1 rcpt=1/2 data=1 rset=1 noop=1 quit=1 commands=9/10", pf.session(mark))
    local by_id = relayed(before, 1)
    check_relayed(by_id[qid], qid, BODY, "ESMTPS", "b@example.org")
  end)

  it("reports a session Postfix closed while idle (421 4.4.2 timeout) as kind closed, temporary", function()
    if not pf then return without_postfix() end
    local mark = pf.mark()
    local conn = assert(smtp.connect(opts { port = pf.idle_port }))
    assert.is_truthy(pf.wait_log(mark, "timeout after [^\n]* from localhost", 10))
    local before = pf.count()
    local res, err = conn:send { from = "a@example.com", to = "b@example.org", message = BODY }
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_true(err.temporary)
    assert.equal(421, err.code)
    assert.equal("4.4.2", err.enhanced)
    local res2, err2 = conn:send { from = "a@example.com", to = "b@example.org", message = BODY }
    assert.is_nil(res2)
    assert.equal("closed", err2.kind)
    conn:close()
    assert.equal(before, pf.count())
  end)

  describe("AUTH (Postfix's SASL over the Dovecot protocol, smtpd_tls_auth_only, relay only when authenticated)", function()
    local function aopts(t)
      local o = opts { port = pf.auth_port }
      for k, v in pairs(t or {}) do o[k] = v end
      return o
    end

    it("offers AUTH PLAIN LOGIN only after STARTTLS; authenticates with PLAIN (picked) and LOGIN (named), then relays", function()
      if not pf then return without_postfix() end
      local conn = assert(smtp.connect(aopts()))
      assert.equal("PLAIN LOGIN", conn:extensions().AUTH)
      conn:close()
      local plain = assert(smtp.connect(aopts { tls = "none" }))
      assert.is_nil(plain:extensions().AUTH)
      plain:close()
      for _, mech in ipairs { "PLAIN", "LOGIN" } do
        local n_auth = #pf.auths()
        local before, mark = pf.count(), pf.mark()
        local res, err = smtp.send(aopts { auth = { user = pf.user, password = pf.password,
          mechanism = mech ~= "PLAIN" and mech or nil } })
        assert.is_nil(err)
        assert.equal(mech, res.server.auth)
        assert.same({ "b@example.org" }, res.accepted)
        assert.equal("ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 bdat=1 quit=1 commands=8", pf.session(mark))
        assert.is_truthy(pf.log(mark):find(": client=localhost%[127%.0%.0%.1%], sasl_method=" .. mech ..
          ", sasl_username=user@postfix%.test\n"))
        local seen = pf.auths()
        assert.equal(n_auth + 1, #seen)
        assert.same({ mechanism = mech, user = pf.user, ok = true }, seen[#seen])
        local by_id = relayed(before, 1)
        check_relayed(by_id[qid_of(res)], qid_of(res), BODY, "ESMTPSA", "b@example.org")
      end
    end)

    it("gets kind auth with Postfix's 535 5.7.8 for a wrong password, and sends no MAIL", function()
      if not pf then return without_postfix() end
      local before, mark = pf.count(), pf.mark()
      local res, err = smtp.send(aopts { auth = { user = pf.user, password = "wrong" } })
      assert.is_nil(res)
      assert.equal("auth", err.kind)
      assert.equal("auth", err.phase)
      assert.equal(535, err.code)
      assert.equal("5.7.8", err.enhanced)
      assert.equal("Error: authentication failed: (reason unavailable)", err.text)
      assert.equal("ehlo=2 starttls=1 auth=0/1 quit=1 commands=4/5", pf.session(mark))
      assert.same({ mechanism = "PLAIN", user = pf.user, ok = false }, pf.auths()[#pf.auths()])
      assert.equal(before, pf.count())
    end)

    it("is refused relay without AUTH (554 5.7.1 Relay access denied, kind rejected)", function()
      if not pf then return without_postfix() end
      local before, mark = pf.count(), pf.mark()
      local res, err = smtp.send(aopts())
      assert.is_nil(res)
      assert.equal("rejected", err.kind)
      assert.equal("rcpt", err.phase)
      assert.equal(554, err.code)
      assert.equal("5.7.1", err.enhanced)
      assert.equal("<b@example.org>: Relay access denied", err.text)
      assert.equal("ehlo=2 starttls=1 mail=1 rcpt=0/1 bdat=0/1 rset=1 quit=1 commands=6/8", pf.session(mark))
      assert.equal(before, pf.count())
    end)
  end)
end)
