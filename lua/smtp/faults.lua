-- smtp.faults: failures on demand for a test server. Rules say at which step of a session
-- (connect, EHLO, MAIL, RCPT, DATA, end of data, STARTTLS, AUTH) and for which address to answer
-- with a chosen code, wait before answering, drop the connection, refuse STARTTLS or AUTH, or
-- hide and add EHLO extensions; f:hooks(opts) turns them into smtp.server hooks.
local errors = require "smtp.errors"

local M = {}

local unpack = table.unpack or unpack
local function pack(...) return { n = select("#", ...), ... } end

local PHASES = { connect = true, ehlo = true, mail = true, rcpt = true, data = true, data_end = true,
  starttls = true, auth = true }
-- what `match` is matched against at each step (nil: no match allowed)
local MATCHES = { connect = "the client's address", ehlo = "the EHLO name", mail = "the sender",
  rcpt = "the recipient", data = "a recipient", data_end = "a recipient", auth = "the user name" }
local KEYS = { at = true, code = true, enhanced = true, text = true, match = true, delay = true, drop = true,
  times = true, refuse = true, hide = true, advertise = true }
-- the refusal an action without a code gives
local REFUSE = { starttls = { 454, "4.7.0", "TLS not available due to temporary reason" },
  auth = { 454, "4.7.0", "Temporary authentication failure" } }
local WIRE = { connect = "the greeting", ehlo = "EHLO", mail = "MAIL", rcpt = "RCPT", data = "DATA",
  data_end = "the end of data", starttls = "STARTTLS", auth = "AUTH" }

local function invalid(text) return nil, errors.new { kind = "invalid", text = "fault: " .. text } end

-- A glob (* any run, ? one character; case-insensitive) as a Lua pattern over the whole string.
-- "full@" (ending in @) stands for that local part at any domain.
local function glob(g)
  if g:sub(-1) == "@" then g = g .. "*" end
  local p = g:lower():gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", ".*"):gsub("%?", ".")
  return "^" .. p .. "$"
end

local function keywords(v, name)
  if type(v) ~= "table" then return nil, name .. ": a list of extension keywords expected" end
  local out = {}
  for i, k in ipairs(v) do
    if type(k) ~= "string" or k == "" or #k > 200 or k:find("%c") then
      return nil, name .. ": keyword " .. i .. " must be a string without control characters"
    end
    out[i] = k
  end
  for k in pairs(v) do
    if type(k) ~= "number" or k % 1 ~= 0 or k < 1 or k > #v then return nil, name .. ": a list expected" end
  end
  return out
end

-- The rule checked and copied (nothing of the caller's table is kept), or nil, why.
local function check(r)
  for k in pairs(r) do
    if not KEYS[k] then return nil, "unknown field " .. tostring(k) end
  end
  local at = r.at
  if not PHASES[at] then
    return nil, "at: one of connect, ehlo, mail, rcpt, data, data_end, starttls, auth expected, got " .. tostring(at)
  end
  local c = { at = at }
  if r.code ~= nil then
    local n = r.code
    if type(n) == "string" and n:match("^%d%d%d$") then n = tonumber(n) end
    if math.type and math.type(n) == "float" and n % 1 == 0 then n = math.tointeger(n) end
    if type(n) ~= "number" or n % 1 ~= 0 or n < 400 or n > 599 then
      return nil, "code: a 4xx or 5xx reply code expected, got " .. tostring(r.code)
    end
    c.code = n
  end
  if r.enhanced ~= nil then
    local e = r.enhanced
    local class = type(e) == "string" and e:match("^([45])%.%d%d?%d?%.%d%d?%d?$")
    if not class then return nil, "enhanced: class.subject.detail (4.x.x or 5.x.x) expected" end
    if not c.code then return nil, "enhanced: needs a code" end
    if class ~= tostring(c.code):sub(1, 1) then return nil, "enhanced: its class is not the code's" end
    c.enhanced = e
  end
  if r.text ~= nil then
    if type(r.text) ~= "string" or r.text:find("%c") or #r.text > 400 then
      return nil, "text: a line of at most 400 characters expected"
    end
    if not c.code then return nil, "text: needs a code" end
    c.text = r.text
  end
  if r.match ~= nil then
    if not MATCHES[at] then return nil, "match: not for " .. at end
    if type(r.match) ~= "string" or r.match == "" or #r.match > 500 or r.match:find("%c") then
      return nil, "match: a glob string expected"
    end
    c.match = r.match
  end
  if r.delay ~= nil then
    local d = r.delay
    if type(d) == "string" then d = tonumber(d) end
    if type(d) ~= "number" or d ~= d or d < 0 or d > 3600 then
      return nil, "delay: seconds (0 to 3600) expected"
    end
    c.delay = d
  end
  if r.drop ~= nil and r.drop ~= false then
    if r.drop ~= true then return nil, "drop: true expected" end
    if c.code then return nil, "drop: a dropped connection has no reply code" end
    c.drop = true
  end
  if r.times ~= nil then
    local t = r.times
    if type(t) == "string" then t = tonumber(t) end
    if type(t) ~= "number" or t % 1 ~= 0 or t < 1 or t > 2 ^ 31 then return nil, "times: a positive integer expected" end
    c.times = math.tointeger and math.tointeger(t) or t
  end
  if r.refuse ~= nil and r.refuse ~= false then
    if r.refuse ~= true then return nil, "refuse: true expected" end
    if not REFUSE[at] then return nil, "refuse: only for starttls and auth" end
    if c.drop then return nil, "refuse: not with drop" end
    c.refuse = true
  end
  for _, k in ipairs { "hide", "advertise" } do
    if r[k] ~= nil then
      if at ~= "ehlo" then return nil, k .. ": only for ehlo" end
      local list, why = keywords(r[k], k)
      if not list then return nil, why end
      c[k] = list
    end
  end
  if not (c.code or c.drop or c.delay or c.refuse or c.hide or c.advertise) then
    return nil, "nothing to do: give code, drop, delay" .. (REFUSE[at] and ", refuse" or "")
      .. (at == "ehlo" and ", hide or advertise" or "")
  end
  if c.refuse and not c.code then c.code, c.enhanced, c.text = REFUSE[at][1], REFUSE[at][2], REFUSE[at][3] end
  c.pattern = c.match and glob(c.match)
  return c
end

local Faults = { __name = "smtp.faults" }
Faults.__index = Faults

-- faults.new() -> f: an empty set of rules.
function M.new()
  return setmetatable({ rules = {}, next_id = 1, servers = setmetatable({}, { __mode = "k" }) }, Faults)
end

-- f:add(rule) -> id | nil, err
function Faults:add(r)
  if type(r) ~= "table" then error("bad argument #1 to 'add' (table expected, got " .. type(r) .. ")", 2) end
  local c, why = check(r)
  if not c then return invalid(why) end
  c.id = self.next_id
  c.hits = 0
  self.next_id = self.next_id + 1
  self.rules[#self.rules + 1] = c
  self:_changed()
  return c.id
end

local LISTED = { "at", "code", "enhanced", "text", "match", "delay", "drop", "times", "refuse", "hits", "id" }

-- f:list() -> { rule, ... } in the order they apply; copies, `times` what is left of it.
function Faults:list()
  local out = {}
  for i, c in ipairs(self.rules) do
    local t = {}
    for _, k in ipairs(LISTED) do t[k] = c[k] end
    for _, k in ipairs { "hide", "advertise" } do
      if c[k] then t[k] = { unpack(c[k]) } end
    end
    out[i] = t
  end
  return out
end

-- f:remove(id) -> true | nil, err
function Faults:remove(id)
  for i, c in ipairs(self.rules) do
    if c.id == id or tostring(c.id) == tostring(id) then
      table.remove(self.rules, i)
      self:_changed()
      return true
    end
  end
  return invalid("no rule with id " .. tostring(id))
end

-- f:clear() -> true
function Faults:clear()
  self.rules = {}
  self:_changed()
  return true
end

local function matches(c, subject)
  if not c.pattern then return true end
  if type(subject) == "table" then
    for _, s in ipairs(subject) do
      if tostring(s):lower():match(c.pattern) then return true end
    end
    return false
  end
  return subject ~= nil and tostring(subject):lower():match(c.pattern) ~= nil
end

-- The rules that apply now at `at` for `subject`, each use counted (a rule whose `times` runs out
-- is removed). Returns the delay to wait in all, the deciding rule (code, drop or refuse) if one,
-- and for EHLO the extensions to hide and add.
function Faults:_take(at, subject)
  local delay, decide, hide, adv = 0, nil, nil, nil
  local i = 1
  local rules = self.rules
  while i <= #rules do
    local c = rules[i]
    if c.at == at and matches(c, subject) then
      c.hits = c.hits + 1
      if c.times then c.times = c.times - 1 end
      if c.times == 0 then table.remove(rules, i); self:_changed() else i = i + 1 end
      delay = delay + (c.delay or 0)
      if c.hide then
        hide = hide or {}
        for _, k in ipairs(c.hide) do hide[#hide + 1] = k end
      end
      if c.advertise then
        adv = adv or {}
        for _, k in ipairs(c.advertise) do adv[#adv + 1] = k end
      end
      if c.code or c.drop then
        decide = c
        break
      end
    else
      i = i + 1
    end
  end
  return delay, decide, hide, adv
end

-- The servers whose hooks these rules drive (f:hooks' opts._gate) ask their live sessions again
-- which commands must wait for a hook.
function Faults:_changed()
  for srv in pairs(self.servers) do srv:_regate() end
end

function Faults:_has(at)
  for _, c in ipairs(self.rules) do if c.at == at then return true end end
  return false
end

local function sleep(d)
  if d > 0 then require("smtp.wait").sleep(d) end
end

-- The reply of a deciding rule, as a hook returns it.
local function refusal(c)
  local enh = c.enhanced or (tostring(c.code):sub(1, 1) .. ".0.0")
  return false, c.code, enh, c.text or ("Injected fault at " .. WIRE[c.at])
end

-- Applies the rules at `at`: nil when the caller's hook (or acceptance) goes on, else what the
-- hook returns. Drops close the connection: the server finds it closed at its next write.
local function apply(f, session, at, subject)
  if #f.rules == 0 then return nil end
  local delay, c = f:_take(at, subject)
  sleep(delay)
  if not c then return nil end
  if c.drop then
    session:drop()
    return { true }
  end
  return { refusal(c) }
end

local function call(fn, ...)
  if fn then return fn(...) end
  return true
end

local function recipients(envelope) return envelope and envelope.to or {} end

-- Reads the rest of a message, so a refusal or a drop comes after the data as at a real end of data.
local function drain(reader)
  while reader:read(65536) do end
end

-- The phases whose commands need a round through Lua only while a rule (or a hook of the
-- application's) is there to decide them, with that hook's name.
local GATED = { mail = "on_mail", rcpt = "on_rcpt", data = "on_data", starttls = "on_starttls" }

-- f:hooks(opts) -> a copy of server.listen's opts whose hooks apply the rules first, then call
-- the ones opts had (or accept).
function Faults:hooks(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #1 to 'hooks' (table or nil expected, got " .. type(opts) .. ")", 2)
  end
  opts = opts or {}
  local f = self
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  -- MAIL, RCPT, DATA and STARTTLS go through Lua only while a rule for them exists (or the
  -- opts had a hook of their own): smtp.server asks the gate per session and again on changes
  o._gate = {
    has = function(at)
      return f:_has(at) or opts[GATED[at]] ~= nil
    end,
    watch = function(srv) f.servers[srv] = true end,
  }
  local on = {}
  for _, k in ipairs { "on_connect", "on_helo", "on_mail", "on_rcpt", "on_data", "on_message", "on_starttls",
    "on_auth" } do on[k] = opts[k] end

  o.on_connect = function(session)
    local r = apply(f, session, "connect", session.address)
    if r then return unpack(r) end
    return call(on.on_connect, session)
  end
  o.on_helo = function(session, name, verb)
    local delay, c, hide, adv
    if #f.rules > 0 then delay, c, hide, adv = f:_take("ehlo", name) else delay = 0 end
    sleep(delay)
    if c and c.drop then session:drop(); return true end
    if c then return refusal(c) end
    -- BDAT has no reply before its data: a client must use DATA for a `data` rule to meet it
    if f:_has("data") then
      hide = hide or {}
      hide[#hide + 1] = "CHUNKING"
    end
    local r = pack(call(on.on_helo, session, name, verb))
    if r[1] and (hide or adv) then
      local edit = type(r[2]) == "table" and r[2] or {}
      local h, a = {}, {}
      for _, k in ipairs(edit.hide or {}) do h[#h + 1] = k end
      for _, k in ipairs(hide or {}) do h[#h + 1] = k end
      for _, k in ipairs(edit.advertise or {}) do a[#a + 1] = k end
      for _, k in ipairs(adv or {}) do a[#a + 1] = k end
      return true, { hide = h, advertise = a }
    end
    return unpack(r, 1, r.n)
  end
  o.on_mail = function(session, from, params)
    local r = apply(f, session, "mail", from)
    if r then return unpack(r) end
    return call(on.on_mail, session, from, params)
  end
  o.on_rcpt = function(session, rcpt, params)
    local r = apply(f, session, "rcpt", rcpt)
    if r then return unpack(r) end
    return call(on.on_rcpt, session, rcpt, params)
  end
  o.on_data = function(session, envelope)
    local r = apply(f, session, "data", recipients(envelope))
    if r then return unpack(r) end
    return call(on.on_data, session, envelope)
  end
  o.on_message = function(session, envelope, reader)
    if #f.rules == 0 then return call(on.on_message, session, envelope, reader) end
    local delay, c = f:_take("data_end", recipients(envelope))
    if c then
      drain(reader)
      sleep(delay)
      if c.drop then session:drop(); return true end
      return refusal(c)
    end
    local r = pack(call(on.on_message, session, envelope, reader))
    sleep(delay)
    return unpack(r, 1, r.n)
  end
  o.on_starttls = function(session)
    local r = apply(f, session, "starttls", nil)
    if r then return unpack(r) end
    return call(on.on_starttls, session)
  end
  o.on_auth = function(session, result)
    local r = apply(f, session, "auth", result and result.user)
    if r then return unpack(r) end
    if on.on_auth then return on.on_auth(session, result) end
    return result.ok
  end
  return o
end

function Faults:__tostring()
  return ("smtp.faults (%d rules)"):format(#self.rules)
end

-- faults.parse(spec) -> rule | nil, err: the command line's form, at[:item]..., each item a reply
-- code (452), an enhanced code (4.2.2), drop, refuse, delay=S, times=N, hide=K1,K2,
-- advertise=K1,K2, match=GLOB, text=... (the rest of the spec, colons included), or a glob
-- (anything with @, * or ?): "rcpt:452:full@*", "data_end:554", "connect:drop", "ehlo:delay=5".
function M.parse(spec)
  if type(spec) ~= "string" then error("bad argument #1 to 'parse' (string expected, got " .. type(spec) .. ")", 2) end
  local r = {}
  local at, rest = spec:match("^([%w_]+):?(.*)$")
  if not at then return invalid("'" .. spec .. "': at[:code][:match]... expected") end
  r.at = at:lower()
  if not PHASES[r.at] then
    return invalid("'" .. spec .. "': one of connect, ehlo, mail, rcpt, data, data_end, starttls, auth expected first")
  end
  while rest ~= "" do
    local item
    if rest:match("^text=") then
      item, rest = rest, ""
    else
      item, rest = rest:match("^([^:]*):?(.*)$")
    end
    local k, v = item:match("^(%a+)=(.*)$")
    if item:match("^%d%d%d$") then r.code = tonumber(item)
    elseif item:match("^%d%.%d+%.%d+$") then r.enhanced = item
    elseif item == "drop" then r.drop = true
    elseif item == "refuse" then r.refuse = true
    elseif k == "delay" or k == "times" then
      r[k] = tonumber(v)
      if r[k] == nil then return invalid("'" .. spec .. "': " .. k .. "= needs a number") end
    elseif k == "hide" or k == "advertise" then
      local list = {}
      for w in v:gmatch("[^,]+") do list[#list + 1] = w end
      r[k] = list
    elseif k == "match" or k == "text" then r[k] = v
    elseif item:find("[@%*%?]") then r.match = item
    else return invalid("'" .. spec .. "': unknown item '" .. item .. "'") end
  end
  local c, why = check(r)
  if not c then return invalid("'" .. spec .. "': " .. why) end
  return r
end

M.glob = glob

return M
