-- smtp.testing: a catch-all SMTP sink for test suites (busted or any runner): started in-process
-- or as a child `lua-smtp sink` on a free loopback port, waited on for a matching message,
-- made to fail on demand (smtp.faults), with assertions whose failures say what arrived.
local core = require "smtp.core"
local wait = require "smtp.wait"
local loop = require "smtp.loop"
local faults = require "smtp.faults"

local M = {}

local function argerr(fname, msg) error("bad argument #1 to '" .. fname .. "' (" .. msg .. ")", 3) end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("*a")
  f:close()
  return d
end

-- The parsed message of `data` with `envelope` and `raw` added. A message the parser refuses
-- still arrives: `invalid` holds why, and only the envelope and raw data can be matched.
local function parsed(from, to, data)
  local msg, err = require("smtp.message").parse(data)
  if not msg then msg = { invalid = err, header = function() return nil end } end
  msg.envelope = { from = from, to = to }
  msg.raw = data
  return msg
end

-- Matching ----------------------------------------------------------------------------------

-- A wanted value: a glob when it holds * or ?, else equal; letters' case ignored.
local function like(want, have)
  if have == nil then return false end
  have = tostring(have)
  if want:find("[%*%?]") then return have:lower():match(faults.glob(want)) ~= nil end
  return want:lower() == have:lower()
end

local QUERY = { to = true, from = true, subject = true, match = true, timeout = true }

local function check_query(fname, query)
  if type(query) ~= "table" then argerr(fname, "table expected, got " .. type(query)) end
  for k, v in pairs(query) do
    if not QUERY[k] then argerr(fname, "unknown field '" .. tostring(k) .. "'") end
    if (k == "to" or k == "from" or k == "subject") and type(v) ~= "string" then
      argerr(fname, "'" .. k .. "' must be a string")
    end
    if k == "match" and type(v) ~= "function" then argerr(fname, "'match' must be a function") end
    if k == "timeout" and (type(v) ~= "number" or v < 0) then argerr(fname, "'timeout' must be seconds") end
  end
end

local function matches(query, msg)
  if query.from and not like(query.from, msg.envelope.from) then return false end
  if query.to then
    local any = false
    for _, r in ipairs(msg.envelope.to) do if like(query.to, r) then any = true; break end end
    if not any then return false end
  end
  if query.subject and not like(query.subject, msg:header("subject")) then return false end
  if query.match then
    local ok, yes = pcall(query.match, msg)
    if not ok or not yes then return false end
  end
  return true
end

local function describe_query(query)
  local t = {}
  for _, k in ipairs { "from", "to", "subject" } do
    if query[k] then t[#t + 1] = ("%s = %q"):format(k, query[k]) end
  end
  if query.match then t[#t + 1] = "match = <function>" end
  return "{ " .. table.concat(t, ", ") .. " }"
end

local function describe_msg(i, msg)
  local s = msg.header and msg:header("subject")
  return ("  %d. from=<%s> to=<%s> subject=%s"):format(i, tostring(msg.envelope.from),
    table.concat(msg.envelope.to, ">,<"), s and ("%q"):format(s) or "(none)")
end

-- What a failed wait says: what was asked, then everything that did arrive.
local function not_arrived(query, list, timeout)
  local lines = { ("smtp.testing: no message matching %s arrived within %g s; %s"):format(
    describe_query(query), timeout, #list == 0 and "none arrived at all" or (#list .. " arrived:")) }
  for i, msg in ipairs(list) do lines[#lines + 1] = describe_msg(i, msg) end
  return table.concat(lines, "\n")
end

-- Sinks -------------------------------------------------------------------------------------

local Sink = { __name = "smtp.testing.sink" }
Sink.__index = Sink

function Sink:__tostring()
  return ("smtp.testing.sink (%s, %s port %d%s)"):format(self.in_process and "in-process" or "child",
    self.host, self.port, self.closed and ", closed" or "")
end

-- sink:messages() -> every message received so far, oldest first (parsed, with envelope and raw).
function Sink:messages()
  if not self.in_process then self:_scan() end
  local out = {}
  for i, m in ipairs(self.store) do out[i] = m end
  return out
end

-- sink:find(query) -> the first message matching, or nil; no waiting.
function Sink:find(query)
  check_query("find", query)
  for _, m in ipairs(self:messages()) do
    if matches(query, m) then return m end
  end
  return nil
end

-- sink:wait_for(query) -> the first message matching, oldest first, waiting up to
-- query.timeout seconds (default 5); raises a readable error listing what arrived otherwise.
function Sink:wait_for(query)
  check_query("wait_for", query)
  local timeout = query.timeout or 5
  local deadline = core.now() + timeout
  while true do
    local m = self:find(query)
    if m then return m end
    if core.now() >= deadline then break end
    wait.sleep(math.min(0.02, math.max(0, deadline - core.now())))
  end
  error(not_arrived(query, self:messages(), timeout), 2)
end

-- sink:check(query) -> msg | nil, why: wait_for without raising (the assertions use it).
function Sink:check(query)
  check_query("check", query)
  local ok, r = pcall(self.wait_for, self, query)
  if ok then return r end
  return nil, (tostring(r):gsub("^[^\n]-:%d+: ", ""))
end

-- sink:clear(): forgets every message received so far.
function Sink:clear()
  if self.in_process then
    self.store = {}
  else
    self:_scan()
    for _, name in ipairs(self.files) do os.remove(self.dir .. "/new/" .. name) end
    self.files, self.seen, self.store = {}, {}, {}
  end
  return true
end

-- sink:fail(rule) -> id | nil, err: smtp.faults' f:add on this sink's rules. A child sink is
-- restarted on its port with the rules as --fail options (a few tenths of a second).
function Sink:fail(rule)
  if type(rule) ~= "table" then argerr("fail", "table expected, got " .. type(rule)) end
  local id, err = self.faults:add(rule)
  if not id then return nil, err end
  if not self.in_process then
    local ok, rerr = self:_restart()
    if not ok then self.faults:remove(id); return nil, rerr end
  end
  return id
end

-- sink:unfail([id]): removes one rule, or all of them.
function Sink:unfail(id)
  if id == nil then self.faults:clear() else self.faults:remove(id) end
  if not self.in_process then return self:_restart() end
  return true
end

-- sink:close(): stops the server (an in-process one) or the child (by its PID).
function Sink:close()
  if self.closed then return true end
  self.closed = true
  if self.in_process then
    self.srv:close()
  else
    self:_stop()
    os.execute("rm -rf " .. q(self.dir))
  end
  return true
end

-- In-process: smtp.server in this process's smtp.loop ---------------------------------------

local function start_in_process(self, opts)
  local server = require "smtp.server"
  local lopts = {
    host = "127.0.0.1", port = 0, hostname = opts.hostname or "sink.test",
    tls = opts.tls, max_message_size = opts.max_size, timeout = 30,
    on_message = function(_, env, reader)
      local parts = {}
      while true do
        local chunk = reader:read(65536)
        if not chunk then break end
        parts[#parts + 1] = chunk
      end
      local to = {}
      for i, r in ipairs(env.to) do to[i] = r end
      local s = self.store
      s[#s + 1] = parsed(env.from, to, table.concat(parts))
      return true
    end,
  }
  if opts.auth then
    local user, pass = opts.auth.user, opts.auth.password
    lopts.auth = function(_, _, u, p) return u == user and p == pass end
    lopts.require_auth = true
  end
  local srv, err = server.listen(self.faults:hooks(lopts))
  if not srv then return nil, err end
  self.srv, self.port = srv, srv.port
  srv:serve()
  return true
end

-- Child: `lua-smtp sink` with a Maildir, watched by PID ---------------------------------------

local function self_pid()
  local s = readfile("/proc/self/stat")
  return s and tonumber(s:match("^(%d+)"))
end

local function alive(pid)
  local st = readfile("/proc/" .. tostring(pid) .. "/stat")
  if not st then return false end
  local state = st:match(".*%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- The command that runs `lua-smtp`: this checkout's bin/lua-smtp with this interpreter when the
-- module is loaded from a checkout, else `lua-smtp` from PATH.
local function default_command()
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local root = src:match("^(.*)/lua/smtp/testing%.lua$")
  if root and readfile(root .. "/bin/lua-smtp") then
    local interp = (jit and "luajit") or ("lua" .. _VERSION:match("%d+%.%d+"))
    return { interp, root .. "/bin/lua-smtp" }
  end
  return { "lua-smtp" }
end

local function spec_of(c)
  local t = { c.at }
  if c.code then t[#t + 1] = tostring(c.code) end
  if c.enhanced then t[#t + 1] = c.enhanced end
  if c.match then t[#t + 1] = "match=" .. c.match end
  if c.drop then t[#t + 1] = "drop" end
  if c.refuse then t[#t + 1] = "refuse" end
  if c.delay then t[#t + 1] = "delay=" .. c.delay end
  if c.times then t[#t + 1] = "times=" .. c.times end
  if c.hide then t[#t + 1] = "hide=" .. table.concat(c.hide, ",") end
  if c.advertise then t[#t + 1] = "advertise=" .. table.concat(c.advertise, ",") end
  if c.text then t[#t + 1] = "text=" .. c.text end
  return table.concat(t, ":")
end

function Sink:_start_child()
  local o = self.opts
  local argv = {}
  for i, a in ipairs(o.command or default_command()) do argv[i] = a end
  for _, a in ipairs { "sink", "--listen", "127.0.0.1:" .. (self.port or 0), "--maildir", self.dir,
    "--no-received", "--hostname", o.hostname or "sink.test", "--timeout", "30" } do argv[#argv + 1] = a end
  if o.tls then
    for _, a in ipairs { "--tls-cert", o.tls.cert, "--tls-key", o.tls.key } do argv[#argv + 1] = a end
    if o.tls.implicit then argv[#argv + 1] = "--tls-implicit" end
  end
  if o.max_size then argv[#argv + 1] = "--max-size"; argv[#argv + 1] = tostring(o.max_size) end
  local env = ""
  if o.auth then
    env = "LUA_SMTP_TESTING_AUTH=" .. q(o.auth.user .. ":" .. o.auth.password) .. " "
    argv[#argv + 1] = "--auth-env"; argv[#argv + 1] = "LUA_SMTP_TESTING_AUTH"
  end
  for _, c in ipairs(self.faults:list()) do argv[#argv + 1] = "--fail"; argv[#argv + 1] = spec_of(c) end
  local words = {}
  for i, a in ipairs(argv) do words[i] = q(a) end
  local log = self.dir .. "/sink.log"
  os.remove(log)
  -- The child's parent is this process; a watcher ends it should this process die first.
  local script = ("%sexec %s >%s 2>&1 </dev/null &\ns=$!\necho $s\n" ..
    "( while kill -0 %d 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 1; done; kill $s 2>/dev/null ) " ..
    ">/dev/null 2>&1 </dev/null &\n"):format(env, table.concat(words, " "), q(log), self_pid() or 1)
  local p = io.popen("sh -c " .. q(script), "r")
  local pid = p and tonumber(p:read("*l"))
  if p then p:close() end
  if not pid then return nil, "smtp.testing: could not start " .. table.concat(argv, " ") end
  self.pid = pid
  local deadline = core.now() + 10
  while core.now() < deadline do
    local out = readfile(log) or ""
    local port = out:match("listening on %S+ port (%d+)")
    if port then
      self.port = tonumber(port)
      return true
    end
    if not alive(pid) then break end
    wait.sleep(0.02)
  end
  self:_stop()
  return nil, "smtp.testing: the sink did not start: " .. (readfile(log) or "")
end

function Sink:_stop()
  local pid = self.pid
  if not pid then return end
  self.pid = nil
  os.execute("kill " .. pid .. " 2>/dev/null")
  local deadline = core.now() + 5
  while alive(pid) and core.now() < deadline do wait.sleep(0.02) end
  if alive(pid) then os.execute("kill -KILL " .. pid .. " 2>/dev/null") end
end

function Sink:_restart()
  self:_stop()
  -- the port stays the same: tests already hold sink.port
  local ok, err = self:_start_child()
  if not ok then return nil, err end
  return true
end

-- New files in the Maildir, in the order the sink stored them (its names count up: Q<n>).
function Sink:_scan()
  local p = io.popen("ls -1 " .. q(self.dir .. "/new") .. " 2>/dev/null", "r")
  local new = {}
  if p then
    for name in p:lines() do
      if not self.seen[name] then new[#new + 1] = name end
    end
    p:close()
  end
  table.sort(new, function(a, b)
    return (tonumber(a:match("Q(%d+)")) or 0) < (tonumber(b:match("Q(%d+)")) or 0)
  end)
  for _, name in ipairs(new) do
    local data = readfile(self.dir .. "/new/" .. name)
    if data then
      self.seen[name] = true
      self.files[#self.files + 1] = name
      -- the sink's own lines come first: Return-Path, then one Delivered-To per recipient
      local from, rest = data:match("^Return%-Path: <(.-)>\r\n(.*)$")
      local to = {}
      while rest do
        local r, more = rest:match("^Delivered%-To: ([^\r\n]*)\r\n(.*)$")
        if not r then break end
        to[#to + 1] = r
        rest = more
      end
      self.store[#self.store + 1] = parsed(from or "", to, rest or data)
    end
  end
end

-- testing.sink{ in_process =, tls = { cert =, key = [, implicit = true] }, auth = { user =,
-- password = }, hostname =, max_size =, fail = { rule, ... }, command = { argv... } } -> sink
function M.sink(opts)
  if opts ~= nil and type(opts) ~= "table" then argerr("sink", "table or nil expected, got " .. type(opts)) end
  opts = opts or {}
  local in_process = opts.in_process
  if in_process == nil then in_process = loop.current() ~= nil end
  if in_process and not loop.current() then
    argerr("sink", "in_process needs to run inside an smtp.loop task (outside one, a child sink serves "
      .. "while this process blocks or runs cqueues)")
  end
  if opts.tls ~= nil and (type(opts.tls) ~= "table" or type(opts.tls.cert) ~= "string" or type(opts.tls.key) ~= "string") then
    argerr("sink", "'tls' must be { cert = path, key = path }")
  end
  if opts.auth ~= nil and (type(opts.auth) ~= "table" or type(opts.auth.user) ~= "string"
    or type(opts.auth.password) ~= "string") then
    argerr("sink", "'auth' must be { user =, password = }")
  end
  local self = setmetatable({ opts = opts, in_process = in_process and true or false, host = "127.0.0.1",
    faults = faults.new(), store = {}, files = {}, seen = {} }, Sink)
  for _, rule in ipairs(opts.fail or {}) do
    local id, err = self.faults:add(rule)
    if not id then return nil, err end
  end
  local ok, err
  if in_process then
    ok, err = start_in_process(self, opts)
  else
    self.dir = assert(io.popen("mktemp -d /tmp/smtp-testing.XXXXXX")):read("*l")
    ok, err = self:_start_child()
  end
  if not ok then return nil, err end
  self.url = ("smtp://%s:%d"):format(self.host, self.port)
  return self
end

-- Assertions --------------------------------------------------------------------------------

-- testing.assert_sent{ sink =, to =, from =, subject =, match =, timeout = } -> msg, or raises
-- with what was asked and what arrived.
function M.assert_sent(query)
  if type(query) ~= "table" or getmetatable(query.sink) ~= Sink then
    argerr("assert_sent", "{ sink = <smtp.testing sink>, ... } expected")
  end
  local q2 = {}
  for k, v in pairs(query) do if k ~= "sink" then q2[k] = v end end
  local msg, why = query.sink:check(q2)
  if not msg then error(why, 2) end
  return msg
end

-- With busted (luassert) loaded: assert.received(sink, query), assert.is_not.received(sink,
-- query) (which waits the whole timeout: give a short one).
function M.register_luassert()
  local ok, luassert = pcall(require, "luassert")
  local sok, say = pcall(require, "say")
  if not (ok and sok) then return false end
  say:set("assertion.received.positive", "Expected a message matching %s to arrive")
  say:set("assertion.received.negative", "Expected no message matching %s to arrive")
  luassert:register("assertion", "received", function(state, arguments)
    local sink, query = arguments[1], arguments[2] or {}
    if getmetatable(sink) ~= Sink then error("assert.received: a smtp.testing sink expected", 3) end
    local msg, why = sink:check(query)
    state.failure_message = why or ("a message matching " .. describe_query(query) .. " arrived")
    arguments[1], arguments[2] = describe_query(query), nil
    arguments.n, arguments.nofmt = 1, { true }
    return msg ~= nil
  end, "assertion.received.positive", "assertion.received.negative")
  return true
end

if package.loaded.luassert or package.loaded.busted then M.register_luassert() end

return M
