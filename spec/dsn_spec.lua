-- smtp.dsn: the notifications the queue sends are RFC 3464 reports that Python's email and our
-- own parser (smtp.message.parse) both read back field by field.
local helper = require "helper"
local dsn = require "smtp.dsn"
local message = require "smtp.message"

local T0 = 1700000000  -- a fixed time: nothing here depends on the day the spec runs

local original = "From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n" ..
  "Message-ID: <m1@example.com>\r\n\r\nbody line\r\nmore\r\n"

-- Python's view: { type =, parts = {...}, msg = {field = value}, rcpt = { {field = value} }, ... }
local function python(raw)
  helper.need("python3")
  local dir = helper.tmpdir()
  helper.write(dir .. "/dsn.eml", raw)
  local out = helper.sh("PYTHONIOENCODING=utf-8:surrogateescape " .. helper.python .. " " .. helper.quote(helper.root .. "/spec/support/dsncheck.py") ..
    " <" .. helper.quote(dir .. "/dsn.eml") .. " 2>&1")
  local r = { parts = {}, msg = {}, rcpt = {}, header = {}, defects = {}, orig = {}, raw = out }
  for line in out:gmatch("[^\n]+") do
    local f = {}
    for x in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = x end
    if f[1] == "type" then r.type = f[2]
    elseif f[1] == "report-type" then r.report_type = f[2]
    elseif f[1] == "header" then r.header[f[2]] = f[3]
    elseif f[1] == "part" then r.parts[#r.parts + 1] = f[2]
    elseif f[1] == "defect" then r.defects[#r.defects + 1] = f[2]
    elseif f[1] == "msg" then r.msg[f[2]] = f[3]
    elseif f[1] == "rcpt" then
      local i = tonumber(f[2])
      r.rcpt[i] = r.rcpt[i] or {}
      r.rcpt[i][f[3]] = f[4]
    elseif f[1] == "orig" then r.orig[#r.orig + 1] = f[2]
    elseif f[1] == "text" then r.text = f[2]
    end
  end
  return r
end

local function build(recipients, extra)
  local o = { to = "ann@example.com", recipients = recipients, arrival = T0, now = T0 + 3600,
    headers = dsn.headers_of(original), reporting_mta = "mx.queue.test", queue_id = "abc123" }
  for k, v in pairs(extra or {}) do o[k] = v end
  return dsn.build(o)
end

describe("smtp.dsn", function()
  it("builds a bounce that Python's email reads as multipart/report with delivery-status fields", function()
    local raw = build {
      { recipient = "bob@example.org", action = "failed", code = 550, enhanced = "5.1.1",
        text = "no such user", remote_mta = "mx.example.org", last_attempt = T0 + 60 },
      { recipient = "carol@example.net", action = "failed", code = 451, text = "delivery time expired",
        status = "4.4.7", last_attempt = T0 + 120 },
    }
    local p = python(raw)
    assert.equal("multipart/report", p.type, p.raw)
    assert.equal("delivery-status", p.report_type)
    assert.same({ "text/plain", "message/delivery-status", "text/rfc822-headers" }, p.parts)
    assert.same({}, p.defects)
    assert.truthy(p.header.To:find("ann@example.com", 1, true))
    assert.equal("auto-replied", p.header["Auto-Submitted"])
    assert.equal("Undelivered Mail Returned to Sender", p.header.Subject)
    assert.equal("dns; mx.queue.test", p.msg["Reporting-MTA"])
    assert.equal("Tue, 14 Nov 2023 22:13:20 +0000", p.msg["Arrival-Date"])
    assert.equal(2, #p.rcpt)
    assert.same({
      ["Final-Recipient"] = "rfc822; bob@example.org", Action = "failed", Status = "5.1.1",
      ["Remote-MTA"] = "dns; mx.example.org", ["Diagnostic-Code"] = "smtp; 550 5.1.1 no such user",
      ["Last-Attempt-Date"] = "Tue, 14 Nov 2023 22:14:20 +0000",
    }, p.rcpt[1])
    assert.equal("4.4.7", p.rcpt[2].Status)
    assert.equal("smtp; 451 delivery time expired", p.rcpt[2]["Diagnostic-Code"])
    assert.same({ "From: Ann <ann@example.com>", "To: bob@example.org", "Subject: hello",
      "Message-ID: <m1@example.com>" }, p.orig)
    assert.truthy(p.text:find("<bob@example.org>: host mx.example.org said: 550 5.1.1 no such user", 1, true))
  end)

  it("is read back by smtp.message.parse, the status part kept as one text", function()
    local raw = build {
      { recipient = "bob@example.org", action = "failed", code = 550, enhanced = "5.1.1", text = "no such user",
        last_attempt = T0 },
    }
    local m = assert(message.parse(raw))
    assert.same({}, m.defects)
    assert.equal("multipart/report", m.content_type)
    assert.equal("delivery-status", m.params["report-type"])
    assert.equal(3, #m.parts)
    local st = m.parts[2]
    assert.equal("message/delivery-status", st.content_type)
    local content = st.text or st.content
    assert.truthy(content:find("Reporting-MTA: dns; mx.queue.test\r\n", 1, true))
    assert.truthy(content:find("\r\n\r\nFinal-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n", 1, true))
    assert.truthy(content:find("Diagnostic-Code: smtp; 550 5.1.1 no such user", 1, true))
    assert.equal("text/rfc822-headers", m.parts[3].content_type)
    assert.truthy(m.parts[3].content:find("Subject: hello", 1, true))
  end)

  it("builds a delayed-delivery warning", function()
    local raw = build { { recipient = "bob@example.org", action = "delayed", code = 451, enhanced = "4.3.0",
      text = "try later", will_retry_until = T0 + 5 * 86400, last_attempt = T0 } }
    local p = python(raw)
    assert.equal("multipart/report", p.type, p.raw)
    assert.equal("Delayed Mail (still being retried)", p.header.Subject)
    assert.equal("delayed", p.rcpt[1].Action)
    assert.equal("4.3.0", p.rcpt[1].Status)
    assert.equal("Sun, 19 Nov 2023 22:13:20 +0000", p.rcpt[1]["Will-Retry-Until"])
  end)

  it("keeps a remote server's text on one line and marks an international address utf-8", function()
    local raw = build { { recipient = "jörg@example.org", action = "failed", code = 550,
      text = "bad\r\nX-Injected: yes", last_attempt = T0 } }
    local p = python(raw)
    assert.same({}, p.defects)
    assert.equal("utf-8; jörg@example.org", p.rcpt[1]["Final-Recipient"])
    assert.equal("smtp; 550 bad X-Injected: yes", p.rcpt[1]["Diagnostic-Code"])
    assert.is_nil(p.rcpt[1]["X-Injected"])
  end)

  it("raises on misuse", function()
    assert.has_error(function() dsn.build("x") end, "bad argument #1 to 'build' (table expected, got string)")
    assert.has_error(function() dsn.build { to = "", recipients = { {} } } end)
    assert.has_error(function() dsn.build { to = "a@b", recipients = {} } end)
  end)
end)
