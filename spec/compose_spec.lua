-- smtp.message options for threads, mailing lists and calendars: a caller's Message-ID,
-- In-Reply-To and References; List-Id and the RFC 2369 / RFC 8058 unsubscribe fields, signed by
-- DKIM as RFC 8058 §4 asks (checked with dkimpy); invitations read back with Python's email
-- package and python3-icalendar.
local helper = require "helper"
local core = require "smtp.core"
local message = require "smtp.message"
local S = require "support.message"

local function new(t)
  t.from = t.from or "Alice <alice@example.com>"
  t.to = t.to or "bob@example.org"
  return message.new(S.fixed(t))
end

local function bad(t, pattern)
  local m, err = new(t)
  assert.is_nil(m, pattern)
  assert.equal("invalid", err.kind)
  assert.truthy(err.text:find(pattern, 1, true), err.text .. " (expected: " .. pattern .. ")")
end

-- The header section of a raw message, unfolded, as a list of { name, value }.
local function header_fields(raw)
  local head = raw:match("^(.-\r\n)\r\n"):gsub("\r\n[ \t]", " ")
  local out = {}
  for name, value in head:gmatch("([^:\r\n]+): ([^\r\n]*)\r\n") do out[#out + 1] = { name, value } end
  return out
end

local function field(raw, name)
  for _, f in ipairs(header_fields(raw)) do if f[1]:lower() == name:lower() then return f[2] end end
end

describe("message.new threading", function()
  it("takes a caller's Message-ID with or without angle brackets", function()
    local m = assert(new { message_id = "<order-42.1@shop.example.com>" })
    assert.equal("<order-42.1@shop.example.com>", m.message_id)
    assert.equal("<order-42.1@shop.example.com>", field(m:tostring(), "Message-ID"))
    m = assert(new { message_id = "x+y/z=1@[192.0.2.1]" })
    assert.equal("<x+y/z=1@[192.0.2.1]>", m.message_id)
    -- exactly one Message-ID field either way
    local n = 0
    for _, f in ipairs(header_fields(m:tostring())) do if f[1] == "Message-ID" then n = n + 1 end end
    assert.equal(1, n)
    local id = "<" .. string.rep("a", message.MSG_ID_MAX - 14) .. "@example.com>"
    assert.equal(message.MSG_ID_MAX, #id)
    assert.equal(id, assert(new { message_id = id }).message_id)
  end)

  it("refuses a Message-ID that is not an RFC 5322 msg-id", function()
    bad({ message_id = "<a@b>\r\nBcc: x@y" }, "message_id: control character")
    bad({ message_id = "a\0@b" }, "message_id: control character")
    bad({ message_id = "no-at-sign" }, "message_id: not a msg-id")
    bad({ message_id = "<a b@c>" }, "message_id: not a msg-id")
    bad({ message_id = "<a@b@c>" }, "message_id: not a msg-id")
    bad({ message_id = "<.a@b>" }, "message_id: not a msg-id")
    bad({ message_id = "<a..b@c>" }, "message_id: not a msg-id")
    bad({ message_id = "<a@>" }, "message_id: not a msg-id")
    bad({ message_id = "<<a@b>>" }, "message_id: not a msg-id")
    bad({ message_id = "<é@b>" }, "message_id: not a msg-id")
    bad({ message_id = 42 }, "message_id: msg-id must be a string")
    bad({ message_id = "<" .. string.rep("a", message.MSG_ID_MAX) .. "@b>" }, "over " .. message.MSG_ID_MAX .. " octets")
    bad({ headers = { { "Message-ID", "<a@b>" } } }, "given twice")
  end)

  it("writes In-Reply-To and References, folded between msg-ids, as Python reads them", function()
    local refs = {}
    for i = 1, 8 do refs[i] = ("<thread-%d.%s@lists.example.org>"):format(i, string.rep("x", 20)) end
    local m = assert(new { in_reply_to = "parent@example.org", references = refs })
    local raw = m:tostring()
    for line in raw:match("^(.-)\r\n\r\n"):gmatch("[^\r\n]+") do assert.is_true(#line <= 78, line) end
    assert.equal("<parent@example.org>", field(raw, "In-Reply-To"))
    assert.equal(table.concat(refs, " "), field(raw, "References"))
    local p = S.parse({ raw })[1]
    assert.same({}, p.defects)
    assert.equal(table.concat(refs, " "), (p.hdr["references"][1]:gsub("%s+", " ")))
    assert.equal("<parent@example.org>", p.hdr["in-reply-to"][1])
    -- a string of several, separated by spaces
    raw = assert(new { references = "<a@x.example> b@y.example" }):tostring()
    assert.equal("<a@x.example> <b@y.example>", field(raw, "References"))
  end)

  it("refuses bad threading values and a second In-Reply-To in headers", function()
    bad({ in_reply_to = "<a@b>\r\nX: y" }, "in_reply_to: control character")
    bad({ references = { "<a@b>", "nope" } }, "references: not a msg-id")
    bad({ references = {} }, "references: no msg-id")
    bad({ references = 5 }, "references: a msg-id or a list of them expected")
    bad({ in_reply_to = "<a@b>", headers = { { "In-Reply-To", "<c@d>" } } }, "given twice")
  end)
end)

-- A fresh Ed25519 key and its DNS record.
local function edkey()
  local dir = helper.tmpdir()
  helper.need("openssl")
  helper.sh("openssl genpkey -algorithm ED25519 -out " .. dir .. "/ed.pem 2>/dev/null")
  local pem = assert(helper.read(dir .. "/ed.pem"))
  return pem, "v=DKIM1; k=ed25519; p=" .. assert(core.dkim_key(pem)):public()
end

describe("message.new list fields", function()
  local list = { id = "Monthly News <news.example.com>",
    unsubscribe = { url = "https://example.com/unsub?u=42&l=news", mailto = "mailto:unsub@example.com?subject=unsubscribe" } }

  it("writes List-Id, List-Unsubscribe and List-Unsubscribe-Post (RFC 2369, 2919, 8058)", function()
    local raw = assert(new { list = list, text = "hi" }):tostring()
    assert.equal("Monthly News <news.example.com>", field(raw, "List-Id"))
    assert.equal("<https://example.com/unsub?u=42&l=news>, <mailto:unsub@example.com?subject=unsubscribe>",
      field(raw, "List-Unsubscribe"))
    assert.equal("List-Unsubscribe=One-Click", field(raw, "List-Unsubscribe-Post"))
    local p = S.parse({ raw })[1]
    assert.same({}, p.defects)
    assert.equal("List-Unsubscribe=One-Click", p.hdr["list-unsubscribe-post"][1])
    -- the other RFC 2369 fields, one URL or several
    raw = assert(new { list = { help = "mailto:help@example.com", archive = { "https://example.com/a", "mailto:arch@example.com" },
      post = "mailto:news@example.com", owner = "mailto:owner@example.com", subscribe = "https://example.com/s" } }):tostring()
    assert.equal("<mailto:help@example.com>", field(raw, "List-Help"))
    assert.equal("<https://example.com/a>, <mailto:arch@example.com>", field(raw, "List-Archive"))
    assert.equal("<mailto:news@example.com>", field(raw, "List-Post"))
    assert.equal("<mailto:owner@example.com>", field(raw, "List-Owner"))
    assert.equal("<https://example.com/s>", field(raw, "List-Subscribe"))
    -- a UTF-8 list name is RFC 2047 encoded
    raw = assert(new { list = { id = "Grüße <gruesse.example.com>" } }):tostring()
    assert.truthy(field(raw, "List-Id"):find("^=%?UTF%-8%?B%?.* <gruesse%.example%.com>$"))
  end)

  it("adds List-Unsubscribe-Post only with an https URL (RFC 8058), unless one_click = false", function()
    local raw = assert(new { list = { unsubscribe = { mailto = "mailto:u@example.com" } } }):tostring()
    assert.equal("<mailto:u@example.com>", field(raw, "List-Unsubscribe"))
    assert.is_nil(field(raw, "List-Unsubscribe-Post"))
    raw = assert(new { list = { unsubscribe = { url = "http://example.com/u" } } }):tostring()
    assert.equal("<http://example.com/u>", field(raw, "List-Unsubscribe"))
    assert.is_nil(field(raw, "List-Unsubscribe-Post"))
    raw = assert(new { list = { unsubscribe = { url = "https://example.com/u", one_click = false } } }):tostring()
    assert.is_nil(field(raw, "List-Unsubscribe-Post"))
    bad({ list = { unsubscribe = { mailto = "mailto:u@example.com", one_click = true } } }, "needs an https URL")
  end)

  it("refuses bad list values", function()
    bad({ list = "x" }, "list must be a table")
    bad({ list = { unsubscribe = {} } }, "list.unsubscribe:")
    bad({ list = { unsubscribe = { url = "https://example.com/a b" } } }, "list.unsubscribe.url: not a URL")
    bad({ list = { unsubscribe = { url = "https://example.com/>\r\nBcc: x@y" } } }, "not a URL")
    bad({ list = { unsubscribe = { url = "https://example.com/%zz" } } }, "not a URL")
    bad({ list = { unsubscribe = { url = "https:///path" } } }, "URL without a host")
    bad({ list = { unsubscribe = { url = "ftp://example.com/u" } } }, "an https URL expected")
    bad({ list = { unsubscribe = { url = "https://example.com/" .. string.rep("a", 900) } } }, "over 900 octets")
    bad({ list = { unsubscribe = { mailto = "https://example.com/u" } } }, "a mailto: URL expected")
    bad({ list = { unsubscribe = { mailto = "mailto:?subject=x" } } }, "mailto URL without an address")
    bad({ list = { id = "nodot" } }, "list.id: not a list id")
    bad({ list = { id = "a b.example" } }, "list.id: not a list id")
    bad({ list = { help = {} } }, "list.help: no URL")
    bad({ list = list, headers = { { "List-Unsubscribe", "<mailto:x@y.example>" } } }, "given twice (set by list)")
  end)

  it("has DKIM sign List-Unsubscribe and List-Unsubscribe-Post, over-signed (dkimpy verifies)", function()
    local pem, record = edkey()
    local raw = assert(new { list = list, text = "hi", dkim = { domain = "example.com", selector = "s1", key = pem } }):tostring()
    local sig = raw:match("^(DKIM%-Signature:.-)\r\n%S"):gsub("\r\n[ \t]", "")
    local h = sig:match("h=([^;]*);"):gsub("%s", ""):lower()
    local count = {}
    for n in h:gmatch("[^:]+") do count[n] = (count[n] or 0) + 1 end
    -- present once, named twice: a copy added later breaks the signature
    assert.equal(2, count["list-unsubscribe"])
    assert.equal(2, count["list-unsubscribe-post"])
    assert.equal(2, count["list-id"])
    local got = S.parse({ raw,
      "List-Unsubscribe: <https://evil.example/u>\r\n" .. raw,
      "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" .. raw,
      (raw:gsub("u=42", "u=43", 1)) }, record)
    assert.is_true(got[1].verify, "the message as signed")
    assert.is_false(got[2].verify, "a prepended List-Unsubscribe still verifies")
    assert.is_false(got[3].verify, "a prepended List-Unsubscribe-Post still verifies")
    assert.is_false(got[4].verify, "a changed unsubscribe URL still verifies")
  end)
end)

local ICS = table.concat({
  "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//lua-smtp//spec//EN", "METHOD:%s", "BEGIN:VEVENT",
  "UID:20240102-1@example.com", "DTSTAMP:20240101T120000Z", "DTSTART:20240102T100000Z",
  "DTEND:20240102T110000Z",
  "SUMMARY:Réunion de planification trimestrielle: budget, calendrier et équipe (salle Ödön)",
  "DESCRIPTION:" .. string.rep("Ordre du jour très détaillé. ", 6),
  "ORGANIZER;CN=Alice:mailto:alice@example.com",
  "ATTENDEE;CN=Bob;ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:bob@example.org",
  "SEQUENCE:0", "STATUS:CONFIRMED", "END:VEVENT", "END:VCALENDAR", "" }, "\n")

-- What Python's email package and icalendar make of a message with an invitation.
local calcheck_py = [[
import sys, re, email, email.policy, icalendar
raw = open(sys.argv[1], 'rb').read()
given = open(sys.argv[2], 'rb').read().decode()
msg = email.message_from_bytes(raw, policy=email.policy.default)
out = []
def lua(v):
    if v is None: return 'nil'
    if isinstance(v, bool): return 'true' if v else 'false'
    return '"' + ''.join('\\%d' % b for b in str(v).encode()) + '"'
def tree(p):
    if p.is_multipart(): return p.get_content_type() + '(' + ','.join(tree(c) for c in p.iter_parts()) + ')'
    return p.get_content_type()
out.append('tree=' + lua(tree(msg)))
out.append('defects=' + lua(';'.join(str(d) for p in msg.walk() for d in p.defects)))
unfold = lambda t: re.sub('\r\n[ \t]', '', t.replace('\r\n', '\n').replace('\n', '\r\n'))
alt = [p for p in msg.walk() if p.get_content_type() == 'multipart/alternative']
cal = [p for p in alt[0].iter_parts() if p.get_content_type() == 'text/calendar'] if alt else []
if cal:
    c = cal[0]
    out.append('method=' + lua(c.get_param('method')))
    out.append('charset=' + lua(c.get_content_charset()))
    text = c.get_content()
    out.append('lines_ok=' + lua(all(len(l.encode()) <= 75 for l in text.replace('\r\n', '\n').split('\n'))))
    out.append('same_text=' + lua(unfold(text) == unfold(given)))
    a, b = icalendar.Calendar.from_ical(text), icalendar.Calendar.from_ical(given)
    out.append('same_cal=' + lua(a.to_ical() == b.to_ical()))
    out.append('ical_method=' + lua(a.get('method')))
    ev = a.walk('VEVENT')[0]
    out.append('summary=' + lua(ev.get('summary')))
    out.append('attendee=' + lua(ev.get('attendee')))
att = [p for p in msg.walk() if p.get_content_disposition() == 'attachment']
if att:
    p = att[0]
    out.append('att_type=' + lua(p.get_content_type()))
    out.append('att_name=' + lua(p.get_filename()))
    data = p.get_content()
    if isinstance(data, bytes): data = data.decode()
    out.append('att_same=' + lua(icalendar.Calendar.from_ical(data).to_ical() == icalendar.Calendar.from_ical(given).to_ical()))
    out.append('att_text=' + lua(unfold(data) == unfold(given)))
print('return {' + ','.join(out) + '}')
]]

local function calcheck(raw, given)
  helper.need("python3 icalendar")
  local dir = helper.tmpdir()
  helper.write(dir .. "/c.py", calcheck_py)
  helper.write(dir .. "/m.eml", raw)
  helper.write(dir .. "/given.ics", given)
  local out = helper.sh(helper.python .. " " .. dir .. "/c.py " .. dir .. "/m.eml " .. dir .. "/given.ics 2>&1")
  local f = (loadstring or load)(out)
  assert(f, out)
  return f()
end

describe("message.new calendar invitations", function()
  it("puts text/calendar; method=REQUEST in the alternative and invite.ics beside it (email, icalendar)", function()
    local ics = ICS:format("REQUEST")
    local m = assert(new { subject = "Invitation", text = "You are invited.", html = "<p>You are invited.</p>",
      calendar = ics, attachments = { { content = "x,y\r\n", filename = "a.csv" } } })
    local raw = m:tostring()
    local r = calcheck(raw, ics)
    assert.equal("multipart/mixed(multipart/alternative(text/plain,text/html,text/calendar),application/ics,text/csv)", r.tree)
    assert.equal("", r.defects)
    assert.equal("REQUEST", r.method)
    assert.equal("utf-8", r.charset)
    assert.is_true(r.lines_ok, "a line over 75 octets")
    assert.is_true(r.same_text, "the calendar differs from the input beyond folding")
    assert.is_true(r.same_cal)
    assert.equal("REQUEST", r.ical_method)
    assert.equal("Réunion de planification trimestrielle: budget, calendrier et équipe (salle Ödön)", r.summary)
    assert.equal("mailto:bob@example.org", r.attendee)
    assert.equal("application/ics", r.att_type)
    assert.equal("invite.ics", r.att_name)
    assert.is_true(r.att_same)
    assert.is_true(r.att_text)
    assert.truthy(raw:find("Content-Type: text/calendar; charset=UTF-8; method=REQUEST\r\n", 1, true))
  end)

  it("takes CANCEL and REPLY, CRLF or LF, folded or not, and text only", function()
    for _, method in ipairs { "CANCEL", "REPLY" } do
      local ics = ICS:format(method):gsub("\n", "\r\n")
      local r = calcheck(assert(new { text = "update", calendar = { content = ics, method = method:lower(),
        filename = "update.ics" } }):tostring(), ics)
      assert.equal("multipart/mixed(multipart/alternative(text/plain,text/calendar),application/ics)", r.tree)
      assert.equal(method, r.method)
      assert.equal(method, r.ical_method)
      assert.equal("update.ics", r.att_name)
      assert.is_true(r.same_text and r.same_cal and r.att_same)
    end
    -- already folded by the caller: kept as given
    local folded = ICS:format("REQUEST"):gsub("\n", "\r\n"):gsub("(DESCRIPTION:[^\r]-)%. ", "%1.\r\n  ", 1)
    local raw = assert(new { calendar = folded }):tostring()
    local r = calcheck(raw, folded)
    assert.is_true(r.same_text and r.same_cal)
    -- no attachment when asked
    r = calcheck(assert(new { calendar = { content = ICS:format("REQUEST"), attachment = false } }):tostring(), ICS:format("REQUEST"))
    assert.equal("multipart/alternative(text/plain,text/calendar)", r.tree)
  end)

  it("refuses iCalendar text without VCALENDAR or METHOD, or whose METHOD is not the one asked for", function()
    bad({ calendar = "BEGIN:VEVENT\r\nEND:VEVENT\r\n" }, "BEGIN:VCALENDAR ... END:VCALENDAR expected")
    bad({ calendar = ICS:format("REQUEST"):gsub("END:VCALENDAR\n$", "") }, "BEGIN:VCALENDAR ... END:VCALENDAR expected")
    bad({ calendar = ICS:format("REQUEST"):gsub("METHOD:REQUEST\n", "") }, "has no METHOD")
    bad({ calendar = ICS:format("PUBLISH"):gsub("METHOD:PUBLISH\n", "BEGIN:VTIMEZONE\nMETHOD:REQUEST\nEND:VTIMEZONE\n") }, "has no METHOD")
    bad({ calendar = ICS:format("INVITE") }, "unknown METHOD INVITE")
    bad({ calendar = { content = ICS:format("CANCEL"), method = "REQUEST" } }, "does not match the text's METHOD:CANCEL")
    bad({ calendar = ICS:format("REQUEST") .. "\0" }, "NUL")
    bad({ calendar = "BEGIN:VCALENDAR\nMETHOD:REQUEST\nSUMMARY:\255\nEND:VCALENDAR\n" }, "not UTF-8")
    bad({ calendar = 42 }, "calendar: iCalendar text")
  end)
end)

describe("lua-smtp send with threading, list and calendar options", function()
  local peers = require "support.client_peers"
  local peer
  setup(function() peer = peers.aiosmtpd() end)
  teardown(function() if peer then peer.stop() end end)

  local function cli(args)
    local function sink()
      local t = {}
      return { write = function(self, ...) for _, v in ipairs { ... } do t[#t + 1] = v end return self end,
        text = function() return table.concat(t) end }
    end
    local out, err = sink(), sink()
    local code = require("smtp.cli.send").main(args, out, err)
    return code, out.text(), err.text()
  end

  it("sends what the options ask for", function()
    local ics = ICS:format("REQUEST")
    local path = helper.tmpdir() .. "/invite.ics"
    helper.write(path, ics)
    local code, out, err = cli { "--server", "localhost:" .. peer.port, "--cafile", peer.ca, "--timeout", "10",
      "--from", "alice@example.com", "--to", "bob@example.org", "--subject", "Invitation", "--body", "Come.",
      "--message-id", "inv-1@example.com", "--in-reply-to", "<prev@example.com>",
      "--references", "<root@example.com>", "--references", "prev@example.com",
      "--list-id", "news.example.com", "--list-unsubscribe", "https://example.com/u?x=1",
      "--list-unsubscribe", "mailto:u@example.com", "--calendar", path }
    assert.equal(0, code, err)
    assert.truthy(out:find("sent: 250", 1, true))
    local raw = peer.messages()[#peer.messages()].data
    assert.equal("<inv-1@example.com>", field(raw, "Message-ID"))
    assert.equal("<prev@example.com>", field(raw, "In-Reply-To"))
    assert.equal("<root@example.com> <prev@example.com>", field(raw, "References"))
    assert.equal("<news.example.com>", field(raw, "List-Id"))
    assert.equal("<https://example.com/u?x=1>, <mailto:u@example.com>", field(raw, "List-Unsubscribe"))
    assert.equal("List-Unsubscribe=One-Click", field(raw, "List-Unsubscribe-Post"))
    local r = calcheck(raw, ics)
    assert.equal("multipart/mixed(multipart/alternative(text/plain,text/calendar),application/ics)", r.tree)
    assert.equal("REQUEST", r.method)
    assert.is_true(r.same_cal and r.att_same)
  end)

  it("refuses bad values and options --raw cannot carry, exit 2", function()
    local base = { "--server", "localhost:1", "--from", "a@example.com", "--to", "b@example.org" }
    local function with(t) local a = {} for _, v in ipairs(base) do a[#a + 1] = v end for _, v in ipairs(t) do a[#a + 1] = v end return a end
    local code, _, err = cli(with { "--message-id", "not an id" })
    assert.equal(2, code)
    assert.truthy(err:find("message_id: not a msg-id", 1, true), err)
    code, _, err = cli(with { "--list-unsubscribe", "https://a.example/1", "--list-unsubscribe", "https://a.example/2" })
    assert.equal(2, code)
    assert.truthy(err:find("at most one http(s) URL and one mailto: URL", 1, true), err)
    local path = helper.tmpdir() .. "/raw.eml"
    helper.write(path, "Subject: x\r\n\r\ny\r\n")
    code, _, err = cli(with { "--raw", path, "--references", "<a@b.example>" })
    assert.equal(2, code)
    assert.truthy(err:find("--raw excludes --references", 1, true), err)
  end)
end)
