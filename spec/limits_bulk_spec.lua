-- smtp.limits at work: conn:send_many given a limiter goes on over a new session after a 421
-- (default behaviour unchanged without one) and keeps messages_per_connection; smtp.deliver and
-- smtp.send honour a shared limiter; and the measured run: 200 messages through
-- `lua-smtp send --to-file --rate --max-connections` against a sink process that refuses more
-- than 3 concurrent sessions (421 4.7.0) and more than 20 messages in any 1 s (451 4.7.1),
-- judged by the sink's own log and clock.
local helper = require "helper"
local smtp = require "smtp"
local server = require "smtp.server"
local loop = require "smtp.loop"
local limits = require "smtp.limits"
local errors = require "smtp.errors"
local core = require "smtp.core"

local MSG = "From: a@example.com\r\nTo: b@example.org\r\nSubject: limits\r\n\r\nhello\r\n"

-- An in-process server that records each accepted message with its session's id.
local function sink(opts)
  local got = { messages = {}, sessions = {}, per_session = {} }
  opts = opts or {}
  local o = { host = "127.0.0.1", port = 0, hostname = "limits.test",
    on_event = function(ev)
      if ev.type == "session_open" then got.sessions[#got.sessions + 1] = ev.conn end
    end,
    on_message = function(session, env, reader)
      for _ in reader:chunks() do end
      got.messages[#got.messages + 1] = env.to[1]
      got.per_session[session.id] = (got.per_session[session.id] or 0) + 1
      return true
    end }
  for k, v in pairs(opts) do o[k] = v end
  got.srv = assert(server.listen(o))
  return got
end

local function entries(n)
  local list = {}
  for i = 1, n do list[i] = { message = MSG, from = "a@example.com", to = { ("r%d@example.org"):format(i) } } end
  return list
end

-- Runs fn(srv) as a loop task beside the server; returns what fn returned.
local function with_server(got, fn)
  local res
  loop.spawn(function()
    got.srv:serve()
    local ok, e = pcall(fn, got.srv)
    got.srv:close()
    if not ok then error(e, 0) end
    res = e
  end)
  loop.run()
  return res
end

describe("send_many with smtp.limits", function()
  it("without a limiter reports what a 421 mid-batch left undone (unchanged)", function()
    local got = sink { max_transactions = 4 }
    local out = with_server(got, function(srv)
      local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none" })
      local out = conn:send_many(entries(10))
      conn:close()
      return out
    end)
    for i = 1, 4 do assert.is_false(errors.is(out[i]), tostring(out[i])) end
    assert.equal("closed", out[5].kind); assert.equal(421, out[5].code)
    -- pipelined after the 5th: the session ended under them
    for i = 6, 10 do assert.equal("closed", out[i].kind) end
    assert.equal(4, #got.messages)
  end)

  it("with one, sends the rest over new sessions after the pause", function()
    local got = sink { max_transactions = 4 }
    local lim = limits.new { backoff = 0.05, max_backoff = 0.2 }
    local t0 = core.now()
    local oks = {}
    local out = with_server(got, function(srv)
      local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none",
        on_event = function(ev) if ev.type == "transaction" and ev.ok then oks[#oks + 1] = ev.index end end })
      local out = conn:send_many(entries(10), { limits = lim })
      -- the caller's conn is on the last session, open until closed
      local r = conn:noop()
      assert(r and r.code == 250, "conn not usable after send_many")
      conn:close()
      return out
    end)
    for i = 1, 10 do assert.is_false(errors.is(out[i]), i .. ": " .. tostring(out[i])) end
    assert.equal(10, #got.messages)
    local seen = {}
    for _, r in ipairs(got.messages) do seen[r] = (seen[r] or 0) + 1 end
    for i = 1, 10 do assert.equal(1, seen[("r%d@example.org"):format(i)]) end
    assert.equal(3, #got.sessions)
    local st = lim:stats()["127.0.0.1:" .. got.srv.port]
    assert.equal(2, st.busy); assert.equal(0, st.active)
    -- two pauses, the second twice the first
    assert.is_true(core.now() - t0 >= 0.15 - 0.01)
    -- events name the entries, not their place in a session's slice
    table.sort(oks)
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, oks)
  end)

  it("keeps messages_per_connection and the rate", function()
    local stamps = {}
    local got = sink { on_mail = function() stamps[#stamps + 1] = core.now(); return true end }
    local lim = limits.new { messages_per_connection = 3, rate = { messages = 4, per = 0.2 } }
    local out = with_server(got, function(srv)
      local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none" })
      local out = conn:send_many(entries(12), { limits = lim })
      conn:close()
      return out
    end)
    for i = 1, 12 do assert.is_false(errors.is(out[i]), tostring(out[i])) end
    assert.equal(4, #got.sessions)
    for id, n in pairs(got.per_session) do assert.is_true(n <= 3, id .. ": " .. n) end
    assert.equal(12, #stamps)
    -- same clock on both sides here: 12 messages at 4 per 0.2 s take at least 0.4 s
    assert.is_true(stamps[12] - stamps[1] >= 0.4 - 0.02, stamps[12] - stamps[1])
  end)

  it("refuses a limiter that is not one", function()
    local got = sink {}
    with_server(got, function(srv)
      local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none" })
      assert.has_error(function() conn:send_many(entries(1), { limits = {} }) end,
        "bad argument #2 to 'send_many' (limits: smtp.limits expected)")
      conn:close()
    end)
  end)
end)

describe("batch.bulk", function()
  it("backs off from a server's 421 at connect and 451 on MAIL and still sends everything", function()
    local refused_once = {}
    local got = sink { max_client_connections = 2, client_exempt = false, max_client_rate = false,
      max_client_messages = false, max_client_recipients = false, tarpit_delay = 0,
      on_mail = function() return true end,
      on_rcpt = function(_, rcpt)
        -- every 7th recipient is refused for load the first time it comes
        local n = tonumber(rcpt:match("^r(%d+)@"))
        if n % 7 == 0 and not refused_once[n] then
          refused_once[n] = true
          return false, 451, "4.7.1 Too many messages, slow down"
        end
        return true
      end }
    local lim = limits.new { backoff = 0.05, max_backoff = 0.2, recover = 0.2 }
    local seen = {}
    local out = with_server(got, function(srv)
      return require("smtp.batch").bulk { connect = { server = "127.0.0.1", port = srv.port, tls = "none" },
        entries = entries(40), limits = lim, concurrency = 5,
        on_result = function(i) seen[#seen + 1] = i end }
    end)
    for i = 1, 40 do assert.is_false(errors.is(out[i]), i .. ": " .. tostring(out[i])) end
    assert.equal(40, #seen)
    local st = lim:stats()["127.0.0.1:" .. got.srv.port]
    assert.is_true(st.busy >= 1)
    assert.is_true(got.srv.counters.client_connections >= 1)   -- it did meet the 421s
    local per = {}
    for _, r in ipairs(got.messages) do per[r] = (per[r] or 0) + 1 end
    for i = 1, 40 do assert.equal(1, per[("r%d@example.org"):format(i)]) end
  end)

  it("the command refuses bad limit flags", function()
    local send = require "smtp.cli.send"
    local function run(args)
      local o, e = {}, {}
      local out = { write = function(_, ...) for _, v in ipairs { ... } do o[#o + 1] = v end end, flush = function() end }
      local err = { write = function(_, ...) for _, v in ipairs { ... } do e[#e + 1] = v end end, flush = function() end }
      return send.main(args, out, err), table.concat(e)
    end
    local dir = helper.tmpdir()
    helper.write(dir .. "/to.txt", "a@example.org\n")
    local base = { "--server", "127.0.0.1:1", "--from", "a@example.com", "--to-file", dir .. "/to.txt" }
    local function with(...) local t = { (table.unpack or unpack)(base) } for _, v in ipairs { ... } do t[#t + 1] = v end return t end
    local st, e = run(with("--rate", "fast"))
    assert.equal(2, st); assert.matches("bad %-%-rate 'fast'", e)
    st, e = run(with("--max-connections", "0"))
    assert.equal(2, st); assert.matches("bad %-%-max%-connections '0'", e)
    st, e = run(with("--messages-per-connection", "1.5"))
    assert.equal(2, st); assert.matches("bad %-%-messages%-per%-connection", e)
    st, e = run { "--server", "127.0.0.1:1", "--from", "a@example.com", "--to", "b@example.org", "--rate", "5/1" }
    assert.equal(2, st); assert.matches("go with %-%-to%-file", e)
  end)
end)

describe("smtp.deliver and smtp.send with smtp.limits", function()
  it("deliver paces a shared limiter per recipient domain; send per host:port", function()
    local stamps = {}
    local got = sink { on_mail = function() stamps[#stamps + 1] = core.now(); return true end }
    local lim = limits.new { rate = { messages = 2, per = 0.3 }, max_connections = 1 }
    local results = {}
    with_server(got, function(srv)
      local n = 0
      for i = 1, 3 do
        loop.spawn(function()
          results[i] = smtp.deliver { message = MSG, from = "a@example.com", to = { "x@[127.0.0.1]" },
            port = srv.port, tls = "none", destinations = "any", limits = lim }
          n = n + 1
        end)
      end
      while n < 3 do loop.sleep(0.01) end
      assert(smtp.send { server = "127.0.0.1", port = srv.port, tls = "none", message = MSG,
        from = "a@example.com", to = { "y@example.org" }, limits = lim })
    end)
    for i = 1, 3 do assert.equal("sent", results[i][1].status) end
    local st = lim:stats()
    assert.equal(3, st["[127.0.0.1]"].messages); assert.equal(1, st["[127.0.0.1]"].peak)
    assert.equal(1, st["127.0.0.1:" .. got.srv.port].messages)
    -- the third message of the domain waited for the window
    assert.is_true(stamps[3] - stamps[1] >= 0.3 - 0.02, stamps[3] - stamps[1])
    assert.has_error(function() smtp.deliver { message = MSG, from = "a@example.com", to = "x@example.org", limits = 5 } end,
      "bad argument #1 to 'deliver' (limits: smtp.limits expected)")
  end)
end)

describe("smtp.queue with smtp.limits", function()
  it("the runner's acquire and release work with the real limiter", function()
    local got = sink {}
    local lim = limits.new { max_connections = 1 }
    local q = assert(require("smtp.queue").open(helper.tmpdir(), { limits = lim }))
    local via = { server = "127.0.0.1", port = got.srv.port, tls = "none", timeout = 10 }
    for i = 1, 3 do assert(q:submit { message = MSG, from = "a@example.com", to = { ("q%d@example.org"):format(i) }, via = via }) end
    -- the only slot is taken: the runner leaves the messages for later (a smarthost's key is
    -- host:port, as smtp.send's)
    local d = "127.0.0.1:" .. got.srv.port
    assert.is_true(lim:acquire(d))
    local n1, n2
    with_server(got, function()
      n1 = q:run_once()
      lim:release(d, "ok")
      for _, m in ipairs(q:list()) do assert(q:retry(m.id)) end
      n2 = q:run_once()
    end)
    assert.equal(3, n1.limited); assert.equal(0, n1.sent)
    assert.equal(3, n2.sent)
    assert.equal(3, #got.messages)
    local st = lim:stats()[d]
    assert.equal(0, st.active); assert.equal(1, st.peak)
  end)

  it("the runner keeps a destination's rate, also from the command line (--rate)", function()
    local got = sink {}
    local dir = helper.tmpdir()
    -- the limiter the command line makes of --rate 1/3600 --max-connections 1
    local lim = assert(limits.from_flags { rate = "1/3600", ["max-connections"] = "1" })
    local q = assert(require("smtp.queue").open(dir, { limits = lim }))
    local via = { server = "127.0.0.1", port = got.srv.port, tls = "none", timeout = 10 }
    for i = 1, 3 do assert(q:submit { message = MSG, from = "a@example.com", to = { ("r%d@example.org"):format(i) }, via = via }) end
    local n
    -- one message an hour: one goes now, the others wait for the window
    with_server(got, function() n = q:run_once() end)
    assert.equal(1, #got.messages)
    assert.equal(1, n.sent); assert.equal(2, n.limited)
    local bad = helper.sh(helper.lua .. " " .. helper.quote(helper.root .. "/bin/lua-smtp") .. " queue run "
      .. helper.quote(dir) .. " --once --rate fast 2>&1; echo rc=$?")
    assert.matches("bad --rate 'fast'", bad, 1, true)
    assert.matches("rc=2", bad, 1, true)
  end)
end)

-- The sink of the measured run, as its own process: its clock and its log decide.
local SINK = [[
local server = require "smtp.server"
local core = require "smtp.core"
local maxc, R, W, logpath = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), arg[4]
local log = assert(io.open(logpath, "w"))
log:setvbuf("line")
local accepted = {}   -- MAIL times accepted, for the sliding window
local srv
srv = assert(server.listen {
  host = "127.0.0.1", port = 0, hostname = "ratesink.test", timeout = 60,
  -- the connection limit is the server's own per-client one, loopback included
  max_client_connections = maxc, client_exempt = false, max_client_rate = false,
  max_client_messages = false, max_client_recipients = false, max_errors = 100000, tarpit_delay = 0,
  on_event = function(ev)
    if ev.type == "session_open" then log:write(("open %.6f %d\n"):format(core.now(), srv.active))
    elseif ev.type == "limit" then log:write(("limit %.6f %s\n"):format(core.now(), ev.name)) end
  end,
  on_mail = function(session)
    local t = core.now()
    local n = 0
    for i = #accepted, 1, -1 do
      if accepted[i] <= t - W then break end
      n = n + 1
    end
    if n >= R then
      log:write(("refused %.6f %d\n"):format(t, session.id))
      return false, 451, "4.7.1 Too many messages, slow down"
    end
    accepted[#accepted + 1] = t
    log:write(("mail %.6f %d\n"):format(t, session.id))
    return true
  end,
  on_message = function(session, env, reader)
    for _ in reader:chunks() do end
    log:write(("msg %.6f %d %s\n"):format(core.now(), session.id, env.to[1]))
    return true
  end,
})
io.stdout:write("ready ", srv.port, "\n"); io.stdout:flush()
srv:serve()
]]

describe("a bulk run against a sink that enforces limits", function()
  it("finishes 200 messages with zero failures and never exceeds the sink's limits", function()
    local dir = helper.tmpdir()
    helper.write(dir .. "/sink.lua", SINK)
    local MAXC, R, W = 3, 20, 1.0
    local p = helper.spawn({ helper.lua, dir .. "/sink.lua", tostring(MAXC), tostring(R), tostring(W),
      dir .. "/sink.log" }, { limit = 300 })
    local port
    for _ = 1, 200 do
      port = p:output():match("ready (%d+)")
      if port then break end
      helper.sleep(0.05)
    end
    assert(port, "sink did not start: " .. p:output())
    local rcpts = {}
    for i = 1, 200 do rcpts[i] = ("r%d@example.org"):format(i) end
    helper.write(dir .. "/to.txt", table.concat(rcpts, "\n") .. "\n")
    helper.write(dir .. "/body.txt", "hello\n")
    -- the client's rate is the sink's 20 per 1 s with a window of 1.5 s: a quarter second and more
    -- of scheduling jitter between our clock and the sink's cannot put 21 in one of its windows;
    -- twice the connections the sink allows ask for slots
    local t0 = core.now()
    local cmd = table.concat({ "timeout 240", helper.lua, helper.quote(helper.root .. "/bin/lua-smtp"),
      "send --server 127.0.0.1:" .. port, "--tls none --from a@example.com",
      "--to-file", helper.quote(dir .. "/to.txt"), "--body-file", helper.quote(dir .. "/body.txt"),
      "--subject limits --rate 20/1.5 --max-connections 3 --concurrency 6 --messages-per-connection 25",
      ">", helper.quote(dir .. "/out.txt"), "2>", helper.quote(dir .. "/err.txt"), "; echo $?" }, " ")
    local status = helper.sh(cmd)
    local elapsed = core.now() - t0
    p:stop()
    local out, err = helper.read(dir .. "/out.txt") or "", helper.read(dir .. "/err.txt") or ""
    assert.equal("0", status:match("%d+"), err)
    assert.matches("sent 200, failed 0, deferred 0", out)

    local mails, opens, per_session, refused, limit_hits, delivered = {}, {}, {}, 0, 0, {}
    for line in (helper.read(dir .. "/sink.log") or ""):gmatch("[^\n]+") do
      local kind, t, rest = line:match("^(%a+) ([%d.]+) ?(.*)$")
      t = tonumber(t)
      if kind == "mail" then mails[#mails + 1] = t
      elseif kind == "open" then opens[#opens + 1] = tonumber(rest)
      elseif kind == "refused" then refused = refused + 1
      elseif kind == "limit" then limit_hits = limit_hits + 1
      elseif kind == "msg" then
        local id, rcpt = rest:match("^(%d+) (.*)$")
        per_session[id] = (per_session[id] or 0) + 1
        delivered[rcpt] = (delivered[rcpt] or 0) + 1
      end
    end
    -- every recipient once
    local n = 0
    for _, r in ipairs(rcpts) do assert.equal(1, delivered[r], r); n = n + 1 end
    assert.equal(200, n)
    -- the sink never had to refuse: no 451 for the rate, no 421 for connections
    assert.equal(0, refused); assert.equal(0, limit_hits)
    -- and by its own clock: no 1 s window over 20, never more than 3 sessions
    local function max_in(win)
      local m, j = 0, 1
      for i = 1, #mails do
        while mails[i] - mails[j] >= win do j = j + 1 end
        if i - j + 1 > m then m = i - j + 1 end
      end
      return m
    end
    local max_1s = max_in(W)
    assert.is_true(max_1s <= R, "a 1 s window held " .. max_1s)
    local max_active = 0
    for _, a in ipairs(opens) do if a > max_active then max_active = a end end
    assert.is_true(max_active <= MAXC, "sessions at once: " .. max_active)
    local max_per = 0
    for _, c in pairs(per_session) do if c > max_per then max_per = c end end
    assert.is_true(max_per <= 25)
    -- 200 at 20 per 1.5 s cannot take less than (200 - 20) / 20 * 1.5 = 13.5 s
    assert.is_true(mails[#mails] - mails[1] >= 13.5 - 0.1)
    io.stderr:write(("\n[limits bulk] %d messages, sink limits %d sessions / %d per %gs, client --rate 20/1.5 "
      .. "--max-connections 3 --concurrency 6 --messages-per-connection 25: %.1f s, max %d per 1 s window, "
      .. "max %d sessions at once, %d sessions, max %d messages per session\n"):format(
      #mails, MAXC, R, W, elapsed, max_1s, max_active, #opens, max_per))
  end)
end)

describe("lim:wait in each scheduler", function()
  -- 3 messages at 2 per 0.3 s: the third waits about 0.3 s, however the waiting is done
  local function three(lim)
    local t0 = core.now()
    for _ = 1, 3 do assert.is_true(lim:wait("d", "message")) end
    return core.now() - t0
  end

  it("blocks a plain script", function()
    local took = three(limits.new { rate = "2/0.3" })
    assert.is_true(took >= 0.29 and took < 5, took)
  end)

  it("yields inside smtp.loop: another task runs meanwhile", function()
    local took, ticks = nil, 0
    loop.spawn(function() took = three(limits.new { rate = "2/0.3" }) end)
    loop.spawn(function() for _ = 1, 5 do ticks = ticks + 1; loop.sleep(0.02) end end)
    loop.run()
    assert.is_true(took >= 0.29 and took < 5, took)
    assert.equal(5, ticks)
  end)

  it("sleeps through cqueues inside a controller", function()
    local cqueues = require "cqueues"   -- a test dependency (lua-cqueues)
    local cq = cqueues.new()
    local took, ticks = nil, 0
    cq:wrap(function() took = three(limits.new { rate = "2/0.3" }) end)
    cq:wrap(function() for _ = 1, 5 do ticks = ticks + 1; cqueues.sleep(0.02) end end)
    assert(cq:loop(10))
    assert.is_true(took >= 0.29 and took < 5, took)
    assert.equal(5, ticks)
  end)
end)
