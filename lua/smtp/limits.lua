-- smtp.limits: what a receiving provider allows one sender, kept per destination (a smarthost's
-- "host:port" or a recipient's MX domain): concurrent connections, messages per connection,
-- messages per time window, and a pause with fewer connections after the server says it is busy.
-- It only counts and answers "now" or "in N seconds"; the caller waits (lim:wait does it through
-- smtp.wait, so the same limiter serves smtp.loop tasks, cqueues and blocking code).
local errors = require "smtp.errors"

local M = {}

local type, pairs, tostring, floor, min, max = type, pairs, tostring, math.floor, math.min, math.max

-- When no slot is free there is no time at which one surely frees: waiters look again this often.
M.POLL = 0.05

local DEFAULTS = {
  backoff = 1,         -- first pause after a "busy" outcome, seconds; doubled per strike
  max_backoff = 300,   -- longest pause
  recover = 10,        -- seconds per connection given back after a pause
}

local function bad(fname, n, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), (level or 2) + 1)
end

local function positive(v, name, fname, int)
  if v == nil then return nil end
  if type(v) ~= "number" or v <= 0 or v ~= v or v == math.huge or (int and v % 1 ~= 0) then
    bad(fname, 1, name .. ": positive " .. (int and "integer" or "number") .. " expected", 3)
  end
  return v
end

-- One level of settings (the top table or a per_destination entry), checked.
local function settings(t, fname, base)
  local s = {}
  if base then for k, v in pairs(base) do s[k] = v end end
  if type(t) ~= "table" then bad(fname, 1, "table expected", 2) end
  local function num(name, int)
    if t[name] ~= nil then s[name] = positive(t[name], name, fname, int) end
  end
  num("max_connections", true)
  num("messages_per_connection", true)
  num("backoff"); num("max_backoff"); num("recover")
  if t.rate ~= nil then
    local r = t.rate
    if type(r) == "string" then r = M.parse_rate(r) or bad(fname, 1, "rate: \"N/SECONDS\" expected", 2) end
    if type(r) ~= "table" then bad(fname, 1, "rate: { messages =, per = } expected", 2) end
    s.rate = { messages = positive(r.messages, "rate.messages", fname, true),
               per = positive(r.per, "rate.per", fname) }
    if not s.rate.messages or not s.rate.per then bad(fname, 1, "rate: { messages =, per = } expected", 2) end
  end
  return s
end

-- "100/60", "100/60s", "20/1.5s" -> { messages = 100, per = 60 } | nil
function M.parse_rate(s)
  if type(s) ~= "string" then return nil end
  local n, p = s:match("^%s*(%d+)%s*/%s*(%d*%.?%d+)%s*s?%s*$")
  n, p = tonumber(n), tonumber(p)
  if not n or not p or n < 1 or p <= 0 then return nil end
  return { messages = n, per = p }
end

-- The command line's --rate N/SECONDS, --max-connections N and --messages-per-connection N (in
-- o, as smtp.cli.args parses them) -> a limiter | nil when none is given | false, why.
function M.from_flags(o)
  if not (o.rate or o["max-connections"] or o["messages-per-connection"]) then return nil end
  local lopts = {}
  if o.rate then
    lopts.rate = M.parse_rate(o.rate)
    if not lopts.rate then return false, "bad --rate '" .. o.rate .. "' (N/SECONDS, e.g. 100/60)" end
  end
  for _, k in ipairs { "max-connections", "messages-per-connection" } do
    if o[k] then
      local v = tonumber(o[k])
      if not v or v < 1 or v % 1 ~= 0 then return false, "bad --" .. k .. " '" .. o[k] .. "'" end
      lopts[(k:gsub("%-", "_"))] = v
    end
  end
  return M.new(lopts)
end

-- What a session's end or a reply means for its destination: "busy" (the server is shedding
-- load: 421, a 450/451/452 about rates or connections, a refused connection), "error" (anything
-- else that went wrong) or "ok".
local BUSY_TEXT = { "too many", "too much", "rate", "limit", "throttl", "slow down", "busy",
  "exceed", "try again later", "try later", "congest", "overload", "capacity" }
function M.outcome(err)
  if err == nil then return "ok" end
  if not errors.is(err) then return "error" end
  local code = err.code
  if code == 421 then return "busy" end
  local text = tostring(err.text or ""):lower()
  if code == 450 or code == 451 or code == 452 then
    local enh = err.enhanced
    if enh == "4.7.0" or enh == "4.7.1" or enh == "4.3.2" or enh == "4.7.28" then return "busy" end
    -- 452 4.5.3 is too many recipients in one message, not too many messages
    if enh ~= "4.5.3" then
      for _, w in ipairs(BUSY_TEXT) do
        if text:find(w, 1, true) then return "busy" end
      end
    end
    return "error"
  end
  if err.kind == "connect" and (text:find("refused", 1, true) or err.code == nil and text:find("econnrefused", 1, true)) then
    return "busy"
  end
  return "error"
end

local Limiter = { __name = "smtp.limits" }
Limiter.__index = Limiter

-- limits.new{ max_connections =, messages_per_connection =, rate = { messages =, per = } or
-- "N/SECONDS", per_destination = { [dest] = { ...overrides } }, backoff =, max_backoff =,
-- recover =, now = clock, sleep = fn }
function M.new(opts)
  opts = opts or {}
  local base = settings(opts, "new")
  for k, v in pairs(DEFAULTS) do if base[k] == nil then base[k] = v end end
  if base.max_backoff < base.backoff then base.max_backoff = base.backoff end
  local per = {}
  if opts.per_destination ~= nil then
    if type(opts.per_destination) ~= "table" then bad("new", 1, "per_destination: table expected") end
    for dest, o in pairs(opts.per_destination) do
      if type(dest) ~= "string" then bad("new", 1, "per_destination: destination names expected") end
      per[dest:lower()] = settings(o, "new", base)
    end
  end
  if opts.now ~= nil and type(opts.now) ~= "function" then bad("new", 1, "now: function expected") end
  if opts.sleep ~= nil and type(opts.sleep) ~= "function" then bad("new", 1, "sleep: function expected") end
  return setmetatable({ base = base, per = per, now = opts.now or require("smtp.core").now,
    sleep = opts.sleep, dests = {} }, Limiter)
end

-- The settings for `dest`: its own entry, or the entry of its host without ":port", or the base.
local function settings_of(self, dest)
  local s = self.per[dest]
  if s then return s end
  local host = dest:match("^(.*):%d+$")
  if host then
    host = host:gsub("^%[(.*)%]$", "%1")
    s = self.per[host]
  end
  return s or self.base
end

local function state(self, dest, fname)
  if type(dest) ~= "string" or dest == "" then bad(fname, 1, "destination name expected", 3) end
  dest = dest:lower()
  local d = self.dests[dest]
  if not d then
    local s = settings_of(self, dest)
    d = { s = s, active = 0, peak = 0, cap = s.max_connections, pause_until = nil, strikes = 0,
      busy_at = nil, cap_at_busy = nil,
      -- sliding-window log: the send times of the last rate.messages messages, a ring
      ring = s.rate and {} or nil, rn = 0, rh = 1,
      connections = 0, messages = 0, busy = 0, errors = 0, waited = 0 }
    self.dests[dest] = d
  end
  return d
end

-- The connections allowed now: after a busy outcome the cap was cut, and it comes back by one
-- every `recover` seconds once the pause is over (additive increase), so a server that was
-- overwhelmed is not hit with the full number at once.
local function cap_now(d, now)
  local full = d.s.max_connections
  if not d.busy_at then return full end
  local since = now - (d.pause_until or d.busy_at)
  if since < 0 then return d.cap_at_busy end
  local steps = floor(since / d.s.recover)
  -- recovered (a whole period without trouble, back at the full number): the next busy starts
  -- from the first pause again
  if steps >= 1 and ((full and d.cap_at_busy + steps >= full) or (not full and steps >= 8)) then
    d.busy_at, d.cap_at_busy, d.strikes = nil, nil, 0
    return full
  end
  local c = d.cap_at_busy + steps
  return full and min(c, full) or c
end

-- lim:acquire(dest) -> true | nil, wait_seconds: a connection slot (give it back with release).
function Limiter:acquire(dest)
  local d = state(self, dest, "acquire")
  local now = self.now()
  if d.pause_until and now < d.pause_until then return nil, d.pause_until - now end
  local cap = cap_now(d, now)
  if cap and d.active >= cap then return nil, M.POLL end
  d.active = d.active + 1
  if d.active > d.peak then d.peak = d.active end
  d.connections = d.connections + 1
  return true
end

-- lim:release(dest, outcome): a slot back; outcome "ok", "busy" (the server refused us for load:
-- pause and fewer connections) or "error" (counted, no pause).
function Limiter:release(dest, outcome)
  local d = state(self, dest, "release")
  outcome = outcome or "ok"
  if outcome ~= "ok" and outcome ~= "busy" and outcome ~= "error" then
    bad("release", 2, "\"ok\", \"busy\" or \"error\" expected")
  end
  if d.active > 0 then d.active = d.active - 1 end
  if outcome == "busy" then self:_busy(d) elseif outcome == "error" then d.errors = d.errors + 1 end
end

-- A busy answer: pause the destination and cut its connections by half. Several sessions that
-- meet the same overload report it together: a report during the pause changes nothing more.
function Limiter:_busy(d)
  d.busy = d.busy + 1
  local now = self.now()
  if d.pause_until and now < d.pause_until then return end
  local cur = cap_now(d, now) or max(d.active + 1, d.peak)
  d.strikes = d.strikes + 1
  local pause = min(d.s.backoff * 2 ^ (d.strikes - 1), d.s.max_backoff)
  d.pause_until = now + pause
  d.busy_at = now
  d.cap_at_busy = max(1, floor(cur / 2))
end

-- lim:take(dest) -> true | nil, wait_seconds: the right to send one message now.
-- The rate is a sliding window (the last N send times in a ring): a token bucket of N tokens
-- lets through N at the end of one window and N refilled during the next, twice the limit in a
-- window that straddles them, and providers count in windows of either alignment; the log holds
-- no window of `per` seconds with more than N messages, at a cost of N numbers per destination.
function Limiter:take(dest)
  local d = state(self, dest, "take")
  local now = self.now()
  if d.pause_until and now < d.pause_until then return nil, d.pause_until - now end
  local r = d.s.rate
  if r then
    local ring = d.ring
    if d.rn >= r.messages then
      local oldest = ring[d.rh]
      local free_at = oldest + r.per
      if now < free_at then return nil, free_at - now end
      ring[d.rh] = now
      d.rh = d.rh % r.messages + 1
    else
      d.rn = d.rn + 1
      ring[(d.rh + d.rn - 2) % r.messages + 1] = now
    end
  end
  d.messages = d.messages + 1
  return true
end

-- lim:settings(dest) -> the settings that apply to dest (max_connections, messages_per_connection,
-- rate, backoff, max_backoff, recover), a copy.
function Limiter:settings(dest)
  local d = state(self, dest, "settings")
  local t = {}
  for k, v in pairs(d.s) do t[k] = v end
  if t.rate then t.rate = { messages = t.rate.messages, per = t.rate.per } end
  return t
end

-- lim:wait(dest, "connection" | "message" [, timeout]) -> true | nil, err: acquire or take,
-- sleeping in between (smtp.wait: the loop task, the cqueues controller or the process; inside
-- nginx ngx.sleep). `timeout` seconds bound the wait (kind "timeout", temporary).
function Limiter:wait(dest, kind, timeout)
  local fn
  if kind == "connection" then fn = self.acquire
  elseif kind == "message" then fn = self.take
  else bad("wait", 2, "\"connection\" or \"message\" expected") end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0) then bad("wait", 3, "seconds expected") end
  local sleep = self.sleep
  if not sleep then
    local ngx = rawget(_G, "ngx")
    if type(ngx) == "table" and ngx.sleep and ngx.get_phase and ngx.get_phase() ~= "init" then
      sleep = ngx.sleep
    else
      sleep = require("smtp.wait").sleep
    end
  end
  local d = state(self, dest, "wait")
  local started = self.now()
  while true do
    local ok, w = fn(self, dest)
    if ok then return true end
    if timeout then
      local left = started + timeout - self.now()
      if left <= 0 then
        return nil, errors.new { kind = "timeout", temporary = true,
          text = ("no %s for %s within %gs"):format(kind == "connection" and "connection slot" or "message slot",
            dest, timeout) }
      end
      w = min(w, left)
    end
    d.waited = d.waited + w
    sleep(w)
  end
end

-- lim:stats() -> { [dest] = { active =, peak =, cap =, paused =, connections =, messages =,
-- busy =, errors =, in_window = } }
function Limiter:stats()
  local now = self.now()
  local t = {}
  for dest, d in pairs(self.dests) do
    local in_window
    if d.s.rate then
      in_window = 0
      for i = 1, d.rn do
        if d.ring[i] > now - d.s.rate.per then in_window = in_window + 1 end
      end
    end
    t[dest] = { active = d.active, peak = d.peak, cap = cap_now(d, now),
      paused = (d.pause_until and d.pause_until > now) and (d.pause_until - now) or 0,
      connections = d.connections, messages = d.messages, busy = d.busy, errors = d.errors,
      in_window = in_window }
  end
  return t
end

function Limiter:__tostring()
  local n = 0
  for _ in pairs(self.dests) do n = n + 1 end
  return ("smtp.limits (%d destination%s)"):format(n, n == 1 and "" or "s")
end

function M.is(v) return getmetatable(v) == Limiter end

return M
