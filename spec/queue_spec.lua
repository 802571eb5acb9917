-- smtp.queue: durable submission, per-recipient state and retries, backoff and max age on an
-- injected clock, bounces, limits, cleanup of what dead writers left, the queue CLI. The peers are
-- smtp.server in the same loop (replies chosen per recipient) and aiosmtpd for the CLI runner.
local helper = require "helper"
local queue = require "smtp.queue"
local server = require "smtp.server"
local loop = require "smtp.loop"
local message = require "smtp.message"
local mxsink = require "support.mxsink"

local T0 = 1700000000

local function ls(dir)
  local out = {}
  for _, n in ipairs(require("smtp.core").spool_list(dir) or {}) do out[#out + 1] = n end
  table.sort(out)
  return out
end

local function clock()
  local c = { t = T0 }
  function c.now() return c.t end
  return c
end

-- A server in this process whose RCPT replies follow the local part: defer* 451, busy* 421 at
-- MAIL, bad* 550; it counts each recipient's accepted deliveries and keeps the messages.
local function peer()
  local p = { count = {}, messages = {}, rcpts = {} }
  p.srv = assert(server.listen {
    on_mail = function(_, from)
      if p.busy then return false, 421, "4.7.0 too many connections" end
      return true
    end,
    on_rcpt = function(_, r)
      p.rcpts[r] = (p.rcpts[r] or 0) + 1
      if r:match("^defer") and not p.heal then return false, 451, "4.3.0 try later" end
      if r:match("^bad") then return false, 550, "5.1.1 no such user" end
      return true
    end,
    on_message = function(_, env, reader)
      local parts = {}
      for c in reader:chunks() do parts[#parts + 1] = c end
      for _, r in ipairs(env.to) do p.count[r] = (p.count[r] or 0) + 1 end
      p.messages[#p.messages + 1] = { from = env.from, to = env.to, data = table.concat(parts) }
      return true
    end,
  })
  p.via = { server = "127.0.0.1", port = p.srv.port, tls = "none", timeout = 10 }
  return p
end

-- Runs fn inside smtp.loop beside the peer's server, then closes it.
local function in_loop(p, fn)
  local err
  loop.spawn(function()
    p.srv:serve()
    local ok, e = pcall(fn)
    if not ok then err = e end
    p.srv:close()
  end)
  loop.run()
  if err then error(err, 0) end
end

local raw = "From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: queued\r\n" ..
  "Message-ID: <q1@example.com>\r\n\r\nhello\r\n"

describe("smtp.queue", function()
  it("submits durably: message and state on disk, nothing left in tmp, the id returned", function()
    local dir = helper.tmpdir()
    local q = assert(queue.open(dir, { now = clock().now }))
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = { "bob@example.org" }, via = "mx" })
    assert.matches("^%x+$", id)
    assert.same({ id }, ls(dir .. "/msg"))
    assert.same({ id }, ls(dir .. "/state"))
    assert.same({}, ls(dir .. "/tmp"))
    assert.equal(raw, helper.read(dir .. "/msg/" .. id))
    local st = assert(q:show(id))
    assert.equal("ann@example.com", st.from)
    assert.equal(T0, st.created)
    assert.same({ { rcpt = "bob@example.org", state = "pending", attempts = 0 } }, st.recipients)
    -- a file, a function and a smtp.message (envelope from its fields) are sources too
    local path = dir .. "/in.eml"
    helper.write(path, raw)
    local f = assert(io.open(path, "rb"))
    local id2 = assert(q:submit { message = f, from = "", to = "x@example.org", via = "mx" })
    f:close()
    assert.equal(raw, helper.read(dir .. "/msg/" .. id2))
    local parts = { "a\r\n", "b\r\n" }
    local i = 0
    local id3 = assert(q:submit { message = function() i = i + 1; return parts[i] end, from = "a@b.example",
      to = "c@d.example", via = "mx" })
    assert.equal("a\r\nb\r\n", helper.read(dir .. "/msg/" .. id3))
    local m = message.new { from = "ann@example.com", to = "bob@example.org", cc = "cy@example.net", subject = "s", text = "t" }
    local id4 = assert(q:submit { message = m, via = "mx" })
    local st4 = q:show(id4)
    assert.equal("ann@example.com", st4.from)
    assert.equal(2, #st4.recipients)
  end)

  it("is idempotent on a key: the same key gives the first id and writes nothing", function()
    local dir = helper.tmpdir()
    local q = assert(queue.open(dir, { now = clock().now }))
    local a = assert(q:submit { message = raw, from = "ann@example.com", to = "bob@example.org", via = "mx", key = "order-17" })
    local before = helper.read(dir .. "/state/" .. a)
    local b = assert(q:submit { message = "other", from = "x@example.com", to = "y@example.org", via = "mx", key = "order-17" })
    assert.equal(a, b)
    assert.same({ a }, ls(dir .. "/msg"))
    assert.equal(raw, helper.read(dir .. "/msg/" .. a))
    assert.equal(before, helper.read(dir .. "/state/" .. a))
    assert.same({}, ls(dir .. "/tmp"))
    local c = assert(q:submit { message = raw, from = "ann@example.com", to = "bob@example.org", via = "mx", key = "order-18" })
    assert.not_equal(a, c)
  end)

  it("refuses bad input as invalid, misuse with bad argument", function()
    local dir = helper.tmpdir()
    local q = assert(queue.open(dir))
    local id, err = q:submit { message = raw, from = "ann@example.com", to = { "bob@example.org\r\nRCPT TO:<x@y>" }, via = "mx" }
    assert.is_nil(id)
    assert.equal("invalid", err.kind)
    id, err = q:submit { message = raw, from = "ann@example.com", to = {}, via = "mx" }
    assert.is_nil(id)
    assert.equal("invalid", err.kind)
    id, err = q:submit { message = raw, from = "a@b.example", to = "c@d.example", via = { server = "h", auth = { token = print } } }
    assert.is_nil(id)
    assert.matches("stored", err.text)
    assert.same({}, ls(dir .. "/msg"))
    assert.has_error(function() q:submit("x") end, "bad argument #1 to 'submit' (table expected, got string)")
    assert.has_error(function() q:submit { message = raw, from = "a@b.example", to = "c@d.example", via = 5 } end)
    assert.has_error(function() queue.open(dir, { max_age = -1 }) end)
    assert.has_error(function() queue.open(nil) end, "bad argument #1 to 'open' (directory name expected)")
  end)

  it("keeps state per recipient: sent stays sent, deferred is retried alone, failed bounces at once", function()
    local dir = helper.tmpdir()
    local c = clock()
    local q = assert(queue.open(dir, { now = c.now, random = function() return 0.5 end, hostname = "queue.test" }))
    local p = peer()
    local id = assert(q:submit { message = raw, from = "ann@example.com",
      to = { "ok@example.org", "defer@example.org", "bad@example.org" }, via = p.via })
    in_loop(p, function()
      local n = q:run_once()
      assert.equal(2, n.sent)   -- ok@ and the bounce
      assert.equal(1, n.deferred); assert.equal(1, n.failed)
      assert.equal(1, n.bounced)
      local st = q:show(id)
      assert.same({ "sent", "deferred", "failed" }, { st.recipients[1].state, st.recipients[2].state, st.recipients[3].state })
      assert.equal(250, st.recipients[1].code)
      assert.equal(451, st.recipients[2].code)
      assert.equal("4.3.0", st.recipients[2].enhanced)
      assert.equal(T0 + 300, st.recipients[2].next)     -- first retry: retry_base, jitter 0.5 = none
      assert.equal(550, st.recipients[3].code)
      assert.is_true(st.recipients[3].reported)
      -- the bounce went out in the same pass, with the null sender, to the envelope sender
      assert.equal(1, p.count["ann@example.com"])
      local bounce = p.messages[2]
      assert.equal("", bounce.from)
      assert.matches("multipart/report; report%-type=delivery%-status", bounce.data)
      assert.matches("Final%-Recipient: rfc822; bad@example.org\r\nAction: failed\r\nStatus: 5.1.1", bounce.data)
      -- not due yet: nothing is tried
      c.t = T0 + 299
      n = q:run_once()
      assert.equal(0, n.messages)
      assert.equal(T0 + 300, n.next)
      -- due: only the deferred recipient is tried again
      c.t = T0 + 300
      n = q:run_once()
      assert.equal(1, n.deferred)
      assert.equal(2, p.rcpts["defer@example.org"])
      assert.equal(1, p.rcpts["ok@example.org"])
      assert.equal(T0 + 300 + 600, q:show(id).recipients[2].next)   -- doubled
      p.heal = true
      c.t = T0 + 900
      n = q:run_once()
      assert.equal(1, n.sent)
      assert.equal(1, n.done)
    end)
    assert.equal(1, p.count["ok@example.org"])
    assert.equal(1, p.count["defer@example.org"])
    assert.is_nil(p.count["bad@example.org"])
    assert.same({}, ls(dir .. "/state"))
    assert.same({}, ls(dir .. "/msg"))
    assert.equal(2, #ls(dir .. "/done"))    -- the message and its bounce
    assert.truthy(helper.read(dir .. "/done/" .. id))
    -- a finished message's key still answers with its id until keep_done
    assert.equal("sent", q:show(id).recipients[1].state)
  end)

  it("groups recipients by domain for MX delivery: two of five domains deferred are retried alone", function()
    local dir = helper.tmpdir()
    local c = clock()
    local calls = {}
    local q = assert(queue.open(dir, { now = c.now, random = function() return 0.5 end,
      deliver = function(o)
        calls[#calls + 1] = table.concat(o.to, ",")
        local res = {}
        for i, r in ipairs(o.to) do
          local late = r:match("@d[45]%.example$") and #calls <= 5
          res[i] = { recipient = r, status = late and "deferred" or "sent", code = late and 451 or 250,
            text = late and "greylisted" or "ok", host = "mx." .. r:match("@(.*)$") }
        end
        assert.equal("hello\r\n", o.message:read("a"):match("\r\n\r\n(.*)$"))
        return res
      end }))
    local id = assert(q:submit { message = raw, from = "ann@example.com", via = "mx",
      to = { "a@d1.example", "b@d2.example", "c@d3.example", "d@d4.example", "e@d5.example", "f@d1.example" } })
    local n = q:run_once()
    assert.same({ "a@d1.example,f@d1.example", "b@d2.example", "c@d3.example", "d@d4.example", "e@d5.example" }, calls)
    assert.equal(4, n.sent); assert.equal(2, n.deferred)
    local s = q:stats()
    assert.same({ ["d4.example"] = { pending = 0, deferred = 1 }, ["d5.example"] = { pending = 0, deferred = 1 } }, s.destinations)
    c.t = T0 + 300
    n = q:run_once()
    assert.same({ "d@d4.example", "e@d5.example" }, { calls[6], calls[7] })
    assert.equal(7, #calls)
    assert.equal(2, n.sent)
    assert.equal(1, n.done)
    assert.is_nil(q:stats().destinations["d4.example"])
    assert.truthy(q:show(id).finished)
  end)

  it("delivers by MX to an address literal through smtp.deliver", function()
    local dir = helper.tmpdir()
    local p = peer()
    local q = assert(queue.open(dir))
    assert(q:submit { message = raw, from = "ann@example.com", to = { "x@[127.0.0.1]", "y@[127.0.0.1]" },
      via = { mx = true, port = p.srv.port, destinations = "any", tls = "none", timeout = 10 } })
    in_loop(p, function()
      local n = q:run_once()
      assert.equal(2, n.sent)
      assert.equal(1, n.done)
    end)
    assert.equal(1, #p.messages)
    assert.same({ "x@[127.0.0.1]", "y@[127.0.0.1]" }, p.messages[1].to)
  end)

  it("backs off exponentially with jitter up to the cap, and bounces what outlives max_age", function()
    local dir = helper.tmpdir()
    local c = clock()
    local r = 0.5
    local q = assert(queue.open(dir, { now = c.now, random = function() return r end }))
    assert.equal(300, q:_backoff(1))
    assert.equal(600, q:_backoff(2))
    assert.equal(9600, q:_backoff(6))
    assert.equal(14400, q:_backoff(7))
    assert.equal(14400, q:_backoff(40))
    r = 0; assert.equal(225, q:_backoff(1))
    r = 0.999; assert.equal(375, q:_backoff(1))
    r = 0.5
    local p = peer()
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = { "defer@example.org" }, via = p.via })
    local nul = assert(q:submit { message = raw, from = "", to = { "defer2@example.org" }, via = p.via })
    in_loop(p, function()
      local tries = 0
      while q:show(id) and not q:show(id).finished do
        local n = q:run_once()
        tries = tries + 1
        c.t = n.next or c.t
        assert(tries < 60)
      end
      -- 5 days at 5 min doubling to the 4 h cap: 7 growing waits, then every 4 hours
      local st = q:show(id)
      assert.equal("failed", st.recipients[1].state)
      assert.equal("4.4.7", st.recipients[1].status)
      assert.matches("delivery time expired; last reply: try later", st.recipients[1].text)
      assert.is_true(st.finished - T0 >= 5 * 86400)
      assert.is_true(st.recipients[1].attempts > 20 and st.recipients[1].attempts < 40)
    end)
    -- one bounce, for ann; none for the null sender's message
    local bounces = 0
    for _, m in ipairs(p.messages) do
      if m.from == "" then
        bounces = bounces + 1
        assert.same({ "ann@example.com" }, m.to)
        assert.matches("Status: 4.4.7", m.data)
      end
    end
    assert.equal(1, bounces)
    assert.truthy(q:show(nul).finished)
  end)

  it("sends one delayed-delivery warning after warn_after", function()
    local dir = helper.tmpdir()
    local c = clock()
    local q = assert(queue.open(dir, { now = c.now, random = function() return 0.5 end, warn_after = 3600 }))
    local p = peer()
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = { "defer@example.org" }, via = p.via })
    in_loop(p, function()
      for _ = 1, 6 do
        local n = q:run_once()
        c.t = n.next
      end
    end)
    local warnings = {}
    for _, m in ipairs(p.messages) do
      if m.from == "" then warnings[#warnings + 1] = m end
    end
    assert.equal(1, #warnings)
    assert.matches("Action: delayed", warnings[1].data)
    assert.is_true(q:show(id).warned)
  end)

  it("asks the limiter before each connection and tells it how the connection went", function()
    local dir = helper.tmpdir()
    local c = clock()
    local log = {}
    local allow = false
    local limiter = {
      acquire = function(_, dest)
        log[#log + 1] = "acquire " .. dest
        if not allow then return nil, 30 end
        return true
      end,
      release = function(_, dest, outcome) log[#log + 1] = "release " .. dest .. " " .. outcome end,
    }
    local q = assert(queue.open(dir, { now = c.now, limits = limiter, random = function() return 0.5 end }))
    local p = peer()
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = { "ok@example.org" }, via = p.via })
    in_loop(p, function()
      local n = q:run_once()
      assert.equal(1, n.limited)
      assert.equal(0, p.srv.counters.sessions)
      assert.equal(T0 + 30, q:show(id).recipients[1].next)
      assert.equal(0, q:show(id).recipients[1].attempts)
      allow, p.busy = true, true
      c.t = T0 + 30
      n = q:run_once()
      assert.equal(1, n.deferred)
      p.busy = false
      c.t = n.next
      n = q:run_once()
      assert.equal(1, n.sent)
    end)
    local d = "127.0.0.1:" .. p.srv.port   -- a smarthost is counted as smtp.send counts it, host:port
    assert.same({ "acquire " .. d, "acquire " .. d, "release " .. d .. " busy",
      "acquire " .. d, "release " .. d .. " ok" }, log)
  end)

  it("cleans what dead writers left and skips a corrupt state", function()
    local dir = helper.tmpdir()
    local q = assert(queue.open(dir))
    helper.write(dir .. "/tmp/abc.123", "From: truncat")         -- a writer killed mid-write
    helper.write(dir .. "/msg/0123456789abcdef", "From: x\r\n")  -- killed before its state
    helper.write(dir .. "/state/fedcba9876543210", "{ broken")  -- not ours
    helper.write(dir .. "/msg/fedcba9876543210", "From: y\r\n")
    local n = q:run_once()
    assert.equal(0, n.sent)
    assert.equal(1, n.broken)
    assert.same({}, ls(dir .. "/tmp"))
    assert.same({ "fedcba9876543210" }, ls(dir .. "/msg"))
    local l = q:list()
    assert.equal(1, #l)
    assert.is_true(l[1].corrupt)
  end)

  it("leaves a message locked by another runner alone", function()
    local dir = helper.tmpdir()
    local q = assert(queue.open(dir))
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = "bob@example.org", via = "mx" })
    local lock = assert(require("smtp.core").spool_lock(dir .. "/msg/" .. id))
    local n = q:run_once()
    assert.equal(1, n.locked)
    assert.equal(0, n.messages)
    local ok, err = q:retry(id)
    assert.is_nil(ok)
    assert.matches("being delivered", err.text)
    lock:close()
    assert.is_true(q:delete(id))
    assert.same({}, ls(dir .. "/msg"))
  end)

  it("runs inside smtp.loop until told to stop, sleeping until the next due time", function()
    local dir = helper.tmpdir()
    local c = clock()
    local q = assert(queue.open(dir, { now = c.now, random = function() return 0.5 end }))
    local p = peer()
    assert(q:submit { message = raw, from = "ann@example.com", to = { "defer@example.org" }, via = p.via })
    local slept = {}
    in_loop(p, function()
      q:run { sleep = function(s) slept[#slept + 1] = s; c.t = c.t + s; p.heal = #slept >= 2 end,
        stop = function(n) return n.done > 0 end }
    end)
    assert.same({ 60, 60, 60, 60, 60 }, slept)   -- the poll interval bounds each sleep
    assert.equal(1, p.count["defer@example.org"])
  end)
end)

describe("smtp.queue in cqueues", function()
  it("runs in a cqueues controller, its sleeps yielding to other coroutines", function()
    helper.need("cqueues")
    local cqueues = require "cqueues"
    local dir = helper.tmpdir()
    local port = helper.free_port()
    local sink = mxsink.start("127.0.0.1", port, {})
    local q = assert(queue.open(dir, { poll = 0.05 }))
    assert(q:submit { message = raw, from = "ann@example.com", to = "cq@example.org",
      via = { server = "127.0.0.1", port = port, tls = "none", timeout = 10 } })
    local ticks, passes = 0, 0
    local cq = cqueues.new()
    cq:wrap(function()
      q:run { stop = function(n) passes = passes + 1; return passes >= 3 end }
    end)
    cq:wrap(function()
      for _ = 1, 5 do ticks = ticks + 1; cqueues.sleep(0.01) end
    end)
    assert(cq:loop(20))
    sink:stop()
    assert.equal(5, ticks)
    assert.equal(3, passes)
    assert.same({ "cq@example.org" }, sink:transactions()[1].to)
  end)
end)

describe("lua-smtp queue", function()
  local function cli(args)
    local out = helper.sh(helper.lua .. " " .. helper.quote(helper.root .. "/bin/lua-smtp") .. " queue " .. args ..
      " 2>&1; echo \"exit=$?\"")
    return out:gsub("exit=(%d+)\n$", ""), tonumber(out:match("exit=(%d+)\n$"))
  end

  it("lists, shows, retries, deletes and runs a spool (text and JSON)", function()
    local dir = helper.tmpdir()
    local port = helper.free_port()
    local sink = mxsink.start("127.0.0.1", port, { reject = { "nobody" } })
    local q = assert(queue.open(dir))
    local via = { server = "127.0.0.1", port = port, tls = "none", auth = { user = "u", password = "secret-pw" },
      allow_plaintext_auth = true }
    local id = assert(q:submit { message = raw, from = "ann@example.com", to = { "bob@example.org", "nobody@example.org" },
      via = { server = "127.0.0.1", port = port, tls = "none" } })
    local id2 = assert(q:submit { message = raw, from = "ann@example.com", to = { "x@a.example" }, via = "mx" })
    local id3 = assert(q:submit { message = raw, from = "ann@example.com", to = { "y@a.example" }, via = via })
    local out, code = cli("list " .. helper.quote(dir))
    assert.equal(0, code, out)
    assert.matches(id .. "  from <ann@example.com>", out, 1, true)
    assert.matches("3 messages; recipients: 4 pending, 0 deferred, 0 sent, 0 failed", out, 1, true)
    assert.matches("  a.example: 1 pending, 0 deferred", out, 1, true)
    assert.matches("  127.0.0.1:" .. port .. ": 3 pending, 0 deferred", out, 1, true)
    out, code = cli("list " .. helper.quote(dir) .. " --json")
    assert.equal(0, code)
    assert.matches('"counts":{"deferred":0,"failed":0,"pending":4,"sent":0}', out, 1, true)
    assert.matches('"total":3', out, 1, true)
    assert.not_matches("secret%-pw", out)
    out, code = cli("show " .. helper.quote(dir) .. " " .. id3 .. " --json")
    assert.equal(0, code, out)
    assert.matches('"recipient":"y@a.example"', out, 1, true)
    assert.not_matches("secret%-pw", out)
    out, code = cli("delete " .. helper.quote(dir) .. " " .. id2)
    assert.equal(0, code, out)
    out, code = cli("delete " .. helper.quote(dir) .. " " .. id3)
    assert.equal(0, code, out)
    out, code = cli("show " .. helper.quote(dir) .. " " .. id2)
    assert.equal(1, code)
    assert.matches("no message", out)
    out, code = cli("retry " .. helper.quote(dir) .. " " .. id)
    assert.equal(0, code, out)
    out, code = cli("run " .. helper.quote(dir) .. " --once")
    assert.equal(0, code, out)
    assert.matches("sent 2, failed 1, deferred 0, bounced 1, done 2", out, 1, true)
    sink:stop()
    local t = sink:transactions()
    assert.equal(2, #t)
    assert.same({ "bob@example.org" }, t[1].to)
    assert.equal("<>", t[2].from)           -- aiosmtpd's spelling of the null sender
    assert.same({ "ann@example.com" }, t[2].to)
    out, code = cli("list " .. helper.quote(dir))
    assert.equal(0, code)
    assert.matches("0 messages", out)
  end)

  it("runs as a long-running command until stopped, delivering what is submitted meanwhile", function()
    local dir = helper.tmpdir()
    local port = helper.free_port()
    local sink = mxsink.start("127.0.0.1", port, {})
    local q = assert(queue.open(dir))
    local proc = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "queue", "run", dir, "--poll", "0.2" },
      { limit = 60 })
    assert(q:submit { message = raw, from = "ann@example.com", to = "late@example.org",
      via = { server = "127.0.0.1", port = port, tls = "none" } })
    local got
    for _ = 1, 200 do
      got = sink:transactions()[1]
      if got then break end
      helper.sleep(0.05)
    end
    -- the runner reports the pass after the transaction the sink saw: wait for its line
    for _ = 1, 200 do
      if proc:output():find("done 1", 1, true) then break end
      helper.sleep(0.05)
    end
    proc:stop()
    sink:stop()
    assert.truthy(got, proc:output())
    assert.same({ "late@example.org" }, got.to)
    assert.matches("sent 1, failed 0, deferred 0, bounced 0, done 1", proc:output(), 1, true)
  end)

  it("refuses bad usage with status 2", function()
    local _, code = cli("")
    assert.equal(2, code)
    _, code = cli("frobnicate /tmp")
    assert.equal(2, code)
    _, code = cli("show /tmp")
    assert.equal(2, code)
    _, code = cli("list /tmp --once")
    assert.equal(2, code)
    _, code = cli("run /tmp --poll=abc")
    assert.equal(2, code)
    local out
    out, code = cli("--help")
    assert.equal(0, code)
    assert.matches("usage: lua%-smtp queue run DIR", out)
  end)
end)
