-- The Received header smtp.server writes (session:received, `received = true`) and the sink
-- stores (issue 17): Postfix's shape, checked against what a private Postfix smtpd writes for the
-- same kind of session (with smtpd_tls_received_header = yes); its date by the grammar; a stored
-- message parsed back by Python's email without a defect.
local helper = require "helper"
local dates = require "support.dates"
local postfix = require "support.postfix"
local received = require "smtp.received"
local server = require "smtp.server"
local smtp = require "smtp"
local loop = require "smtp.loop"

if not pcall(require, "smtp.transport.native") then
  describe("Received", function() pending("needs smtp.transport.native") end)
  return
end

local T = 1796482800 -- Sat, 05 Dec 2026 15:00:00 +0000: a fixed time, so the text is exact

describe("smtp.received.header", function()
  it("writes Postfix's lines: from, TLS, certificate, by ... with PROTOCOL id, for; date", function()
    assert.equal("Received: from client.test (mail.client.test [192.0.2.1])\r\n" ..
      "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n" ..
      "\t(No client certificate requested)\r\n" ..
      "\tby mx.test (lua-smtp) with ESMTPSA id 0A1B2C3D4E\r\n" ..
      "\tfor <b@y.test>; Sat, 05 Dec 2026 15:00:00 +0000\r\n",
      received.header { helo = "client.test", name = "mail.client.test", address = "192.0.2.1", esmtp = true,
        tls = { version = "TLSv1.3", cipher = "TLS_AES_256_GCM_SHA384", bits = 256 }, user = "alice",
        by = "mx.test", id = "0A1B2C3D4E", rcpt = "b@y.test", time = T })
  end)

  it("HELO is SMTP; no reverse name is unknown; IPv6 is tagged; several recipients put the date after the id", function()
    assert.equal("Received: from old.test (unknown [IPv6:2001:db8::1])\r\n" ..
      "\tby mx.test (lua-smtp) with SMTP id X1; Sat, 05 Dec 2026 15:00:00 +0000\r\n",
      received.header { helo = "old.test", address = "2001:db8::1", by = "mx.test", id = "X1", time = T })
  end)

  it("never lets a client's name open or close a comment, or break the line", function()
    local h = received.header { helo = "a(b)\r\n c", address = "192.0.2.1", by = "mx.test", id = "X", time = T,
      rcpt = "x>\r\ny@z" }
    assert.equal("Received: from a?b????c (unknown [192.0.2.1])\r\n\tby mx.test (lua-smtp) with SMTP id X\r\n" ..
      "\tfor <x???y@z>; Sat, 05 Dec 2026 15:00:00 +0000\r\n", h)
  end)
end)

-- Ours for a session like the one postfix_spec's client makes: EHLO client.test, STARTTLS,
-- one recipient, from 127.0.0.1.
local function ours()
  local c = helper.certs()
  local hdr
  local srv = assert(server.listen { port = 0, hostname = "mx.test", received = true,
    tls = { cert = c.server, key = c.server_key },
    on_message = function(s, env, reader)
      for _ in reader:chunks() do end
      hdr = s:received(env)
      return true
    end })
  local res, err
  loop.spawn(function()
    srv:serve()
    res, err = smtp.send { server = "127.0.0.1", port = srv.port, cafile = c.ca, helo = "client.test",
      from = "a@example.com", to = "b@example.org", message = "Subject: r\r\n\r\nhi\r\n", timeout = 15 }
    srv:close()
  end)
  loop.run()
  assert(res, tostring(err))
  return hdr
end

-- A Received field with what differs between two servers and two moments replaced by names.
local function shape(h, software)
  h = h:gsub(";[^;]*\r\n$", "; DATE\r\n")
  h = h:gsub(" id %w+", " id QUEUEID"):gsub("%(" .. software .. "%)", "(SOFTWARE)")
  h = h:gsub("\tby %S+ ", "\tby HOST "):gsub("^Received: from (%S+) %(%S+ ", "Received: from %1 (RDNS ")
  h = h:gsub("cipher %S+ %(%d+/%d+ bits%)", "cipher CIPHER (N/N bits)")
  -- Postfix 3.4 and later add the key exchange on a line of its own; we do not know it
  h = h:gsub("\r\n\t key%-exchange [^\r\n]*%)", ")")
  return h
end

describe("Received against a private Postfix", function()
  it("has the shape Postfix writes for the same session (TLS lines on), and a date by the grammar", function()
    local pf, why = postfix.start { main = "smtpd_tls_received_header = yes\n" }
    if not pf then
      if tostring(why):match("^missing peer") then error(why) end
      return pending(why)
    end
    local before = pf.count()
    local res, err = smtp.send { server = "127.0.0.1", port = pf.port, cafile = pf.ca, helo = "client.test",
      timeout = 15, from = "a@example.com", to = "b@example.org", message = "Subject: r\r\n\r\nhi\r\n" }
    local recs = res and pf.wait_relayed(before + 1, 25, before)
    pf.stop()
    assert(res, tostring(err))
    local theirs = postfix.split_received(recs[1].data)
    local mine = ours()
    assert.equal(shape(theirs, "Postfix"), shape(mine, "lua%-smtp"))
    assert.equal("Received: from client.test (RDNS [127.0.0.1])\r\n\t(using TLSv1.3 with cipher CIPHER (N/N bits))\r\n" ..
      "\t(No client certificate requested)\r\n\tby HOST (SOFTWARE) with ESMTPS id QUEUEID\r\n" ..
      "\tfor <b@example.org>; DATE\r\n", shape(mine, "lua%-smtp"))
    dates.check(mine:match(";%s*([^\r\n]*)\r\n$"))
  end)
end)

describe("a message the sink stored", function()
  it("parses with Python's email: one Received field, its date readable, no defects", function()
    local port = helper.free_port()
    local md = helper.tmpdir() .. "/Maildir"
    local sink = helper.spawn({ "lua5.4", helper.root .. "/bin/lua-smtp", "sink", "--listen", "127.0.0.1:" .. port,
      "--maildir", md, "--hostname", "sink.test" }, { limit = 60 })
    assert(helper.wait_port("127.0.0.1", port, 10), sink:output())
    local out = helper.sh("swaks --server 127.0.0.1 --port " .. port .. " --helo client.test --from a@x.test" ..
      " --to b@y.test 2>&1")
    sink:stop()
    assert.matches("250 2%.0%.0", out)
    local file = md .. "/new/" .. helper.sh("ls " .. helper.quote(md .. "/new")):match("^(%S+)\n$")
    local py = helper.tmpdir() .. "/p.py"
    helper.write(py, [[
import email, email.policy, email.utils, sys
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=email.policy.default)
r = m.get_all('Received')
print(len(r))
print(' '.join(str(r[0]).split()))
d = email.utils.parsedate_to_datetime(str(r[0]).rsplit(';', 1)[1].strip())
print(d.utcoffset().total_seconds())
print(len(m.defects), [len(h.defects) for h in r], m['Return-Path'], m['Delivered-To'])
]])
    local res = helper.sh(helper.python .. " " .. helper.quote(py) .. " " .. helper.quote(file) .. " 2>&1")
    local n, value, offset, defects = res:match("^(%d+)\n([^\n]*)\n([^\n]*)\n([^\n]*)\n$")
    assert.equal("1", n, res)
    assert.matches("^from client%.test %(unknown %[127%.0%.0%.1%]%) by sink%.test %(lua%-smtp%) with ESMTP id %x+ " ..
      "for <b@y%.test>; ", value)
    assert.equal("0.0", offset)
    assert.equal("0 [0] <a@x.test> b@y.test", defects)
  end)
end)
