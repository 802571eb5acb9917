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
    for _, p in ipairs(procs) do support.stop(p) end
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
      "bad argument #1 to 'connect' (option 'port': number expected, got string)")
    assert.has_error(function() native.connect { host = "127.0.0.1", port = 25, timeout = "1" } end,
      "bad argument #1 to 'connect' (option 'timeout': number expected, got string)")
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

  it("sets TCP_NODELAY on both sides: small write, small write, read never stalls on Nagle", function()
    -- Without TCP_NODELAY each round here waits for a delayed ACK (40 ms on Linux): 20 rounds
    -- took 0.85 s when the option was left out, about 2 ms with it. 100 rounds: over 4 s without,
    -- a few ms with it, so a 2 s bound holds on a loaded machine and still catches Nagle.
    local l = assert(native.listen { port = 0 })
    local dt
    loop.spawn(function()
      local c = assert(l:accept(5))
      for _ = 1, 100 do
        local got = ""
        while #got < 2 do got = got .. assert(c:read(5)) end
        assert(c:write("o", 5)); assert(c:write("k", 5))
      end
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = l.port })
      local t0 = core.now()
      for _ = 1, 100 do
        assert(s:write("a", 5)); assert(s:write("b", 5))
        local got = ""
        while #got < 2 do got = got .. assert(s:read(5)) end
        assert.equal("ok", got)
      end
      dt = core.now() - t0
      s:close()
    end)
    loop.run()
    l:close()
    assert.is_true(dt < 2, "100 rounds took " .. dt .. " s")
  end)

  it("has a monotonic clock and a blocking wait that honours its timeout", function()
    local t0 = core.now()
    assert.same({ nil, "timeout" }, { core.wait(-1, "r", 0.05) })
    local dt = core.now() - t0
    assert.is_true(dt >= 0.05 and dt < 2, "waited " .. dt)
  end)
end)

describe("smtp.transport.native with misbehaving peers", function()
  local proc, ports
  setup(function() proc, ports = support.peers() end)
  teardown(function() support.stop(proc) end)
  local function peer(mode) return ports[mode] end

  -- Never before the deadline; after it by at most a second or three times the deadline (a loaded
  -- 2-core machine wakes a process late), far below the 5 s connection timeouts set around it.
  local function within(dt, limit)
    assert.is_true(dt >= limit and dt <= limit + math.max(1, 2 * limit),
      ("returned after %.3f s for a %.3f s deadline"):format(dt, limit))
  end

  it("times out a read from a server that accepts and never answers (blocking)", function()
    local port = peer("silent")
    local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
    local t0 = core.now()
    local d, err = s:read(0.5)
    within(core.now() - t0, 0.5)
    assert.is_nil(d)
    assert.equal("timeout", err.kind)
    assert.is_true(err.temporary)
    assert.is_nil(s.sock)   -- closed by the timeout
    local _, err2 = s:write("x", 1)
    assert.equal("closed", err2.kind)
  end)

  it("times out a read from a server that never answers (in smtp.loop)", function()
    local port = peer("silent")
    local dt, err
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
      local t0 = core.now()
      local _
      _, err = s:read(0.5)
      dt = core.now() - t0
    end)
    loop.run()
    within(dt, 0.5)
    assert.equal("timeout", err.kind)
  end)

  it("times out a TLS handshake with a server that never answers", function()
    local port = peer("silent")
    local t0 = core.now()
    local s, err = native.connect { host = "127.0.0.1", port = port, timeout = 0.5, tls = { verify = false } }
    within(core.now() - t0, 0.5)
    assert.is_nil(s)
    assert.equal("timeout", err.kind)
    assert.equal("TLS handshake timed out", err.text)
  end)

  it("times out a connect that is never answered", function()
    -- A listener that never accepts: once its queue is full the kernel drops further SYNs.
    local l = assert(core.listen("127.0.0.1", 0, 1))
    local held = {}
    local t0, err
    for _ = 1, 8 do
      t0 = core.now()
      local s
      s, err = native.connect { host = "127.0.0.1", port = l:port(), timeout = 0.3 }
      if not s then break end
      held[#held + 1] = s
    end
    within(core.now() - t0, 0.3)
    assert.equal("timeout", err.kind)
    assert.equal("connect to 127.0.0.1 port " .. l:port() .. " timed out", err.text)
    for _, s in ipairs(held) do s:close() end
    l:close()
  end)

  it("reports a reset as kind closed and survives writing to it", function()
    local port = peer("reset")
    local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
    assert(s:write("x", 5))
    local t0 = core.now()
    local d, err = s:read(5)
    assert.is_true(core.now() - t0 < 2.5) -- at the reset, not at the 5 s deadline
    assert.is_nil(d)
    assert.equal("closed", err.kind)
    assert.equal("ECONNRESET", err.errno)
    s:close()
  end)

  it("sees a half-close as end of stream, and can still write", function()
    local port = peer("hello")
    local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
    local got = ""
    local d, err
    repeat
      d, err = s:read(2)
      if d then got = got .. d end
    until not d
    assert.equal("hello\n", got)
    assert.equal("closed", err.kind)
    assert.equal("connection closed by peer", err.text)
  end)

  it("never hangs writing to a peer that went away", function()
    local port = peer("reset")
    local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
    assert(s:write("x", 5))
    core.wait(-1, "r", 0.2)
    local ok, err
    for _ = 1, 50 do
      ok, err = s:write(string.rep("y", 65536), 1)
      if not ok then break end
    end
    assert.is_nil(ok)
    assert.equal("closed", err.kind)
  end)

  it("fails a TLS handshake cleanly when the peer resets or answers plaintext", function()
    local t0 = core.now()
    local s, err = native.connect { host = "127.0.0.1", port = peer("reset"), timeout = 5, tls = { verify = false } }
    assert.is_nil(s)
    assert.equal("tls", err.kind)
    assert.equal("TLS handshake failed: Connection reset by peer", err.text)
    s, err = native.connect { host = "127.0.0.1", port = peer("hello"), timeout = 5, tls = { verify = false } }
    assert.is_nil(s)
    assert.equal("tls", err.kind)
    assert.equal("TLS handshake failed: wrong version number", err.text)
    assert.is_true(core.now() - t0 < 4) -- two failures at once, not at the 5 s deadlines
  end)

  it("lets our side half-close and still read the answer", function()
    local l = assert(native.listen { port = 0 })
    local got
    loop.spawn(function()
      local c = assert(l:accept(5))
      local all = ""
      while true do
        local d = c:read(5)
        if not d then break end
        all = all .. d
      end
      assert(c:write("got " .. #all, 5))
      c:close()
    end)
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = l.port, timeout = 5 })
      assert(s:write("abc", 5))
      assert(s:shutdown())
      got = s:read(5)
      s:close()
    end)
    loop.run()
    l:close()
    assert.equal("got 3", got)
  end)
end)

describe("smtp.transport.native resolving names through smtp.dns", function()
  local has_dns = pcall(require, "smtp.dns")
  if not has_dns then
    pending("smtp.dns is not there yet")
    return
  end
  local ns
  setup(function()
    -- dnsmasq as in support/dnsmasq.lua, but with LD_PRELOAD cleared: under `make test-asan` the
    -- sanitizer runtime preloaded into the interpreter must not leak into the peer.
    local port = helper.free_port("127.0.0.1")
    local proc = helper.spawn({ "env", "-u", "LD_PRELOAD", "/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
      "--no-resolv", "--no-hosts", "--port=" .. port, "--listen-address=127.0.0.1", "--bind-interfaces",
      "--pid-file=", "--local=/test/", "--host-record=both.test,127.0.0.1,::1",
      "--host-record=v4.test,127.0.0.1" }, { limit = 120 })
    assert(helper.wait_port("127.0.0.1", port, 10), "dnsmasq did not start: " .. proc:output())
    ns = { proc = proc, nameserver = "127.0.0.1:" .. port }
  end)
  teardown(function() if ns then support.stop(ns.proc) end end)

  it("tries each address of a name in turn, IPv6 and IPv4", function()
    for _, host in ipairs { "::1", "127.0.0.1" } do
      local l = assert(native.listen { host = host, port = 0 })
      local s, err = native.connect { host = "both.test", port = l.port, timeout = 5, nameservers = { ns.nameserver } }
      assert.is_nil(err)
      assert.equal(host, s.address)
      assert.equal("both.test", s.host)
      s:close()
      l:close()
    end
  end)

  it("reports a name that does not exist as kind dns", function()
    local s, err = native.connect { host = "nothing.test", port = 25, timeout = 5, nameservers = { ns.nameserver } }
    assert.is_nil(s)
    assert.equal("dns", err.kind)
  end)

  it("reports kind connect when every address refuses", function()
    local port = helper.free_port()
    local s, err = native.connect { host = "v4.test", port = port, timeout = 5, nameservers = { ns.nameserver } }
    assert.is_nil(s)
    assert.equal("connect", err.kind)
    assert.equal("127.0.0.1 port " .. port .. ": Connection refused", err.text)
  end)
end)
