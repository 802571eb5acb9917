-- Issue 3's streaming promise, held: "sending a 1 GB file keeps the process under 20 MB of
-- memory". A child interpreter (spec/support/stream_send.lua) sends one big message with
-- smtp.send on loopback, from a function source and from a file handle, with DATA (to Postfix's
-- smtp-sink) and with pipelined BDAT chunks (to `lua-smtp sink`), and reports its own peak RSS
-- (VmHWM) at the end; the whole process must stay under 20 MB.
--
-- Sizes: 1 GB each in the plain Lua 5.4 run, as the issue says; 50 MB on LuaJIT and under ASan
-- (as spec/resource_exhaustion_spec.lua does), to keep CI short; the bound is the same. Measured
-- on this 2-core machine, 300 MB, peak RSS: Lua 5.4 DATA 5.4 MB (function and file), BDAT 7.3 MB
-- (function) and 7.4 MB (file); LuaJIT DATA 5.3 / 6.7 MB, BDAT 7.5 / 10.4 MB (before the body
-- went from the engine's buffer to the socket and BDAT chunks were gathered in C, LuaJIT with a
-- file peaked at 14-21 MB). 1 GB on Lua 5.4: 5.4-5.5 MB and about 4 s with DATA (smtp-sink sets
-- the pace), 7.3-7.5 MB and 1.2-1.7 s with BDAT.
-- Under ASan the child keeps the sanitizer runtime with its quarantine off (it would hold freed
-- memory back and read as growth); it then peaks near 12 MB.
local helper = require "helper"
local peers = require "support.client_peers"

local full = helper.lua == "lua5.4" and os.getenv("SMTP_BUILD") ~= "asan"
local MB = full and 1024 or 50
-- The promise is for the plain build; under ASan the sanitizer's own shadow memory and allocator
-- add several MB to the same process, so that run only checks that memory stays bounded.
local BOUND_KB = (os.getenv("SMTP_BUILD") == "asan" and 48 or 20) * 1024

-- The environment of the child: the build under test, and the sanitizer runtime when present.
local function child_env()
  local env = { LUA_PATH = os.getenv("LUA_PATH"), LUA_CPATH = os.getenv("LUA_CPATH") }
  for k, v in pairs(helper.preload) do env[k] = v end
  if env.ASAN_OPTIONS then
    env.ASAN_OPTIONS = env.ASAN_OPTIONS .. ":quarantine_size_mb=0:thread_local_quarantine_size_kb=0"
  end
  local parts = {}
  for k, v in pairs(env) do parts[#parts + 1] = k .. "=" .. helper.quote(v) end
  return "env " .. table.concat(parts, " ")
end

local function send(port, mode, what)
  local cmd = ("timeout 120 %s %s %s %d %s %s 2>&1"):format(child_env(), helper.lua,
    helper.quote(helper.root .. "/spec/support/stream_send.lua"), port, mode, helper.quote(what))
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

-- Asserts the child's report: the whole message accepted with 250, peak RSS under the bound.
local function check(out, min_bytes)
  local bytes, code = out:match("sent (%d+) (%d+) ")
  assert(bytes, out)
  assert.equal(250, tonumber(code), out)
  assert.is_true(tonumber(bytes) >= min_bytes, out)
  local hwm = tonumber(out:match("hwm (%d+)"))
  assert(hwm, out)
  assert.is_true(hwm < BOUND_KB, ("peak RSS %d kB, over %d kB"):format(hwm, BOUND_KB))
end

-- The two ways a message goes out: DATA to smtp-sink (no CHUNKING), and BDAT chunks, pipelined,
-- to our own `lua-smtp sink` (CHUNKING and PIPELINING, nothing stored) in its own process.
local function lua_sink()
  local port = helper.free_port()
  local p = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "sink", "--listen",
    "127.0.0.1:" .. port, "--max-size", "4000000000" }, { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
  return { port = port, stop = function() p:stop() end }
end

describe("smtp.send streams a big message in constant memory (issue 3)", function()
  local servers, path = {}, nil
  setup(function()
    servers.DATA = peers.sink()
    servers.BDAT = lua_sink()
    -- A file of real message text (78-byte CRLF lines, some starting with a dot), not zeros.
    path = helper.tmpdir() .. "/big.eml"
    local f = assert(io.open(path, "wb"))
    f:write("From: a@example.com\r\nTo: b@example.org\r\nSubject: big file\r\n\r\n")
    local line = ("x"):rep(76) .. "\r\n"
    local block = (line:rep(13) .. "." .. line:sub(2)):rep(60)   -- 840 lines, 65520 bytes
    for _ = 1, MB * 16 do f:write(block) end
    f:close()
  end)
  teardown(function()
    for _, s in pairs(servers) do s.stop() end
    if path then os.remove(path) end   -- 1 GB of scratch
  end)

  for _, how in ipairs { "DATA", "BDAT" } do
    it(MB .. " MB from a function source with " .. how .. ": 250 and a peak RSS under " .. math.floor(BOUND_KB / 1024) .. " MB", function()
      check(send(servers[how].port, "function", tostring(MB)), MB * 1000 * 1000)
    end)

    it(MB .. " MB from a file handle with " .. how .. ": 250 and a peak RSS under " .. math.floor(BOUND_KB / 1024) .. " MB", function()
      check(send(servers[how].port, "file", path), MB * 1000 * 1000)
    end)
  end
end)
