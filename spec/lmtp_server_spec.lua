-- The LMTP server (RFC 2033): the server engine's LMTP mode fed by hand (LHLO, HELO and EHLO
-- refused with 500, one reply per accepted recipient after the final dot and after BDAT LAST,
-- its own refusals repeated per recipient), server.listen{ lmtp = true } with per-recipient
-- verdicts against our own LMTP client over TCP and over a Unix socket, and a private Postfix
-- (spec/support/postfix.lua) relaying through its lmtp client to our server: what it delivered,
-- bounced and deferred, as its log says.
local helper = require "helper"
local postfix = require "support.postfix"
local core = require "smtp.core"
local smtp = require "smtp"
local server = require "smtp.server"
local loop = require "smtp.loop"

-- Feeds `input` and answers every event: MAIL/RCPT accepted, an END decided by `decide(i)` for
-- the i-th reply. Returns the reply lines written and the events seen.
local function drive(e, input, decide)
  e:feed(input)
  local events, out = {}, {}
  while true do
    local kind, a = e:next()
    if not kind then break end
    events[#events + 1] = kind .. (a and type(a) ~= "table" and (" " .. tostring(a)) or "")
    if kind == "mail" or kind == "rcpt" then
      e:decide(a ~= "nobody@x.test")
    elseif kind == "end" and not a then
      local i = 0
      repeat
        i = i + 1
        e:decide(decide(i))
      until e:lmtp_due() == 0
    end
  end
  for line in (e:output() or ""):gmatch("([^\r\n]*)\r\n") do out[#out + 1] = line end
  return out, events
end

local function engine()
  local e = core.server_engine { hostname = "lmtp.test", lmtp = true, hook_mail = true, hook_rcpt = true,
    max_message_size = 1000 }
  assert.same({ "220 lmtp.test LMTP lua-smtp" }, drive(e, ""))
  return e
end

local function yes() return true end

describe("the server engine in LMTP mode", function()
  it("takes LHLO and answers HELO and EHLO with 500 (RFC 2033 4.1)", function()
    local e = engine()
    local out = drive(e, "HELO c.test\r\nEHLO c.test\r\nMAIL FROM:<a@x.test>\r\nLHLO c.test\r\n")
    assert.matches("^500 5%.5%.1 ", out[1])
    assert.matches("^500 5%.5%.1 ", out[2])
    assert.matches("^503 ", out[3])
    assert.equal("250-lmtp.test", out[4])
    assert.equal("250 DSN", out[#out])
    assert.equal("c.test", e:helo())
    -- and an SMTP engine does not know LHLO
    local s = core.server_engine { hostname = "smtp.test" }
    local sout = drive(s, "LHLO c.test\r\n")
    assert.equal("220 smtp.test ESMTP lua-smtp", sout[1])
    assert.matches("^500 5%.5%.2 ", sout[2])
  end)

  it("replies once per accepted recipient after the final dot, in order, each as decided", function()
    local e = engine()
    drive(e, "LHLO c.test\r\n")
    local out = drive(e, "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<nobody@x.test>\r\n" ..
      "RCPT TO:<c@x.test>\r\nRCPT TO:<d@x.test>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nNOOP\r\n", function(i)
        if i == 1 then return true end
        if i == 2 then return false, 452, "4.2.2", "c is full" end
        return false, 550, "5.1.1", "d is gone"
      end)
    assert.same({ "250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 Recipient rejected", "250 2.1.5 Ok", "250 2.1.5 Ok",
      "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued", "452 4.2.2 c is full", "550 5.1.1 d is gone",
      "250 2.0.0 Ok" }, out)
    assert.is_nil(e:envelope())   -- the transaction is over once every recipient is answered
  end)

  it("replies once per recipient after BDAT LAST, once to a chunk before it", function()
    local e = engine()
    drive(e, "LHLO c.test\r\n")
    local out = drive(e, "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n" ..
      "BDAT 4\r\nab\r\nBDAT 4 LAST\r\ncd\r\n", yes)
    assert.same({ "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.0.0 4 octets received",
      "250 2.0.0 Ok: queued", "250 2.0.0 Ok: queued" }, out)
  end)

  it("repeats its own refusals at the end for each recipient (size, bare LF)", function()
    local e = engine()
    drive(e, "LHLO c.test\r\n")
    local out = drive(e, "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n" ..
      ("x"):rep(1200) .. "\r\n.\r\n", yes)
    assert.same({ "552 5.3.4 Message size exceeds fixed maximum message size",
      "552 5.3.4 Message size exceeds fixed maximum message size" }, { out[5], out[6] })
    assert.equal(6, #out)
    out = drive(e, "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nRCPT TO:<d@x.test>\r\n" ..
      "BDAT 5 LAST\r\na\nb\r\n", yes)
    assert.same({ "550 5.6.11 Bare CR or LF in message data not allowed" }, { out[5] })
    assert.equal(out[5], out[6])
    assert.equal(out[5], out[7])
    assert.equal(7, #out)
  end)

  it("answers DATA without an accepted recipient with 503 (RFC 2033 4.2)", function()
    local e = engine()
    drive(e, "LHLO c.test\r\n")
    local out = drive(e, "MAIL FROM:<a@x.test>\r\nRCPT TO:<nobody@x.test>\r\nDATA\r\n")
    assert.matches("^503 5%.5%.1 ", out[3])
  end)
end)

-- The hook of the specs below: a verdict per recipient, by its local part.
local function verdicts(env)
  local out = {}
  for i, r in ipairs(env.to) do
    if r:match("^reject") then out[i] = { false, 550, "5.1.1", "no such mailbox here" }
    elseif r:match("^later") then out[r] = { false, 451, "4.2.0 mailbox busy, try later" }
    else out[i] = true end
  end
  return out
end

describe("server.listen{ lmtp = true } with our LMTP client", function()
  local MSG = "From: a@x.test\r\nSubject: lmtp to ourselves\r\n\r\n.dot line\r\nbody\r\n"

  for _, where in ipairs { "tcp", "unix" } do
    for _, chunking in ipairs { true, false } do
      it(("answers each recipient as on_message says (%s, %s)"):format(where, chunking and "BDAT" or "DATA"), function()
        local got = {}
        local opts = { lmtp = true, hostname = "lmtp.test",
          on_message = function(session, env, reader)
            got[#got + 1] = { data = helper.read_message(reader, 7), to = env.to, helo = session.helo,
              address = session.address }
            return verdicts(env)
          end }
        local sock
        if where == "unix" then
          sock = helper.tmpdir() .. "/lmtp.sock"
          opts.path = sock
        else
          opts.host, opts.port = "127.0.0.1", 0
        end
        local srv = assert(server.listen(opts))
        local res, err
        loop.spawn(function()
          srv:serve()
          local o = { helo = "client.test", timeout = 10, chunking = chunking, from = "a@x.test", message = MSG,
            to = { "ok1@x.test", "reject1@x.test", "ok2@x.test", "later1@x.test" } }
          if sock then o.url = "lmtp://" .. sock else o.url = "lmtp://127.0.0.1:" .. srv.port end
          res, err = smtp.send(o)
          srv:close()
        end)
        loop.run()
        assert(res, tostring(err))
        assert.same({ "ok1@x.test", "ok2@x.test" }, res.accepted)
        local r = res.recipients
        assert.same({ "accepted", "permanent", "accepted", "temporary" }, { r[1].status, r[2].status, r[3].status, r[4].status })
        assert.same({ 250, 550, 250, 451 }, { r[1].code, r[2].code, r[3].code, r[4].code })
        assert.same({ "2.0.0", "5.1.1", "2.0.0", "4.2.0" }, { r[1].enhanced, r[2].enhanced, r[3].enhanced, r[4].enhanced })
        assert.equal("mailbox busy, try later", r[4].text)
        assert.equal(1, #got)
        assert.equal(MSG, got[1].data)
        assert.same({ "ok1@x.test", "reject1@x.test", "ok2@x.test", "later1@x.test" }, got[1].to)
        assert.equal("client.test", got[1].helo)
        if sock then
          assert.equal("unix", got[1].address)
          assert.equal("", helper.sh("ls " .. helper.quote(sock) .. " 2>/dev/null"), "the socket file is removed at close")
        end
      end)
    end
  end

  it("tells on_helo the verb was LHLO and writes LMTP in its Received header", function()
    local verbs, header = {}, nil
    local srv = assert(server.listen { lmtp = true, host = "127.0.0.1", port = 0, hostname = "lmtp.test",
      received = true,
      on_helo = function(_, name, verb) verbs[#verbs + 1] = verb .. " " .. name; return true end,
      on_message = function(session, env, reader)
        header = session:received(env)
        for _ in reader:chunks() do end
        return true
      end })
    local res, err
    loop.spawn(function()
      srv:serve()
      res, err = smtp.send { url = "lmtp://127.0.0.1:" .. srv.port, helo = "client.test", timeout = 10,
        from = "a@x.test", to = { "b@x.test" }, message = MSG }
      srv:close()
    end)
    loop.run()
    assert(res, tostring(err))
    assert.same({ "LHLO client.test" }, verbs)
    assert.truthy(header:match("\r\n\tby lmtp%.test %(lua%-smtp%) with LMTP id %w+\r\n"), header)
  end)

  it("replaces a socket file nobody listens on, refuses any other file, and checks its options", function()
    local d = helper.tmpdir()
    local stale = d .. "/stale.sock"
    local l = assert(core.listen_unix(stale, 5))
    l:close()   -- the C listener leaves its file behind, as a crashed server would
    local function is_socket(p) return helper.sh("test -S " .. helper.quote(p) .. " && echo yes"):match("yes") ~= nil end
    assert.is_true(is_socket(stale))
    local srv = assert(server.listen { path = stale, lmtp = true })
    assert.is_true(is_socket(stale))
    srv:close()
    assert.is_false(is_socket(stale))
    helper.write(d .. "/plain", "x")
    local none, err = server.listen { path = d .. "/plain", lmtp = true }
    assert.is_nil(none)
    assert.same({ "connect", "EADDRINUSE" }, { err.kind, err.errno })
    assert.equal("x", helper.read(d .. "/plain"))
    assert.has_error(function() server.listen { path = 5 } end,
      "bad argument #1 to 'listen' (option 'path': socket path expected)")
    assert.has_error(function() server.listen { path = "/tmp/x.sock", port = 25 } end,
      "bad argument #1 to 'listen' (option 'path': give path or host and port, not both)")
    assert.has_error(function() server.listen { lmtp = "yes" } end,
      "bad argument #1 to 'listen' (option 'lmtp': boolean expected)")
    assert.has_error(function() smtp.send { lmtp = "yes", server = "x.test", from = "a@x.test", to = "b@x.test", message = "x" } end,
      "bad argument #1 to 'send' (lmtp: boolean expected)")
  end)

  it("gives 451 to every recipient when on_message raises, and to one it leaves out", function()
    local logged = {}
    local calls = 0
    local srv = assert(server.listen { lmtp = true, host = "127.0.0.1", port = 0,
      log = function(m) logged[#logged + 1] = m end,
      on_message = function(_, env)
        calls = calls + 1
        if calls == 1 then error("handler broke") end
        return { [env.to[1]] = true }
      end })
    local out = {}
    loop.spawn(function()
      srv:serve()
      for i = 1, 2 do
        local res, err = smtp.send { url = "lmtp://127.0.0.1:" .. srv.port, helo = "client.test", timeout = 10,
          from = "a@x.test", to = { "b@x.test", "c@x.test" }, message = "Subject: x\r\n\r\nx\r\n" }
        out[i] = res or err
      end
      srv:close()
    end)
    loop.run()
    assert.same({ "rejected", "data_end", 451, true }, { out[1].kind, out[1].phase, out[1].code, out[1].temporary })
    assert.same({ "b@x.test" }, out[2].accepted)
    assert.same({ "c@x.test", 451, "4.3.0" }, { out[2].rejected[1].recipient, out[2].rejected[1].code, out[2].rejected[1].enhanced })
    assert.matches("on_message raised: .*handler broke", logged[1])
    assert.matches("no reply for recipient 2 %(c@x%.test%)", logged[2])
  end)
end)

describe("lua-smtp sink --lmtp", function()
  it("takes LMTP on a Unix socket and stores the message once, each recipient answered", function()
    local d = helper.tmpdir()
    local sock, md = d .. "/sink.sock", d .. "/Maildir"
    local sink = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "sink", "--lmtp", "--listen", sock,
      "--maildir", md, "--reject-rcpt", "nobody@*" }, { limit = 60 })
    for _ = 1, 200 do
      if helper.sh("test -S " .. helper.quote(sock) .. " && echo yes"):match("yes") then break end
      helper.sleep(0.05)
    end
    local res, err = smtp.send { url = "lmtp://" .. sock, helo = "client.test", timeout = 10, from = "a@x.test",
      to = { "b@x.test", "nobody@x.test", "c@x.test" }, message = "Subject: sink\r\n\r\nto the sink\r\n" }
    local files = helper.sh("ls " .. helper.quote(md .. "/new"))
    sink:stop()
    assert(res, tostring(err) .. sink:output())
    assert.same({ "b@x.test", "c@x.test" }, res.accepted)
    assert.same({ "accepted", "permanent", "accepted" },
      { res.recipients[1].status, res.recipients[2].status, res.recipients[3].status })
    local file = files:match("^(%S+)\n$")
    assert.truthy(file, files)
    local stored = helper.read(md .. "/new/" .. file)
    -- the Received line of a Unix socket's client names no address; its date is matched by grammar
    local received = "Received: from client%.test\r\n\tby localhost %(lua%-smtp%) with LMTP id %w+; "
      .. "%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d [+-]%d%d%d%d\r\n"
    assert.truthy(stored:match("^Return%-Path: <a@x%.test>\r\nDelivered%-To: b@x%.test\r\nDelivered%-To: c@x%.test\r\n"
      .. received .. "Subject: sink\r\n\r\nto the sink\r\n$"), stored)
    assert.matches("listening on " .. sock:gsub("%p", "%%%0"), sink:output())
  end)
end)

-- Our LMTP server as a process of its own (Postfix's lmtp client connects to it while the spec
-- waits on Postfix's log): per-recipient verdicts by local part, each message recorded.
local SERVER = [=[
local server = require "smtp.server"
local port, record = tonumber(arg[1]), arg[2]
local n = 0
local function q(s) return ("%q"):format(s) end
local srv = assert(server.listen { host = "127.0.0.1", port = port, lmtp = true, hostname = "lmtp.test",
  on_message = function(session, env, reader)
    local parts = {}
    for c in reader:chunks() do parts[#parts + 1] = c end
    n = n + 1
    local file = record .. "." .. n .. ".eml"
    local f = assert(io.open(file, "wb")); f:write(table.concat(parts)); f:close()
    local out, to = {}, {}
    for i, r in ipairs(env.to) do
      to[i] = q(r)
      if r:match("^reject") then out[i] = { false, 550, "5.1.1", "no such mailbox here" }
      elseif r:match("^later") then out[i] = { false, 451, "4.2.0", "mailbox busy, try later" }
      else out[i] = true end
    end
    f = assert(io.open(record, "ab"))
    f:write(("{ from = %s, to = { %s }, helo = %s, file = %s },\n"):format(q(env.from), table.concat(to, ", "),
      q(session.helo or ""), q(file)))
    f:close()
    return out
  end })
srv:serve()
]=]

describe("Postfix's lmtp client delivering to server.listen{ lmtp = true }", function()
  local pf, why, lmtp_port, record, proc
  setup(function()
    local d = helper.tmpdir()
    lmtp_port, record = helper.free_port(), d .. "/got.lua"
    helper.write(d .. "/server.lua", SERVER)
    proc = helper.spawn({ helper.lua, d .. "/server.lua", tostring(lmtp_port), record }, { limit = 200 })
    if not helper.wait_port("127.0.0.1", lmtp_port, 10) then
      why = "our LMTP server did not start: " .. proc:output()
      return
    end
    local hop = "lmtp:inet:127.0.0.1:" .. lmtp_port
    pf, why = postfix.start {
      main = "relayhost =\ndefault_transport = " .. hop .. "\nrelay_transport = " .. hop .. "\n",
      master = "lmtp      unix  -       -       n       -       -       lmtp\n",
    }
  end)
  teardown(function()
    if pf then pf.stop() end
    if proc then proc:stop() end
  end)

  local function got()
    local text = (helper.read(record) or ""):match("^(.*\n)") or ""
    return assert((loadstring or load)("return {" .. text .. "}"))()
  end
  local function wait_got(n)
    for _ = 1, 400 do
      local g = got()
      if #g >= n then return g end
      helper.sleep(0.05)
    end
    return got()
  end

  it("gets one transaction for four recipients and delivers, bounces and defers as our server answered", function()
    if not pf then error(why) end
    local mark = pf.mark()
    local body = "From: a@example.com\r\nTo: ok1@example.org\r\nSubject: through Postfix to LMTP\r\n" ..
      "Message-ID: <pf-lmtp@example.com>\r\n\r\nfirst line\r\n.a dot line\r\nlast line\r\n"
    local res = assert(smtp.send { server = "127.0.0.1", port = pf.port, tls = "none", helo = "client.test",
      timeout = 15, from = "a@example.com", message = body,
      to = { "ok1@example.org", "reject1@example.org", "ok2@example.org", "later1@example.org" } })
    local qid = postfix.queue_id(res.reply.text)
    assert.truthy(qid, res.reply.text)
    -- Postfix's log: each recipient's outcome from the LMTP replies after the data
    local relay = "relay=127%.0%.0%.1%[127%.0%.0%.1%]:" .. lmtp_port
    local log, all
    for _, who in ipairs { "ok1", "ok2", "reject1", "later1" } do
      log, all = pf.wait_log(mark, qid .. ": to=<" .. who .. "@example%.org>, " .. relay .. "[^\n]*status=", 20)
      assert(log, "Postfix log:\n" .. tostring(all))
    end
    assert.is_nil(log:find("overriding earlier entry", 1, true), log)
    assert.matches(qid .. ": to=<ok1@example%.org>, " .. relay .. "[^\n]*status=sent %(250 2%.0%.0 Ok: queued%)", log)
    assert.matches(qid .. ": to=<ok2@example%.org>, " .. relay .. "[^\n]*status=sent %(250 2%.0%.0 Ok: queued%)", log)
    assert.matches(qid .. ": to=<reject1@example%.org>, " .. relay .. "[^\n]*dsn=5%.1%.1, status=bounced " ..
      "%(host 127%.0%.0%.1%[127%.0%.0%.1%] said: 550 5%.1%.1 no such mailbox here %(in reply to end of DATA command%)%)", log)
    assert.matches(qid .. ": to=<later1@example%.org>, " .. relay .. "[^\n]*dsn=4%.2%.0, status=deferred " ..
      "%(host 127%.0%.0%.1%[127%.0%.0%.1%] said: 451 4%.2%.0 mailbox busy, try later %(in reply to end of DATA command%)%)", log)
    -- Postfix's lmtp client greeted with LHLO and sent all four in one transaction
    local g = wait_got(1)
    local to = {}
    for i, r in ipairs(g[1].to) do to[i] = r end
    table.sort(to)   -- Postfix orders a message's recipients its own way
    assert.same({ "later1@example.org", "ok1@example.org", "ok2@example.org", "reject1@example.org" }, to)
    assert.equal("a@example.com", g[1].from)
    assert.equal("postfix.test", g[1].helo)
    local received, rest = postfix.split_received(helper.read(g[1].file))
    assert.truthy(received, "Postfix's Received field")
    assert.equal(body, rest)
    -- and the bounce for reject1 came back to the sender through the same LMTP server
    g = wait_got(2)
    assert.equal("", g[2].from)
    assert.same({ "a@example.com" }, g[2].to)
    assert.matches("reject1@example%.org", helper.read(g[2].file))
    assert.matches("no such mailbox here", helper.read(g[2].file))
  end)
end)
