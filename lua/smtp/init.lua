-- smtp: send mail through a submission server (smtp.send, smtp.connect and the session methods)
-- and direct delivery (smtp.deliver). Policy lives here; the protocol bytes come from the C
-- engine (core.client_engine) and move through a transport (smtp.transport.native by default).
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = { _VERSION = "0.1.0" }

local type, pairs, ipairs, tostring, tonumber, select = type, pairs, ipairs, tostring, tonumber, select
local concat, sort = table.concat, table.sort
local now = core.now

-- RFC 5321 §4.5.3.2 waits are the upper defaults; connect, ehlo, tls, auth and quit have no RFC
-- value and get shorter ones. `data_block` bounds each write of the body.
local DEFAULT_TIMEOUTS = {
  connect = 30, greeting = 300, ehlo = 300, tls = 60, auth = 120, mail = 300, rcpt = 300,
  data = 120, data_block = 180, data_end = 600, quit = 60,
}
M.DEFAULT_TIMEOUTS = DEFAULT_TIMEOUTS
local PORTS = { starttls = 587, implicit = 465, opportunistic = 25, none = 25 }
local MECHANISMS = { PLAIN = true, LOGIN = true, ["CRAM-MD5"] = true, XOAUTH2 = true, OAUTHBEARER = true }
-- Strongest first among what the server offers.
local PASSWORD_ORDER = { "CRAM-MD5", "PLAIN", "LOGIN" }
local TOKEN_ORDER = { "OAUTHBEARER", "XOAUTH2" }
local WRITE_BATCH = 256 * 1024   -- body bytes gathered before one write
local BDAT_CHUNK = 1024 * 1024   -- bytes per BDAT chunk
local STRING_SLICE = 65536        -- a string message is handed to the engine this much at a time
-- A file message is read this much at a time. Each read is a new string; LuaJIT's collector
-- does a fixed slice of work per allocation whatever its size, so bigger reads let garbage pile
-- up (64 KB reads: 11-21 MB peak for a big file there, 16 KB: under 9 MB).
local FILE_READ = 16384

local function misuse(fname, msg)
  error("bad argument to '" .. fname .. "' (" .. msg .. ")", 3)
end

local function invalid(text)
  return nil, errors.new { kind = "invalid", text = text, temporary = false }
end

-- ---- input validation (all of it happens before any connection is opened) -----------------

local function has_ctl(s) return s:find("[%z\1-\31\127]") ~= nil end

-- Addresses that passed, so a program sending many messages to the same few addresses checks each
-- once; emptied when it reaches CHECKED_MAX entries, so it stays small.
local checked, nchecked, CHECKED_MAX = {}, 0, 1024

-- An address as it goes between the angle brackets of MAIL FROM / RCPT TO.
local function check_address(a, what, allow_null)
  if checked[a] then return true end
  if type(a) ~= "string" then return invalid(what .. ": address must be a string") end
  if a == "" then
    if allow_null then return true end
    return invalid(what .. ": empty address")
  end
  if has_ctl(a) then return invalid(what .. ": control character (CR, LF, NUL, ...) in address") end
  if a:find("[<>]") then return invalid(what .. ": '<' or '>' in address") end
  local at = a:match("^.*()@")
  if not at or at == 1 or at == #a then return invalid(what .. ": not an address: " .. a) end
  local localpart, domain = a:sub(1, at - 1), a:sub(at + 1)
  if #localpart > 64 then return invalid(what .. ": local part over 64 octets") end
  if #domain > 255 then return invalid(what .. ": domain over 255 octets") end
  if #a + 2 > 256 then return invalid(what .. ": path over 256 octets") end
  if a:find("[ \t]") and not localpart:match('^".*"$') then
    return invalid(what .. ": space in address")
  end
  if domain:find("[%s\"\\]") then return invalid(what .. ": bad character in domain") end
  if nchecked >= CHECKED_MAX then checked, nchecked = {}, 0 end
  checked[a], nchecked = true, nchecked + 1
  return true
end
M.check_address = check_address

local has_8bit = core.has_8bit
local function non_ascii(s) return has_8bit(s) end

-- xtext (RFC 3461 §4): '+', '=' and anything outside 33..126 as +XX.
local function xtext(s)
  return (s:gsub("[^\33-\42\44-\60\62-\126]", function(c) return ("+%02X"):format(c:byte()) end))
end
M.xtext = xtext

local NOTIFY = { NEVER = true, SUCCESS = true, FAILURE = true, DELAY = true }

local function check_dsn(dsn)
  if dsn == nil then return true end
  if type(dsn) ~= "table" then misuse("send", "dsn: table expected") end
  local out = {}
  if dsn.notify ~= nil then
    local list = type(dsn.notify) == "string" and { dsn.notify } or dsn.notify
    if type(list) ~= "table" then misuse("send", "dsn.notify: list expected") end
    local seen, never = {}, false
    for _, v in ipairs(list) do
      if type(v) ~= "string" or not NOTIFY[v:upper()] then
        return invalid("dsn.notify: not NEVER, SUCCESS, FAILURE or DELAY: " .. tostring(v))
      end
      v = v:upper()
      if v == "NEVER" then never = true end
      if not seen[v] then seen[#seen + 1] = v; seen[v] = true end
    end
    if #seen == 0 then return invalid("dsn.notify: empty list") end
    if never and #seen > 1 then return invalid("dsn.notify: NEVER goes alone") end
    out.notify = concat(seen, ",")
  end
  if dsn.ret ~= nil then
    local r = type(dsn.ret) == "string" and dsn.ret:upper()
    if r ~= "FULL" and r ~= "HDRS" then return invalid("dsn.ret: FULL or HDRS") end
    out.ret = r
  end
  if dsn.envid ~= nil then
    if type(dsn.envid) ~= "string" then misuse("send", "dsn.envid: string expected") end
    if has_ctl(dsn.envid) then return invalid("dsn.envid: control character") end
    if #dsn.envid > 100 or non_ascii(dsn.envid) then return invalid("dsn.envid: over 100 ASCII characters") end
    out.envid = xtext(dsn.envid)
  end
  out.orcpt = dsn.orcpt ~= false
  return out
end

local function check_helo(h)
  if type(h) ~= "string" then misuse("connect", "helo: string expected") end
  if h == "" or #h > 255 or has_ctl(h) or h:find("[%s<>]") then
    return invalid("helo: not a host name or address literal: " .. h)
  end
  return true
end

local function default_helo()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local name = f and f:read("*l")
  if f then f:close() end
  if not name or name == "" or has_ctl(name) or name:find("%s") then name = "localhost" end
  return name
end

local function check_timeouts(t)
  local out = {}
  for k, v in pairs(DEFAULT_TIMEOUTS) do out[k] = v end
  if t == nil then return out end
  if type(t) == "number" then
    if t <= 0 then misuse("connect", "timeout must be positive") end
    for k in pairs(out) do out[k] = t end
  elseif type(t) == "table" then
    for k, v in pairs(t) do
      if DEFAULT_TIMEOUTS[k] == nil then misuse("connect", "timeout: unknown phase " .. tostring(k)) end
      if type(v) ~= "number" or v <= 0 then misuse("connect", "timeout." .. k .. ": positive number expected") end
      out[k] = v
    end
  else
    misuse("connect", "timeout: number or table expected")
  end
  return out
end

local function check_auth(a)
  if a == nil then return true end
  if type(a) ~= "table" then misuse("connect", "auth: table expected") end
  if type(a.user) ~= "string" then misuse("connect", "auth.user: string expected") end
  if has_ctl(a.user) then return invalid("auth.user: control character (CR, LF, NUL, ...)") end
  if a.authzid ~= nil and (type(a.authzid) ~= "string" or has_ctl(a.authzid)) then
    return invalid("auth.authzid: control character or not a string")
  end
  local has_pw, has_tok = a.password ~= nil, a.token ~= nil
  if has_pw == has_tok then misuse("connect", "auth: give password or token") end
  if has_pw and type(a.password) ~= "string" then misuse("connect", "auth.password: string expected") end
  -- CR and LF too: a LOGIN server that decodes the password into a line must not see two lines
  if has_pw and a.password:find("[\r\n%z]") then return invalid("auth.password: CR, LF or NUL") end
  if has_tok and type(a.token) ~= "string" and type(a.token) ~= "function" then
    misuse("connect", "auth.token: string or function expected")
  end
  if type(a.token) == "string" and has_ctl(a.token) then return invalid("auth.token: control character") end
  if a.mechanism ~= nil then
    if type(a.mechanism) ~= "string" or not MECHANISMS[a.mechanism:upper()] then
      return invalid("auth.mechanism: one of PLAIN, LOGIN, CRAM-MD5, XOAUTH2, OAUTHBEARER")
    end
    local m = a.mechanism:upper()
    if has_tok ~= (m == "XOAUTH2" or m == "OAUTHBEARER") then
      return invalid("auth.mechanism " .. m .. " does not go with " .. (has_tok and "a token" or "a password"))
    end
  end
  return true
end

local function is_loopback_name(h)
  return h == "localhost" or h:match("^127%.%d+%.%d+%.%d+$") ~= nil or h == "::1" or h == "[::1]"
end

-- pool = nil|true (defaults) | false (off) | { size = 10, idle_timeout = 30 }: idle sessions kept
-- for the next smtp.send where the transport keeps them (the cosocket pool inside nginx).
local function check_pool(p, fname)
  if p == false then return nil end
  if p == nil or p == true then p = {} end
  if type(p) ~= "table" then misuse(fname, "pool: boolean or table expected") end
  local size, idle = p.size or 10, p.idle_timeout or 30
  if type(size) ~= "number" or size < 1 or size % 1 ~= 0 then misuse(fname, "pool.size: positive integer expected") end
  if type(idle) ~= "number" or idle <= 0 then misuse(fname, "pool.idle_timeout: positive number expected") end
  return { size = size, idle_timeout = idle }
end

-- Connection options -> a validated config, or nil, err. Raises on misuse.
local function connect_config(opts, fname)
  if type(opts) ~= "table" then misuse(fname, "options table expected") end
  if type(opts.server) ~= "string" or opts.server == "" then misuse(fname, "server: host name expected") end
  if has_ctl(opts.server) or opts.server:find("%s") then return invalid("server: bad host name") end
  local tls = opts.tls == nil and "starttls" or opts.tls
  if PORTS[tls] == nil then misuse(fname, "tls: starttls, implicit, opportunistic or none") end
  local port = opts.port == nil and PORTS[tls] or tonumber(opts.port)
  if not port or port < 1 or port > 65535 or port % 1 ~= 0 then misuse(fname, "port: 1..65535") end
  local helo = opts.helo
  if helo == nil then helo = default_helo() else
    local ok, err = check_helo(helo); if not ok then return nil, err end
  end
  local ok, err = check_auth(opts.auth)
  if not ok then return nil, err end
  if opts.auth and tls == "none" and not opts.allow_plaintext_auth and not is_loopback_name(opts.server) then
    return invalid("auth over a plaintext connection: use TLS or allow_plaintext_auth = true")
  end
  local servername = opts.servername
  if servername ~= nil and type(servername) ~= "string" then
    misuse(fname, "servername: string expected")
  end
  if servername ~= nil and has_ctl(servername) then
    return invalid("servername: control character")
  end
  if opts.cafile ~= nil and type(opts.cafile) ~= "string" then misuse(fname, "cafile: string expected") end
  return {
    server = opts.server, port = port, tls = tls, helo = helo, auth = opts.auth,
    verify = opts.verify ~= false, cafile = opts.cafile,
    servername = servername or (opts.server:gsub("^%[(.*)%]$", "%1")),
    timeouts = check_timeouts(opts.timeout),
    allow_plaintext_auth = opts.allow_plaintext_auth == true,
    chunking = opts.chunking ~= false,
    pipelining = opts.pipelining ~= false,
    nameservers = opts.nameservers,
    transport = opts.transport,
    pool = check_pool(opts.pool, fname),
  }
end

-- ---- message sources ---------------------------------------------------------------------

local function is_message(m)
  return (type(m) == "table" or type(m) == "userdata") and type(m.source) == "function"
end

-- The header section of a raw message (for Message-ID and the SMTPUTF8 decision): up to the
-- first empty line, at most 16 KB. Plain finds: this runs once per message.
local function headers_of(s)
  local a = s:find("\n\r\n", 1, true)
  if a then
    -- a bare "\n\n" can only end the headers earlier: look for it in that prefix only, not
    -- through the whole body
    local h = s:sub(1, a)
    local b = h:find("\n\n", 1, true)
    return b and h:sub(1, b) or h
  end
  local b = s:find("\n\n", 1, true)
  if b then return s:sub(1, b) end
  return #s > 16384 and s:sub(1, 16384) or s
end

-- The Message-ID in a header section (from headers_of).
local function message_id_in(h)
  if not (h:find("essage-", 1, true) or h:find("ESSAGE-", 1, true)) then return nil end
  return h:match("\n[Mm][Ee][Ss][Ss][Aa][Gg][Ee]%-[Ii][Dd]:%s*(<[^>\r\n]*>)") or
    h:match("^[Mm][Ee][Ss][Ss][Aa][Gg][Ee]%-[Ii][Dd]:%s*(<[^>\r\n]*>)")
end

local function message_id_of(chunk)
  return message_id_in(headers_of(chunk))
end

-- -> iterator of chunks, size or nil
local function source_of(m)
  local t = type(m)
  if t == "string" then
    local pos, n = 1, #m
    -- a big string goes out in slices: BDAT chunks of BDAT_CHUNK, and no copy of the whole
    -- message in the engine's output buffer
    return function()
      if pos > n then return nil end
      if pos == 1 and n <= STRING_SLICE then
        pos = n + 1
        return m
      end
      local s = m:sub(pos, pos + STRING_SLICE - 1)
      pos = pos + STRING_SLICE
      return s
    end, n
  elseif io.type(m) == "file" then
    local size
    local here = m:seek()
    if here then
      local last = m:seek("end")
      if last then size = last - here end
      m:seek("set", here)
    end
    return function()
      local d, err = m:read(FILE_READ)
      if d == nil and err then error(err, 0) end  -- a read error must not end the message early
      return d
    end, size
  elseif t == "function" then
    return m, nil
  elseif is_message(m) then
    return m:source(), nil
  end
end

local function to_list(v, fname, what)
  if v == nil then return nil end
  if type(v) == "string" then return { v } end
  if type(v) ~= "table" then misuse(fname, what .. ": string or list expected") end
  local out = {}
  for i, a in ipairs(v) do out[i] = a end
  return out
end

-- Message options -> a transaction description, or nil, err. Raises on misuse.
local function message_config(opts, fname)
  if type(opts) ~= "table" then misuse(fname, "options table expected") end
  local m = opts.message
  local mt = type(m)
  if not (mt == "string" or mt == "function" or io.type(m) == "file" or is_message(m)) then
    misuse(fname, "message: string, file, function or smtp.message expected")
  end
  local from, to = opts.from, to_list(opts.to, fname, "to")
  local needs_utf8, head = false, nil
  if is_message(m) then
    if (from == nil or to == nil) and type(m.envelope) == "function" then
      local ef, et = m:envelope()
      if from == nil then from = ef end
      if to == nil then to = to_list(et, fname, "to") end
    end
    if type(m.needs) == "function" then
      local n = m:needs()
      needs_utf8 = type(n) == "table" and n.smtputf8 == true
    end
  elseif mt == "string" then
    head = headers_of(m)
    needs_utf8 = non_ascii(head)
  end
  if from == nil then return invalid("from: no envelope sender (give from = ...)") end
  if type(from) ~= "string" then misuse(fname, "from: string expected") end
  local ok, err = check_address(from, "from", true)
  if not ok then return nil, err end
  if to == nil or #to == 0 then return invalid("to: no recipients") end
  for _, r in ipairs(to) do
    if type(r) ~= "string" then misuse(fname, "to: strings expected") end
    ok, err = check_address(r, "to")
    if not ok then return nil, err end
    if non_ascii(r) then needs_utf8 = true end
  end
  if non_ascii(from) then needs_utf8 = true end
  local dsn
  dsn, err = check_dsn(opts.dsn)
  if not dsn then return nil, err end
  return { message = m, from = from, to = to, dsn = opts.dsn and dsn or nil, smtputf8 = needs_utf8,
    head = head }
end

-- ---- the session ---------------------------------------------------------------------------

local Conn = { __name = "smtp.connection" }
Conn.__index = Conn

local function new_error(t)
  return errors.new(t)
end

-- Closes the socket at once (timeouts, protocol errors, 421): no QUIT.
function Conn:_abort()
  if self.sock then self.sock:close() end
  self.sock = nil
  self.dead = true
end

local function reply_error(kind, r, phase, extra)
  local t = extra or {}
  t.kind, t.code, t.enhanced, t.text, t.phase = kind, r.code, r.enhanced, r.text, phase
  return new_error(t)
end

-- A transport failure, with the phase it happened in. The session is over.
function Conn:_io_error(err, phase)
  self:_abort()
  local t = { phase = phase }
  if type(err) == "table" then
    for k, v in pairs(err) do t[k] = v end
  else
    t.kind, t.text = "closed", tostring(err)
  end
  t.phase = phase
  if t.kind == "closed" then t.temporary = true end
  if t.kind == "timeout" then t.temporary = true end
  return nil, errors.new(t)
end

function Conn:_write(data, phase)
  if data == "" then return true end
  local ok, err = self.sock:write(data, self.timeouts[phase])
  if not ok then return self:_io_error(err, phase) end
  return true
end

-- Writes whatever the engine has to say (pipelined commands, SASL answers, body bytes): on the
-- native transport straight from the engine's buffer, elsewhere as a string.
function Conn:_flush(phase)
  local e = self.engine
  if e:outlen() == 0 then return true end
  local sock = self.sock
  if sock.write_engine then
    local ok, err = sock:write_engine(e, self.timeouts[phase])
    if not ok then return self:_io_error(err, phase) end
    return true
  end
  return self:_write(e:take(), phase)
end

-- The next reply, in order; 421 and protocol errors end the session here.
function Conn:_reply(phase)
  local e = self.engine
  local limit, deadline
  while true do
    local r, perr = e:reply()
    if r then
      if r.code == 421 and r.command ~= "QUIT" then
        self:_abort()
        return nil, reply_error("closed", r, phase, { temporary = true })
      end
      return r
    end
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
      deadline = now and now() + limit
      t = limit
    else
      t = deadline and deadline - now() or limit
      if t <= 0 then
        self:_abort()
        return nil, new_error { kind = "timeout", text = phase .. " timed out", phase = phase, temporary = true }
      end
    end
    local data, rerr = self.sock:read(t)
    if not data then return self:_io_error(rerr, phase) end
    ok, perr = e:feed(data)
    if not ok then
      self:_abort()
      return nil, new_error { kind = "protocol", text = perr, phase = phase, temporary = false }
    end
  end
end

local function alive(self, fname)
  if getmetatable(self) ~= Conn then error("bad self to '" .. fname .. "' (smtp connection expected)", 3) end
  if self.dead or not self.sock then
    return nil, new_error { kind = "closed", text = "the session is closed", temporary = true, phase = fname }
  end
  return true
end

local function command(self, phase, fn, ...)
  local ok, err = fn(self.engine, ...)
  if not ok then return invalid(err) end
  ok, err = self:_flush(phase)
  if not ok then return nil, err end
  return self:_reply(phase)
end

local function parse_auth_list(ext)
  local offered = {}
  local v = ext and ext.AUTH
  if v then for m in v:gmatch("%S+") do offered[m:upper()] = true end end
  return offered
end

-- EHLO (HELO when EHLO is refused): the extensions table.
function Conn:_hello()
  self._info = nil
  local r, err = command(self, "ehlo", self.engine.ehlo, self.cfg.helo)
  if not r then return nil, err end
  if r.code >= 500 and r.code <= 502 then
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

function Conn:_starttls()
  local cfg = self.cfg
  local r, err = command(self, "tls", self.engine.starttls)
  if not r then return nil, err end
  if r.code ~= 220 then
    return nil, reply_error("tls", r, "tls")
  end
  -- Anything the server sent with or after its 220 was read before the handshake: a man in the
  -- middle could have put it there (STARTTLS response injection). Drop it and end the session.
  local dropped = self.engine:upgrade()
  if dropped > 0 then
    self:_abort()
    return nil, new_error { kind = "tls", phase = "tls", temporary = false,
      text = ("the server sent %d bytes after its STARTTLS 220 (response injection?)"):format(dropped) }
  end
  local ok, terr = self.sock:starttls { servername = cfg.servername, verify = cfg.verify,
    cafile = cfg.cafile, timeout = cfg.timeouts.tls }
  if not ok then
    self:_abort()
    local t = { kind = "tls", phase = "tls", temporary = false,
      text = type(terr) == "table" and terr.text or tostring(terr) }
    return nil, new_error(t)
  end
  self.tls = true
  return self:_hello()
end

-- The secret for one AUTH attempt (a token function is called for a fresh token each time).
local function secret_of(a)
  if a.password then return a.password end
  if type(a.token) == "function" then
    local ok, tok = pcall(a.token)
    if ok and type(tok) == "string" and has_ctl(tok) then
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
  if not r then return nil, err end
  if r.code ~= 235 then
    self:quit()
    return nil, reply_error("auth", r, "auth")
  end
  self.auth_mechanism = mech
  self._info = nil
  return true
end

-- Inside nginx (a transport with acquire): an idle session of the same server, TLS mode and
-- credentials from the cosocket pool, checked with RSET ("reused"), or a fresh connection in
-- self.sock that still needs greeting, EHLO, STARTTLS and AUTH (true).
function Conn:_acquire(transport)
  local cfg = self.cfg
  local a = cfg.auth or {}
  self.pool_key = transport.pool_key { server = cfg.server, port = cfg.port, tls = cfg.tls,
    verify = cfg.verify, servername = cfg.servername, helo = cfg.helo,
    user = a.user, password = a.password, token = a.token }
  local sock, state = transport.acquire({ host = cfg.server, port = cfg.port,
      timeout = cfg.timeouts.connect, nameservers = cfg.nameservers,
      pool = self.pool_key, pool_size = cfg.pool.size },
    function(s)
      -- A new engine told it had its greeting, so RSET is the next command; a short wait, since
      -- a stale session should cost little.
      local e = core.client_engine()
      e:feed("220 pooled session\r\n")
      e:reply()
      self.sock, self.engine, self.dead = s, e, false
      local saved = self.timeouts
      self.timeouts = { mail = math.min(saved.mail, saved.connect) }
      local r = command(self, "mail", e.rset)
      self.timeouts = saved
      return r ~= nil and r.code == 250
    end)
  if not sock then return nil, state end
  self.sock, self.dead = sock, false
  local info = sock:info()
  self.address = info.address
  self.loopback = is_loopback_name(info.address or cfg.server)
  if state then
    self.ext, self.tls, self.auth_mechanism = state.extensions, state.tls, state.auth
    return "reused"
  end
  self.engine = core.client_engine()
  return true
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
  local sock, err
  if cfg.pool and transport.acquire and self.pooling then
    local got
    got, err = self:_acquire(transport)
    if not got then
      if errors.is(err) then err.phase = err.phase or "connect"; return nil, err end
      return nil, new_error { kind = "connect", text = tostring(err), phase = "connect" }
    end
    if got == "reused" then return true end
    sock = self.sock
  else
    sock, err = transport.connect { host = cfg.server, port = cfg.port,
      timeout = cfg.timeouts.connect, nameservers = cfg.nameservers }
  end
  if not sock then
    if errors.is(err) then err.phase = err.phase or "connect"; return nil, err end
    return nil, new_error { kind = "connect", text = tostring(err), phase = "connect" }
  end
  self.sock = sock
  local info = sock.info and sock:info() or {}
  self.address = info.address
  self.loopback = is_loopback_name(info.address or cfg.server)
  if cfg.tls == "implicit" then
    local ok, terr = sock:starttls { servername = cfg.servername, verify = cfg.verify,
      cafile = cfg.cafile, timeout = cfg.timeouts.tls }
    if not ok then
      self:_abort()
      return nil, new_error { kind = "tls", phase = "tls", temporary = false,
        text = type(terr) == "table" and terr.text or tostring(terr) }
    end
    self.tls = true
  end
  local r
  r, err = self:_reply("greeting")
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
  return true
end

-- smtp.connect{...} -> conn | nil, err
function M.connect(opts)
  local cfg, err = connect_config(opts, "connect")
  if not cfg then return nil, err end
  local self = setmetatable({ cfg = cfg, timeouts = cfg.timeouts, engine = core.client_engine(), ext = {} }, Conn)
  local ok
  ok, err = self:_open()
  if not ok then self:_abort(); return nil, err end
  return self
end

function Conn:extensions()
  return self.ext
end

function Conn:info()
  if self._info then return self._info end
  local info = self.sock and self.sock.info and self.sock:info() or {}
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

local function params_string(p, fname)
  if p == nil then return nil end
  if type(p) == "string" then return p end
  if type(p) ~= "table" then misuse(fname, "params: string or table expected") end
  local keys, out = {}, {}
  for k in pairs(p) do keys[#keys + 1] = k end
  sort(keys)
  for _, k in ipairs(keys) do
    local v = p[k]
    out[#out + 1] = (v == true) and k or (k .. "=" .. tostring(v))
  end
  return concat(out, " ")
end

function Conn:mail(from, params)
  local ok, err = alive(self, "mail"); if not ok then return nil, err end
  ok, err = check_address(from, "from", true); if not ok then return nil, err end
  return command(self, "mail", self.engine.mail, from, params_string(params, "mail"))
end

function Conn:rcpt(to, params)
  local ok, err = alive(self, "rcpt"); if not ok then return nil, err end
  ok, err = check_address(to, "to"); if not ok then return nil, err end
  return command(self, "rcpt", self.engine.rcpt, to, params_string(params, "rcpt"))
end

function Conn:rset()
  local ok, err = alive(self, "rset"); if not ok then return nil, err end
  return command(self, "mail", self.engine.rset)
end

function Conn:noop()
  local ok, err = alive(self, "noop"); if not ok then return nil, err end
  return command(self, "mail", self.engine.noop)
end

-- Streams a body after DATA's 354; the last body bytes and the end-of-data go in one write.
function Conn:_body(src, keep)
  local e = self.engine
  local id, head = nil, true
  while true do
    local okc, chunk = pcall(src)
    if okc and chunk == nil then break end
    if not okc or type(chunk) ~= "string" then
      -- close without the end-of-data: the server must not take a truncated message
      self:_abort()
      return invalid(okc and ("message source gave a " .. type(chunk) .. " instead of a string")
        or ("message source failed: " .. tostring(chunk)))
    end
    if head then
      -- the Message-ID from the header section of the first chunk, for the result
      id = message_id_of(chunk)
      head = false
    end
    e:body(chunk)
    if e:outlen() >= WRITE_BATCH then
      local ok, err = self:_flush("data_block")
      if not ok then return nil, err end
    end
  end
  e:body_end()
  if keep then return true, id end  -- the caller adds the next commands to this write
  local ok, err = self:_flush("data_block")
  if not ok then return nil, err end
  return true, id
end

function Conn:data(source)
  local ok, err = alive(self, "data"); if not ok then return nil, err end
  local src = source_of(source)
  if not src then misuse("data", "source: string, file, function or smtp.message expected") end
  local r
  r, err = command(self, "data", self.engine.data)
  if not r then return nil, err end
  if r.code ~= 354 then return r end
  ok, err = self:_body(src)
  if not ok then return nil, err end
  return self:_reply("data_end")
end

function Conn:quit()
  if self.dead or not self.sock then self.dead = true; return true end
  if self.engine:state() == "ready" or self.engine:state() == "greeting" then
    self.engine:quit()
    local ok = self:_flush("quit")
    if ok then self:_reply("quit") end
  end
  self:_abort()
  return true
end

function Conn:close()
  if getmetatable(self) ~= Conn then error("bad self to 'close' (smtp connection expected)", 2) end
  return self:quit()
end
Conn.__close = function(self) self:close() end
Conn.__gc = function(self) if self.sock then self.sock:close() end end

local function entry(addr, r)
  return { recipient = addr, code = r.code, enhanced = r.enhanced, text = r.text }
end

-- RSET after a failed transaction keeps the session usable.
function Conn:_reset()
  if self.dead then return end
  local r = command(self, "mail", self.engine.rset)
  if r and r.code ~= 250 then self:_abort() end
end

-- BDAT chunks of about BDAT_CHUNK bytes, CRLF-normalized in C into the stuffer's own buffer, so
-- no Lua string is made of them. next() reads the source until a chunk is full and returns its
-- size and whether it is the last (one source chunk is read ahead to know), and on its first call
-- also the first source chunk (for the Message-ID); e:bdat_from(st, last) then queues the chunk.
local function bdat_chunks(src)
  local st = core.stuffer(false)
  local function read()
    local c = src()
    if c ~= nil and type(c) ~= "string" then
      error("message source gave a " .. type(c) .. " instead of a string", 0)
    end
    return c
  end
  local ahead, started
  return st, function()
    local first
    if not started then
      started = true
      ahead = read()
      first = ahead
    end
    local n = 0
    while ahead ~= nil and n < BDAT_CHUNK do
      n = st:add(ahead)
      ahead = read()
    end
    if ahead == nil then return st:add_end(), true, first end
    return n, false, first
  end
end

-- Queues the chunk the stuffer holds after whatever commands the engine has, and writes them all
-- (a small message goes in the same write as MAIL and RCPT).
function Conn:_bdat_chunk(st, last)
  self.engine:bdat_from(st, last)
  return self:_flush("data_block")
end

-- One transaction; `tx` comes from message_config.
-- MAIL parameters for one transaction (SIZE, BODY, SMTPUTF8, DSN RET/ENVID), or nil, err for
-- what the server cannot take (SMTPUTF8 missing, over its SIZE): refused before any byte.
function Conn:_mail_params(tx, size)
  local ext = self.ext
  if not tx.smtputf8 and not tx.dsn and size then
    -- the common case, once per message in send_many: SIZE and BODY only, the limit parsed once
    -- per EHLO
    if self._mp_ext ~= ext then
      self._mp_ext = ext
      self._mp_limit = ext.SIZE and (tonumber(ext.SIZE:match("^%d+") or "") or false)
      self._mp_body = ext["8BITMIME"] and "BODY=8BITMIME" or nil
    end
    local limit, body = self._mp_limit, self._mp_body
    if limit == nil then return body or false, nil end
    if limit and limit > 0 and size > limit then
      return nil, new_error { kind = "rejected", code = 552, enhanced = "5.3.4", phase = "mail",
        temporary = false, text = ("message of %d bytes over the server's limit of %d"):format(size, limit) }
    end
    if body then return "SIZE=" .. size .. " " .. body, nil end
    return "SIZE=" .. size, nil
  end
  if tx.smtputf8 and not ext.SMTPUTF8 then
    return invalid("the message needs SMTPUTF8 (non-ASCII address or header) and the server does not offer it")
  end
  local mparams = {}
  if ext.SIZE then
    local limit = tonumber(ext.SIZE:match("^%d+"))
    if size then
      if limit and limit > 0 and size > limit then
        return nil, new_error { kind = "rejected", code = 552, enhanced = "5.3.4", phase = "mail",
          temporary = false, text = ("message of %d bytes over the server's limit of %d"):format(size, limit) }
      end
      mparams[#mparams + 1] = "SIZE=" .. size
    end
  end
  if ext["8BITMIME"] then mparams[#mparams + 1] = "BODY=8BITMIME" end
  if tx.smtputf8 then mparams[#mparams + 1] = "SMTPUTF8" end
  local dsn = tx.dsn and ext.DSN and tx.dsn
  if dsn then
    if dsn.ret then mparams[#mparams + 1] = "RET=" .. dsn.ret end
    if dsn.envid then mparams[#mparams + 1] = "ENVID=" .. dsn.envid end
  end
  return #mparams > 0 and concat(mparams, " ") or false, dsn
end

local function rcpt_params(dsn, rcpt)
  if not dsn then return nil end
  local rp = {}
  if dsn.notify then rp[#rp + 1] = "NOTIFY=" .. dsn.notify end
  if dsn.orcpt then
    if non_ascii(rcpt) then
      -- RFC 6533 utf-8-addr-unitext (SMTPUTF8 is in use for this address): UTF-8 as is,
      -- '+', '=', space and controls as \x{HEX}
      rp[#rp + 1] = "ORCPT=utf-8;" .. rcpt:gsub("[%z\1-\32+=\127]", function(c)
        return ("\\x{%X}"):format(c:byte())
      end)
    else
      rp[#rp + 1] = "ORCPT=rfc822;" .. xtext(rcpt)
    end
  end
  return #rp > 0 and concat(rp, " ") or nil
end

-- One transaction; `tx` comes from message_config.
function Conn:_transaction(tx)
  local ext, e = self.ext, self.engine
  local src, size = source_of(tx.message)
  local mp, dsn = self:_mail_params(tx, size)
  if mp == nil then return nil, dsn end
  local pipelining = ext.PIPELINING and self.cfg.pipelining
  local bdat = ext.CHUNKING and self.cfg.chunking
  local ok, err = e:mail(tx.from, mp or nil)
  if not ok then return invalid(err) end
  local function step(phase)
    if pipelining then return true end
    local fok, ferr = self:_flush(phase)
    if not fok then return nil, ferr end
    return true
  end
  -- Without PIPELINING each reply is awaited before the next command.
  local replies = {}
  local function await(phase)
    local r, rerr = self:_reply(phase)
    if not r then return nil, rerr end
    replies[#replies + 1] = r
    return r
  end
  if not pipelining then
    local fok, ferr = self:_flush("mail")
    if not fok then return nil, ferr end
    local r, rerr = await("mail")
    if not r then return nil, rerr end
    if r.code ~= 250 then
      self:_reset()
      return nil, reply_error("rejected", r, "mail")
    end
  end
  for _, rcpt in ipairs(tx.to) do
    ok, err = e:rcpt(rcpt, rcpt_params(dsn, rcpt))
    if not ok then return invalid(err) end
    if not pipelining then
      local fok, ferr = step("rcpt")
      if not fok then return nil, ferr end
      local r, rerr = await("rcpt")
      if not r then return nil, rerr end
    end
  end
  -- BDAT: the next chunk is staged in `st` (its LAST flag in plast) when `staged` is true
  local st, chunks, first, staged, plast
  local function stage()
    local pok, p, l, f = pcall(chunks)
    if not pok then return nil, p end
    staged, plast, first = true, l, first or f
    return true
  end
  if bdat then
    st, chunks = bdat_chunks(src)
    local sok, serr = stage()
    if not sok then self:_reset(); return invalid(tostring(serr)) end
  end
  -- The group ends with DATA, or with the first BDAT chunk (the whole message when it is small).
  local nwait = 0
  if pipelining then
    local fok, ferr
    if bdat then
      fok, ferr = self:_bdat_chunk(st, plast)
    else
      e:data()
      fok, ferr = self:_flush("mail")
    end
    if not fok then return nil, ferr end
    local r, rerr = await("mail")
    if not r then return nil, rerr end
    for _ = 1, #tx.to do
      r, rerr = await("rcpt")
      if not r then return nil, rerr end
    end
    nwait = 1
  end
  -- replies[1] is MAIL's, then one per recipient
  local mail_r = replies[1]
  local accepted, rejected = {}, {}
  for i, rcpt in ipairs(tx.to) do
    local r = replies[i + 1]
    if r and r.code >= 200 and r.code < 300 then accepted[#accepted + 1] = rcpt
    elseif r then rejected[#rejected + 1] = entry(rcpt, r) end
  end
  local function finish_failed(kind, r, phase, extra)
    local err2 = reply_error(kind, r, phase, extra)
    self:_reset()
    return nil, err2
  end
  if mail_r.code ~= 250 then
    if nwait == 1 then
      local dr, derr = await(bdat and "data_end" or "data")
      if not dr then return nil, derr end
      if not bdat and dr.code == 354 then
        e:body_end(); local f2, fe2 = self:_flush("data_block"); if not f2 then return nil, fe2 end
        local er, eerr = self:_reply("data_end"); if not er then return nil, eerr end
      end
    end
    return finish_failed("rejected", mail_r, "mail", { rejected = rejected })
  end
  local function all_rejected()
    local first = rejected[1]
    return nil, new_error { kind = "rejected", phase = "rcpt", code = first and first.code,
      enhanced = first and first.enhanced, text = first and first.text or "every recipient was rejected",
      rejected = rejected, temporary = first and first.code < 500 or false }
  end
  local id, final
  if bdat then
    -- With PIPELINING the next chunk goes out before the reply to the one before it (two chunks
    -- unanswered at most: RFC 3030 has the server discard chunks in flight after a failed one),
    -- so a big message does not wait a round trip per chunk.
    local window = pipelining and 2 or 1
    local lasts, head, tail = {}, 1, 0   -- the LAST flag of each chunk written, reply unread
    -- A source that fails mid-message: no LAST went out, so after the replies in flight a RSET
    -- drops what the server holds and the session stays usable.
    local function source_failed(why)
      for _ = head, tail do
        local r2, e2 = self:_reply("data_block")
        if not r2 then return nil, e2 end
      end
      self:_reset()
      return invalid(tostring(why))
    end
    id = message_id_of(first or "") or false
    if pipelining then
      tail = 1; lasts[1] = plast
      staged = false
      if not plast and #accepted > 0 then
        local sok, serr = stage()
        if not sok then return source_failed(serr) end
      end
    end
    while true do
      while staged and tail - head + 1 < window and #accepted > 0 do
        local fok, ferr = self:_bdat_chunk(st, plast)
        if not fok then return nil, ferr end
        tail = tail + 1; lasts[tail] = plast
        staged = false
        if not plast then
          local sok, serr = stage()
          if not sok then return source_failed(serr) end
        end
      end
      if tail < head then self:_reset(); return all_rejected() end  -- no recipient: nothing sent
      local was_last = lasts[head]; head = head + 1
      local r, rerr = self:_reply(was_last and "data_end" or "data_block")
      if not r then return nil, rerr end
      if r.code ~= 250 then
        for _ = head, tail do   -- the replies to chunks still in flight come first
          local r2, e2 = self:_reply("data_block")
          if not r2 then return nil, e2 end
        end
        if #accepted == 0 then self:_reset(); return all_rejected() end
        if was_last then return nil, reply_error("rejected", r, "data_end", { rejected = rejected }) end
        return finish_failed("rejected", r, "data", { rejected = rejected })
      end
      if was_last then final = r; break end
    end
  else
    if not pipelining then
      if #accepted == 0 then self:_reset(); return all_rejected() end
      e:data()
    end
    local dr, derr = await("data")
    if not dr then return nil, derr end
    if dr.code ~= 354 then
      if #accepted == 0 then self:_reset(); return all_rejected() end
      return finish_failed("rejected", dr, "data", { rejected = rejected })
    end
    if #accepted == 0 then
      -- a server that said 354 with no valid recipient: end the empty data, send nothing
      e:body_end()
      local fok, ferr = self:_flush("data_block"); if not fok then return nil, ferr end
      local er, eerr = self:_reply("data_end"); if not er then return nil, eerr end
      return all_rejected()
    end
    local bok
    bok, id = self:_body(src)
    if not bok then return nil, id end
    local r, rerr = self:_reply("data_end")
    if not r then return nil, rerr end
    if r.code ~= 250 then
      return nil, reply_error("rejected", r, "data_end", { rejected = rejected })
    end
    final = r
  end
  if #accepted == 0 then return all_rejected() end
  return {
    accepted = accepted, rejected = rejected,
    reply = { code = final.code, enhanced = final.enhanced, text = final.text },
    message_id = (is_message(tx.message) and tx.message.message_id) or id or nil,
    server = self:info(),
  }
end

-- conn:send{ message =, from =, to =, dsn = } -> result | nil, err
function Conn:send(opts)
  if getmetatable(self) ~= Conn then error("bad self to 'send' (smtp connection expected)", 2) end
  local tx, err = message_config(opts, "send")
  if not tx then return nil, err end
  local ok
  ok, err = alive(self, "send")
  if not ok then return nil, err end
  return self:_transaction(tx)
end

-- send_many with PIPELINING and CHUNKING: no 354 to wait for, so up to WINDOW transactions
-- (MAIL, RCPTs, BDAT n LAST with the message) are in flight at once, written together, and their
-- replies matched in order (RFC 2920: BDAT does not end a command group; RFC 3030). Every
-- transaction after the first starts with RSET: a transaction that fails after its MAIL was
-- accepted (every RCPT refused, BDAT refused) may leave that MAIL open on the server, and the next
-- MAIL would then get 503 while its RCPTs and data joined the failed envelope. RSET costs one
-- short line each way and no round trip. Messages that are not strings (or larger than one BDAT
-- chunk) go through _transaction once the window has drained.
local WINDOW, HALF_WINDOW = 32, 16
function Conn:_send_window(txs, out, n)
  local e = self.engine
  local q, qh, qt = {}, 1, 0     -- transactions in flight, oldest first
  local nxt, first, dirty = 1, true, false
  local function fail_all(err)
    for i = 1, n do out[i] = out[i] or err end
    return out
  end
  while true do
    -- fill the window
    local queued = false
    -- bounded by count and by bytes: up to 32 messages of 1 MB must not sit in memory at once
    while nxt <= n and qt - qh + 1 < WINDOW and e:outlen() < WRITE_BATCH do
      local i = nxt
      local tx = txs[i]
      local m = tx and tx.message
      if tx and not (type(m) == "string" and #m <= BDAT_CHUNK) then
        if qt >= qh then break end    -- drain first, then send it on its own
        nxt = nxt + 1
        if dirty then self:_reset() end
        first, dirty = false, false
        if self.dead then return fail_all(new_error { kind = "closed", text = "the session is closed",
          temporary = true, phase = "mail" }) end
        local res, err = self:_transaction(tx)
        out[i] = res or err
        if not res then
          if self.dead then return fail_all(err) end
          dirty = true
        end
      else
        nxt = nxt + 1
        if tx then
          local mp, dsn = self:_mail_params(tx, #m)
          if mp == nil then
            out[i] = dsn
          else
            local rset = not first
            if rset then e:rset() end
            first = false
            local st = { i = i, tx = tx, rset = rset, nrcpt = 0 }
            local ok, err = e:mail(tx.from, mp or nil)
            if ok then
              st.mail = true
              local to = tx.to
              for k = 1, #to do
                ok, err = e:rcpt(to[k], rcpt_params(dsn, to[k]))
                if not ok then break end
                st.nrcpt = k
              end
              if ok then ok, err = e:bdat_last(m) end
              if ok then st.bdat = true end
            end
            if not ok then
              -- the commands already queued still get replies; the message is refused here
              st.err = select(2, invalid(err))
            end
            qt = qt + 1; q[qt] = st
            queued = true
          end
        end
      end
    end
    if queued then
      local ok, err = self:_flush("mail")
      if not ok then return fail_all(err) end
    end
    if qt < qh then
      if nxt > n then
        -- the last transaction failed: a MAIL may still be open on the server (every RCPT
        -- refused); RSET so the next send starts clean, as _transaction does
        if dirty then self:_reset() end
        return out
      end
    else
      -- the oldest transaction's replies; refill once half the window is done
      local target = qh + HALF_WINDOW
      if nxt > n then target = qt + 1 end
      while qh <= qt and qh < target do
        local st = q[qh]
        q[qh] = nil
        qh = qh + 1
        local r, err
        if st.rset then
          r, err = self:_reply("mail")
          if not r then return fail_all(err) end
          if r.code ~= 250 then
            self:_abort()
            return fail_all(reply_error("closed", r, "mail", { temporary = true }))
          end
        end
        local mail_r
        if st.mail then
          mail_r, err = self:_reply("mail")
          if not mail_r then return fail_all(err) end
        end
        local to, accepted, rejected = st.tx.to, {}, {}
        for k = 1, st.nrcpt do
          r, err = self:_reply("rcpt")
          if not r then return fail_all(err) end
          if r.code >= 200 and r.code < 300 then accepted[#accepted + 1] = to[k]
          else rejected[#rejected + 1] = entry(to[k], r) end
        end
        local final
        if st.bdat then
          final, err = self:_reply("data_end")
          if not final then return fail_all(err) end
        end
        local m = st.tx.message
        if st.err then
          out[st.i] = st.err
          dirty = true
        elseif mail_r.code ~= 250 then
          out[st.i] = reply_error("rejected", mail_r, "mail", { rejected = rejected })
          dirty = true
        elseif #accepted == 0 then
          local f = rejected[1]
          out[st.i] = new_error { kind = "rejected", phase = "rcpt", code = f and f.code,
            enhanced = f and f.enhanced, text = f and f.text or "every recipient was rejected",
            rejected = rejected, temporary = f and f.code < 500 or false }
          dirty = true
        elseif final.code ~= 250 then
          out[st.i] = reply_error("rejected", final, "data_end", { rejected = rejected })
          dirty = true
        else
          out[st.i] = { accepted = accepted, rejected = rejected,
            reply = { code = final.code, enhanced = final.enhanced, text = final.text },
            message_id = message_id_of(m) or nil, server = self:info() }
          dirty = false
        end
      end
      if qh > qt then q, qh, qt = {}, 1, 0 end
    end
  end
end

-- conn:send_many{ opts1, opts2, ... } -> a list with, for each, the result conn:send would give
-- or its error (an smtp.errors table: check `.kind`). With PIPELINING (and no BDAT) the next
-- message's MAIL, RCPT and DATA go in the same write as the previous body's end-of-data, so a
-- message costs one round trip.
function Conn:send_many(list)
  if getmetatable(self) ~= Conn then error("bad self to 'send_many' (smtp connection expected)", 2) end
  if type(list) ~= "table" then error("bad argument #1 to 'send_many' (list expected)", 2) end
  local out, txs = {}, {}
  for i, o in ipairs(list) do
    local tx, err = message_config(o, "send_many")
    if tx then txs[i] = tx else out[i] = err end
  end
  local n = #list
  local ok, aerr = alive(self, "send")
  if not ok then
    for i = 1, n do out[i] = out[i] or aerr end
    return out
  end
  local ext, e = self.ext, self.engine
  if ext.PIPELINING and self.cfg.pipelining and ext.CHUNKING and self.cfg.chunking then
    return self:_send_window(txs, out, n)
  end
  if not (ext.PIPELINING and self.cfg.pipelining) then
    for i = 1, n do
      if txs[i] then
        local res, err = self:_transaction(txs[i])
        out[i] = res or err
      end
    end
    return out
  end
  -- what each queued command's reply means, in order: its kind, transaction and recipient, in
  -- three parallel arrays (no table per command)
  local qk, qs, qr, qn, head = {}, {}, {}, 0, 1
  local function push(kind, st, rcpt)
    qn = qn + 1
    qk[qn], qs[qn], qr[qn] = kind, st, rcpt or false
  end
  local nxt = 1
  local function queue_next()
    while nxt <= n do
      local i = nxt
      nxt = nxt + 1
      local tx = txs[i]
      if tx then
        local m, src, size = tx.message, nil, nil
        -- a string up to one write batch goes to the engine in one call (no source closure)
        if type(m) == "string" and #m <= WRITE_BATCH then size = #m else src, size = source_of(m) end
        local mp, dsn = self:_mail_params(tx, size)
        if mp == nil then
          out[i] = dsn
        else
          local st = { i = i, tx = tx, src = src, accepted = {}, rejected = {} }
          local mok, merr = e:mail(tx.from, mp or nil)
          if not mok then out[i] = select(2, invalid(merr)) else
            push("mail", st)
            for _, rcpt in ipairs(tx.to) do
              e:rcpt(rcpt, rcpt_params(dsn, rcpt))
              push("rcpt", st, rcpt)
            end
            e:data()
            push("data", st)
            return true
          end
        end
      end
    end
    return false
  end
  local function rejected_err(st)
    local first = st.rejected[1]
    return new_error { kind = "rejected", phase = "rcpt", code = first and first.code,
      enhanced = first and first.enhanced, text = first and first.text or "every recipient was rejected",
      rejected = st.rejected, temporary = first and first.code < 500 or false }
  end
  local phase_of = { mail = "mail", rcpt = "rcpt", data = "data", ["end"] = "data_end", rset = "mail" }
  queue_next()
  local fok, ferr = self:_flush("mail")
  if not fok then
    for i = 1, n do out[i] = out[i] or ferr end
    return out
  end
  while head <= qn do
    local kind, st, rcpt = qk[head], qs[head], qr[head]
    -- (entries are left in place: the arrays only grow, and nil holes would make them rehash)
    local r, err = self:_reply(phase_of[kind])
    if not r then
      for i = 1, n do out[i] = out[i] or err end
      return out
    end
    head = head + 1
    if kind == "mail" then
      st.mail = r
    elseif kind == "rcpt" then
      if r.code >= 200 and r.code < 300 then st.accepted[#st.accepted + 1] = rcpt
      else st.rejected[#st.rejected + 1] = entry(rcpt, r) end
    elseif kind == "data" then
      if r.code == 354 then
        if st.mail.code == 250 and #st.accepted > 0 then
          if st.src then
            local bok, id = self:_body(st.src, true)
            if not bok then
              for i = 1, n do out[i] = out[i] or id end
              return out
            end
            st.id = id
          else
            local m = st.tx.message
            e:body(m)
            e:body_end()
            st.id = message_id_in(st.tx.head)
          end
        else
          e:body_end()
          st.empty = true
        end
        push("end", st)
      else
        if st.mail.code ~= 250 then
          out[st.i] = reply_error("rejected", st.mail, "mail", { rejected = st.rejected })
        elseif #st.accepted == 0 then
          out[st.i] = rejected_err(st)
        else
          out[st.i] = reply_error("rejected", r, "data", { rejected = st.rejected })
        end
        e:rset()
        push("rset")
      end
      queue_next()
      fok, ferr = self:_flush("data_block")
      if not fok then
        for i = 1, n do out[i] = out[i] or ferr end
        return out
      end
    elseif kind == "end" then
      if st.empty or #st.accepted == 0 then
        out[st.i] = rejected_err(st)
      elseif r.code ~= 250 then
        out[st.i] = reply_error("rejected", r, "data_end", { rejected = st.rejected })
      else
        local m = st.tx.message
        out[st.i] = { accepted = st.accepted, rejected = st.rejected,
          reply = { code = r.code, enhanced = r.enhanced, text = r.text },
          message_id = (is_message(m) and m.message_id) or st.id or nil, server = self:info() }
      end
    elseif kind == "rset" then
      if r.code ~= 250 then
        self:_abort()
        local err2 = reply_error("closed", r, "mail", { temporary = true })
        for i = 1, n do out[i] = out[i] or err2 end
        return out
      end
    end
  end
  return out
end

-- smtp.send{...}: connect, one transaction, QUIT. Everything is checked before connecting.
function M.send(opts)
  local cfg, err = connect_config(opts, "send")
  if not cfg then return nil, err end
  local tx
  tx, err = message_config(opts, "send")
  if not tx then return nil, err end
  local conn = setmetatable({ cfg = cfg, timeouts = cfg.timeouts, engine = core.client_engine(), ext = {},
    pooling = true }, Conn)
  local ok
  ok, err = conn:_open()
  if not ok then conn:_abort(); return nil, err end
  local res
  res, err = conn:_transaction(tx)
  if not conn:_release() then conn:close() end
  return res, err
end

M.deliver = function(opts) return require("smtp.deliver").deliver(opts) end

-- For smtp.deliver and the command line: the same checks send() makes.
M._connect_config = connect_config
M._message_config = message_config

return M
