-- smtp.loop and smtp.wait: tasks, timers, fd waits, error propagation.
local loop = require "smtp.loop"
local wait = require "smtp.wait"
local core = require "smtp.core"
local helper = require "helper"

-- Runs spec/support/transport_load.lua in a child interpreter with the fd limit raised (a fresh
-- machine may start at 1024), returning its figures as a table.
local function load_script(...)
  local args = {}
  for i, a in ipairs { ... } do args[i] = helper.quote(a) end
  -- Our own interpreter keeps the sanitizer preload under `make test-asan` (helper.sh drops it).
  local env = ""
  for k, v in pairs(helper.preload) do env = env .. k .. "=" .. helper.quote(v) .. " " end
  local cmd = "h=$(ulimit -Hn); [ \"$h\" = unlimited ] && h=8192; [ \"$h\" -gt 8192 ] && h=8192; " ..
    "ulimit -n \"$h\" 2>/dev/null; exec env " .. env .. "timeout 120 " .. helper.quote(helper.lua) .. " " ..
    helper.quote(helper.root .. "/spec/support/transport_load.lua") .. " " .. table.concat(args, " ") .. " 2>&1"
  local out = helper.sh("sh -c " .. helper.quote(cmd))
  local t = { output = out }
  for k, v in out:gmatch("([%w_]+)=(%S+)") do t[k] = tonumber(v) or v end
  return t
end

describe("smtp.loop", function()
  it("runs spawned tasks with arguments until all finish", function()
    local out = {}
    loop.spawn(function(a, b) out[#out + 1] = a + b end, 1, 2)
    loop.spawn(function() out[#out + 1] = "x" end)
    loop.run()
    assert.same({ 3, "x" }, out)
  end)

  it("wakes sleepers in deadline order", function()
    local order = {}
    for _, d in ipairs { 0.06, 0.02, 0.04 } do
      loop.spawn(function() loop.sleep(d); order[#order + 1] = d end)
    end
    local t0 = loop.now()
    loop.run()
    local dt = loop.now() - t0
    assert.same({ 0.02, 0.04, 0.06 }, order)
    assert.is_true(dt >= 0.06 and dt < 2, "took " .. dt)
  end)

  it("knows the running task", function()
    assert.is_nil(loop.current())
    local co
    loop.spawn(function() co = loop.current() end)
    loop.run()
    assert.equal("thread", type(co))
  end)

  it("times out an fd wait at its deadline", function()
    local native = require "smtp.transport.native"
    local l = assert(native.listen { port = 0 })
    local res, dt
    loop.spawn(function()
      local t0 = core.now()
      res = { wait.fd(l.fd, "r", t0 + 0.1) }
      dt = core.now() - t0
    end)
    loop.run()
    l:close()
    assert.same({ nil, "timeout" }, res)
    assert.is_true(dt >= 0.1 and dt < 1.5, "waited " .. dt)
  end)


  -- A task's timer entry is reused from wait to wait (later deadlines only move it forward):
  -- the last deadline set is the one honoured, and an earlier one (a sleep) still comes first.
  it("honours the latest deadline of a task that waited many times, and an earlier sleep", function()
    local native = require "smtp.transport.native"
    local l = assert(native.listen { port = 0 })
    local a = assert(native.connect { host = "127.0.0.1", port = l.port })
    local b = assert(l:accept(5))
    local res, dt, slept
    loop.spawn(function()
      for i = 1, 200 do
        assert(a:write("x"))
        assert(wait.fd(b.fd, "r", core.now() + 300 + i))  -- data is there: no timeout
        assert.equal("x", b:read(1))
      end
      local t0 = core.now()
      wait.sleep(0.05)
      slept = core.now() - t0
      t0 = core.now()
      res = { wait.fd(b.fd, "r", t0 + 0.1) }   -- nothing comes: times out at 0.1, not at 300
      dt = core.now() - t0
    end)
    loop.run()
    a:close(); b:close(); l:close()
    -- upper bounds far below the 300 s deadlines set before, far above a loaded machine's delays
    assert.is_true(slept >= 0.05 and slept < 1.5, "slept " .. slept)
    assert.same({ nil, "timeout" }, res)
    assert.is_true(dt >= 0.1 and dt < 1.5, "waited " .. dt)
    assert.equal(0, loop.stats().tasks)
  end)
  it("wakes a task parked on an fd that another task closes", function()
    local native = require "smtp.transport.native"
    local l = assert(native.listen { port = 0 })
    local res
    loop.spawn(function() res = { l:accept(5) } end)
    loop.spawn(function() loop.sleep(0.01); l:close() end)
    loop.run()
    assert.is_nil(res[1])
    assert.equal("closed", res[2].kind)
  end)

  it("propagates a task's error out of run()", function()
    loop.spawn(function() error("boom") end)
    assert.has_error(function() loop.run() end)
    -- and the loop is usable again afterwards
    local ran = false
    loop.spawn(function() ran = true end)
    loop.run()
    assert.is_true(ran)
  end)

  it("lets a bare coroutine.yield give way to other tasks", function()
    local out = {}
    loop.spawn(function() out[#out + 1] = 1; coroutine.yield(); out[#out + 1] = 3 end)
    loop.spawn(function() out[#out + 1] = 2 end)
    loop.run()
    assert.same({ 1, 2, 3 }, out)
  end)

  it("does not keep the timers of waits that finished early", function()
    local native = require "smtp.transport.native"
    local l = assert(native.listen { port = 0 })
    local peak = 0
    -- An idle reader whose earlier deadline keeps the finished waits' timers off the heap's top.
    local idle = assert(native.connect { host = "127.0.0.1", port = l.port })
    local idle_server = assert(l:accept(5))
    loop.spawn(function() idle:read(100) end)
    loop.spawn(function()
      local c = assert(l:accept(5))
      for _ = 1, 5000 do
        assert(c:write("x", 300))
        assert.equal("y", c:read(300))
      end
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = l.port })
      for _ = 1, 5000 do
        assert.equal("x", s:read(300))
        assert(s:write("y", 300))
        local t = loop.stats().timers
        if t > peak then peak = t end
      end
      s:close()
      idle_server:close()
    end)
    loop.run()
    l:close()
    -- 10,000 reads with a 300 s timeout each, all done in well under a second.
    assert.is_true(peak <= 2100, "timer heap peaked at " .. peak)
    assert.same({ tasks = 0, waiting = 0 }, { tasks = loop.stats().tasks, waiting = loop.stats().waiting })
  end)

  -- The edges of the scheduler's C core (csrc/sched.c).
  describe("its C core", function()
    local native = require "smtp.transport.native"

    it("wakes a task that is both readable and past its deadline once, as ready", function()
      local l = assert(native.listen { port = 0 })
      local a = assert(native.connect { host = "127.0.0.1", port = l.port })
      local b = assert(l:accept(5))
      local first, second, dt
      loop.spawn(function()
        first = { wait.fd(b.fd, "r", core.now() + 0.05) }
        assert.equal("x", b:read(1))
        -- a second wake-up from the first wait would end this one early
        local t0 = core.now()
        second = { wait.fd(b.fd, "r", t0 + 0.2) }
        dt = core.now() - t0
      end)
      loop.spawn(function()
        assert(a:write("x"))
        core.wait(-1, "r", 0.15)   -- blocks the loop past the first deadline
      end)
      loop.run()
      a:close(); b:close(); l:close()
      assert.same({ true }, first)
      assert.same({ nil, "timeout" }, second)
      assert.is_true(dt >= 0.2, "waited " .. dt)
      assert.same({ tasks = 0, waiting = 0 }, { tasks = loop.stats().tasks, waiting = loop.stats().waiting })
    end)

    it("raises a task's error from run() with its traceback, and goes on with the others next run", function()
      local l = assert(native.listen { port = 0 })
      local res
      loop.spawn(function() res = { wait.fd(l.fd, "r", core.now() + 0.1) } end)
      loop.spawn(function()
        local function inner() error(setmetatable({}, { __tostring = function() return "a table error" end })) end
        inner()
      end)
      local ok, err = pcall(loop.run)
      assert.is_false(ok)
      assert.matches("^a table error\nstack traceback:", err)
      assert.matches("inner", err)
      assert.same({ tasks = 1, waiting = 1 }, { tasks = loop.stats().tasks, waiting = loop.stats().waiting })
      loop.run()   -- the parked task is still there and times out
      l:close()
      assert.same({ nil, "timeout" }, res)
    end)

    it("wakes a reader and a writer of an fd forgotten while they wait", function()
      local l = assert(native.listen { port = 0 })   -- a listening socket is never writable
      local r, w
      loop.spawn(function() r = { wait.fd(l.fd, "r", core.now() + 30) } end)
      loop.spawn(function() w = { wait.fd(l.fd, "w", core.now() + 30) } end)
      loop.spawn(function()
        loop.sleep(0.01)
        assert.equal(2, loop.stats().waiting)
        loop.forget(l.fd)
      end)
      loop.run()
      l:close()
      assert.same({ nil, "closed" }, r)
      assert.same({ nil, "closed" }, w)
      assert.same({ tasks = 0, waiting = 0 }, { tasks = loop.stats().tasks, waiting = loop.stats().waiting })
    end)

    it("raises misuse at the waiting code's line", function()
      local l = assert(native.listen { port = 0 })
      loop.spawn(function() wait.fd(l.fd, "r", core.now() + 0.2) end)
      loop.spawn(function() wait.fd(l.fd, "r", core.now() + 0.2) end)
      local ok, err = pcall(loop.run)
      assert.is_false(ok)
      assert.matches("loop_spec%.lua:%d+: two tasks wait to read fd " .. l.fd, err)
      loop.spawn(function() loop.wait_fd(l.fd, "x") end)
      ok, err = pcall(loop.run)
      assert.is_false(ok)
      assert.matches("loop_spec%.lua:%d+: bad argument #2 to 'wait_fd'", err)
      loop.run()   -- the first waiter times out
      l:close()
      assert.has_error(function() loop.wait_fd(0, "r") end, "smtp.loop.wait_fd called outside a loop task")
      assert.same({ tasks = 0, waiting = 0 }, { tasks = loop.stats().tasks, waiting = loop.stats().waiting })
    end)

    -- The timer heap's moves: entries pushed, moved up by an earlier deadline, re-keyed later
    -- in place, disarmed, and taken out from the middle when their task ends.
    it("wakes many sleepers in deadline order, each at or after its deadline", function()
      local order, late, n = {}, {}, 0
      local seed = 7
      local function rand(m) seed = (seed * 1103515245 + 12345) % 2147483648 return seed % m end
      local t0 = core.now()
      for i = 1, 300 do
        -- distinct deadlines 0.3 ms apart (7 and 300 are coprime), in no order of i
        local first, d = rand(60) / 1000, (i * 7 % 300) * 0.0003
        loop.spawn(function()
          if i % 4 == 0 then return end                  -- ends at once
          if i % 5 == 0 then loop.sleep(first) end       -- a first, unrelated deadline
          local due = t0 + d
          loop.sleep(due - core.now())
          if core.now() < due then late[#late + 1] = i end
          if i % 5 ~= 0 then   -- the others may have slept past their deadline already
            n = n + 1
            order[n] = due
          end
        end)
      end
      loop.run()
      assert.same({}, late)
      for i = 2, n do assert.is_true(order[i - 1] <= order[i], "woken out of order at " .. i) end
      assert.same({ tasks = 0, waiting = 0, timers = 0 },
        { tasks = loop.stats().tasks, waiting = loop.stats().waiting, timers = loop.stats().timers })
    end)

    it("treats a coroutine a task resumes itself as no task", function()
      local inner, outer
      loop.spawn(function()
        outer = loop.current()
        local co = coroutine.create(function() inner = loop.current() or false end)
        assert(coroutine.resume(co))
        loop.spawn(function() loop.sleep(0) end)   -- a task spawned by a task
      end)
      loop.run()
      assert.equal("thread", type(outer))
      assert.is_false(inner)
      assert.equal(0, loop.stats().tasks)
    end)
  end)

  it("sleeps on the main thread by blocking", function()
    local t0 = core.now()
    wait.sleep(0.03)
    assert.is_true(core.now() - t0 >= 0.03)
  end)

  it("runs 1,000 concurrent tasks each doing a connect and a round trip", function()
    local r = load_script("many", "1000")
    assert.equal(1000, r.done, r.output)
    assert.equal(0, r.failed, r.output)
    assert.is_true(r.seconds < 20, r.output)
  end)

  it("holds idle connections at well under 16 KB each (both ends in one process)", function()
    local r = load_script("idle", "500")
    assert.equal(500, r.connections, r.output)
    -- kb_per_connection counts both ends of each loopback connection: two coroutines, two sockets.
    assert.is_true(r.kb_per_connection < 16, r.output)
  end)
end)
