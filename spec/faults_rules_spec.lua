-- smtp.faults: rules checked and listed; each kind of fault met by real clients: smtp.send on an
-- in-process server (smtp.loop), and swaks and Python's smtplib against `lua-smtp sink --fail`.
local helper = require "helper"

if not pcall(require, "smtp.transport.native") then
  describe("smtp.faults", function() pending("needs smtp.transport.native") end)
  return
end
local smtp = require "smtp"
local loop = require "smtp.loop"
local core = require "smtp.core"
local server = require "smtp.server"
local faults = require "smtp.faults"

local MSG = "Subject: t\r\n\r\nhi\r\n"

describe("smtp.faults rules", function()
  it("adds, lists, removes and clears rules with ids", function()
    local f = faults.new()
    local a = assert(f:add { at = "rcpt", code = 452, enhanced = "4.2.2", match = "full@*", times = 2 })
    local b = assert(f:add { at = "ehlo", hide = { "STARTTLS", "AUTH" } })
    assert.are_not.equal(a, b)
    local l = f:list()
    assert.equal(2, #l)
    assert.same({ at = "rcpt", code = 452, enhanced = "4.2.2", match = "full@*", times = 2, hits = 0, id = a }, l[1])
    assert.same({ "STARTTLS", "AUTH" }, l[2].hide)
    assert.is_true(f:remove(a))
    local ok, err = f:remove(a)
    assert.is_nil(ok)
    assert.equal("invalid", err.kind)
    assert.equal(1, #f:list())
    assert.is_true(f:clear())
    assert.same({}, f:list())
  end)

  it("refuses what cannot be a fault with an invalid error naming the field", function()
    local f = faults.new()
    local bad = {
      { { at = "quit", code = 421 }, "at:" },
      { { at = "rcpt", code = 250 }, "code: a 4xx or 5xx" },
      { { at = "rcpt", code = 452.5 }, "code:" },
      { { at = "rcpt", code = 452, enhanced = "5.2.2" }, "class is not the code's" },
      { { at = "rcpt", code = 452, enhanced = "4.2" }, "enhanced:" },
      { { at = "rcpt", code = 452, text = "a\r\nDATA" }, "text:" },
      { { at = "rcpt", drop = true, code = 550 }, "drop:" },
      { { at = "rcpt", refuse = true }, "refuse: only for starttls and auth" },
      { { at = "mail", hide = { "SIZE" } }, "hide: only for ehlo" },
      { { at = "ehlo", hide = "STARTTLS" }, "hide:" },
      { { at = "starttls", match = "x" }, "match: not for starttls" },
      { { at = "rcpt", delay = -1 }, "delay:" },
      { { at = "rcpt", code = 452, times = 0 }, "times:" },
      { { at = "rcpt" }, "nothing to do" },
      { { at = "rcpt", code = 452, colour = "red" }, "unknown field colour" },
    }
    for _, case in ipairs(bad) do
      local id, err = f:add(case[1])
      assert.is_nil(id)
      assert.equal("invalid", err.kind)
      assert.truthy(tostring(err):find(case[2], 1, true), tostring(err))
    end
    assert.same({}, f:list())
    assert.has_error(function() f:add("rcpt:452") end, "bad argument #1 to 'add' (table expected, got string)")
    assert.has_error(function() faults.parse(42) end, "bad argument #1 to 'parse' (string expected, got number)")
  end)

  it("parses the command line's form", function()
    assert.same({ at = "rcpt", code = 452, match = "full@*" }, faults.parse("rcpt:452:full@*"))
    assert.same({ at = "data_end", code = 554 }, faults.parse("data_end:554"))
    assert.same({ at = "connect", drop = true }, faults.parse("connect:drop"))
    assert.same({ at = "ehlo", delay = 5 }, faults.parse("ehlo:delay=5"))
    assert.same({ at = "ehlo", hide = { "STARTTLS", "AUTH" }, advertise = { "XFOO" } },
      faults.parse("ehlo:hide=STARTTLS,AUTH:advertise=XFOO"))
    assert.same({ at = "rcpt", code = 452, enhanced = "4.2.2", times = 1, text = "full: try later" },
      faults.parse("rcpt:452:4.2.2:times=1:text=full: try later"))
    assert.same({ at = "starttls", refuse = true }, faults.parse("starttls:refuse"))
    for _, s in ipairs { "quit:421", "rcpt:250", "rcpt", "rcpt:452:bogus", "connect:drop:554", "rcpt:delay=x" } do
      local r, err = faults.parse(s)
      assert.is_nil(r, s)
      assert.equal("invalid", err.kind)
      assert.truthy(tostring(err):find(s, 1, true), tostring(err))
    end
  end)
end)

-- Runs fn(port, srv) in a loop task against a server whose hooks apply `f`'s rules.
local function with_server(f, opts, fn)
  local failure
  loop.spawn(function()
    local o = { host = "127.0.0.1", port = 0, timeout = 10 }
    for k, v in pairs(opts or {}) do o[k] = v end
    local srv = assert(server.listen(f:hooks(o)))
    srv:serve()
    local ok, err = pcall(fn, srv.port, srv)
    srv:close()
    if not ok then failure = err end
  end)
  loop.run()
  if failure then error(failure, 0) end
end

local function send(port, o)
  local opts = { server = "127.0.0.1", port = port, tls = "none", helo = "client.test", timeout = 5,
    from = "a@example.com", to = { "b@example.org" }, message = MSG }
  for k, v in pairs(o or {}) do opts[k] = v end
  return smtp.send(opts)
end

describe("smtp.faults against smtp.send (in-process server)", function()
  it("answers RCPT 452 for full@* while the others are accepted, and the message still goes", function()
    local f = faults.new()
    assert(f:add { at = "rcpt", code = 452, enhanced = "4.2.2", text = "Mailbox full", match = "full@*" })
    local got = {}
    with_server(f, { on_message = function(_, env) got[#got + 1] = env.to; return true end }, function(port)
      local res = assert(send(port, { to = { "b@example.org", "full@example.org", "FULL@x.test" } }))
      assert.same({ "b@example.org" }, res.accepted)
      assert.equal(2, #res.rejected)
      assert.equal(452, res.rejected[1].code)
      assert.equal("4.2.2", res.rejected[1].enhanced)
      assert.matches("Mailbox full", res.rejected[1].text)
    end)
    assert.same({ { "b@example.org" } }, got)
    assert.equal(2, f:list()[1].hits)
  end)

  it("a rule added while a session is open applies to its next command, and removed, no longer", function()
    local f = faults.new()
    with_server(f, nil, function(port)
      local conn = assert(smtp.connect { server = "127.0.0.1", port = port, tls = "none", helo = "client.test",
        timeout = 5 })
      -- the session began with no rule: its MAIL and RCPT were answered without a hook
      assert(conn:send { from = "a@example.com", to = { "b@example.org" }, message = MSG })
      local id = assert(f:add { at = "rcpt", code = 452, enhanced = "4.2.2", match = "full@*" })
      assert(f:add { at = "mail", code = 451, match = "late@*", times = 1 })
      local res = assert(conn:send { from = "a@example.com", to = { "b@example.org", "full@example.org" },
        message = MSG })
      assert.same({ "b@example.org" }, res.accepted)
      assert.equal(452, res.rejected[1].code)
      local _, err = conn:send { from = "late@example.com", to = { "b@example.org" }, message = MSG }
      assert.equal("mail", err.phase)
      assert.equal(451, err.code)
      assert(f:remove(id))
      res = assert(conn:send { from = "a@example.com", to = { "full@example.org" }, message = MSG })
      assert.same({ "full@example.org" }, res.accepted)
      conn:close()
    end)
  end)

  it("refuses the end of data with 554, storing nothing, and a 'full@' match means any domain", function()
    local f = faults.new()
    assert(f:add { at = "data_end", code = 554, match = "full@" })
    local stored = 0
    with_server(f, { on_message = function() stored = stored + 1; return true end }, function(port)
      local res, err = send(port, { to = { "full@example.org" } })
      assert.is_nil(res)
      assert.equal("rejected", err.kind)
      assert.equal("data_end", err.phase)
      assert.equal(554, err.code)
      assert.equal("5.0.0", err.enhanced)
      assert(send(port, { to = { "other@example.org" } }))
    end)
    assert.equal(1, stored)
  end)

  it("drops the connection at connect, and only once with times = 1", function()
    local f = faults.new()
    assert(f:add { at = "connect", drop = true, times = 1 })
    with_server(f, nil, function(port)
      local res, err = send(port)
      assert.is_nil(res)
      assert.equal("closed", err.kind)
      assert.equal("greeting", err.phase)
      assert.is_true(err.temporary)
      assert.same({}, f:list()) -- expired
      assert(send(port))
    end)
  end)

  it("drops the connection after MAIL and after the data, storing nothing", function()
    local f = faults.new()
    assert(f:add { at = "mail", drop = true, match = "drop-me@*" })
    assert(f:add { at = "data_end", drop = true, match = "late@*" })
    local stored = 0
    with_server(f, { on_message = function() stored = stored + 1; return true end }, function(port)
      local _, err = send(port, { from = "drop-me@example.com" })
      assert.equal("closed", err.kind)
      assert.equal("mail", err.phase)
      -- MAIL, RCPT and BDAT LAST went out pipelined: the drop came before any reply was written
      _, err = send(port, { to = { "late@example.org" } })
      assert.equal("closed", err.kind)
      assert.is_true(err.temporary)
      assert(send(port))
    end)
    assert.equal(1, stored)
  end)

  it("refuses DATA with 451 (CHUNKING hidden so the client sends DATA), then accepts once expired", function()
    local f = faults.new()
    assert(f:add { at = "data", code = 451, times = 1 })
    with_server(f, nil, function(port)
      local _, err = send(port)
      assert.equal("rejected", err.kind)
      assert.equal("data", err.phase)
      assert.equal(451, err.code)
      assert.is_true(err.temporary)
      assert(send(port))
    end)
  end)

  it("delays a reply by 1 s without holding up other sessions", function()
    local f = faults.new()
    assert(f:add { at = "rcpt", delay = 1, match = "slow@*" })
    with_server(f, nil, function(port)
      local fast_dt
      local done = false
      loop.spawn(function()
        loop.sleep(0.1)
        local t0 = loop.now()
        assert(send(port))
        fast_dt = loop.now() - t0
        done = true
      end)
      local t0 = loop.now()
      assert(send(port, { to = { "slow@example.org" } }))
      local dt = loop.now() - t0
      assert.is_true(dt >= 0.95 and dt < 5, "delayed send took " .. dt .. " s")
      while not done do loop.sleep(0.05) end
      -- the other session went through while this one waited
      assert.is_true(fast_dt < 0.8, "the other session took " .. fast_dt .. " s")
    end)
  end)

  it("hides STARTTLS from EHLO: a client requiring TLS gives up, an opportunistic one sends in clear", function()
    local c = helper.certs()
    local f = faults.new()
    assert(f:add { at = "ehlo", hide = { "starttls" }, advertise = { "XFAULT 1" } })
    local lines = {}
    with_server(f, { tls = { cert = c.server, key = c.server_key }, transcript = function(ev)
      if ev.dir == "send" or ev.direction == "send" then lines[#lines + 1] = ev.line or ev.text end
    end }, function(port)
      local _, err = send(port, { tls = "starttls", server = "localhost", cafile = c.ca })
      assert.equal("tls", err.kind)
      assert.matches("does not offer STARTTLS", err.text)
      local res = assert(send(port, { tls = "opportunistic", server = "localhost", cafile = c.ca }))
      assert.is_false(res.tls and true or false)
    end)
  end)

  it("refuses STARTTLS with 454, and AUTH with its code", function()
    local c = helper.certs()
    local f = faults.new()
    assert(f:add { at = "starttls", refuse = true, times = 1 })
    assert(f:add { at = "auth", code = 535, enhanced = "5.7.8", match = "locked*" })
    with_server(f, { tls = { cert = c.server, key = c.server_key }, auth = function() return true end },
      function(port)
        local _, err = send(port, { tls = "starttls", server = "localhost", cafile = c.ca })
        assert.equal("tls", err.kind)
        assert.equal(454, err.code)
        local tls = { tls = "starttls", server = "localhost", cafile = c.ca }
        tls.auth = { user = "locked-out", password = "p" }
        _, err = send(port, tls)
        assert.equal("auth", err.kind)
        assert.equal(535, err.code)
        tls.auth = { user = "fine", password = "p" }
        assert(send(port, tls))
      end)
  end)

  it("calls the hooks it wraps when no rule decides", function()
    local f = faults.new()
    assert(f:add { at = "rcpt", code = 450, match = "busy@*" })
    with_server(f, { on_rcpt = function(_, r)
      if r:match("^nobody@") then return false, 550, "5.1.1 no such user" end
      return true
    end }, function(port)
      local res = assert(send(port, { to = { "b@example.org", "busy@example.org", "nobody@example.org" } }))
      assert.same({ "b@example.org" }, res.accepted)
      assert.equal(450, res.rejected[1].code)
      assert.equal(550, res.rejected[2].code)
    end)
  end)
end)

describe("lua-smtp sink --fail with swaks and Python smtplib", function()
  local BIN = helper.root .. "/bin/lua-smtp"
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do helper.sh("kill " .. p.pid .. " 2>/dev/null"); p.stopped = true end
    procs = {}
  end)
  local function sink(args)
    local port = helper.free_port()
    local argv = { helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local p = helper.spawn(argv, { limit = 60 })
    procs[#procs + 1] = p
    -- its own line, not a probe connection: a connect fault would take the probe
    local t_end = core.now() + 10
    while not p:output():find("listening on", 1, true) and core.now() < t_end do helper.sleep(0.05) end
    assert(p:output():find("listening on", 1, true), "sink did not start: " .. p:output())
    return port
  end
  local function swaks(port, extra)
    local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(port), "--from", "a@x.test",
      "--timeout", "10" }
    for _, a in ipairs(extra) do argv[#argv + 1] = a end
    helper.need_argv(argv)
    local w = {}
    for i, a in ipairs(argv) do w[i] = helper.quote(a) end
    return (helper.sh(table.concat(w, " ") .. " 2>&1"))
  end
  local function smtplib(port, code)
    helper.need("python3")
    return (helper.sh(helper.python .. " -c " .. helper.quote("import smtplib, sys, time\nport = int(sys.argv[1])\n" .. code)
      .. " " .. port .. " 2>&1"))
  end

  it("refuses bad --fail values with a usage error", function()
    local out = helper.sh(helper.lua .. " " .. BIN .. " sink --fail rcpt:250 2>&1; echo EXIT:$?")
    assert.matches("%-%-fail: fault: 'rcpt:250': code: a 4xx or 5xx reply code expected", out)
    assert.matches("EXIT:2", out)
  end)

  it("rcpt:452:full@* and data_end:451 (times=1), seen by swaks", function()
    local md = helper.tmpdir() .. "/md"
    local port = sink { "--maildir", md, "--fail", "rcpt:452:4.2.2:full@*", "--fail", "data_end:451:times=1" }
    local out = swaks(port, { "--to", "ok@y.test,full@y.test" })
    assert.matches("<%*%* 452 4%.2%.2 Injected fault at RCPT", out)
    assert.matches("<%*%* 451 4%.0%.0 Injected fault at the end of data", out)
    out = swaks(port, { "--to", "ok@y.test,full@y.test" })
    assert.matches("<%- +250 2%.0%.0 Ok: queued", out)
    local n = helper.sh("ls -1 " .. helper.quote(md .. "/new") .. " | wc -l")
    assert.equal(1, tonumber(n))
  end)

  it("connect:drop, ehlo:hide=STARTTLS and mail:delay=1, seen by smtplib", function()
    local c = helper.certs()
    local port = sink { "--tls-cert", c.server, "--tls-key", c.server_key, "--fail", "connect:drop:times=1",
      "--fail", "ehlo:hide=STARTTLS,PIPELINING", "--fail", "mail:delay=1:match=slow@*",
      "--fail", "rcpt:550:5.1.1:gone@*:text=No such user here" }
    local out = smtplib(port, [[
try:
    smtplib.SMTP('127.0.0.1', port, timeout=10)
    print('connected')
except smtplib.SMTPServerDisconnected as e:
    print('dropped')
s = smtplib.SMTP('127.0.0.1', port, timeout=10)
s.ehlo('client.test')
print('starttls', s.has_extn('starttls'), 'pipelining', s.has_extn('pipelining'), 'size', s.has_extn('size'))
t0 = time.monotonic()
s.mail('slow@x.test')
print('mail took %.2f' % (time.monotonic() - t0))
print('rcpt', s.rcpt('gone@y.test'))
s.quit()
]])
    assert.matches("dropped", out)
    assert.matches("starttls False pipelining False size True", out)
    local took = tonumber(out:match("mail took ([%d.]+)"))
    assert.is_true(took and took >= 0.95 and took < 5, out)
    assert.matches("rcpt %(550, b'5%.1%.1 No such user here'%)", out)
  end)
end)

describe("server hooks for faults", function()
  it("on_data and on_starttls decide DATA and STARTTLS; the engine keeps the transaction", function()
    local e = core.server_engine { hook_data = true, hook_starttls = true, tls = true }
    e:output()
    e:feed("EHLO x\r\nSTARTTLS\r\n")
    assert.equal("starttls_command", (e:next()))
    e:decide(false, 454, "4.7.0", "not now")
    assert.matches("454 4%.7%.0 not now\r\n$", e:output())
    e:feed("MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    assert.equal("data_command", (e:next()))
    e:decide(false, 451, "4.3.0", "later")
    assert.matches("451 4%.3%.0 later\r\n$", e:output())
    e:feed("DATA\r\n")
    assert.equal("data_command", (e:next()))
    e:decide(true)
    assert.equal("begin", (e:next()))
    assert.matches("354 ", e:output())
    -- accepted, STARTTLS is reported for the handshake; what was pipelined behind it is dropped
    e = core.server_engine { hook_starttls = true, tls = true }
    e:feed("EHLO x\r\nSTARTTLS\r\nNOOP\r\n")
    assert.equal("starttls_command", (e:next()))
    e:decide(true)
    assert.equal("starttls", (e:next()))
    assert.matches("220 2%.0%.0 Ready to start TLS\r\n$", e:output())
    assert.is_nil((e:next()))
  end)
end)
