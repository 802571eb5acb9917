-- smtp.loop and smtp.wait: tasks, timers, fd waits, error propagation.
local loop = require "smtp.loop"
local wait = require "smtp.wait"
local core = require "smtp.core"

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
    assert.is_true(dt >= 0.06 and dt < 0.5, "took " .. dt)
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
    assert.is_true(dt >= 0.1 and dt < 0.2, "waited " .. dt)
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

  it("sleeps on the main thread by blocking", function()
    local t0 = core.now()
    wait.sleep(0.03)
    assert.is_true(core.now() - t0 >= 0.03)
  end)
end)
