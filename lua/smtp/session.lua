-- smtp.session: one client session (SMTP, or LMTP) over a transport. Opens it (greeting, EHLO or LHLO, STARTTLS, AUTH,
-- or a pooled session checked with RSET), moves the engine's bytes and replies, closes it, and
-- holds the lower-level methods (ehlo, mail, rcpt, data, rset, noop). Transactions are run by
-- smtp.transaction and smtp.batch through the four primitives _flush, _reply, _abort and dead.
local core = require "smtp.core"
local check = require "smtp.check"
local config = require "smtp.config"
local errors = require "smtp.errors"
local source = require "smtp.source"
local observe = require "smtp.observe"

local M = {}

local type, pairs, ipairs, tostring, getmetatable, setmetatable = type, pairs, ipairs, tostring,
  getmetatable, setmetatable
local now = core.now
local new_error = errors.new
local counters = observe.counters

-- Strongest first among what the server offers.
local PASSWORD_ORDER = { "CRAM-MD5", "PLAIN", "LOGIN" }
local TOKEN_ORDER = { "OAUTHBEARER", "XOAUTH2" }

local Conn = { __name = "smtp.connection" }
Conn.__index = Conn


function M.reply_error(kind, r, phase, extra)
  local t = extra or {}
  t.kind, t.code, t.enhanced, t.text, t.phase = kind, r.code, r.enhanced, r.text, phase
  return new_error(t)
end
local reply_error = M.reply_error

-- Closes the connection at once (timeouts, protocol errors, 421): no QUIT.
function Conn:_abort()
  local s = self.sock
  self.sock, self.dead = nil, true
  if s then s:close() end
end

-- A transport failure, with the phase it happened in. The session is over.
function Conn:_io_error(err, phase)
  self:_abort()
  local t = {}
  if type(err) == "table" then
    for k, v in pairs(err) do t[k] = v end
  else
    t.kind, t.text = "closed", tostring(err)
  end
  t.phase = phase
  if t.kind == "closed" or t.kind == "timeout" then t.temporary = true end
  return nil, new_error(t)
end

-- Writes whatever the engine has to say (pipelined commands, SASL answers, body bytes). Every
-- transport has write_engine: the native one writes straight from the engine's buffer.
function Conn:_flush(phase)
  local e = self.engine
  if e:outlen() == 0 then return true end
  local ok, err = self.sock:write_engine(e, self.timeouts[phase])
  if not ok then return self:_io_error(err, phase) end
  if self.tr then
    local list = e:trace_take()
    if list then observe.records(self.tr, self.id, list, "send", self) end
  end
  return true
end

-- The next reply, in order; 421 and protocol errors end the session here. `phase` names the
-- timeout and the error's phase; it may be an object with :phase() (a transaction), asked only
-- when the reply is not here yet or fails: most pipelined replies are.
function Conn:_reply(phase)
  local e = self.engine
  local limit, deadline
  while true do
    local r, perr = e:reply()
    if r then
      if r.code == 421 and r.command ~= "QUIT" then
        if type(phase) == "table" then phase = phase:phase() end
        self:_abort()
        return nil, reply_error("closed", r, phase, { temporary = true })
      end
      return r
    end
    if type(phase) == "table" then phase = phase:phase() end
    if perr then
      self:_abort()
      return nil, new_error { kind = "protocol", text = perr, phase = phase, temporary = false }
    end
    local ok, err = self:_flush(phase)
    if not ok then return nil, err end
    local t
    if not limit then
      -- the phase's time runs from the first wait (a reply already here costs no clock read)
      limit = self.timeouts[phase]
      deadline = now() + limit
      t = limit
    else
      t = deadline - now()
      if t <= 0 then
        self:_abort()
        return nil, new_error { kind = "timeout", text = phase .. " timed out", phase = phase, temporary = true }
      end
    end
    local data, rerr = self.sock:read(t)
    if not data then return self:_io_error(rerr, phase) end
    if self.tr then observe.recv(self.tr, self.id, self, data) end
    ok, perr = e:feed(data)
    if not ok then
      self:_abort()
      return nil, new_error { kind = "protocol", text = perr, phase = phase, temporary = false }
    end
  end
end

-- Queues one command (fn is an engine method), writes it and reads its reply. A value the engine
-- refuses (it already passed our checks, so this is rare) is kind "invalid" and queues nothing.
local function command(self, phase, fn, ...)
  local ok, err = fn(self.engine, ...)
  if not ok then return errors.invalid(err) end
  ok, err = self:_flush(phase)
  if not ok then return nil, err end
  return self:_reply(phase)
end
M.command = command

-- Misuse (not a session) raises; a closed session is an expected failure (kind "closed").
function M.alive(self, fname)
  if getmetatable(self) ~= Conn then
    error("bad argument #1 to '" .. fname .. "' (smtp connection expected)", 3)
  end
  if self.dead or not self.sock then
    return nil, new_error { kind = "closed", text = "the session is closed", temporary = true }
  end
  return true
end
local alive = M.alive

local function parse_auth_list(ext)
  local offered = {}
  local v = ext and ext.AUTH
  if v then for m in v:gmatch("%S+") do offered[m:upper()] = true end end
  return offered
end

-- EHLO (HELO when EHLO is refused; LHLO for LMTP, which has no fallback): the extensions table.
function Conn:_hello()
  self._info = nil
  local r, err = command(self, "ehlo", self.engine.ehlo, self.cfg.helo)
  if not r then return nil, err end
  if r.code >= 500 and r.code <= 502 and not self.cfg.lmtp then
    r, err = command(self, "ehlo", self.engine.helo, self.cfg.helo)
    if not r then return nil, err end
    if r.code ~= 250 then return nil, reply_error("rejected", r, "ehlo") end
    self.ext = {}
    return self.ext
  end
  if r.code ~= 250 then return nil, reply_error(r.code < 500 and "closed" or "rejected", r, "ehlo") end
  self.ext = r.extensions or {}
  return self.ext
end

-- The TLS handshake over the connected transport (STARTTLS after its 220, or implicit TLS);
-- a failure ends the session.
function Conn:_handshake()
  local cfg = self.cfg
  local ok, terr = self.sock:starttls { servername = cfg.servername, verify = cfg.verify,
    verify_name = cfg.verify_name, cafile = cfg.cafile, timeout = cfg.timeouts.tls, dane = cfg.dane,
    session_cache = cfg.session_cache }
  if not ok then
    self:_abort()
    local text = type(terr) == "table" and terr.text or tostring(terr)
    counters.tls_failures = counters.tls_failures + 1
    if self.tr then observe.line(self.tr, self.id, "tls", "TLS handshake failed: " .. text) end
    if self.ev then observe.event(self.ev, "tls", self.id, { ok = false, error = text }) end
    return nil, new_error { kind = "tls", phase = "tls", temporary = false, text = text }
  end
  self.tls = true
  if cfg.dane then self.dane = self.sock.dane_info and self.sock:dane_info() end
  counters.tls = counters.tls + 1
  if self.tr or self.ev then
    local t = observe.tls_fields(self.sock:info(), cfg.verify)
    if self.tr then observe.line(self.tr, self.id, "tls", observe.tls_line(t)) end
    if self.ev then t.ok = true; observe.event(self.ev, "tls", self.id, t) end
  end
  return true
end

function Conn:_starttls()
  local r, err = command(self, "tls", self.engine.starttls)
  if not r then return nil, err end
  if r.code ~= 220 then return nil, reply_error("tls", r, "tls") end
  -- Anything the server sent with or after its 220 was read before the handshake: a man in the
  -- middle could have put it there (STARTTLS response injection). Drop it and end the session.
  local dropped = self.engine:upgrade()
  if dropped > 0 then
    self:_abort()
    return nil, new_error { kind = "tls", phase = "tls", temporary = false,
      text = ("the server sent %d bytes after its STARTTLS 220 (response injection?)"):format(dropped) }
  end
  local ok, herr = self:_handshake()
  if not ok then return nil, herr end
  return self:_hello()
end

-- The secret for one AUTH attempt (a token function is called for a fresh token each time).
local function secret_of(a)
  if a.password then return a.password end
  if type(a.token) == "function" then
    local ok, tok = pcall(a.token)
    if ok and type(tok) == "string" and check.has_ctl(tok) then
      return nil, new_error { kind = "invalid", phase = "auth", temporary = false,
        text = "auth.token function gave a token with a control character" }
    end
    if not ok or type(tok) ~= "string" or tok == "" then
      return nil, new_error { kind = "auth", phase = "auth", temporary = false,
        text = "auth.token function gave no usable token: " .. tostring(tok) }
    end
    return tok
  end
  return a.token
end

function Conn:_auth()
  local a = self.cfg.auth
  if not self.tls and not self.cfg.allow_plaintext_auth and not self.loopback then
    self:quit()
    return nil, new_error { kind = "tls", phase = "auth", temporary = false,
      text = "refusing AUTH over a plaintext connection (allow_plaintext_auth = true permits it)" }
  end
  local offered = parse_auth_list(self.ext)
  local mech
  if a.mechanism then
    mech = a.mechanism:upper()
    if not offered[mech] then mech = nil end
  else
    for _, m in ipairs(a.token and TOKEN_ORDER or PASSWORD_ORDER) do
      if offered[m] then mech = m; break end
    end
  end
  if not mech then
    self:quit()
    return nil, new_error { kind = "auth", phase = "auth", temporary = false,
      text = "the server offers no usable AUTH mechanism (" .. tostring(self.ext.AUTH or "none") .. ")" }
  end
  local secret, serr = secret_of(a)
  if not secret then self:quit(); return nil, serr end
  local r, err = command(self, "auth", self.engine.auth, mech, a.user, secret, a.authzid)
  secret = nil
  if not r then return nil, err end
  if r.code ~= 235 then
    counters.auth_failures = counters.auth_failures + 1
    if self.ev then
      observe.event(self.ev, "auth", self.id, { ok = false, mechanism = mech, user = a.user,
        code = r.code, enhanced = r.enhanced, text = r.text })
    end
    self:quit()
    return nil, reply_error("auth", r, "auth")
  end
  counters.auth = counters.auth + 1
  if self.ev then
    observe.event(self.ev, "auth", self.id, { ok = true, mechanism = mech, user = a.user, code = r.code })
  end
  self.auth_mechanism = mech
  self._info = nil
  return true
end

local function connect_error(err)
  if errors.is(err) then err.phase = err.phase or "connect"; return err end
  return new_error { kind = "connect", text = tostring(err), phase = "connect" }
end

-- Inside nginx (a transport that pools): an idle session of the same server, TLS mode and
-- credentials from the cosocket pool, checked with RSET before it is trusted ("reused"), or a
-- fresh connection that still needs greeting, EHLO, STARTTLS and AUTH (true). A stale pooled
-- session (the server dropped it while idle) is closed and the next one tried; when every try
-- finds a stale one, a connection outside the pool.
function Conn:_acquire(transport)
  local cfg = self.cfg
  local a = cfg.auth or {}
  self.pool_key = transport.pool_key { server = (cfg.lmtp and "lmtp:" or "") .. cfg.server, port = cfg.port, tls = cfg.tls,
    verify = cfg.verify, verify_name = cfg.verify_name, servername = cfg.servername, helo = cfg.helo,
    user = a.user, password = a.password, token = a.token, bind = cfg.bind and cfg.bind.text }
  local copts = { host = cfg.server, port = cfg.port, path = cfg.path, timeout = cfg.timeouts.connect,
    nameservers = cfg.nameservers, pool = self.pool_key, pool_size = cfg.pool.size,
    bind = cfg.bind, proxy = cfg.proxy }
  for try = 1, cfg.pool.size + 2 do
    if try == cfg.pool.size + 2 then copts.pool = nil; self.pool_key = nil end
    local sock, err = transport.connect(copts)
    if not sock then return nil, err end
    self.sock, self.dead = sock, false
    local state = sock:reused() > 0 and sock:state() or nil
    if not state then
      self.engine = self:_engine()
      return true
    end
    -- A new engine told it had its greeting, so RSET is the next command; a short wait, since
    -- a stale session should cost little.
    local e = self:_engine()
    e:feed("220 pooled session\r\n")
    e:reply()
    self.engine = e
    local saved = self.timeouts
    self.timeouts = { mail = math.min(saved.mail, saved.connect) }
    local r = command(self, "mail", e.rset)
    self.timeouts = saved
    if r and r.code == 250 then
      self.ext, self.tls, self.auth_mechanism = state.extensions, state.tls, state.auth
      return "reused"
    end
    self:_abort()
  end
end

-- Hands an idle session back to the pool (smtp.send inside nginx); false when it cannot be kept.
function Conn:_release()
  if not self.pool_key or self.dead or not self.sock or self.engine:state() ~= "ready" then
    return false
  end
  local p = self.cfg.pool
  local sock = self.sock
  self.sock, self.dead = nil, true
  sock:keepalive(p.idle_timeout, p.size, { extensions = self.ext, tls = self.tls, auth = self.auth_mechanism })
  return true
end

function Conn:_open()
  local cfg = self.cfg
  local transport = cfg.transport or require("smtp.transport").get()
  if cfg.pool and self.pooling and transport.pooling then
    local got, err = self:_acquire(transport)
    if not got then return self:_connect_failed(connect_error(err)) end
    if got == "reused" then return true end
  else
    local sock, err = transport.connect { host = cfg.server, port = cfg.port, path = cfg.path,
      timeout = cfg.timeouts.connect, nameservers = cfg.nameservers, bind = cfg.bind,
      proxy = cfg.proxy }
    if not sock then return self:_connect_failed(connect_error(err)) end
    self.sock, self.dead = sock, false
  end
  local sock = self.sock
  local info = sock:info()
  self.address = info.address
  counters.connections = counters.connections + 1
  if self.tr then
    local where = cfg.path and "" or (" [" .. tostring(info.address) .. "]:" .. tostring(info.port or cfg.port))
    observe.line(self.tr, self.id, "info", ("connected to %s%s%s%s"):format(cfg.server,
      where, (info.reused or 0) > 0 and " (reused)" or "",
      cfg.proxy and (" via proxy " .. tostring(info.proxy or cfg.proxy.host)) or ""))
  end
  if self.ev then
    observe.event(self.ev, "connect", self.id, { ok = true, host = cfg.server, port = cfg.port,
      address = info.address, reused = info.reused })
  end
  -- through a proxy the bytes also cross the way to it: loopback only when both ends are
  self.loopback = cfg.path ~= nil or (check.is_loopback(info.address or cfg.server)
    and (not cfg.proxy or check.is_loopback(cfg.proxy.host)))
  if cfg.tls == "implicit" then
    local ok, herr = self:_handshake()
    if not ok then return nil, herr end
  end
  local r, err = self:_reply("greeting")
  if not r then return nil, err end
  if r.code ~= 220 then
    self:quit()
    return nil, reply_error(r.code < 500 and "closed" or "rejected", r, "greeting")
  end
  self.greeting = r
  local ext
  ext, err = self:_hello()
  if not ext then self:quit(); return nil, err end
  if cfg.tls == "starttls" or cfg.tls == "opportunistic" then
    if ext.STARTTLS then
      local ok, terr = self:_starttls()
      if not ok then
        if cfg.tls == "starttls" or self.dead or terr.kind ~= "tls" or terr.code == nil then
          self:quit()
          return nil, terr
        end
        -- opportunistic: a refused STARTTLS leaves the plaintext session as it was
      end
    elseif cfg.tls == "starttls" then
      self:quit()
      return nil, new_error { kind = "tls", phase = "tls", temporary = false,
        text = "the server does not offer STARTTLS and tls = \"starttls\" requires it" }
    end
  end
  if cfg.auth then
    local ok, aerr = self:_auth()
    if not ok then return nil, aerr end
  end
  -- open and idle until the first message: the engine's buffers go back to the heap
  self.engine:shrink()
  return true
end

-- Releases a session nobody closed, when it is collected: Lua 5.4 runs Conn.__gc on the table;
-- LuaJIT runs no __gc on tables, so there a userdata sentinel held by the session does it. No
-- QUIT can be written from a finalizer (it may not wait or yield): the connection is closed.
local function collect(self)
  local s = self.sock
  self.sock, self.dead = nil, true
  if s then pcall(s.close, s) end
end
local newproxy = newproxy   -- LuaJIT (and 5.1) only
-- One metatable for every sentinel, whose environment is its session: LuaJIT marks what a
-- userdata awaiting its finalizer references, so the session is still there when it runs. A
-- metatable and a closure per session cost 370 bytes more on LuaJIT.
local sentinel
if newproxy and debug and debug.setfenv and debug.getfenv then
  sentinel = newproxy(true)
  local getfenv_ud = debug.getfenv
  getmetatable(sentinel).__gc = function(p)
    local self = getfenv_ud(p)
    if getmetatable(self) == Conn then collect(self) end
  end
end

function Conn:_connect_failed(err)
  counters.connect_failures = counters.connect_failures + 1
  if self.tr then observe.line(self.tr, self.id, "info", "connect to " .. self.cfg.server .. " failed: " .. tostring(err)) end
  if self.ev then
    observe.event(self.ev, "connect", self.id, { ok = false, host = self.cfg.server, port = self.cfg.port,
      error = err })
  end
  return nil, err
end

-- A client engine, recording a transcript when someone reads one.
function Conn:_engine()
  local e = core.client_engine()
  if self.tr then e:trace(self.tr_body and 2 or 1) end
  if self.cfg.lmtp then e:lmtp(true) end
  return e
end

-- A new, unopened session for validated options (config.connection). `obs` holds the observer
-- options (observe.check): transcript, transcript_body, on_event.
function M.new(cfg, pooling, obs)
  local self = setmetatable({ cfg = cfg, timeouts = cfg.timeouts, ext = {}, pooling = pooling,
    id = observe.next_id() }, Conn)
  if obs then
    self.tr, self.tr_body, self.ev = obs.transcript, obs.transcript_body, obs.on_event
  end
  self.engine = self:_engine()
  if sentinel then
    local p = newproxy(sentinel)
    debug.setfenv(p, self)
    self._sentinel = p
  elseif newproxy then
    local p = newproxy(true)
    getmetatable(p).__gc = function() collect(self) end
    self._sentinel = p
  end
  return self
end

function Conn:extensions()
  return self.ext
end

function Conn:info()
  if self._info then return self._info end
  local info = self.sock and self.sock:info() or {}
  local ext = {}
  for k, v in pairs(self.ext or {}) do ext[k] = v end
  local i = { host = self.cfg.server, port = self.cfg.port, address = info.address or self.address,
    tls = self.tls and ((type(info.tls) == "string" and info.tls) or info.version or true) or false,
    cipher = info.cipher, extensions = ext,
    auth = self.auth_mechanism, reused = info.reused }
  -- shared by every result of this session until the next EHLO
  self._info = i
  return i
end

-- Lower-level session methods: each returns the reply table, or nil, err.
function Conn:ehlo()
  local ok, err = alive(self, "ehlo"); if not ok then return nil, err end
  return self:_hello()
end

function Conn:mail(from, params)
  local ok, err = alive(self, "mail"); if not ok then return nil, err end
  local wire
  ok, err, wire = check.address(from, "from", true); if not ok then return nil, err end
  return command(self, "mail", self.engine.mail, wire, config.params(params, "mail"))
end

function Conn:rcpt(to, params)
  local ok, err = alive(self, "rcpt"); if not ok then return nil, err end
  local wire
  ok, err, wire = check.address(to, "to"); if not ok then return nil, err end
  return command(self, "rcpt", self.engine.rcpt, wire, config.params(params, "rcpt"))
end

function Conn:rset()
  local ok, err = alive(self, "rset"); if not ok then return nil, err end
  return command(self, "mail", self.engine.rset)
end

function Conn:noop()
  local ok, err = alive(self, "noop"); if not ok then return nil, err end
  return command(self, "mail", self.engine.noop)
end

function Conn:data(src)
  local ok, err = alive(self, "data"); if not ok then return nil, err end
  local chunks = source.of(src)
  if not chunks then
    error("bad argument #1 to 'data' (string, file, function or smtp.message expected)", 2)
  end
  local r
  r, err = command(self, "data", self.engine.data)
  if not r then return nil, err end
  if r.code ~= 354 then return r end
  -- smtp.transaction builds on this module: looked up when first needed
  ok, err = require("smtp.transaction").stream_body(self, chunks)
  if not ok then return nil, err end
  ok, err = self:_flush("data_block")
  if not ok then return nil, err end
  r, err = self:_reply("data_end")
  if not r or not self.cfg.lmtp then return r, err end
  -- LMTP: one reply per accepted recipient; the first is returned, all of them in `replies`
  local replies = { r }
  while replies[#replies].more do
    local nr, nerr = self:_reply("data_end")
    if not nr then return nil, nerr end
    replies[#replies + 1] = nr
  end
  r.replies = replies
  return r
end

-- smtp.batch builds on this module: looked up once, on the first send.
local batch
-- Between messages a session is idle: its engine hands its empty buffers back.
local function idle(self, ...)
  local e = not self.dead and self.engine
  if e then e:shrink() end
  return ...
end

function Conn:send(opts)
  batch = batch or require "smtp.batch"
  return idle(self, batch.send(self, opts))
end

function Conn:send_many(list, opts)
  batch = batch or require "smtp.batch"
  return idle(self, batch.send_many(self, list, opts))
end

function Conn:quit()
  if self.dead or not self.sock then self.dead = true; return true end
  local st = self.engine:state()
  if st == "ready" or st == "greeting" then
    self.engine:quit()
    if self:_flush("quit") then self:_reply("quit") end
  end
  self:_abort()
  return true
end

function Conn:close()
  if getmetatable(self) ~= Conn then error("bad argument #1 to 'close' (smtp connection expected)", 2) end
  return self:quit()
end
Conn.__close = function(self) self:close() end
Conn.__gc = collect

return M
