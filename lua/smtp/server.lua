-- smtp.server: a minimal, strict SMTP server over the C engine: one coroutine per connection in
-- smtp.loop, hooks that accept or reject, and message data streamed to on_message.
local core = require "smtp.core"
local errors = require "smtp.errors"
local check = require "smtp.check"

local M = {}

local DEFAULTS = {
  max_message_size = 25 * 1024 * 1024, max_recipients = 100, timeout = 300,
  max_connections = 1000, max_line = 512, max_errors = 10,
}

local function transport() return require "smtp.transport.native" end

local function loop() return require "smtp.loop" end

local function argerr(msg) error("bad argument #1 to 'listen' (" .. msg .. ")", 3) end

local function check_opts(o)
  if type(o) ~= "table" then argerr("table expected, got " .. type(o)) end
  for _, k in ipairs { "on_mail", "on_rcpt", "on_message", "auth" } do
    if o[k] ~= nil and type(o[k]) ~= "function" then argerr("option '" .. k .. "': function expected") end
  end
  for _, k in ipairs { "max_message_size", "max_recipients", "timeout", "max_connections", "max_line",
    "max_errors", "port" } do
    if o[k] ~= nil and type(o[k]) ~= "number" then argerr("option '" .. k .. "': number expected") end
  end
  if o.tls ~= nil and (type(o.tls) ~= "table" or type(o.tls.cert) ~= "string" or type(o.tls.key) ~= "string") then
    argerr("option 'tls': { cert = path, key = path } expected")
  end
  if o.hostname ~= nil and (type(o.hostname) ~= "string" or o.hostname:find("[%c%s]")) then
    argerr("option 'hostname': a name without spaces expected")
  end
end

-- A hook's answer: true | false, code, text (text may start with an enhanced code) |
-- false, code, enhanced, text.
local function verdict(default_code, default_enh, ok, code, a, b)
  if ok then return true end
  code = tonumber(code) or default_code
  -- a fraction would make the engine's integer check raise and drop the session without a reply
  if code < 400 or code > 599 or code % 1 ~= 0 then code = default_code end
  local enh, text
  if b ~= nil then
    enh, text = a, b
  elseif type(a) == "string" then
    enh, text = a:match("^(%d%.%d%d?%d?%.%d%d?%d?)%s+(.*)$")
    if not enh then text = a end
  end
  if enh and not tostring(enh):match("^[245]%.%d+%.%d+$") then enh = nil end
  if not enh then
    enh = (code >= 500 and "5" or "4") .. default_enh:sub(2)
  end
  text = text and tostring(text):gsub("[%c]", " ") or nil
  if text then text = text:sub(1, 400) end
  return false, code, enh, text
end

-- Session -----------------------------------------------------------------------------------

local Session = { __name = "smtp.server.session" }
Session.__index = Session
function Session:__tostring()
  return ("smtp.server.session (%s port %s)"):format(tostring(self.address), tostring(self.port))
end

local function closed_err(text)
  return errors.new { kind = "closed", text = text or "connection closed by client", temporary = true }
end

-- Runs one connection to the end. Everything the world does to it ends the session quietly.
local function run_session(srv, conn, ip, port)
  local o = srv.opts
  local eng = core.server_engine {
    hostname = srv.hostname, max_line = o.max_line, max_message_size = o.max_message_size,
    max_recipients = o.max_recipients, max_errors = o.max_errors,
    tls = srv.tls_ctx ~= nil and not srv.implicit, tls_active = srv.implicit,
    auth = o.auth ~= nil, auth_plaintext = srv.auth_plaintext, require_auth = o.require_auth,
    normalize = o.normalize_newlines, hook_mail = o.on_mail ~= nil, hook_rcpt = o.on_rcpt ~= nil,
  }
  local session = setmetatable({ address = ip, port = port, server = srv, tls = srv.implicit }, Session)
  local rec = { conn = conn, eng = eng, session = session }
  srv.sessions[rec] = true
  local timeout = o.timeout
  local dead = false       -- the connection is gone (closed, reset, timed out)
  local stash              -- an event the reader pulled that belongs to the main loop

  local function flush()
    local out = eng:output()
    if out and not dead then
      local ok = conn:write(out, timeout)
      if not ok then dead = true end
    end
    return not dead
  end

  -- Reads more client bytes into the engine; false when the session must end.
  local function fill()
    if not flush() then return false end
    if eng:closed() then return false end
    if srv.closing then
      eng:shutdown(421, "4.3.2", "Service shutting down")
      flush()
      return false
    end
    local space = eng:space()
    if space == 0 then return true end
    -- The transport's read_idle leaves the connection open on a timeout, so 421 can still go out.
    rec.idle = true
    local chunk, err = conn:read_idle(timeout, space, rec.full)
    rec.idle = false
    rec.full = chunk ~= nil and #chunk >= space
    if not chunk then
      if err.kind == "timeout" then
        eng:shutdown(421, "4.4.2", "Idle timeout, closing connection")
        flush()
      end
      dead = true
      return false
    end
    eng:feed(chunk)
    return true
  end

  local function refresh()
    session.helo = eng:helo()
    session.user = eng:user()
  end

  -- The message being read: its state lives here, not in per-message closures, so a message
  -- costs one reader table. `cur` is that reader; a reader kept past its message reads nothing.
  local cur, buf, ended, endcode, endtext, rerr

  -- Next data chunk of the current message from the engine, or nil at its end.
  local function pull()
    while not ended do
      local kind, a, b = eng:next()
      if kind == "data" then return a end
      if kind == "end" then
        ended, endcode, endtext = true, a, b
        return nil
      end
      if kind then -- the message was cut off by something else
        stash = { kind, a, b }
        ended, endcode, endtext = true, 451, "Transaction aborted"
        return nil
      end
      if a == "write" then
        if not flush() then
          ended = true
          rerr = closed_err()
          return nil
        end
      elseif not fill() then
        ended = true
        rerr = closed_err()
        return nil
      end
    end
  end

  local function read(reader, n)
    if n ~= nil and (type(n) ~= "number" or n < 1) then
      error("bad argument #1 to 'read' (positive number expected)", 2)
    end
    if reader ~= cur then return nil end
    if not buf then
      if ended then
        if rerr then return nil, rerr end
        if endcode then
          return nil, errors.new { kind = "rejected", code = endcode, text = endtext }
        end
        return nil
      end
      buf = pull()
      if not buf then return read(reader, n) end
    end
    local s = buf
    if n and #s > n then
      buf = s:sub(n + 1)
      s = s:sub(1, n)
    else
      buf = nil
    end
    return s
  end
  local reader_mt = { __name = "smtp.server.reader", __index = {
    read = read,
    chunks = function(self)
      return function()
        local s = read(self, 65536)
        return s
      end
    end,
  } }

  -- on_message with a reader that pulls from the connection as the hook reads.
  local function message()
    buf, ended, endcode, endtext, rerr = nil, false, nil, nil, nil
    local ok, r1, r2, r3, r4
    if o.on_message then
      local envelope = eng:envelope()
      cur = setmetatable({}, reader_mt)
      refresh()
      ok, r1, r2, r3, r4 = pcall(o.on_message, session, envelope, cur)
      cur = nil
    else
      ok, r1 = true, true
    end
    -- whatever the hook left: take the whole message in before replying
    buf = nil
    while not ended do pull() end
    if rerr or dead then return false end
    if endcode then return true end -- the engine refused it and replied already
    if not ok then
      srv:_log("on_message raised: " .. tostring(r1))
      eng:decide(false, 451, "4.3.0", "Error processing message, try again later")
    else
      eng:decide(verdict(554, "5.6.0", r1, r2, r3, r4))
    end
    return true
  end

  local function hook(fn, default_code, default_enh, ...)
    refresh()
    local ok, r1, r2, r3, r4 = pcall(fn, session, ...)
    if not ok then
      srv:_log("hook raised: " .. tostring(r1))
      eng:decide(false, 451, "4.3.0", "Temporary error, try again later")
    else
      eng:decide(verdict(default_code, default_enh, r1, r2, r3, r4))
    end
  end

  local ok, err = pcall(function()
    if srv.implicit then
      local tok = conn:tls_accept(srv.tls_ctx, timeout)
      if not tok then return end
    end
    while true do
      local kind, a, b, c
      if stash then
        kind, a, b = stash[1], stash[2], stash[3]
        stash = nil
      else
        kind, a, b, c = eng:next()
      end
      if not kind then
        if a == "write" then -- replies piled up: out they go before more input is taken
          if not flush() then break end
        elseif not fill() then
          break
        end
      elseif kind == "mail" then
        hook(o.on_mail, 550, "5.7.1", a, b)
      elseif kind == "rcpt" then
        hook(o.on_rcpt, 550, "5.1.1", a, b)
      elseif kind == "begin" then
        if not message() then break end
      elseif kind == "end" then
        -- a BDAT message aborted before any data was read: nothing to do
        if not a then eng:decide(true) end
      elseif kind == "auth" then
        refresh()
        local pok, res = pcall(o.auth, session, a, b, c)
        a, b, c = nil, nil, nil
        if not pok then
          srv:_log("auth callback raised: " .. tostring(res))
          eng:decide(false, 454, "4.7.0", "Temporary authentication failure")
        else
          eng:decide(res == true)
        end
      elseif kind == "starttls" then
        if not flush() then break end
        local tok = conn:tls_accept(srv.tls_ctx, timeout)
        if not tok then break end
        session.tls = true
      elseif kind == "close" then
        flush()
        break
      end
    end
  end)
  if not ok then srv:_log("session error: " .. tostring(err)) end
  srv.sessions[rec] = nil
  srv.active = srv.active - 1
  conn:close()
end

-- Server ------------------------------------------------------------------------------------

local Server = { __name = "smtp.server" }
Server.__index = Server

function Server:_log(msg)
  if self.opts.log then pcall(self.opts.log, msg) end
end

function Server:__tostring()
  return ("smtp.server (%s port %d%s)"):format(self.host, self.port, self.closed and ", closed" or "")
end

local function accept_loop(srv)
  local l = srv.listener
  while not srv.closed do
    local conn, ip, port = l:accept()
    if not conn then
      if srv.closed then break end
      loop().sleep(0.05) -- EMFILE and friends: do not spin
    elseif srv.active >= srv.opts.max_connections then
      conn:write("421 4.3.2 Too many connections, try again later\r\n", 5)
      conn:close()
    else
      srv.active = srv.active + 1
      loop().spawn(run_session, srv, conn, ip, port)
    end
  end
end

-- srv:serve(): inside smtp.loop it starts accepting as one more task and returns at once;
-- outside, it runs the loop until srv:close().
function Server:serve()
  if self.serving then return true end
  self.serving = true
  local lp = loop()
  lp.spawn(accept_loop, self)
  if not lp.current() then lp.run() end
  return true
end

-- srv:close(): stops accepting; sessions end with 421 at their next wait.
function Server:close()
  if self.closed then return true end
  self.closed, self.closing = true, true
  self.listener:close()
  for rec in pairs(self.sessions) do
    if rec.idle then
      -- waiting for the client: answer 421 now and close, which wakes the session's task
      rec.eng:shutdown(421, "4.3.2", "Service shutting down")
      local out = rec.eng:output()
      if out then rec.conn:write(out, 1) end
      rec.conn:close()
    end
  end
  return true
end

function M.listen(opts)
  check_opts(opts)
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do o[k] = v end
  local t = transport()
  local host = o.host or "127.0.0.1"
  local tls_ctx
  if o.tls then
    local err
    tls_ctx, err = t.tls_server_context { cert = o.tls.cert, key = o.tls.key }
    if not tls_ctx then
      return nil, errors.new { kind = "tls", text = "server certificate: " .. tostring(err and err.text), temporary = false }
    end
  end
  local l, err = t.listen { host = host, port = o.port or 0, backlog = o.backlog or 512 }
  if not l then return nil, err end
  local auth_plaintext = o.auth_plaintext
  if auth_plaintext == nil then auth_plaintext = check.is_loopback(host) end
  local srv = setmetatable({
    opts = o, listener = l, host = l.host or host, port = l.port,
    hostname = o.hostname or "localhost", tls_ctx = tls_ctx, implicit = (o.tls and o.tls.implicit) == true,
    auth_plaintext = auth_plaintext, sessions = {}, active = 0,
  }, Server)
  return srv
end

return M
