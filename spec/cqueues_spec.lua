-- The native transport inside a cqueues controller: waits go through cqueues.poll, so many
-- connections in one controller overlap; connection objects are cqueues-pollable.
local support = require "support.transport"
local native = require "smtp.transport.native"
local core = require "smtp.core"
local helper = require "helper"

local has_cqueues, cqueues = pcall(require, "cqueues")

describe("smtp.transport.native under cqueues", function()
  if not has_cqueues then
    it("needs cqueues", function() helper.need("cqueues") end)
    return
  end

  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do support.stop(p) end
    procs = {}
  end)

  it("runs 50 round trips against a 0.2 s server in about the time of one", function()
    local p, port = support.peer("slowecho", { delay = 0.2 })
    procs[#procs + 1] = p
    local cq = cqueues.new()
    local done, failures = 0, {}
    local t0 = core.now()
    for i = 1, 50 do
      cq:wrap(function()
        local s, err = native.connect { host = "127.0.0.1", port = port, timeout = 10 }
        if not s then failures[#failures + 1] = tostring(err); return end
        local msg = "NOOP " .. i .. "\r\n"
        assert(s:write(msg, 10))
        local got = ""
        while #got < #msg do
          local d, rerr = s:read(10)
          if not d then failures[#failures + 1] = tostring(rerr); return end
          got = got .. d
        end
        assert.equal(msg, got)
        s:close()
        done = done + 1
      end)
    end
    assert(cq:loop(30))
    local dt = core.now() - t0
    assert.same({}, failures)
    assert.equal(50, done)
    -- One round trip alone takes 0.2 s; fifty in sequence would take 10 s.
    assert.is_true(dt < 5, "50 round trips took " .. dt .. " s")
  end)

  it("times out a read under cqueues at its deadline", function()
    local p, port = support.peer("silent")
    procs[#procs + 1] = p
    local cq = cqueues.new()
    local err, dt
    cq:wrap(function()
      local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
      local t0 = core.now()
      local d
      d, err = s:read(0.3)
      dt = core.now() - t0
      assert.is_nil(d)
      assert.is_nil(s.sock)   -- a timeout closes the connection
    end)
    assert(cq:loop(10))
    assert.equal("timeout", err.kind)
    -- at its deadline, not at the connection's 5 s: a loaded machine may wake it late
    assert.is_true(dt >= 0.3 and dt < 1.5, "read returned after " .. dt .. " s")
  end)

  it("gives connection objects pollfd, events and timeout for cqueues.poll", function()
    local l = assert(native.listen { port = 0 })
    local cq = cqueues.new()
    local polled
    cq:wrap(function()
      local s = assert(native.connect { host = "127.0.0.1", port = l.port, timeout = 5 })
      cq:wrap(function()
        local c = assert(l:accept(5))
        cqueues.sleep(0.05)
        assert(c:write("x", 5))
        c:close()
      end)
      -- Poll the object itself, the way cqueues programs wait on their own objects.
      polled = cqueues.poll(s, 5)
      assert.equal(polled, s)
      assert.equal("x", s:read(1))
      s:close()
    end)
    assert(cq:loop(10))
    l:close()
    assert.is_table(polled)
  end)
end)
