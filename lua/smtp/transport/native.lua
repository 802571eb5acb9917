-- smtp.transport.native: TCP (or Unix socket) and TLS connections on the C core, waiting through smtp.wait so the
-- same calls block, yield to smtp.loop or poll under cqueues. Engines talk to this shape only.
local core = require "smtp.core"
local wait = require "smtp.wait"
local loop = require "smtp.loop"
local errors = require "smtp.errors"
local argcheck_mod = require "smtp.argcheck"
local url = require "smtp.url"
local proxy_mod = require "smtp.proxy"

local M = { pooling = false }

local now = core.now
local park_fd, coyield = loop.park_fd, coroutine.yield
local DEFAULT_TIMEOUT = 30
local READ_MAX = 65536

local function fail(kind, text, extra)
  local t = extra or {}
  t.kind, t.text = kind, text
  return nil, errors.new(t)
end

-- Misuse raises Lua's standard message, the same words as smtp.transport.ngx.
local argcheck, optcheck, numcheck = argcheck_mod.arg, argcheck_mod.opt, argcheck_mod.num

-- Absolute deadline for a timeout in seconds (nil = the object's default; math.huge = none).
local function deadline_of(timeout, default)
  timeout = timeout or default
  if timeout == math.huge then return nil end
  return now() + timeout
end

local function is_ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  return a and tonumber(a) < 256 and tonumber(b) < 256 and tonumber(c) < 256 and tonumber(d) < 256
end

local function is_ip(s)
  return is_ipv4(s) or (s:find(":", 1, true) ~= nil and s:match("^%[?[%x:%.]+%]?$") ~= nil)
end
M.is_ip = is_ip

-- Names -> list of numeric addresses. smtp.dns (c-ares) when it is there.
local dns_mod
local function resolve(host, opts, deadline)
  if is_ip(host) then return { (host:gsub("^%[(.*)%]$", "%1")) } end
  if dns_mod == nil then
    local ok, m = pcall(require, "smtp.dns")
    if not ok and not tostring(m):find("module 'smtp.dns' not found", 1, true) then error(m, 0) end
    dns_mod = ok and type(m) == "table" and m.resolve and m or false
  end
  if dns_mod then
    local t = deadline and math.max(0.001, deadline - now()) or nil
    local addrs, err = dns_mod.resolve(host, { nameservers = opts.nameservers, timeout = t })
    if not addrs then
      if errors.is(err) then return nil, err end
      return fail("dns", host .. ": " .. tostring(err))
    end
    if #addrs == 0 then return fail("dns", host .. ": no address") end
    return addrs
  end
  if host:lower() == "localhost" then return { "127.0.0.1", "::1" } end
  return fail("dns", host .. ": cannot resolve names without smtp.dns")
end

-- The meaning of a C failure (msg, code) as an error kind.
local closed_codes = { ECONNRESET = true, EPIPE = true, ECONNABORTED = true, ENOTCONN = true }
local function io_fail(self, msg, code)
  local kind
  if msg == "closed" or closed_codes[code] then
    kind = "closed"
  elseif self._tls then
    kind = "tls"
  else
    kind = "closed"
  end
  return fail(kind, (msg == "closed" and "connection closed by peer" or msg), { errno = code })
end

-- Connection objects -------------------------------------------------------------------------

local Conn = { __name = "smtp.transport.native" }
Conn.__index = Conn

local function wrap(sock, address, port, host, timeout)
  return setmetatable({
    sock = sock, fd = sock:fd(), address = address, port = port, host = host,
    default_timeout = timeout or DEFAULT_TIMEOUT, _events = "r", _deadline = nil,
  }, Conn)
end

-- Waits for the socket as C asked ("wantread"/"wantwrite"); a timeout closes the connection.
local function await(self, want, deadline, what)
  local ev = want == "wantwrite" and "w" or "r"
  self._events, self._deadline = ev, deadline
  local ok, err = wait.fd(self.fd, ev, deadline)
  self._deadline = nil
  if ok then return true end
  if err == "timeout" then
    self:close()
    return fail("timeout", what .. " timed out")
  end
  return fail("closed", what .. ": connection closed")
end

function Conn:pollfd() return self.fd end
function Conn:events() return self._events end
function Conn:timeout()
  if not self._deadline then return nil end
  local t = self._deadline - now()
  return t > 0 and t or 0
end

local function check_conn(self, fname)
  if getmetatable(self) ~= Conn then error("bad self to '" .. fname .. "' (connection expected)", 3) end
  if not self.sock then return fail("closed", fname .. " on a closed connection") end
  return true
end

-- s:write(data, timeout) -> true | nil, err. The whole string, one syscall when the kernel takes it.
-- The deadline is only worked out when the kernel makes us wait (the usual write never does).
function Conn:write(data, timeout)
  local ok, err = check_conn(self, "write")
  if type(data) ~= "string" then argcheck(false, 1, "write", "string expected, got " .. type(data)) end
  numcheck(timeout, 2, "write")
  if not ok then return nil, err end
  local deadline, waited
  local i, n = 1, #data
  while i <= n do
    local put, e, code = self.sock:write(data, i)
    if put then
      i = i + put
    elseif e == "wantwrite" or e == "wantread" then
      if not waited then deadline, waited = deadline_of(timeout, self.default_timeout), true end
      local w, werr = await(self, e, deadline, "write")
      if not w then return nil, werr end
    else
      return io_fail(self, e, code)
    end
  end
  return true
end

-- s:write_idle(data, timeout) -> true | nil, err: write() for a server's replies, with no argument
-- checks (as read_idle: the server's hot path, one call per reply). The usual reply goes out in one
-- call of the socket; anything else (a short write, the kernel making us wait, a failure) is
-- left to write(), which picks up where this one stopped.
function Conn:write_idle(data, timeout)
  local sock = self.sock
  if sock then
    local put = sock:write(data)
    if put == #data then return true end
    if put and put > 0 then data = data:sub(put + 1) end
  end
  return self:write(data, timeout)
end

-- s:write_engine(engine, timeout) -> true | nil, err: everything a client engine has to send,
-- written from the engine's own buffer (no string is made of it); otherwise as write().
function Conn:write_engine(e, timeout)
  local ok, err = check_conn(self, "write_engine")
  if type(e) ~= "userdata" then argcheck(false, 1, "write_engine", "client engine expected, got " .. type(e)) end
  numcheck(timeout, 2, "write_engine")
  if not ok then return nil, err end
  local deadline, waited
  while e:outlen() > 0 do
    local put, er, code = e:write_to(self.sock)
    if not put then
      if er ~= "wantwrite" and er ~= "wantread" then return io_fail(self, er, code) end
      if not waited then deadline, waited = deadline_of(timeout, self.default_timeout), true end
      local w, werr = await(self, er, deadline, "write")
      if not w then return nil, werr end
    end
  end
  return true
end

local function maxcheck(max, fname)
  if max ~= nil and (type(max) ~= "number" or max < 1) then
    argcheck(false, 2, fname, "positive number expected, got "
      .. (type(max) == "number" and tostring(max) or type(max)))
  end
end

-- s:read(timeout [, max]) -> chunk | nil, err. Whatever has arrived, up to max bytes. A timeout
-- closes the connection (a client says no QUIT after one).
function Conn:read(timeout, max)
  local ok, err = check_conn(self, "read")
  numcheck(timeout, 1, "read")
  maxcheck(max, "read")
  if not ok then return nil, err end
  local deadline, waited
  max = max or READ_MAX
  while true do
    local chunk, e, code = self.sock:read(max)
    if chunk then return chunk end
    if e == "wantread" or e == "wantwrite" then
      if not waited then deadline, waited = deadline_of(timeout, self.default_timeout), true end
      local w, werr = await(self, e, deadline, "read")
      if not w then return nil, werr end
    else
      return io_fail(self, e, code)
    end
  end
end

local function idle_fail(werr)
  if werr == "timeout" then return fail("timeout", "read timed out") end
  return fail("closed", "read: connection closed")
end

-- s:read_idle(timeout [, max [, read_first [, cap [, engine]]]]) -> chunk | nil, err: read() for a server waiting on
-- its client. A timeout leaves the connection open, so the server can still say 421 before it
-- closes. After a reply the client has usually sent nothing yet, so it waits for readability
-- first and saves a read that would only say EAGAIN; `read_first` reads at once instead (after
-- a read that filled `max`, TLS may hold decrypted bytes no readiness event would announce).
-- It is the server's hot path (one call per chunk a client sends, several per message), so it
-- checks no arguments: three type checks here cost 4% of the server's instructions per message
-- (callgrind, smtp-source with 4 KB messages). Nor does it keep the _events/_deadline of cqueues polling: a server
-- connection is never handed to cqueues.poll. `cap` (on smtp.core.now's clock) ends the wait
-- sooner than the timeout would: the server's session, command and data deadlines. With `engine`
-- (a server engine) the bytes go straight into it (engine:recv) and their count is returned
-- instead of a string.
function Conn:read_idle(timeout, max, read_first, cap, engine)
  local sock, fd = self.sock, self.fd
  if not sock then return fail("closed", "read_idle on a closed connection") end
  -- `timeout` becomes the deadline: no local more (a slot in every idle session's stack)
  timeout = now() + timeout
  if cap and cap < timeout then timeout = cap end
  if not read_first then
    -- smtp.wait.fd written out for the loop task (its frame is 36 of the ~660 Lua VM
    -- instructions a message costs the server); elsewhere wait.fd waits as usual
    local ok, werr = park_fd(fd, "r", timeout)
    if ok == 0 then
      ok, werr = coyield()
    elseif ok == false then
      ok, werr = wait.fd(fd, "r", timeout)
    end
    if not ok then return idle_fail(werr) end
    sock = self.sock
    if not sock then return fail("closed", "read: connection closed") end
  end
  max = max or READ_MAX
  while true do
    local chunk, e, code
    if engine then chunk, e, code = engine:recv(sock, max) else chunk, e, code = sock:read(max) end
    if chunk then return chunk end
    if e == "wantread" or e == "wantwrite" then
      local ok, werr = wait.fd(fd, e == "wantread" and "r" or "w", timeout)
      if not ok then return idle_fail(werr) end
      if not self.sock then return fail("closed", "read: connection closed") end
    else
      return io_fail(self, e, code)
    end
  end
end

-- TLS ---------------------------------------------------------------------------------------

-- Client contexts are costly to build (the system trust store is parsed each time), so one per
-- distinct set of options is kept for the life of the process.
local client_ctx_cache = {}

local function ctx_options_check(o, fname)
  for _, k in ipairs { "cafile", "capath", "min_version", "max_version", "ciphers", "cert", "key" } do
    optcheck(o[k], "string", fname, k)
  end
  optcheck(o.verify, "boolean", fname, "verify")
end

-- t.tls_client_context{ verify=true, cafile=, capath=, min_version=, max_version=, ciphers= }
function M.tls_client_context(o)
  argcheck(type(o) == "table", 1, "tls_client_context", "table expected, got " .. type(o))
  ctx_options_check(o, "tls_client_context")
  local verify = o.verify ~= false
  local key = table.concat({ tostring(verify), o.cafile or "", o.capath or "", o.min_version or "",
    o.max_version or "", o.ciphers or "", o.cert or "", o.key or "" }, "\0")
  local ctx = client_ctx_cache[key]
  if ctx then return ctx end
  local err
  ctx, err = core.tls_context { mode = "client", verify = verify, cafile = o.cafile, capath = o.capath,
    min_version = o.min_version, max_version = o.max_version, ciphers = o.ciphers, cert = o.cert, key = o.key }
  if not ctx then return fail("tls", err) end
  client_ctx_cache[key] = ctx
  return ctx
end

-- t.tls_server_context{ cert=, key=, min_version=, max_version=, ciphers=, ticket_rotation=3600 }
-- -> ctx | nil, err. Session tickets are sealed with keys of this context that rotate every
-- ticket_rotation seconds (0: only on ctx:rotate_ticket_key()), the previous key still opening.
function M.tls_server_context(o)
  argcheck(type(o) == "table", 1, "tls_server_context", "table expected, got " .. type(o))
  ctx_options_check(o, "tls_server_context")
  argcheck(type(o.cert) == "string", 1, "tls_server_context", "option 'cert': string expected, got " .. type(o.cert))
  argcheck(type(o.key) == "string", 1, "tls_server_context", "option 'key': string expected, got " .. type(o.key))
  optcheck(o.ticket_rotation, "number", "tls_server_context", "ticket_rotation")
  local ctx, err = core.tls_context { mode = "server", verify = o.verify, cafile = o.cafile,
    capath = o.capath, cert = o.cert, key = o.key, min_version = o.min_version,
    max_version = o.max_version, ciphers = o.ciphers, ticket_rotation = o.ticket_rotation }
  if not ctx then return fail("tls", err) end
  return ctx
end

local function handshake(self, ctx, name, verify_name, timeout, what, dane, skey)
  local deadline = deadline_of(timeout, self.default_timeout)
  self._tls = true
  local ok, e = self.sock:tls_start(ctx, name, verify_name, skey)
  if ok and dane then ok, e = self.sock:tls_dane(dane.base, dane.tlsa, dane.names) end
  if not ok then self:close(); return fail("tls", e, { phase = "tls" }) end
  while true do
    local done, msg, code = self.sock:tls_handshake()
    if done then
      loop.release_memory_later()
      return true
    end
    if msg == "wantread" or msg == "wantwrite" then
      local w, werr = await(self, msg, deadline, what)
      if not w then werr.phase = "tls"; return nil, werr end
    else
      self:close()
      return fail("tls", msg, { reason = code, phase = "tls" })
    end
  end
end

-- s:starttls{ servername=, verify=true, verify_name=true, cafile=, capath=, timeout=,
-- min_version=, ctx=, session_cache=true }
-- Client side of implicit TLS and of STARTTLS. The certificate is checked against servername,
-- else the host connected to (an IP address as an IP address); verify_name = false checks the
-- chain only. This transport keeps no read buffer, so there is nothing to drop here; the engine
-- must drop the plaintext bytes it had buffered (RFC 3207 §4). On failure the connection is closed.
function Conn:starttls(o)
  o = o or {}
  argcheck(type(o) == "table", 1, "starttls", "table expected, got " .. type(o))
  optcheck(o.servername, "string", "starttls", "servername")
  optcheck(o.timeout, "number", "starttls", "timeout")
  optcheck(o.verify, "boolean", "starttls", "verify")
  optcheck(o.verify_name, "boolean", "starttls", "verify_name")
  optcheck(o.session_cache, "boolean", "starttls", "session_cache")
  local ok, err = check_conn(self, "starttls")
  if not ok then return nil, err end
  if self._tls then error("starttls: TLS is already on for this connection", 2) end
  local name = o.servername
  if name == nil then
    name = self.host or self.address
    name = name and (name:gsub("^%[(.*)%]$", "%1"))
  end
  -- An empty name would switch the name check off in OpenSSL (a blank setting must not).
  if name ~= nil and (name == "" or name:find("%z")) then
    self:close()
    return errors.invalid("starttls: servername is empty or holds a NUL", { phase = "tls" })
  end
  local ctx = o.ctx
  if ctx == nil then
    ctx, err = M.tls_client_context(o)
    if not ctx then self:close(); err.phase = "tls"; return nil, err end
  end
  -- Sessions are resumed only with the server they came from: the context holds the
  -- verification settings, this key the name, port and name check. Never under DANE: its TLSA
  -- match is made on every handshake, and a resumed one would skip it.
  local skey
  if o.session_cache ~= false and not o.dane then
    skey = (name or self.address or "") .. " " .. tostring(self.port) .. " " ..
      (o.verify_name ~= false and "name" or "chain")
  end
  -- o.dane (smtp.dane): the chain must match these TLSA records instead of a CA and a name.
  return handshake(self, ctx, name, o.verify_name ~= false, o.timeout, "TLS handshake", o.dane, skey)
end

-- s:dane_info() -> the TLSA record that authenticated the server (sock:tls_dane_info()) or nil
function Conn:dane_info()
  return self.sock and self.sock:tls_dane_info() or nil
end

-- s:tls_accept(ctx, timeout) -> true | nil, err: server side, with a ctx from tls_server_context.
function Conn:tls_accept(ctx, timeout)
  argcheck(type(ctx) == "userdata", 1, "tls_accept", "TLS context expected, got " .. type(ctx))
  numcheck(timeout, 2, "tls_accept")
  local ok, err = check_conn(self, "tls_accept")
  if not ok then return nil, err end
  if self._tls then error("tls_accept: TLS is already on for this connection", 2) end
  return handshake(self, ctx, nil, nil, timeout, "TLS handshake")
end

-- Sends FIN: the peer reads end of stream, we can still read its answer.
function Conn:shutdown()
  if self.sock then return self.sock:shutdown_write() end
  return nil
end

-- s:info() -> { address=, port=, tls = false | "TLSv1.3", version = nil | "TLSv1.3", cipher=,
--              bits=, peer_subject=, peer_issuer=, verify_result=, resumed=, reused = 0 }
function Conn:info()
  local t = { address = self.address, port = self.port, tls = false, reused = 0, proxy = self.proxy }
  local ti = self._tls and self.sock and self.sock:tls_info()
  if ti then
    t.tls, t.version, t.cipher, t.bits = ti.version, ti.version, ti.cipher, ti.bits
    t.peer_subject, t.peer_issuer, t.verify_result = ti.peer_subject, ti.peer_issuer, ti.verify_result
    t.resumed = ti.resumed
  end
  return t
end

-- s:local_address() -> ip, port: this end of the connection (the server's side: the address a
-- client reached). nil when closed.
function Conn:local_address()
  if not self.sock then return nil end
  return self.sock:local_addr()
end

-- The pool calls of the transport contract. Native connections are never pooled (M.pooling is
-- false): each one is fresh and has no stored state, and keepalive closes it.
function Conn:reused() return 0 end
function Conn:state() return nil end
function Conn:keepalive()
  self:close()
  return nil, errors.new { kind = "closed", temporary = true,
    text = "native connections are not pooled; closed instead" }
end

function Conn:close()
  local s = self.sock
  if s then
    self.sock = nil
    wait.closing(self.fd)
    s:close()
  end
  return true
end

function Conn:__tostring()
  return ("smtp.transport.native (%s:%s%s%s)"):format(tostring(self.address), tostring(self.port),
    self._tls and ", tls" or "", self.sock and "" or ", closed")
end

local function check_port(port, fname, allow_zero)
  if port == nil then return nil end
  if type(port) ~= "number" then
    error(("bad argument #1 to '%s' (option 'port': number expected, got %s)"):format(fname, type(port)), 3)
  end
  if port ~= math.floor(port) or port < (allow_zero and 0 or 1) or port > 65535 then
    return nil
  end
  return port
end

-- One TCP connection to the first of `addrs` that answers, each address under a fair share of
-- what is left of the deadline, from the local address `bind` when given.
local function tcp_connect(addrs, port, bind, deadline, host, timeout)
  local last
  for i, addr in ipairs(addrs) do
    -- Each address gets a fair share of what is left, the last one all of it, so one
    -- black-holed address cannot eat the whole deadline.
    local left = #addrs - i + 1
    local d = deadline
    if deadline and left > 1 then d = now() + (deadline - now()) / left end
    local sock, msg, code
    if bind then sock, msg, code = core.connect_start(addr, port, bind.ip, bind.port)
    else sock, msg, code = core.connect_start(addr, port) end
    if sock then
      local conn = wrap(sock, addr, port, host, timeout)
      while true do
        local ok, e, c = sock:connect_finish()
        if ok then return conn end
        if e ~= "wantwrite" then
          conn:close()
          last = errors.new { kind = "connect", phase = "connect", text = ("%s port %d: %s"):format(addr, port, e), errno = c }
          break
        end
        conn._events, conn._deadline = "w", d
        local w, werr = wait.fd(conn.fd, "w", d)
        conn._deadline = nil
        if not w then
          conn:close()
          if werr == "timeout" then
            last = errors.new { kind = "timeout", phase = "connect",
              text = ("connect to %s port %d timed out"):format(addr, port) }
          else
            last = errors.new { kind = "connect", phase = "connect",
              text = ("%s port %d: %s"):format(addr, port, tostring(werr)) }
          end
          break
        end
      end
    elseif code == "EINVAL" and not bind then
      return errors.invalid(("connect: not a usable address: %s"):format(addr), { phase = "connect" })
    else
      last = errors.new { kind = "connect", phase = "connect", text = ("%s port %d: %s"):format(addr, port, msg),
        errno = code, temporary = code ~= "EADDRNOTAVAIL" and code ~= "EINVAL" }
    end
    if deadline and now() >= deadline then break end
  end
  return nil, last
end

-- With a local address to bind to, only the server's addresses of its family can be reached.
local function same_family(addrs, bind, host)
  if not bind then return addrs end
  local v6 = bind.ip:find(":", 1, true) ~= nil
  local out = {}
  for _, a in ipairs(addrs) do
    if (a:find(":", 1, true) ~= nil) == v6 then out[#out + 1] = a end
  end
  if #out == 0 then
    return fail("connect", ("%s has no %s address to reach from bind address %s"):format(host,
      v6 and "IPv6" or "IPv4", bind.ip), { phase = "connect", temporary = false })
  end
  return out
end

-- Drives a proxy handshake (smtp.proxy) over conn under the deadline.
local function run_handshake(conn, h, deadline)
  local function left() return deadline and math.max(0, deadline - now()) or math.huge end
  local function broken(err)
    conn:close()
    if err.kind ~= "timeout" then return h:closed() end
    local _, e = h:fail(("the %s handshake timed out"):format(h.proxy.kind == "socks5" and "SOCKS5" or "HTTP CONNECT"), true)
    e.kind = "timeout"
    return nil, e
  end
  while true do
    local out = h:output()
    if out then
      local ok, err = conn:write(out, left())
      if not ok then return broken(err) end
    end
    if h.done then return true end
    local chunk, err = conn:read(left(), h:want())
    if not chunk then return broken(err) end
    local ok, ferr = h:feed(chunk)
    if not ok then conn:close(); return nil, ferr end
  end
end

-- A connection through a proxy: to the proxy (from `bind`), then its handshake for host:port.
-- socks5:// resolves host here and tries its addresses in turn, each through a new proxy
-- connection; socks5h:// and http:// hand the name to the proxy.
local function proxy_connect(proxy, opts, host, port, bind, deadline, timeout)
  local paddrs, perr = resolve(proxy.host, opts, deadline)
  if not paddrs then perr.phase = perr.phase or "connect"; return nil, perr end
  paddrs, perr = same_family(paddrs, bind, proxy.host)
  if not paddrs then return nil, perr end
  local bare = host:gsub("^%[(.*)%]$", "%1")
  local targets = { bare }
  if proxy.kind == "socks5" and not proxy.remote_dns then
    local rerr
    targets, rerr = resolve(host, opts, deadline)
    if not targets then rerr.phase = rerr.phase or "connect"; return nil, rerr end
  end
  local last
  for i, target in ipairs(targets) do
    local left = #targets - i + 1
    local d = deadline
    if deadline and left > 1 then d = now() + (deadline - now()) / left end
    local conn, cerr = tcp_connect(paddrs, proxy.port, bind, d, host, timeout)
    if not conn then
      -- the proxy itself cannot be reached: another target would not help
      cerr.text = "proxy " .. cerr.text
      return nil, cerr
    end
    local h, herr = proxy_mod.new(proxy, target, port)
    local ok = h ~= nil
    if ok then ok, herr = run_handshake(conn, h, d) end
    if ok then
      conn.address, conn.port, conn.proxy = target, port, proxy.host .. ":" .. proxy.port
      return conn
    end
    conn:close()
    last = herr
    -- A refusal that another address cannot change ends the tries.
    if not herr.temporary then break end
    if deadline and now() >= deadline then break end
  end
  return nil, last
end

-- A connection to a Unix socket (an LMTP server's): info() gives the path as its address.
local function unix_connect(path, deadline, timeout)
  local sock, msg, code = core.connect_unix(path)
  if not sock then
    if code == "EINVAL" then return errors.invalid("connect: " .. msg .. ": " .. path, { phase = "connect" }) end
    return nil, errors.new { kind = "connect", phase = "connect", text = ("%s: %s"):format(path, msg),
      errno = code, temporary = code ~= "ENOENT" and code ~= "EACCES" and code ~= "ENOTSOCK" }
  end
  local conn = wrap(sock, path, nil, nil, timeout)
  while true do
    local ok, e, c = sock:connect_finish()
    if ok then return conn end
    if e ~= "wantwrite" then
      conn:close()
      return nil, errors.new { kind = "connect", phase = "connect", text = ("%s: %s"):format(path, e), errno = c }
    end
    conn._events, conn._deadline = "w", deadline
    local w, werr = wait.fd(conn.fd, "w", deadline)
    conn._deadline = nil
    if not w then
      conn:close()
      return nil, errors.new { kind = werr == "timeout" and "timeout" or "connect", phase = "connect",
        text = ("connect to %s %s"):format(path, werr == "timeout" and "timed out" or tostring(werr)) }
    end
  end
end

-- t.connect{ host=, port=, path=, timeout=, nameservers=, tls=, bind=, proxy= } -> conn | nil, err
-- bind: a local address ("192.0.2.1", "[::1]:2525") or url.bind's table; proxy: a proxy URL
-- (socks5://, socks5h://, http://) or url.proxy's table. path: a Unix socket to connect to
-- instead of host and port (bind and proxy do not go with it).
function M.connect(opts)
  argcheck(type(opts) == "table", 1, "connect", "table expected, got " .. type(opts))
  if opts.path ~= nil then
    argcheck(type(opts.path) == "string", 1, "connect", "option 'path': string expected, got " .. type(opts.path))
    optcheck(opts.timeout, "number", "connect", "timeout")
    if opts.bind ~= nil or opts.proxy ~= nil then
      return errors.invalid("connect: bind and proxy do not go with a Unix socket path", { phase = "connect" })
    end
    local conn, err = unix_connect(opts.path, deadline_of(opts.timeout, DEFAULT_TIMEOUT), opts.timeout)
    if not conn then return nil, err end
    if opts.tls then
      local tok, terr = conn:starttls(type(opts.tls) == "table" and opts.tls or opts)
      if not tok then return nil, terr end
    end
    return conn
  end
  local host, timeout = opts.host, opts.timeout
  argcheck(type(host) == "string", 1, "connect", "option 'host': string expected, got " .. type(host))
  optcheck(timeout, "number", "connect", "timeout")
  optcheck(opts.nameservers, "table", "connect", "nameservers")
  local bind, proxy = opts.bind, opts.proxy
  argcheck(bind == nil or type(bind) == "string" or type(bind) == "table", 1, "connect",
    "option 'bind': string expected, got " .. type(bind))
  argcheck(proxy == nil or type(proxy) == "string" or type(proxy) == "table", 1, "connect",
    "option 'proxy': string expected, got " .. type(proxy))
  if opts.port == nil then error("bad argument #1 to 'connect' (option 'port' missing)", 2) end
  local port = check_port(opts.port, "connect")
  local at_connect = { phase = "connect" }
  if not port then return errors.invalid("connect: port out of range: " .. tostring(opts.port), at_connect) end
  if host == "" then return errors.invalid("connect: empty host", at_connect) end
  if timeout and timeout < 0 then return errors.invalid("connect: negative timeout", at_connect) end
  local perr
  if type(bind) == "string" then
    bind, perr = url.bind(bind)
    if not bind then perr.phase = "connect"; return nil, perr end
  end
  if type(proxy) == "string" then
    proxy, perr = url.proxy(proxy)
    if not proxy then perr.phase = "connect"; return nil, perr end
  end
  local deadline = deadline_of(timeout, DEFAULT_TIMEOUT)

  local conn, err
  if proxy then
    conn, err = proxy_connect(proxy, opts, host, port, bind, deadline, timeout)
  else
    local addrs, rerr = resolve(host, opts, deadline)
    if not addrs then
      rerr.phase = rerr.phase or "connect"
      return nil, rerr
    end
    addrs, rerr = same_family(addrs, bind, host)
    if not addrs then return nil, rerr end
    conn, err = tcp_connect(addrs, port, bind, deadline, host, timeout)
  end
  if not conn then return nil, err end
  if opts.tls then
    local tok, terr = conn:starttls(type(opts.tls) == "table" and opts.tls or opts)
    if not tok then return nil, terr end
  end
  return conn
end

-- Listeners ---------------------------------------------------------------------------------

local Listener = { __name = "smtp.transport.native.listener" }
Listener.__index = Listener

-- t.listen{ host=, port=, backlog= } -> listener (l.port is the bound port) | nil, err
-- t.listen{ path=, backlog= }: on a Unix socket (l.path; l.port is 0; the socket file is
-- removed when the listener closes)
function M.listen(opts)
  argcheck(type(opts) == "table", 1, "listen", "table expected, got " .. type(opts))
  if opts.path ~= nil then
    argcheck(type(opts.path) == "string", 1, "listen", "option 'path': string expected, got " .. type(opts.path))
    optcheck(opts.backlog, "number", "listen", "backlog")
    local l, msg, code = core.listen_unix(opts.path, opts.backlog or 128)
    if not l then
      if code == "EINVAL" then return errors.invalid("listen: " .. msg .. ": " .. opts.path) end
      return fail("connect", ("listen on %s: %s"):format(opts.path, msg), { errno = code })
    end
    return setmetatable({ l = l, fd = l:fd(), host = opts.path, path = opts.path, port = 0,
      _deadline = nil, default_timeout = opts.timeout }, Listener)
  end
  local host = opts.host or "127.0.0.1"
  argcheck(type(host) == "string", 1, "listen", "option 'host': string expected, got " .. type(host))
  optcheck(opts.backlog, "number", "listen", "backlog")
  local port = check_port(opts.port or 0, "listen", true)
  if not port then return errors.invalid("listen: port out of range: " .. tostring(opts.port)) end
  if host == "" then return errors.invalid("listen: empty host") end
  if host == "localhost" then host = "127.0.0.1" end
  if host == "*" then host = "0.0.0.0" end
  if not is_ip(host) then return errors.invalid("listen: host must be a numeric address: " .. host) end
  local l, msg, code = core.listen(host, port, opts.backlog or 128)
  if not l then return fail("connect", ("listen on %s port %d: %s"):format(host, port, msg), { errno = code }) end
  return setmetatable({ l = l, fd = l:fd(), host = host, port = l:port(), _deadline = nil,
    default_timeout = opts.timeout }, Listener)
end

-- l:accept(timeout) -> conn, peer_ip, peer_port | nil, err (nil timeout = wait for ever)
function Listener:accept(timeout)
  argcheck(timeout == nil or type(timeout) == "number", 1, "accept", "number expected")
  if not self.l then return fail("closed", "accept on a closed listener") end
  local deadline = timeout and timeout ~= math.huge and now() + timeout or nil
  while true do
    local sock, ip, port = self.l:accept()
    if sock then
      return wrap(sock, ip, port, nil, self.default_timeout), ip, port
    end
    if ip ~= "wantread" then return fail("connect", "accept: " .. tostring(ip), { errno = port }) end
    self._deadline = deadline
    local ok, err = wait.fd(self.fd, "r", deadline)
    self._deadline = nil
    if not ok then
      if err == "timeout" then return fail("timeout", "accept timed out") end
      return fail("closed", "accept: listener closed")
    end
  end
end

function Listener:close()
  local l = self.l
  if l then
    self.l = nil
    wait.closing(self.fd)
    l:close()
    if self.path then os.remove(self.path) end
  end
  return true
end

function Listener:pollfd() return self.fd end
function Listener:events() return "r" end
function Listener:timeout()
  if not self._deadline then return nil end
  local t = self._deadline - now()
  return t > 0 and t or 0
end

function Listener:__tostring()
  return ("smtp.transport.native.listener (%s port %d%s)"):format(self.host, self.port, self.l and "" or ", closed")
end

M.Conn, M.Listener = Conn, Listener
return M
