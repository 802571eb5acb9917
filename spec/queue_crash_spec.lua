-- smtp.queue under kill -9: runner processes are killed at every named point of submission and
-- delivery (SMTP_QUEUE_CRASH_AT) and at random moments while an aiosmtpd sink is slow to answer
-- DATA, then restarted. Checked at the end of each round: no message lost (every recipient got
-- it), none delivered again to a recipient whose acceptance was on disk when the runner died,
-- every message intact, no partial file accepted (tmp/ and orphans cleaned); and several runners
-- on one spool deliver each recipient once.
local helper = require "helper"
local queue = require "smtp.queue"
local core = require "smtp.core"

local sink_py = [[
import asyncio, json, sys, time
from aiosmtpd.controller import Controller
host, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"
    async def handle_DATA(self, server, session, envelope):
        # a server that stalls after DATA (a kill now is mid-transaction: nothing delivered),
        # then takes the message: logged as delivered just before the 250 goes out
        await asyncio.sleep(delay)
        print(json.dumps({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                          "size": len(envelope.original_content or b"")}), flush=True)
        return "250 2.0.0 queued"
c = Controller(Handler(), hostname=host, port=port, ready_timeout=10)
c.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
]]

-- the runner: passes until the spool is empty (or 60 s), its PID in a file for the killer
local child_lua = [[
local queue = require "smtp.queue"
local wait = require "smtp.wait"
local dir, pidfile = arg[1], arg[2]
local f = assert(io.open("/proc/self/stat", "rb"))
local pid = f:read("*a"):match("^(%d+)")
f:close()
f = assert(io.open(pidfile .. ".tmp", "wb")); f:write(pid); f:close()
os.rename(pidfile .. ".tmp", pidfile)
local q = assert(queue.open(dir, { retry_base = 1, retry_max = 1,
  log = function(s) io.stderr:write(s, "\n") end }))
local deadline = os.time() + 60
while os.time() < deadline do
  local n = q:run_once()
  if not n.next and n.locked == 0 then break end
  wait.sleep(0.02)
end
]]

-- a submitter, for the kill points of submission
local submit_lua = [[
local queue = require "smtp.queue"
local q = assert(queue.open(arg[1]))
local id = assert(q:submit { message = arg[2], from = arg[3], to = { arg[4] },
  via = { server = "127.0.0.1", port = tonumber(arg[5]), tls = "none", timeout = 10 } })
print(id)
]]

local function env_prefix(extra)
  local env = ""
  for k, v in pairs(helper.preload) do env = env .. k .. "=" .. helper.quote(v) .. " " end
  for _, k in ipairs { "LUA_PATH", "LUA_CPATH" } do
    local v = os.getenv(k)
    if v then env = env .. k .. "=" .. helper.quote(v) .. " " end
  end
  for k, v in pairs(extra or {}) do env = env .. k .. "=" .. helper.quote(v) .. " " end
  return env
end

local function body(i)
  return ("From: s%d@example.com\r\nTo: r@example.org\r\nSubject: message %d\r\n\r\n"):format(i, i) ..
    ("line %d of a body that takes a few packets\r\n"):format(i):rep(200)
end

local function ls(dir)
  local out = core.spool_list(dir) or {}
  table.sort(out)
  return out
end

local S = {}

local function start_sink(delay)
  helper.need("aiosmtpd")
  local dir = helper.tmpdir()
  helper.write(dir .. "/sink.py", sink_py)
  local port = helper.free_port()
  local proc = helper.spawn({ helper.python, "-u", dir .. "/sink.py", "127.0.0.1", tostring(port), tostring(delay) },
    { limit = 300 })
  for _ = 1, 200 do
    if proc:output():match("ready") or not proc:alive() then break end
    helper.sleep(0.05)
  end
  assert(proc:output():match("ready"), "sink did not start: " .. proc:output())
  local s = { port = port, proc = proc }
  -- deliveries so far: { [rcpt] = n }, sizes { [rcpt] = { sizes } }, and the null-sender ones
  function s:counts()
    local c, sizes = {}, {}
    for line in self.proc:output():gmatch("[^\n]+") do
      if line:sub(1, 1) == "{" then
        local from = line:match('"from": "([^"]*)"')
        local size = tonumber(line:match('"size": (%d+)'))
        for a in (line:match('"to": %[(.-)%], "size"') or ""):gmatch('"([^"]*)"') do
          local key = (from == "<>" and "bounce:" or "") .. a
          c[key] = (c[key] or 0) + 1
          sizes[key] = sizes[key] or {}
          table.insert(sizes[key], size)
        end
      end
    end
    return c, sizes
  end
  return s
end

-- Starts the runner child; returns its PID once it has written it.
local function start_runner(dir, extra_env)
  local tmp = helper.tmpdir()
  helper.write(tmp .. "/child.lua", child_lua)
  local pidfile = tmp .. "/pid"
  helper.sh(env_prefix(extra_env) .. "exec " .. helper.lua .. " " .. helper.quote(tmp .. "/child.lua") .. " " ..
    helper.quote(dir) .. " " .. helper.quote(pidfile) .. " >" .. helper.quote(tmp .. "/log") .. " 2>&1 </dev/null &")
  for _ = 1, 400 do
    local p = helper.read(pidfile)
    if p and tonumber(p) then return tonumber(p), tmp .. "/log" end
    helper.sleep(0.01)
  end
  error("runner did not start: " .. tostring(helper.read(tmp .. "/log")))
end

local function wait_gone(pid, secs)
  for _ = 1, secs * 50 do
    if not helper.alive(pid) then return true end
    helper.sleep(0.02)
  end
  return false
end

-- Which recipients the spool has recorded as accepted ("sent"), keyed as the sink's counts are.
local function recorded(dir)
  local sent = {}
  for _, sub in ipairs { "state", "done" } do
    for _, id in ipairs(ls(dir .. "/" .. sub)) do
      local d = helper.read(dir .. "/" .. sub .. "/" .. id)
      local fn = d and load("return " .. d, "=s", "t", {})
      local ok, st = pcall(fn or error)
      if ok and type(st) == "table" then
        for _, r in ipairs(st.recipients) do
          if r.state == "sent" then sent[(st.from == "" and "bounce:" or "") .. r.rcpt] = true end
        end
      end
    end
  end
  return sent
end

-- A spool of n messages, each to two recipients of its own and one refused (a bounce each), half
-- through the smarthost and half by MX to the address literal [127.0.0.1].
local function fill(dir, port, n, tag)
  local q = assert(queue.open(dir))
  local expect = {}
  for i = 1, n do
    local mx = i % 2 == 0
    local dom = mx and "[127.0.0.1]" or "example.org"
    local to = { ("a%s%d@%s"):format(tag, i, dom), ("b%s%d@%s"):format(tag, i, dom), ("nobody%s%d@%s"):format(tag, i, dom) }
    local via = mx and { mx = true, port = port, destinations = "any", tls = "none", timeout = 10 }
      or { server = "127.0.0.1", port = port, tls = "none", timeout = 10 }
    -- the sender's domain is the recipients' too: a bounce by MX must not ask the DNS
    local from = ("s%s%d@%s"):format(tag, i, mx and "[127.0.0.1]" or "example.com")
    assert(q:submit { message = body(i), from = from, to = to, via = via })
    expect[to[1]] = #body(i)
    expect[to[2]] = #body(i)
    expect["bounce:" .. from] = true
  end
  return expect
end

-- The checks after a round: the spool is empty and clean, every recipient got its message once
-- at least, intact, and never after the spool had recorded it accepted.
local function verify(dir, sink, expect, snapshots)
  local counts, sizes = sink:counts()
  assert.same({}, ls(dir .. "/state"))
  assert.same({}, ls(dir .. "/msg"))
  assert.same({}, ls(dir .. "/tmp"))
  local dups = 0
  for r, size in pairs(expect) do
    assert(counts[r] and counts[r] >= 1, "lost: " .. r)
    dups = dups + counts[r] - 1
    if counts[r] > 1 and os.getenv("QUEUE_CRASH_DEBUG") then io.stderr:write("dup ", r, "\n") end
    if size ~= true then
      for _, s in ipairs(sizes[r]) do assert(s == size, ("%s got %d octets, sent %d"):format(r, s, size)) end
    end
  end
  for _, snap in ipairs(snapshots) do
    for r in pairs(snap.sent) do
      if expect[r] then
        assert(counts[r] == snap.counts[r], ("%s delivered again after its acceptance was recorded (%d then, %d now)"):format(
          r, snap.counts[r] or 0, counts[r]))
      end
    end
  end
  return dups
end

describe("smtp.queue crash safety", function()
  local sink
  setup(function() sink = start_sink(0.02) end)
  teardown(function() if sink then sink.proc:stop() end end)

  it("survives kill -9 at every named point of delivery, bounce and finishing", function()
    local points = { "before_transaction", "after_transaction", "state_tmp_written", "state_before_rename",
      "state_after_rename", "msg_tmp_written", "msg_before_rename", "msg_after_rename", "after_bounce",
      "before_done_rename", "after_done_rename" }
    local kills, dups_total, rounds = 0, 0, 0
    for _, point in ipairs(points) do
      for _, nth in ipairs { 1, 3 } do
        rounds = rounds + 1
        local dir = helper.tmpdir()
        local expect = fill(dir, sink.port, 3, "p" .. rounds .. "x")
        local snapshots = {}
        local pid = start_runner(dir, { SMTP_QUEUE_CRASH_AT = point .. ":" .. nth })
        assert(wait_gone(pid, 30), "runner still running")
        -- the point must have been reached: the runner died with the spool unfinished
        if #ls(dir .. "/state") > 0 or #ls(dir .. "/msg") > 0 or #ls(dir .. "/tmp") > 0 then kills = kills + 1 end
        local c = sink:counts()
        snapshots[1] = { sent = recorded(dir), counts = c }
        pid = start_runner(dir)
        assert(wait_gone(pid, 30), "runner still running")
        local dups = verify(dir, sink, expect, snapshots)
        -- only a kill between a 250 and the write of its state repeats anything (the first state
        -- write of a run is the one after the first transaction)
        local window = point == "after_transaction" or
          (nth == 1 and (point == "state_tmp_written" or point == "state_before_rename"))
        assert(dups == 0 or (window and dups <= 2), point .. ":" .. nth .. " repeated " .. dups .. " deliveries")
        dups_total = dups_total + dups
      end
    end
    -- every point but after_done_rename (nothing left but an unlinked message) leaves work behind
    assert.is_true(kills >= #points * 2 - 2, "kills that left work: " .. kills)
    -- a kill repeats at most the one transaction whose 250 it cut off (two recipients accepted)
    assert.is_true(dups_total <= 2 * rounds)
    io.stderr:write(("\n[queue crash] named points: %d rounds, %d kills left work behind, %d duplicate deliveries (kill between the 250 and the state rename)\n"):format(
      rounds, kills, dups_total))
    S.named = { rounds = rounds, kills = kills, dups = dups_total }
  end)

  it("survives kill -9 of the submitter at every point: a submission is whole or absent", function()
    local points = { "msg_tmp_written", "msg_before_rename", "msg_after_rename", "state_tmp_written",
      "state_before_rename", "state_after_rename" }
    local tmp = helper.tmpdir()
    helper.write(tmp .. "/submit.lua", submit_lua)
    for i, point in ipairs(points) do
      local dir = helper.tmpdir()
      local raw = body(i)
      local out = helper.sh(env_prefix { SMTP_QUEUE_CRASH_AT = point } .. helper.lua .. " " .. helper.quote(tmp .. "/submit.lua") .. " " ..
        helper.quote(dir) .. " " .. helper.quote(raw) .. " sub" .. i .. "@example.com rcpt-sub" .. i .. "@example.org " .. sink.port .. " 2>&1")
      assert.not_matches("%x%x%x%x%x%x%x%x", out)   -- killed before it could print an id
      local pid = start_runner(dir)
      assert(wait_gone(pid, 30))
      local counts, sizes = sink:counts()
      local r = "rcpt-sub" .. i .. "@example.org"
      if point == "state_after_rename" then
        -- the state was on disk: the message is queued although the caller never heard its id
        assert.equal(1, counts[r])
        assert.same({ #raw }, sizes[r])
      else
        assert.is_nil(counts[r])
      end
      assert.same({}, ls(dir .. "/tmp"))
      assert.same({}, ls(dir .. "/msg"))
      assert.same({}, ls(dir .. "/state"))
    end
  end)

  it("survives kill -9 at random moments while the server is slow to answer DATA", function()
    math.randomseed(os.time())
    local kills, rounds, dups_total = 0, 0, 0
    for round = 1, 4 do
      rounds = rounds + 1
      local dir = helper.tmpdir()
      local expect = fill(dir, sink.port, 20, "r" .. round .. "x")
      local snapshots = {}
      for _ = 1, 200 do
        local pid = start_runner(dir)
        helper.sleep(0.01 + math.random() * 0.2)
        if not helper.alive(pid) then break end
        helper.sh("kill -KILL " .. pid)
        assert(wait_gone(pid, 10))
        kills = kills + 1
        snapshots[#snapshots + 1] = { sent = recorded(dir), counts = (sink:counts()) }
      end
      local pid = start_runner(dir)
      assert(wait_gone(pid, 60), "runner still running")
      dups_total = dups_total + verify(dir, sink, expect, snapshots)
    end
    assert.is_true(kills >= 10, "only " .. kills .. " kills")
    assert.is_true(dups_total <= 2 * kills)
    io.stderr:write(("[queue crash] random: %d rounds of 20 messages (40 accepted recipients, 20 bounces each), %d kills, %d duplicate deliveries\n"):format(
      rounds, kills, dups_total))
  end)

  it("lets several runners share a spool without sending anything twice", function()
    local dir = helper.tmpdir()
    local expect = fill(dir, sink.port, 30, "c")
    local pids, logs = {}, {}
    for i = 1, 3 do pids[i], logs[i] = start_runner(dir) end
    for i = 1, 3 do assert(wait_gone(pids[i], 60), "runner still running") end
    for i = 1, 3 do assert.equal("", helper.read(logs[i])) end   -- no runner met an error
    local dups = verify(dir, sink, expect, {})
    assert.equal(0, dups)
  end)
end)
