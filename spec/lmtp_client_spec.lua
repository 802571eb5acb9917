-- The LMTP client (RFC 2033): the client engine's LMTP mode fed scripted replies (LHLO, no HELO,
-- one reply per accepted recipient after the final dot or BDAT LAST, however the replies are
-- pipelined), the lmtp:// URLs, then smtp.send against a real Dovecot LMTP server
-- (spec/support/dovecot.lua) over its Unix socket and over TCP, with DATA and with BDAT:
-- per-recipient results, failures after the data (over quota, a temporary error) and the
-- delivered Maildir files compared with what was sent.
local helper = require "helper"
local dovecot = require "support.dovecot"
local core = require "smtp.core"
local url = require "smtp.url"
local smtp = require "smtp"

-- Every reply the engine gives for `input`, as "COMMAND code [more]".
local function replies(e, input)
  assert(e:feed(input))
  local out = {}
  while true do
    local r, err = e:reply()
    assert(not err, err)
    if not r then break end
    out[#out + 1] = r.command .. " " .. r.code .. (r.more and " more" or "")
  end
  return out
end

local function lmtp_engine()
  local e = core.client_engine()
  e:lmtp(true)
  assert.same({ "GREETING 220" }, replies(e, "220 lmtp ready\r\n"))
  return e
end

describe("the client engine in LMTP mode", function()
  it("greets with LHLO and has no HELO", function()
    local e = lmtp_engine()
    assert.is_true(e:ehlo("client.test"))
    assert.equal("LHLO client.test\r\n", e:take())
    local ok, why = e:helo("client.test")
    assert.is_nil(ok)
    assert.matches("LMTP has no HELO", why)
    assert.equal("", e:take())
  end)

  it("gives one reply per accepted RCPT after the final dot, marked `more` but the last", function()
    local e = lmtp_engine()
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rcpt("c@x.test"); e:rcpt("d@x.test"); e:data()
    e:take()
    assert.same({ "MAIL 250", "RCPT 250", "RCPT 550", "RCPT 250", "DATA 354" },
      replies(e, "250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n"))
    e:body("hi\r\n"); e:body_end(); e:noop()
    -- two replies for the two accepted recipients, then NOOP's: the third is not the end's
    assert.same({ "DATA_END 250 more", "DATA_END 452", "NOOP 250" },
      replies(e, "250 b saved\r\n452 d over quota\r\n250 ok\r\n"))
    assert.equal(0, e:pending())
  end)

  it("counts the accepted recipients as their replies come, for a BDAT LAST pipelined before them", function()
    local e = lmtp_engine()
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rcpt("c@x.test"); e:bdat("Subject: x\r\n\r\nhi\r\n", true)
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:bdat("x\r\n", true)
    assert.same({ "MAIL 250", "RCPT 250", "RCPT 250", "BDAT 250 more", "BDAT 250",
      "MAIL 250", "RCPT 250", "BDAT 451" },
      replies(e, "250 ok\r\n250 ok\r\n250 ok\r\n250 b\r\n250 c\r\n250 ok\r\n250 ok\r\n451 b later\r\n"))
    assert.equal(0, e:pending())
  end)

  it("has one reply to the end when no recipient was accepted, or after a refused chunk", function()
    local e = lmtp_engine()
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:bdat("x\r\n", true)
    assert.same({ "MAIL 250", "RCPT 550", "BDAT 554" }, replies(e, "250 ok\r\n550 no\r\n554 no valid recipients\r\n"))
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rcpt("c@x.test"); e:bdat("x\r\n", false); e:bdat("y\r\n", true)
    assert.same({ "MAIL 250", "RCPT 250", "RCPT 250", "BDAT 552", "BDAT 503" },
      replies(e, "250 ok\r\n250 ok\r\n250 ok\r\n552 too big\r\n503 no transaction\r\n"))
    -- a RSET between transactions forgets the count
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rset(); e:mail("a@x.test"); e:rcpt("c@x.test"); e:bdat("z\r\n", true)
    assert.same({ "MAIL 250", "RCPT 250", "RSET 250", "MAIL 250", "RCPT 250", "BDAT 250" },
      replies(e, "250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 saved\r\n"))
    assert.equal(0, e:pending())
  end)

  it("ends the fan-out at a 421", function()
    local e = lmtp_engine()
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rcpt("c@x.test"); e:bdat("x\r\n", true)
    assert.same({ "MAIL 250", "RCPT 250", "RCPT 250", "BDAT 250 more", "BDAT 421" },
      replies(e, "250 ok\r\n250 ok\r\n250 ok\r\n250 b\r\n421 going down\r\n"))
    assert.equal("closed", e:state())
  end)

  it("answers the end of data once in SMTP mode, as before", function()
    local e = core.client_engine()
    replies(e, "220 hi\r\n")
    e:mail("a@x.test"); e:rcpt("b@x.test"); e:rcpt("c@x.test"); e:bdat("x\r\n", true); e:noop()
    assert.same({ "MAIL 250", "RCPT 250", "RCPT 250", "BDAT 250", "NOOP 250" },
      replies(e, "250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n"))
    e:ehlo("client.test")
    assert.equal("EHLO client.test\r\n", e:take():match("EHLO[^\n]*\n"))
  end)
end)

-- A transport whose reads hand out `chunks` in turn, then time out; what is written goes to `log`.
local function canned(chunks, log)
  local errors = require "smtp.errors"
  local i, sock = 0, {}
  function sock.write_engine(_, e) log[#log + 1] = e:take(); return true end
  function sock.write(_, d) log[#log + 1] = d; return true end
  function sock.read()
    i = i + 1
    if chunks[i] then return chunks[i] end
    return nil, errors.new { kind = "timeout", text = "read timed out", temporary = true }
  end
  function sock.info() return { address = "127.0.0.1", port = 24, tls = false, reused = 0 } end
  function sock.close() return true end
  return { pooling = false, connect = function() return sock end }
end

describe("smtp.send in LMTP mode over a canned transport", function()
  local GREET = "220 lmtp.test LMTP\r\n250-lmtp.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"

  it("maps the replies after the data to the recipients in order, a recipient given twice too", function()
    local log = {}
    local res = assert(smtp.send { server = "127.0.0.1", lmtp = true, tls = "none", helo = "client.test",
      transport = canned({ GREET, "250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n250 2.0.0 b saved\r\n",
        "452 4.2.2 b full now\r\n221 bye\r\n" }, log),
      from = "a@x.test", to = { "b@x.test", "c@x.test", "b@x.test" }, message = "Subject: x\r\n\r\nx\r\n" })
    assert.matches("^LHLO client%.test\r\n", log[1])
    assert.same({ "b@x.test" }, res.accepted)
    local r = res.recipients
    assert.same({ "accepted", "permanent", "temporary" }, { r[1].status, r[2].status, r[3].status })
    assert.same({ "data_end", "rcpt", "data_end" }, { r[1].phase, r[2].phase, r[3].phase })
    assert.same({ "c@x.test", "b@x.test" }, { res.rejected[1].recipient, res.rejected[2].recipient })
    assert.equal("b full now", res.rejected[2].text)
  end)

  it("waits for the later replies under the data_end timeout, and says so when one never comes", function()
    local _, err = smtp.send { server = "127.0.0.1", lmtp = true, tls = "none", helo = "client.test",
      transport = canned({ GREET, "250 ok\r\n250 ok\r\n250 ok\r\n250 2.0.0 b saved\r\n" }, {}),
      from = "a@x.test", to = { "b@x.test", "c@x.test" }, message = "Subject: x\r\n\r\nx\r\n" }
    assert.same({ "timeout", "data_end" }, { err.kind, err.phase })
  end)

  it("does not fall back to HELO when LHLO is refused", function()
    local log = {}
    local _, err = smtp.send { server = "127.0.0.1", lmtp = true, tls = "none", helo = "client.test",
      transport = canned({ "220 lmtp.test\r\n500 5.5.1 what\r\n", "221 bye\r\n" }, log),
      from = "a@x.test", to = "b@x.test", message = "x" }
    assert.same({ "rejected", "ehlo", 500 }, { err.kind, err.phase, err.code })
    assert.is_nil(table.concat(log):find("HELO", 1, true))
  end)
end)

describe("lmtp:// URLs", function()
  it("name a Unix socket (no TLS) or a host and port (24, STARTTLS when offered)", function()
    assert.same({ path = "/run/dovecot/lmtp", tls = "none", lmtp = true }, url.parse("lmtp:///run/dovecot/lmtp"))
    assert.same({ path = "/tmp/a b", tls = "none", lmtp = true }, url.parse("lmtp:///tmp/a%20b"))
    assert.same({ server = "mail.example.com", port = 24, tls = "opportunistic", lmtp = true },
      url.parse("lmtp://mail.example.com"))
    assert.same({ server = "127.0.0.1", port = 2424, tls = "none", lmtp = true, timeout = 5 },
      url.parse("lmtp://127.0.0.1:2424?tls=none&timeout=5"))
  end)

  it("refuse a path with a host, a path for smtp://, and a bad escape", function()
    local _, e1 = url.parse("lmtp://host/run/lmtp")
    assert.matches("goes with no host", e1.text)
    local _, e2 = url.parse("smtp:///run/lmtp")
    assert.matches("a path is not allowed", e2.text)
    local _, e3 = url.parse("lmtp:///run/%zz")
    assert.matches("percent%-encoding", e3.text)
    local _, e4 = url.parse("lmtp:///run/%00x")
    assert.matches("percent%-encoding", e4.text)
  end)

  it("are checked as connection options: path and server exclude each other", function()
    assert.has_error(function() smtp.send { url = "lmtp:///run/lmtp", server = "x.test", from = "a@x.test",
      to = "b@x.test", message = "x" } end, "bad argument #1 to 'send' (path: give path or server and port, not both)")
    local _, err = smtp.send { path = "/tmp/" .. ("x"):rep(120), lmtp = true, from = "a@x.test", to = "b@x.test", message = "x" }
    assert.equal("invalid", err.kind)
  end)
end)

local BODY = table.concat({
  "From: Alice <a@example.com>",
  "To: alice@example.test, bob@example.test",
  "Subject: LMTP check",
  "Message-ID: <lmtp1@example.com>",
  "MIME-Version: 1.0",
  "Content-Type: text/plain; charset=utf-8",
  "Content-Transfer-Encoding: 8bit",
  "",
  "first line",
  ".a line that starts with a dot",
  ".",
  "Gr\195\188\195\159e",
  "last line",
  "",
}, "\r\n")

describe("smtp.send to Dovecot's LMTP server", function()
  local dv, why
  setup(function() dv, why = dovecot.start() end)
  teardown(function() if dv then dv.stop() end end)
  local function need()
    if not dv then error(why, 2) end
  end

  -- The message as Dovecot stored it: the fields it put in front, and the rest.
  local function delivered(user, n)
    local files = dv.maildir(user)
    assert.equal(n, #files, user .. "'s Maildir: " .. #files .. " messages\n" .. dv.log())
    local head, rest = dovecot.split_delivered(files[n])
    return head, rest
  end

  local function check_three(res, how)
    assert.same({ "alice@example.test", "bob@example.test" }, res.accepted, how)
    assert.equal(1, #res.rejected)
    assert.equal("nosuch@example.test", res.rejected[1].recipient)
    assert.equal(550, res.rejected[1].code)
    assert.equal("5.1.1", res.rejected[1].enhanced)
    assert.equal(3, #res.recipients)
    local r = res.recipients
    assert.same({ "alice@example.test", "accepted", 250, "2.0.0", "data_end" },
      { r[1].recipient, r[1].status, r[1].code, r[1].enhanced, r[1].phase })
    assert.same({ "nosuch@example.test", "permanent", 550, "5.1.1", "rcpt" },
      { r[2].recipient, r[2].status, r[2].code, r[2].enhanced, r[2].phase })
    assert.same({ "bob@example.test", "accepted", 250, "2.0.0", "data_end" },
      { r[3].recipient, r[3].status, r[3].code, r[3].enhanced, r[3].phase })
    assert.matches("^<alice@example%.test> .*Saved", r[1].text)
    assert.matches("^<bob@example%.test> .*Saved", r[3].text)
    assert.equal(250, res.reply.code)
    assert.equal("<lmtp1@example.com>", res.message_id)
  end

  local sent = 0
  -- Three recipients, one unknown: two delivered, byte for byte, one refused at RCPT.
  local function three(opts, how)
    need()
    local lines = {}
    local o = { helo = "client.test", timeout = 15, from = "a@example.com",
      to = { "alice@example.test", "nosuch@example.test", "bob@example.test" }, message = BODY,
      transcript = function(ev) if ev.dir == "send" then lines[#lines + 1] = ev.line end end }
    for k, v in pairs(opts) do o[k] = v end
    local res, err = smtp.send(o)
    assert(res, tostring(err))
    check_three(res, how)
    sent = sent + 1
    for _, user in ipairs { "alice", "bob" } do
      local head, rest = delivered(user, sent)
      assert.equal(BODY:gsub("\r\n", "\n"), rest)
      -- (Dovecot adds Delivered-To only for a message to a single recipient)
      assert.matches("^Return%-Path: <a@example%.com>\n", head)
      assert.matches("\nReceived: from client%.test", head)
    end
    return table.concat(lines, "\n")
  end

  it("delivers over the Unix socket with DATA (lmtp:///path)", function()
    local wire = three({ url = "lmtp://" .. dv.socket, chunking = false }, "unix DATA")
    assert.matches("^LHLO client%.test\n", wire)
    assert.matches("\nDATA\n", wire)
  end)

  it("delivers over the Unix socket with BDAT (lmtp = true, path =)", function()
    local wire = three({ lmtp = true, path = dv.socket }, "unix BDAT")
    assert.matches("\nBDAT %d+ LAST\n", wire)
  end)

  it("delivers over TCP with BDAT and with DATA (lmtp://127.0.0.1:PORT, lmtp = true, server =)", function()
    need()
    three({ url = "lmtp://127.0.0.1:" .. dv.port }, "tcp BDAT")
    local wire = three({ lmtp = true, server = "127.0.0.1", port = dv.port, chunking = false }, "tcp DATA")
    assert.matches("^LHLO client%.test\n", wire)
  end)

  it("sends a message of several BDAT chunks and gets one reply per recipient for LAST", function()
    need()
    local parts, n = { "Subject: big\r\nMessage-ID: <lmtp-big@example.com>\r\n\r\n" }, 0
    while n < 2500000 do
      local line = ("%07d "):format(#parts) .. ("0123456789abcdefghijklmnopqrstuvwxyz"):rep(2) .. "\r\n"
      parts[#parts + 1] = line
      n = n + #line
    end
    local big = table.concat(parts)
    local chunks = 0
    local res = assert(smtp.send { path = dv.socket, lmtp = true, helo = "client.test", timeout = 30,
      from = "a@example.com", to = { "alice@example.test", "bob@example.test" }, message = big,
      transcript = function(ev) if ev.dir == "send" and ev.line:match("^BDAT") then chunks = chunks + 1 end end })
    assert.is_true(chunks >= 3, "BDAT chunks: " .. chunks)
    assert.same({ "alice@example.test", "bob@example.test" }, res.accepted)
    sent = sent + 1
    local _, rest = delivered("alice", sent)
    assert.equal(table.concat(parts):gsub("\r\n", "\n"), rest)
    local _, rest2 = delivered("bob", sent)
    assert.equal(#rest, #rest2)
  end)

  it("reports refusals after the data per recipient: over quota (552) and a temporary failure (451)", function()
    need()
    for _, chunking in ipairs { true, false } do
      local res, err = smtp.send { url = "lmtp://" .. dv.socket, chunking = chunking, helo = "client.test",
        timeout = 15, from = "a@example.com", message = BODY,
        to = { "full@example.test", "carol@example.test", "stuck@example.test" } }
      assert(res, tostring(err))
      assert.same({ "carol@example.test" }, res.accepted)
      local r = res.recipients
      assert.same({ "permanent", 552, "5.2.2", "data_end" }, { r[1].status, r[1].code, r[1].enhanced, r[1].phase })
      assert.same({ "accepted", 250 }, { r[2].status, r[2].code })
      assert.same({ "temporary", 451, "4.2.0", "data_end" }, { r[3].status, r[3].code, r[3].enhanced, r[3].phase })
      -- refused after the data: in `rejected` too, with their phase
      assert.same({ "full@example.test", "stuck@example.test" }, { res.rejected[1].recipient, res.rejected[2].recipient })
      assert.same({ "data_end", "data_end" }, { res.rejected[1].phase, res.rejected[2].phase })
    end
    assert.equal(2, #dv.maildir("carol"))
  end)

  it("fails the message when no recipient took it after the data, temporary when one may later", function()
    need()
    local res, err = smtp.send { path = dv.socket, lmtp = true, helo = "client.test", timeout = 15,
      from = "a@example.com", message = BODY, to = { "nosuch@example.test", "stuck@example.test" } }
    assert.is_nil(res)
    assert.same({ "rejected", "data_end", 451, "4.2.0", true }, { err.kind, err.phase, err.code, err.enhanced, err.temporary })
    assert.same({ "nosuch@example.test", "stuck@example.test" }, { err.rejected[1].recipient, err.rejected[2].recipient })
    assert.same({ "permanent", "temporary" }, { err.recipients[1].status, err.recipients[2].status })
    local _, err2 = smtp.send { path = dv.socket, lmtp = true, helo = "client.test", timeout = 15,
      from = "a@example.com", message = BODY, to = { "full@example.test" } }
    assert.same({ "rejected", "data_end", 552, false }, { err2.kind, err2.phase, err2.code, err2.temporary })
    -- every recipient refused at RCPT: as with SMTP
    local _, err3 = smtp.send { path = dv.socket, lmtp = true, helo = "client.test", timeout = 15,
      from = "a@example.com", message = BODY, to = { "nosuch@example.test" } }
    assert.same({ "rejected", "rcpt", 550 }, { err3.kind, err3.phase, err3.code })
  end)

  it("runs a pipelined batch over one session, each message's replies going to its own result", function()
    need()
    for _, chunking in ipairs { true, false } do
      local conn = assert(smtp.connect { url = "lmtp://" .. dv.socket, chunking = chunking, helo = "client.test", timeout = 15 })
      local list = {}
      for i = 1, 6 do
        list[i] = { from = "a@example.com", message = "Subject: batch " .. i .. "\r\n\r\nmessage " .. i .. "\r\n",
          to = i % 3 == 0 and { "nosuch@example.test", "stuck@example.test" }
            or i % 2 == 0 and { "carol@example.test", "nosuch@example.test", "alice@example.test" }
            or { "bob@example.test", "full@example.test" } }
      end
      local out = conn:send_many(list)
      conn:close()
      for i = 1, 6 do
        local r = out[i]
        if i % 3 == 0 then
          assert.same({ "rejected", "data_end", 451 }, { r.kind, r.phase, r.code })
        elseif i % 2 == 0 then
          assert.same({ "carol@example.test", "alice@example.test" }, r.accepted, "entry " .. i)
          assert.equal("nosuch@example.test", r.rejected[1].recipient)
        else
          assert.same({ "bob@example.test" }, r.accepted, "entry " .. i)
          assert.same({ "full@example.test", 552, "data_end" }, { r.rejected[1].recipient, r.rejected[1].code, r.rejected[1].phase })
        end
      end
    end
    sent = sent + 4   -- entries 1 and 5 reached bob, 2 and 4 alice (2 per pass)
    local alice = dv.maildir("alice")
    assert.matches("message 4\n$", alice[#alice])
  end)

  it("returns every reply of the end of data from conn:data (the lower-level methods)", function()
    need()
    local conn = assert(smtp.connect { path = dv.socket, lmtp = true, helo = "client.test", timeout = 15 })
    assert.equal(250, conn:mail("a@example.com").code)
    assert.equal(250, conn:rcpt("carol@example.test").code)
    assert.equal(250, conn:rcpt("full@example.test").code)
    local r = assert(conn:data("Subject: low\r\n\r\nlower level\r\n"))
    assert.equal(250, r.code)
    assert.same({ 250, 552 }, { r.replies[1].code, r.replies[2].code })
    conn:close()
  end)

  it("delivers over the Unix socket from inside a cqueues controller, several sends at once", function()
    need()
    helper.need("cqueues")
    local cqueues = require "cqueues"
    local cq = cqueues.new()
    local results = {}
    for i = 1, 5 do
      cq:wrap(function()
        results[i] = { smtp.send { url = "lmtp://" .. dv.socket, helo = "client.test", timeout = 15,
          from = "a@example.com", to = { "carol@example.test", "nosuch@example.test" },
          message = "Subject: cqueues " .. i .. "\r\n\r\nfrom cqueues " .. i .. "\r\n" } }
      end)
    end
    local before = #dv.maildir("carol")
    assert(cq:loop(30))
    for i = 1, 5 do
      local res, err = results[i][1], results[i][2]
      assert(res, tostring(err))
      assert.same({ "carol@example.test" }, res.accepted)
      assert.same({ "accepted", "permanent" }, { res.recipients[1].status, res.recipients[2].status })
    end
    assert.equal(before + 5, #dv.maildir("carol"))
  end)

  it("works from the command line: lua-smtp send --url lmtp:///path", function()
    need()
    local msg = helper.tmpdir() .. "/m.eml"
    helper.write(msg, "Subject: from the CLI\r\n\r\nvia lua-smtp send\r\n")
    local cmd = ("%s %s/bin/lua-smtp send --url %s --helo client.test --from a@example.com --to carol@example.test " ..
      "--to nosuch@example.test --raw %s --json 2>&1"):format(helper.lua, helper.root,
      helper.quote("lmtp://" .. dv.socket), helper.quote(msg))
    local out = helper.sh(cmd)
    assert.matches('"recipient":"carol@example.test","status":"sent","code":250', out, 1, false)
    assert.matches('"recipient":"nosuch@example.test","status":"failed","code":550', out, 1, false)
    local carol = dv.maildir("carol")
    assert.matches("via lua%-smtp send\n$", carol[#carol])
  end)
end)
