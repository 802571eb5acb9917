-- smtp.limits on an injected clock: connection slots, the sliding-window rate, overrides per
-- destination, the pause and reduced concurrency after "busy" and their recovery, lim:wait's
-- sleeping, outcome classification and misuse. Nothing here sleeps.
local limits = require "smtp.limits"
local errors = require "smtp.errors"

local function clock()
  local t = { now = 1000 }
  return t, function() return t.now end
end

describe("smtp.limits", function()
  it("hands out at most max_connections slots per destination", function()
    local c, now = clock()
    local lim = limits.new { max_connections = 2, now = now }
    assert.is_true(lim:acquire("a.example:25"))
    assert.is_true(lim:acquire("a.example:25"))
    local ok, w = lim:acquire("a.example:25")
    assert.is_nil(ok); assert.is_true(w > 0 and w <= 1)
    -- another destination has its own slots
    assert.is_true(lim:acquire("b.example:25"))
    lim:release("a.example:25", "ok")
    assert.is_true(lim:acquire("a.example:25"))
    local st = lim:stats()["a.example:25"]
    assert.equal(2, st.active); assert.equal(2, st.peak); assert.equal(3, st.connections)
    c.now = c.now + 1
  end)

  it("is a sliding window: no `per` seconds ever hold more than `messages`", function()
    local c, now = clock()
    local lim = limits.new { rate = { messages = 3, per = 10 }, now = now }
    local sent = {}
    -- try at every 0.5 s for 60 s, taking whenever allowed
    for step = 0, 120 do
      c.now = 1000 + step * 0.5
      while lim:take("d") do sent[#sent + 1] = c.now end
    end
    assert.is_true(#sent >= 18)
    for i = 1, #sent do
      local n = 0
      for j = i, #sent do if sent[j] < sent[i] + 10 then n = n + 1 end end
      assert.is_true(n <= 3, "window at " .. sent[i] .. " holds " .. n)
    end
    -- the wait it names is exact
    c.now = 2000
    local lim2 = limits.new { rate = "2/5s", now = now }
    assert.is_true(lim2:take("x")); c.now = 2001
    assert.is_true(lim2:take("x"))
    local ok, w = lim2:take("x")
    assert.is_nil(ok); assert.near(4, w, 1e-9)
    c.now = 2005
    assert.is_true(lim2:take("x"))
    ok, w = lim2:take("x")
    assert.is_nil(ok); assert.near(1, w, 1e-9)
    assert.equal(2, lim2:stats().x.in_window)
  end)

  it("takes overrides per destination, by name or by host without the port", function()
    local _, now = clock()
    local lim = limits.new { max_connections = 5, messages_per_connection = 100,
      per_destination = { ["Slow.Example"] = { max_connections = 1, rate = { messages = 1, per = 60 } } },
      now = now }
    assert.equal(1, lim:settings("slow.example").max_connections)
    assert.equal(1, lim:settings("slow.example:587").max_connections)
    assert.equal(100, lim:settings("slow.example:587").messages_per_connection)
    assert.equal(5, lim:settings("fast.example").max_connections)
    assert.is_true(lim:take("slow.example"))
    assert.is_nil((lim:take("slow.example")))
    assert.is_true(lim:take("fast.example"))
    assert.is_true(lim:take("fast.example"))
  end)

  it("pauses after busy, halves the connections and gives them back one at a time", function()
    local c, now = clock()
    local lim = limits.new { max_connections = 8, backoff = 2, max_backoff = 16, recover = 10, now = now }
    for _ = 1, 8 do assert.is_true(lim:acquire("d")) end
    lim:release("d", "busy")
    -- the pause covers slots and messages
    local ok, w = lim:acquire("d")
    assert.is_nil(ok); assert.near(2, w, 1e-9)
    ok, w = lim:take("d")
    assert.is_nil(ok); assert.near(2, w, 1e-9)
    -- a second session reporting the same overload changes nothing more
    lim:release("d", "busy")
    ok, w = lim:acquire("d"); assert.near(2, w, 1e-9)
    assert.equal(2, lim:stats().d.busy)
    -- after the pause: 4 connections allowed, and 6 are still open
    c.now = c.now + 2
    for _ = 1, 6 do lim:release("d", "ok") end
    assert.equal(4, lim:stats().d.cap)
    for _ = 1, 4 do assert.is_true(lim:acquire("d")) end
    assert.is_nil((lim:acquire("d")))
    c.now = c.now + 10
    assert.is_true(lim:acquire("d"))       -- 5
    assert.is_nil((lim:acquire("d")))
    -- another busy after the pause: the next pause doubles, the cap halves from where it is
    lim:release("d", "busy")
    ok, w = lim:acquire("d"); assert.near(4, w, 1e-9)
    c.now = c.now + 4
    assert.equal(2, lim:stats().d.cap)
    -- recovery to the full 8 resets the strikes: the next pause is the first one again
    c.now = c.now + 60
    assert.equal(8, lim:stats().d.cap)
    for _ = 1, 4 do lim:release("d", "ok") end
    assert.is_true(lim:acquire("d"))
    lim:release("d", "busy")
    ok, w = lim:acquire("d"); assert.near(2, w, 1e-9)
  end)

  it("caps the pause at max_backoff; an error outcome does not pause", function()
    local c, now = clock()
    local lim = limits.new { max_connections = 1, backoff = 1, max_backoff = 5, recover = 100, now = now }
    local w
    for _ = 1, 6 do
      assert.is_true(lim:acquire("d"))
      lim:release("d", "busy")
      _, w = lim:acquire("d")
      c.now = c.now + w
    end
    assert.near(5, w, 1e-9)
    assert.is_true(lim:acquire("d"))
    lim:release("d", "error")
    assert.is_true(lim:acquire("d"))
    assert.equal(1, lim:stats().d.errors)
  end)

  it("waits with the sleep it is given, within a timeout", function()
    local c, now = clock()
    local slept = {}
    local lim = limits.new { rate = { messages = 2, per = 3 }, max_connections = 1, now = now,
      sleep = function(s) slept[#slept + 1] = s; c.now = c.now + s end }
    assert.is_true(lim:wait("d", "message"))
    assert.is_true(lim:wait("d", "message"))
    assert.is_true(lim:wait("d", "message"))
    assert.same({ 3 }, slept)
    assert.is_true(lim:wait("d", "connection"))
    local ok, err = lim:wait("d", "connection", 0.12)
    assert.is_nil(ok)
    assert.is_true(errors.is(err, "timeout")); assert.is_true(err.temporary)
    assert.matches("no connection slot for d", tostring(err))
    assert.is_true(c.now - 1003 >= 0.12 - 1e-9)
  end)

  it("classifies outcomes", function()
    local function e(t) return errors.new(t) end
    assert.equal("ok", limits.outcome(nil))
    assert.equal("busy", limits.outcome(e { kind = "closed", code = 421, enhanced = "4.7.0", text = "Too many connections" }))
    assert.equal("busy", limits.outcome(e { kind = "rejected", code = 451, enhanced = "4.7.1", text = "slow down" }))
    assert.equal("busy", limits.outcome(e { kind = "rejected", code = 450, text = "Rate limit exceeded" }))
    assert.equal("error", limits.outcome(e { kind = "rejected", code = 452, enhanced = "4.5.3", text = "Too many recipients" }))
    assert.equal("error", limits.outcome(e { kind = "rejected", code = 451, enhanced = "4.3.0", text = "local error" }))
    assert.equal("error", limits.outcome(e { kind = "rejected", code = 550, text = "too many" }))
    assert.equal("busy", limits.outcome(e { kind = "connect", text = "connect 127.0.0.1:1: Connection refused" }))
    assert.equal("error", limits.outcome(e { kind = "timeout", text = "greeting timed out" }))
    assert.same({ messages = 100, per = 60 }, limits.parse_rate("100/60s"))
    assert.same({ messages = 20, per = 1.5 }, limits.parse_rate("20/1.5"))
    assert.is_nil(limits.parse_rate("0/5"))
    assert.is_nil(limits.parse_rate("5/0"))
    assert.is_nil(limits.parse_rate("5 per minute"))
  end)

  it("raises the standard message on misuse", function()
    assert.has_error(function() limits.new { max_connections = 0 } end,
      "bad argument #1 to 'new' (max_connections: positive integer expected)")
    assert.has_error(function() limits.new { rate = "fast" } end,
      "bad argument #1 to 'new' (rate: \"N/SECONDS\" expected)")
    assert.has_error(function() limits.new { rate = { messages = 5 } } end,
      "bad argument #1 to 'new' (rate: { messages =, per = } expected)")
    assert.has_error(function() limits.new { now = 5 } end, "bad argument #1 to 'new' (now: function expected)")
    local lim = limits.new {}
    assert.has_error(function() lim:acquire(nil) end, "bad argument #1 to 'acquire' (destination name expected)")
    assert.has_error(function() lim:release("d", "fine") end,
      "bad argument #2 to 'release' (\"ok\", \"busy\" or \"error\" expected)")
    assert.has_error(function() lim:wait("d", "slot") end,
      "bad argument #2 to 'wait' (\"connection\" or \"message\" expected)")
    -- no limits at all: everything is allowed at once
    for _ = 1, 100 do assert.is_true(lim:acquire("d")); assert.is_true(lim:take("d")) end
    assert.equal("smtp.limits (1 destination)", tostring(lim))
    assert.is_true(limits.is(lim)); assert.is_false(limits.is({}))
  end)
end)
