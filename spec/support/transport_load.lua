-- Load scripts for the transport, run in a child interpreter (so the spec can raise the fd limit
-- first) and by bench/idle.sh. Usage:
--   transport_load.lua many N              N concurrent loop tasks, each a connect + round trip
--   transport_load.lua idle N [tls]        N idle loopback connections, both ends in this process
--                                          (with "tls": each one TLS, handshake done)
--   transport_load.lua server N DIR        accept N idle connections (port in DIR/port)
--   transport_load.lua client N PORT DIR   open N idle connections to PORT
--                                          (IDLE_TLS=1 for TLS at both, IDLE_TLS_CERTS=dir)
--   transport_load.lua cqserver N DIR      the same as server, written with cqueues (the peer)
--   transport_load.lua smtpclient N PORT DIR
--                                          N idle smtp.connect sessions over implicit TLS, EHLO done,
--                                          held as a user holds them (the server: IDLE_SMTP=1, which
--                                          answers the greeting and EHLO); IDLE_RESUME=0 for full
--                                          handshakes, else one warm-up session seeds the cache and
--                                          every one of the N resumes
-- Each prints one line of "key=value" figures.
local native = require "smtp.transport.native"
local loop = require "smtp.loop"
local core = require "smtp.core"

local mode, n = arg[1], tonumber(arg[2])

local function rss_kb()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")
end

local function fmt(x) return string.format("%.2f", x) end

-- What an idle server answers (IDLE_SMTP=1): a greeting and a Postfix-sized EHLO reply, so the
-- client holds the extensions a real server gives it.
local EHLO_REPLY = table.concat({ "250-localhost", "250-PIPELINING", "250-SIZE 10240000",
  "250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250-CHUNKING",
  "250 AUTH PLAIN LOGIN", "" }, "\r\n")
local function smtp_greet(c)
  assert(c:write("220 localhost ESMTP\r\n", 60))
  assert(c:read(60))
  assert(c:write(EHLO_REPLY, 60))
end

if mode == "many" then
  local l = assert(native.listen { port = 0, backlog = 4096 })
  local done, failed = 0, {}
  loop.spawn(function()
    for _ = 1, n do
      local c = assert(l:accept(30))
      loop.spawn(function()
        local d = c:read(30)
        if d then c:write(d, 30) end
        c:close()
      end)
    end
  end)
  local t0 = core.now()
  for i = 1, n do
    loop.spawn(function()
      local s, err = native.connect { host = "127.0.0.1", port = l.port, timeout = 30 }
      if not s then failed[#failed + 1] = tostring(err); return end
      local msg = "round trip " .. i .. "\r\n"
      local ok, werr = s:write(msg, 30)
      if not ok then failed[#failed + 1] = tostring(werr); return end
      local got, rerr = s:read(30)
      if got ~= msg then failed[#failed + 1] = tostring(rerr or got); return end
      s:close()
      done = done + 1
    end)
  end
  loop.run()
  l:close()
  print(("done=%d failed=%d seconds=%s first_error=%s"):format(done, #failed, fmt(core.now() - t0),
    tostring(failed[1])))

elseif mode == "idle" or mode == "server" or mode == "client" then
  local conns, parked = {}, 0
  local both = mode == "idle"
  local dir = arg[3]
  local sctx, cctx
  -- "idle N tls", or IDLE_TLS=1 for the server and client modes (each end in its own process)
  if (both and arg[3] == "tls") or (not both and os.getenv("IDLE_TLS") == "1") then
    if both then dir = nil end
    -- IDLE_TLS_CERTS: a directory scripts/make-certs.sh filled, shared by both processes
    local cd = os.getenv("IDLE_TLS_CERTS")
    local certs = cd and { server = cd .. "/server.pem", server_key = cd .. "/server.key", ca = cd .. "/ca.pem" }
      or require("helper").certs()
    sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    cctx = assert(native.tls_client_context { cafile = certs.ca })
  end
  local function hold(c)
    conns[#conns + 1] = c
    parked = parked + 1
    c:read(600)
    parked = parked - 1
  end
  local l
  -- Warm up every code path once, then take the baseline.
  do
    local wl = assert(native.listen { port = 0 })
    loop.spawn(function() local c = wl:accept(5); c:read(5); c:close() end)
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = wl.port }); s:write("x"); s:close()
    end)
    loop.run()
    wl:close()
  end
  if mode ~= "client" then
    l = assert(native.listen { port = 0, backlog = 4096 })
    if dir then
      local f = assert(io.open(dir .. "/port.tmp", "w")); f:write(l.port); f:close()
      os.rename(dir .. "/port.tmp", dir .. "/port")
    end
  end
  settle()
  local base_rss, base_lua = rss_kb(), collectgarbage("count")
  local want = both and 2 * n or n
  local t0 = core.now()
  if l then
    loop.spawn(function()
      for _ = 1, n do
        local c = assert(l:accept(120))
        if sctx then
          loop.spawn(function()
            assert(c:tls_accept(sctx, 60))
            if os.getenv("IDLE_SMTP") == "1" then smtp_greet(c) end
            hold(c)
          end)
        else
          loop.spawn(hold, c)
        end
      end
    end)
  end
  if mode ~= "server" then
    local port = both and l.port or tonumber(arg[3])
    dir = not both and arg[4] or nil
    for _ = 1, n do
      loop.spawn(function()
        local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 60 })
        if cctx then assert(s:starttls { ctx = cctx, servername = "localhost", timeout = 60 }) end
        hold(s)
      end)
    end
  end
  loop.spawn(function()
    while parked < want do
      loop.sleep(0.05)
      if core.now() - t0 > 120 then error("only " .. parked .. " of " .. want .. " connections parked") end
    end
    -- idle means idle: the loop hands back what the handshakes freed within a second of the last
    if sctx or cctx then loop.sleep(1.5) end
    settle()
    local rss, lua = rss_kb(), collectgarbage("count")
    print(("mode=%s%s connections=%d seconds=%s rss_kb=%d kb_per_connection=%s lua_kb_per_connection=%s"):format(
      mode, sctx and "+tls" or "", n, fmt(core.now() - t0), rss - base_rss, fmt((rss - base_rss) / n), fmt((lua - base_lua) / n)))
    io.stdout:flush()
    if mode == "client" and dir then
      local f = assert(io.open(dir .. "/client.done", "w")); f:close()
    elseif mode == "server" and dir then
      -- Hold on until the client has measured its side too.
      local t1 = core.now()
      while not io.open(dir .. "/client.done") and core.now() - t1 < 120 do loop.sleep(0.1) end
    end
    if mode ~= "client" then
      for _, c in ipairs(conns) do c:close() end
      l:close()
    end
  end)
  loop.run()
elseif mode == "smtpclient" then
  -- What a user holds: smtp.connect's session after EHLO over implicit TLS (port 465's shape),
  -- one per coroutine that opened it and has finished, the session kept in a table.
  local smtp = require "smtp"
  local port, dir = tonumber(arg[3]), arg[4]
  local cd = assert(os.getenv("IDLE_TLS_CERTS"), "IDLE_TLS_CERTS: a directory scripts/make-certs.sh filled")
  local resume = os.getenv("IDLE_RESUME") ~= "0"
  local function open()
    return assert(smtp.connect { server = "127.0.0.1", port = port, tls = "implicit", servername = "localhost",
      cafile = cd .. "/ca.pem", helo = "client.example", session_cache = resume })
  end
  -- Warm up every code path (and the TLS context) with one session, kept open: the server counts
  -- it among its N + 1. It leaves a session to resume in the context's cache.
  local warm
  loop.spawn(function() warm = open() end)
  loop.run()
  settle()
  local base_rss, base_lua = rss_kb(), collectgarbage("count")
  local conns, opened, t0 = {}, 0, core.now()
  for _ = 1, n do
    loop.spawn(function()
      local c = open()   -- (not conns[#conns + 1] = open(): the index would be taken before it yields)
      conns[#conns + 1] = c
      opened = opened + 1
    end)
  end
  loop.spawn(function()
    while opened < n do
      loop.sleep(0.05)
      if core.now() - t0 > 120 then error("only " .. opened .. " of " .. n .. " sessions opened") end
    end
    loop.sleep(1.5)
    settle()
    local rss, lua = rss_kb(), collectgarbage("count")
    local resumed = 0
    for _, c in ipairs(conns) do
      assert(c:info().tls == "TLSv1.3")
      if c.sock:info().resumed then resumed = resumed + 1 end
    end
    print(("mode=%s connections=%d resumed=%d seconds=%s rss_kb=%d kb_per_connection=%s lua_kb_per_connection=%s"):format(
      mode, n, resumed, fmt(core.now() - t0), rss - base_rss, fmt((rss - base_rss) / n), fmt((lua - base_lua) / n)))
    io.stdout:flush()
    local f = assert(io.open(dir .. "/client.done", "w")); f:close()
    -- the server closes every connection; nothing is left to say to it
    for _, c in ipairs(conns) do c.sock:close() end
    warm.sock:close()
  end)
  loop.run()
elseif mode == "cqserver" then
  -- The comparison: a cqueues server holding the same idle connections, a coroutine each.
  local cqueues = require "cqueues"
  local socket = require "cqueues.socket"
  local dir = arg[3]
  local cq = cqueues.new()
  local l = assert(socket.listen { host = "127.0.0.1", port = 0, backlog = 4096 })
  local _, _, port = l:localname()
  local f = assert(io.open(dir .. "/port.tmp", "w")); f:write(port); f:close()
  os.rename(dir .. "/port.tmp", dir .. "/port")
  settle()
  local base_rss, base_lua = rss_kb(), collectgarbage("count")
  local conns, parked, t0 = {}, 0, core.now()
  cq:wrap(function()
    for _ = 1, n do
      local c = assert(l:accept(120))
      cq:wrap(function()
        conns[#conns + 1] = c
        parked = parked + 1
        c:read(1)
      end)
    end
  end)
  cq:wrap(function()
    while parked < n do cqueues.sleep(0.05) end
    cqueues.sleep(0.1)   -- let every reader reach its poll
    settle()
    local rss, lua = rss_kb(), collectgarbage("count")
    print(("mode=%s connections=%d seconds=%s rss_kb=%d kb_per_connection=%s lua_kb_per_connection=%s"):format(
      mode, n, fmt(core.now() - t0), rss - base_rss, fmt((rss - base_rss) / n), fmt((lua - base_lua) / n)))
    io.stdout:flush()
    local t1 = core.now()
    while not io.open(dir .. "/client.done") and core.now() - t1 < 120 do cqueues.sleep(0.1) end
    for _, c in ipairs(conns) do c:close() end
    l:close()
  end)
  assert(cq:loop())
else
  io.stderr:write("usage: transport_load.lua many|idle|server|client|smtpclient|cqserver N ...\n")
  os.exit(2)
end
