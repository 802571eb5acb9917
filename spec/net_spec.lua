-- Native TCP transport: blocking and looped echo over loopback, bad arguments, connect failures.
local helper = require "helper"
local support = require "support.transport"
local native = require "smtp.transport.native"
local loop = require "smtp.loop"
local errors = require "smtp.errors"
local core = require "smtp.core"

describe("smtp.transport.native (TCP)", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do p:stop() end
    procs = {}
  end)

  it("echoes over loopback with blocking calls", function()
    local p, port = support.peer("echo")
    procs[#procs + 1] = p
    local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
    assert.same(true, s:write("EHLO there\r\n", 5))
    local got = ""
    while #got < 12 do got = got .. assert(s:read(5)) end
    assert.equal("EHLO there\r\n", got)
    local info = s:info()
    assert.equal("127.0.0.1", info.address)
    assert.equal(port, info.port)
    assert.equal(false, info.tls)
    s:close()
    assert.same(true, s:close())
    local ok, err = s:read(1)
    assert.is_nil(ok)
    assert.equal("closed", err.kind)
  end)

  it("echoes over loopback inside smtp.loop with an in-process listener", function()
    local l = assert(native.listen { host = "127.0.0.1", port = 0 })
    assert.is_true(l.port > 0)
    local got
    loop.spawn(function()
      local c = assert(l:accept(5))
      while true do
        local d = c:read(5)
        if not d then break end
        assert(c:write(d, 5))
      end
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = l.port, timeout = 5 })
      local msg = string.rep("x", 200000) .. "\r\n"
      assert(s:write(msg, 5))
      local parts, n = {}, 0
      while n < #msg do
        local d = assert(s:read(5))
        parts[#parts + 1] = d
        n = n + #d
      end
      got = table.concat(parts)
      assert.equal(msg, got)
      s:close()
    end)
    loop.run()
    l:close()
    assert.equal(200002, #got)
  end)

  it("connects over IPv6 loopback", function()
    local l = assert(native.listen { host = "::1", port = 0 })
    local ok
    loop.spawn(function()
      local c = assert(l:accept(5))
      assert(c:write("hi", 5))
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "::1", port = l.port, timeout = 5 })
      ok = s:read(5)
      s:close()
    end)
    loop.run()
    l:close()
    assert.equal("hi", ok)
  end)

  it("tries every address of localhost in turn", function()
    -- Listen on ::1 only: the IPv4 attempt is refused, the IPv6 one must follow.
    local l = assert(native.listen { host = "::1", port = 0 })
    local s, err = native.connect { host = "localhost", port = l.port, timeout = 5 }
    assert.is_nil(err)
    assert.equal("::1", s.address)
    s:close()
    l:close()
  end)

  it("returns kind connect when nothing listens", function()
    local port = helper.free_port()
    local s, err = native.connect { host = "127.0.0.1", port = port, timeout = 5 }
    assert.is_nil(s)
    assert.is_true(errors.is(err, "connect"))
    assert.matches("refused", err.text)
    assert.equal("ECONNREFUSED", err.errno)
  end)

  it("raises on wrong argument types, naming the argument", function()
    assert.has_error(function() native.connect("x") end, "bad argument #1 to 'connect' (table expected, got string)")
    assert.has_error(function() native.connect { host = 1, port = 25 } end,
      "bad argument #1 to 'connect' (option 'host': string expected, got number)")
    assert.has_error(function() native.connect { host = "127.0.0.1", port = "25" } end,
      "bad argument to 'connect' (option 'port': number expected, got string)")
    assert.has_error(function() native.connect { host = "127.0.0.1", port = 25, timeout = "1" } end,
      "bad argument to 'connect' (option 'timeout': number expected, got string)")
  end)

  it("returns kind invalid for bad values", function()
    for _, port in ipairs { 0, -1, 65536, 1.5 } do
      local s, err = native.connect { host = "127.0.0.1", port = port }
      assert.is_nil(s)
      assert.equal("invalid", err.kind)
      assert.is_false(err.temporary)
    end
    local s, err = native.connect { host = "", port = 25 }
    assert.is_nil(s)
    assert.equal("invalid", err.kind)
    local l, lerr = native.listen { port = 70000 }
    assert.is_nil(l)
    assert.equal("invalid", lerr.kind)
  end)

  it("returns kind dns for a name it cannot resolve", function()
    local s, err = native.connect { host = "no-such-host.invalid", port = 25, timeout = 2 }
    assert.is_nil(s)
    assert.equal("dns", err.kind)
  end)

  it("is pollable: pollfd, events, timeout", function()
    local l = assert(native.listen { port = 0 })
    local s = assert(native.connect { host = "127.0.0.1", port = l.port })
    assert.equal("number", type(s:pollfd()))
    assert.equal(s:pollfd(), s.fd)
    assert.equal("r", s:events())
    assert.is_nil(s:timeout())
    assert.equal(l.fd, l:pollfd())
    s:close()
    l:close()
  end)

  it("has a monotonic clock and a blocking wait that honours its timeout", function()
    local t0 = core.now()
    assert.same({ nil, "timeout" }, { core.wait(-1, "r", 0.05) })
    local dt = core.now() - t0
    assert.is_true(dt >= 0.05 and dt < 0.5, "waited " .. dt)
  end)
end)
