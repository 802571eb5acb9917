-- OpenResty transport: the transport shape of docs/INTERNALS.md over ngx.socket.tcp cosockets, so
-- the same engines run inside nginx handlers without blocking the worker, plus the cosocket-pool
-- hooks (pool key, reuse count, per-worker session state) that let smtp.send reuse idle sessions.
local errors = require "smtp.errors"
local argcheck_mod = require "smtp.argcheck"
local ngx_dns = require "smtp.transport.ngx_dns"
local url = require "smtp.url"

local M = { _VERSION = "0.1.0", pooling = true }

local function ngx_table()
  local n = rawget(_G, "ngx")
  if type(n) == "table" and type(n.get_phase) == "function" then return n end
  return nil
end

-- Phases in which lua-nginx-module offers cosockets.
local cosocket_phases = {
  rewrite = true, access = true, content = true, timer = true, ssl_cert = true,
  ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}

-- usable() -> true, phase | false, phase-or-reason
function M.usable()
  local ngx = ngx_table()
  if not ngx then return false, "not inside nginx" end
  local phase = ngx.get_phase()
  return cosocket_phases[phase] == true, phase
end

local function phase_error(phase)
  return errors.new {
    kind = "invalid", phase = "connect", temporary = false, nginx_phase = phase,
    text = "nginx has no cosockets in the '" .. tostring(phase) .. "' phase, and a blocking socket "
      .. "would stall the worker: send from a timer instead, "
      .. "ngx.timer.at(0, function(premature) smtp.send{...} end)",
  }
end
M.phase_error = phase_error

local DEFAULT_TIMEOUT = 30
local MAX_MS = 2 ^ 31 - 1   -- nginx keeps timers in milliseconds; math.huge means "no limit"

local function ms(seconds, default)
  seconds = tonumber(seconds) or default
  if not seconds then return nil end
  if seconds >= MAX_MS / 1000 then return MAX_MS end
  -- Cosockets take whole milliseconds; 0 would mean "the nginx default", so keep at least 1.
  return math.max(1, math.floor(seconds * 1000 + 0.5))
end

-- Misuse raises the same messages as smtp.transport.native.
local argcheck, optcheck, numcheck = argcheck_mod.arg, argcheck_mod.opt, argcheck_mod.num

-- Read and write failures carry no phase: the session knows which SMTP phase it was in.
local function io_error(err, what)
  if err == "timeout" then
    return errors.new { kind = "timeout", text = what .. " timed out", temporary = true }
  end
  if err == "closed" then
    return errors.new { kind = "closed", text = "connection closed by peer", temporary = true }
  end
  return errors.new { kind = "closed", text = what .. ": " .. tostring(err), temporary = true }
end

----------------------------------------------------------------------------------------------------
-- TLS details the cosocket API does not expose: sslhandshake hands back the SSL_SESSION (a cdata
-- pointer with lua-resty-core, a userdata holding the pointer without it); nginx links libssl, so
-- its protocol and cipher are one FFI call away.
local ssl_ffi

-- A certificate name as RFC 2253 text ("CN=server,O=..."), as the native transport prints it.
local XN_FLAG_RFC2253 = 0x1110317
local BIO_CTRL_INFO = 3
local function x509_name(ffi, name)
  if name == nil then return nil end
  local b = ffi.C.BIO_new(ffi.C.BIO_s_mem())
  if b == nil then return nil end
  local out
  if ffi.C.X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253) >= 0 then
    local pp = ffi.new("char *[1]")
    local len = ffi.C.BIO_ctrl(b, BIO_CTRL_INFO, 0, pp)
    out = ffi.string(pp[0], len)
  end
  ffi.C.BIO_free(b)
  return out
end

-- `ip`: also say whether the peer's certificate is for that IP address (ip_ok), which nginx
-- cannot check (it matches host names only).
local function session_info(sess, ip)
  local t = type(sess)
  if t ~= "userdata" and t ~= "cdata" then return nil end
  if ssl_ffi == nil then
    ssl_ffi = false
    local ok, ffi = pcall(require, "ffi")
    if ok then
      ok = pcall(ffi.cdef, [[
        typedef struct ssl_session_st SSL_SESSION;
        typedef struct ssl_cipher_st SSL_CIPHER;
        typedef struct x509_st X509;
        typedef struct X509_name_st X509_NAME;
        typedef struct bio_st BIO;
        typedef struct bio_method_st BIO_METHOD;
        int SSL_SESSION_get_protocol_version(const SSL_SESSION *s);
        const SSL_CIPHER *SSL_SESSION_get0_cipher(const SSL_SESSION *s);
        const char *SSL_CIPHER_get_name(const SSL_CIPHER *c);
        int SSL_CIPHER_get_bits(const SSL_CIPHER *c, int *alg_bits);
        X509 *SSL_SESSION_get0_peer(SSL_SESSION *s);
        X509_NAME *X509_get_subject_name(const X509 *x);
        X509_NAME *X509_get_issuer_name(const X509 *x);
        const BIO_METHOD *BIO_s_mem(void);
        BIO *BIO_new(const BIO_METHOD *type);
        int BIO_free(BIO *a);
        long BIO_ctrl(BIO *bp, int cmd, long larg, void *parg);
        int X509_NAME_print_ex(BIO *out, const X509_NAME *nm, int indent, unsigned long flags);
        int X509_check_ip_asc(X509 *x, const char *address, unsigned int flags);
      ]])
      if ok then ssl_ffi = ffi end
    end
  end
  if not ssl_ffi then return nil end
  local ffi = ssl_ffi
  local ok, info = pcall(function()
    local p
    if t == "cdata" then p = ffi.cast("SSL_SESSION *", sess) else p = ffi.cast("SSL_SESSION **", sess)[0] end
    if p == nil then return nil end
    local v = ffi.C.SSL_SESSION_get_protocol_version(p)
    local names = { [0x0301] = "TLSv1", [0x0302] = "TLSv1.1", [0x0303] = "TLSv1.2", [0x0304] = "TLSv1.3" }
    local c = ffi.C.SSL_SESSION_get0_cipher(p)
    local cipher = c ~= nil and ffi.string(ffi.C.SSL_CIPHER_get_name(c)) or nil
    local bits = c ~= nil and tonumber(ffi.C.SSL_CIPHER_get_bits(c, nil)) or nil
    local subject, issuer, ip_ok
    local peer = ffi.C.SSL_SESSION_get0_peer(p)
    if peer ~= nil then
      subject = x509_name(ffi, ffi.C.X509_get_subject_name(peer))
      issuer = x509_name(ffi, ffi.C.X509_get_issuer_name(peer))
      if ip then ip_ok = ffi.C.X509_check_ip_asc(peer, ip, 0) == 1 end
    end
    return { version = names[v] or string.format("0x%04x", v), version_number = v, cipher = cipher,
      bits = bits, peer_subject = subject, peer_issuer = issuer, ip_ok = ip_ok }
  end)
  return ok and info or nil
end

----------------------------------------------------------------------------------------------------
-- Per-worker session state, keyed by pool name: what the client learned about the server on a
-- fresh connection (EHLO extensions, TLS details), restored when a pooled connection is reused.
-- Bounded so a stream of distinct keys cannot grow a worker without limit.
local MAX_SESSIONS = 1000
local sessions, nsessions = {}, 0
M.sessions = sessions

function M.session_state(pool) return sessions[pool] end

function M.set_session_state(pool, state)
  if sessions[pool] == nil then
    if nsessions >= MAX_SESSIONS then
      for k in pairs(sessions) do sessions[k] = nil end
      nsessions = 0
    end
    nsessions = nsessions + 1
  end
  sessions[pool] = state
end

-- pool_key{ server=, port=, tls=, verify=, verify_name=, servername=, helo=, user=, password= | token=,
-- bind= }
-- One pool per server, port, TLS mode, verification, name checked, EHLO name, credentials and
-- local address: a
-- connection verified differently or authenticated as someone else is never handed out. The secret
-- enters only as a SHA-1 digest; a token given as a function is left out (it changes over time).
function M.pool_key(o)
  if type(o) ~= "table" then argcheck(false, 1, "pool_key", "table expected, got " .. type(o)) end
  local ngx = ngx_table()
  local secret = o.password
  if secret == nil and type(o.token) == "string" then secret = o.token end
  local digest = ""
  if type(secret) == "string" then
    if ngx and ngx.sha1_bin and ngx.encode_base64 then
      digest = ngx.encode_base64(ngx.sha1_bin(secret))
    else
      error("pool_key needs nginx (ngx.sha1_bin)", 2)
    end
  end
  local parts = {
    "smtp", tostring(o.server or ""), tostring(o.port or ""), tostring(o.tls or "starttls"),
    o.verify == false and "noverify" or (o.verify_name == false and "verifychain" or "verify"),
    tostring(o.servername or ""),
    tostring(o.helo or ""), tostring(o.user or ""), digest, tostring(o.bind or ""),
  }
  -- Length-prefixed so no value can forge another key by containing the separator.
  for i, p in ipairs(parts) do parts[i] = #p .. ":" .. p end
  return table.concat(parts, "|")
end

-- Addresses of pooled servers, per worker (see connect).
M.ADDR_TTL = 60
local addr_cache, naddr = {}, 0

----------------------------------------------------------------------------------------------------
local S = {}
local S_mt = { __name = "smtp.transport.ngx.socket", __index = S }
function S_mt.__tostring(s)
  return string.format("smtp.transport.ngx.socket(%s:%s%s)", tostring(s.address), tostring(s.port),
    s.closed and ", closed" or "")
end

local function check_sock(s, fn)
  if getmetatable(s) ~= S_mt then
    error("bad self to '" .. fn .. "' (connection expected)", 3)
  end
end

local function closed_error(fn)
  return errors.new { kind = "closed", text = fn .. " on a closed connection", temporary = true }
end

-- connect{ host=, port=, timeout=, nameservers=, pool=, pool_size=, backlog= } -> s | nil, err
-- A name is resolved through resty.dns.resolver (the nameservers given, else the system's), and
-- each address is tried in turn under one deadline. With `pool`, a connection left idle in that
-- cosocket pool is taken first (see s:reused()).
-- A cosocket to a Unix socket: nginx connects to "unix:/path" (an LMTP server's, say).
local function unix_connect(opts)
  optcheck(opts.timeout, "number", "connect", "timeout")
  optcheck(opts.pool, "string", "connect", "pool")
  optcheck(opts.pool_size, "number", "connect", "pool_size")
  local at_connect = { phase = "connect" }
  if opts.bind ~= nil or opts.proxy ~= nil then
    return errors.invalid("connect: bind and proxy do not go with a Unix socket path", at_connect)
  end
  if opts.path == "" then return errors.invalid("connect: empty socket path", at_connect) end
  local usable, phase = M.usable()
  if not usable then return nil, phase_error(phase) end
  local ngx = ngx_table()
  local timeout = opts.timeout or DEFAULT_TIMEOUT
  if timeout >= MAX_MS / 1000 then timeout = MAX_MS / 1000 end
  local sock = ngx.socket.tcp()
  sock:settimeouts(ms(timeout), ms(timeout), ms(timeout))
  local target = "unix:" .. opts.path
  local ok, cerr
  if opts.pool then
    ok, cerr = sock:connect(target, { pool = opts.pool, pool_size = opts.pool_size, backlog = opts.backlog })
  else
    ok, cerr = sock:connect(target)
  end
  if not ok then
    return nil, errors.new { kind = cerr == "timeout" and "timeout" or "connect", phase = "connect",
      temporary = true, text = "connect to " .. opts.path .. ": " .. tostring(cerr), address = opts.path }
  end
  local s = setmetatable({
    sock = sock, host = nil, address = opts.path, port = nil, pool = opts.pool,
    reused_times = sock:getreusedtimes() or 0, tls = false, default_timeout = opts.timeout or DEFAULT_TIMEOUT,
  }, S_mt)
  if opts.tls then
    local tok, terr = s:starttls(type(opts.tls) == "table" and opts.tls or opts)
    if not tok then return nil, terr end
  end
  return s
end

function M.connect(opts)
  if type(opts) ~= "table" then argcheck(false, 1, "connect", "table expected, got " .. type(opts)) end
  if opts.path ~= nil then
    if type(opts.path) ~= "string" then
      argcheck(false, 1, "connect", "option 'path': string expected, got " .. type(opts.path))
    end
    return unix_connect(opts)
  end
  if type(opts.host) ~= "string" then
    argcheck(false, 1, "connect", "option 'host': string expected, got " .. type(opts.host))
  end
  optcheck(opts.timeout, "number", "connect", "timeout")
  optcheck(opts.nameservers, "table", "connect", "nameservers")
  optcheck(opts.pool, "string", "connect", "pool")
  optcheck(opts.pool_size, "number", "connect", "pool_size")
  if opts.port == nil then argcheck(false, 1, "connect", "option 'port' missing") end
  optcheck(opts.port, "number", "connect", "port")
  local port = opts.port
  local at_connect = { phase = "connect" }
  if port < 1 or port > 65535 or port % 1 ~= 0 then
    return errors.invalid("connect: port out of range: " .. tostring(port), at_connect)
  end
  if opts.host == "" then return errors.invalid("connect: empty host", at_connect) end
  if opts.timeout and opts.timeout < 0 then return errors.invalid("connect: negative timeout", at_connect) end
  local bind = opts.bind
  if bind ~= nil and type(bind) ~= "string" and type(bind) ~= "table" then
    argcheck(false, 1, "connect", "option 'bind': string expected, got " .. type(bind))
  end
  if opts.proxy ~= nil and type(opts.proxy) ~= "string" and type(opts.proxy) ~= "table" then
    argcheck(false, 1, "connect", "option 'proxy': string expected, got " .. type(opts.proxy))
  end
  -- Cosockets connect by themselves: no proxy handshake can come between connect and use.
  if opts.proxy ~= nil then
    return errors.invalid("connect: proxies are not supported inside nginx (cosockets)", at_connect)
  end
  if type(bind) == "string" then
    local berr
    bind, berr = url.bind(bind)
    if not bind then berr.phase = "connect"; return nil, berr end
  end
  -- tcpsock:bind (lua-nginx-module 0.10.23 and later) takes an address only, no port.
  if bind and bind.port ~= 0 then
    return errors.invalid("connect: bind with a port is not supported inside nginx", at_connect)
  end
  local usable, phase = M.usable()
  if not usable then return nil, phase_error(phase) end
  local ngx = ngx_table()
  ngx.update_time()
  local timeout = opts.timeout or DEFAULT_TIMEOUT
  if timeout >= MAX_MS / 1000 then timeout = MAX_MS / 1000 end
  local deadline = ngx.now() + timeout

  local host = opts.host:gsub("^%[(.*)%]$", "%1")
  local addresses, err, from_cache
  local lit = ngx_dns.literal(host)
  if lit then
    addresses = { lit }
  else
    -- A pooled connect looks the name up at most every ADDR_TTL seconds: a session taken from
    -- the pool needs no address, and a DNS round trip per send would eat much of the gain.
    local ckey = opts.pool and (host .. "|" .. table.concat(opts.nameservers or {}, ","))
    local cached = ckey and addr_cache[ckey]
    if cached and cached.expires > ngx.now() then
      addresses = cached.addresses
      from_cache = ckey
    else
      addresses, err = ngx_dns.resolve(host, { nameservers = opts.nameservers, timeout = timeout })
      if not addresses then
        if type(err) == "table" then err.phase = err.phase or "connect" end
        return nil, err
      end
      if ckey then
        if naddr >= MAX_SESSIONS then addr_cache, naddr = {}, 0 end
        if not addr_cache[ckey] then naddr = naddr + 1 end
        addr_cache[ckey] = { addresses = addresses, expires = ngx.now() + M.ADDR_TTL }
      end
    end
  end

  if bind then
    -- only the addresses of the bind address's family can be reached from it
    local v6, same = bind.ip:find(":", 1, true) ~= nil, {}
    for _, a in ipairs(addresses) do
      if (a:find(":", 1, true) ~= nil) == v6 then same[#same + 1] = a end
    end
    if #same == 0 then
      return nil, errors.new { kind = "connect", phase = "connect", temporary = false,
        text = ("%s has no %s address to reach from bind address %s"):format(host, v6 and "IPv6" or "IPv4", bind.ip) }
    end
    addresses = same
  end
  local copts
  if opts.pool then
    copts = { pool = opts.pool, pool_size = opts.pool_size, backlog = opts.backlog }
  end
  local last
  for i, addr in ipairs(addresses) do
    ngx.update_time()
    local left = deadline - ngx.now()
    -- Each address gets a fair share of what is left (the last one all of it), so one
    -- black-holed address cannot eat the whole deadline.
    if left > 0 and i < #addresses then left = left / (#addresses - i + 1) end
    if left <= 0 then
      last = errors.new { kind = "timeout", phase = "connect", temporary = true,
        text = "connect to " .. host .. ":" .. port .. " timed out" }
      break
    end
    local sock = ngx.socket.tcp()
    sock:settimeouts(ms(left), ms(left), ms(left))
    if bind then
      if not sock.bind then
        return errors.invalid("connect: bind needs lua-nginx-module 0.10.23 or later (tcpsock:bind)", at_connect)
      end
      local bok, berr = sock:bind(bind.ip)
      if not bok then
        return nil, errors.new { kind = "connect", phase = "connect", temporary = false,
          text = "bind " .. bind.ip .. ": " .. tostring(berr) }
      end
    end
    -- nginx parses the target as a URL: IPv6 needs brackets.
    local target = ngx_dns.is_ipv6(addr) and ("[" .. addr .. "]") or addr
    local ok, cerr
    if copts then ok, cerr = sock:connect(target, port, copts) else ok, cerr = sock:connect(target, port) end
    if ok then
      local reused = sock:getreusedtimes() or 0
      local s = setmetatable({
        sock = sock, host = host, address = addr, port = port, pool = opts.pool,
        reused_times = reused, tls = false, default_timeout = opts.timeout or DEFAULT_TIMEOUT,
      }, S_mt)
      if reused > 0 and opts.pool then
        local st = sessions[opts.pool]
        if st and st.tls_info then
          s.tls, s.tls_info = true, st.tls_info
        end
      end
      -- Implicit TLS (port 465): tls = true or a starttls options table.
      if opts.tls and not s.tls then
        local ok, terr = s:starttls(type(opts.tls) == "table" and opts.tls or opts)
        if not ok then return nil, terr end
      end
      return s
    end
    if cerr == "timeout" then
      last = errors.new { kind = "timeout", phase = "connect", temporary = true,
        text = "connect to " .. addr .. ":" .. port .. " timed out", address = addr }
    elseif bind then
      -- nginx binds inside connect: its failure names the local address here
      local foreign = tostring(cerr):find("assign requested address", 1, true) ~= nil
      last = errors.new { kind = "connect", phase = "connect", temporary = not foreign,
        text = "connect to " .. addr .. ":" .. port .. " from " .. bind.ip .. ": " .. tostring(cerr), address = addr }
      if foreign then break end
    else
      last = errors.new { kind = "connect", phase = "connect", temporary = true,
        text = "connect to " .. addr .. ":" .. port .. ": " .. tostring(cerr), address = addr }
    end
  end
  -- Addresses that all failed are looked up afresh next time.
  if from_cache then
    addr_cache[from_cache] = nil
    naddr = naddr - 1
  end
  return nil, last
end

-- Raw cosocket access for code that needs nginx-specific calls.
function S:cosocket() check_sock(self, "cosocket"); return self.sock end

-- How many times this connection was taken from the pool before: 0 for a fresh one.
function S:reused() check_sock(self, "reused"); return self.reused_times end

-- The state stored with s:keepalive() for this connection's pool, when the connection came from
-- the pool; nil for a fresh one (it has to greet, EHLO, STARTTLS and AUTH) or when none was kept.
function S:state()
  check_sock(self, "state")
  if not self.pool or self.reused_times == 0 then return nil end
  return sessions[self.pool]
end

-- s:write(data, timeout) -> true | nil, err: the whole string.
function S:write(data, timeout)
  check_sock(self, "write")
  if type(data) ~= "string" then argcheck(false, 1, "write", "string expected, got " .. type(data)) end
  numcheck(timeout, 2, "write")
  if self.closed then return nil, closed_error("write") end
  local t = ms(timeout, self.default_timeout)
  self.sock:settimeouts(t, t, t)
  local n, err = self.sock:send(data)
  if not n then
    -- As the native transport: a failed or timed-out write leaves nothing worth keeping.
    self:close()
    return nil, io_error(err, "write")
  end
  return true
end

-- s:write_engine(engine, timeout) -> true | nil, err: what a client engine has to send. Cosockets
-- take Lua strings only, so this is a write of e:take() (the native transport writes from the
-- engine's buffer instead).
function S:write_engine(e, timeout)
  check_sock(self, "write_engine")
  if type(e) ~= "userdata" then argcheck(false, 1, "write_engine", "client engine expected, got " .. type(e)) end
  numcheck(timeout, 2, "write_engine")
  if self.closed then return nil, closed_error("write_engine") end
  if e:outlen() == 0 then return true end
  return self:write(e:take(), timeout)
end

-- s:read(timeout [, max]) -> chunk | nil, err: whatever has arrived, up to max (65536) bytes.
function S:read(timeout, max)
  check_sock(self, "read")
  numcheck(timeout, 1, "read")
  if max ~= nil and (type(max) ~= "number" or max < 1) then
    argcheck(false, 2, "read", "positive number expected, got " .. (type(max) == "number" and tostring(max) or type(max)))
  end
  if self.closed then return nil, closed_error("read") end
  local t = ms(timeout, self.default_timeout)
  self.sock:settimeouts(t, t, t)
  local data, err = self.sock:receiveany(math.floor(max or 65536))
  if not data then
    -- A timeout closes the connection (DESIGN: no QUIT after a timeout), as natively.
    self:close()
    return nil, io_error(err, "read")
  end
  return data
end

-- starttls{ servername=, verify=, verify_name=, timeout= }: the TLS handshake over the connected
-- socket (after the 220 to STARTTLS, or right after connect for implicit TLS). Certificates are
-- checked against nginx's lua_ssl_trusted_certificate; cosockets take no per-call CA, so a
-- `cafile`/`capath` is refused (kind "invalid") rather than silently widened to nginx's trust store.
-- The name checked is servername, else the host connected to. nginx checks host names only and
-- only when it sends one as SNI; an IP address (never sent as SNI, RFC 6066) is checked here,
-- against the certificate nginx verified, through libssl's FFI, and refused if that cannot be done.
-- verify_name = false checks the chain only, and so sends no SNI either.
function S:starttls(opts)
  check_sock(self, "starttls")
  opts = opts or {}
  if type(opts) ~= "table" then argcheck(false, 1, "starttls", "table expected, got " .. type(opts)) end
  optcheck(opts.servername, "string", "starttls", "servername")
  optcheck(opts.timeout, "number", "starttls", "timeout")
  optcheck(opts.verify, "boolean", "starttls", "verify")
  optcheck(opts.verify_name, "boolean", "starttls", "verify_name")
  -- cosockets cannot match TLSA records (and resty.dns cannot tell a validated answer): smtp.dane
  -- never asks for it here, and a caller who does is told so rather than silently unprotected.
  if opts.dane ~= nil then
    return errors.invalid("DANE is not available inside nginx (native transport only)", { phase = "tls" })
  end
  if opts.cafile ~= nil or opts.capath ~= nil then
    return errors.invalid("cafile/capath cannot be used inside nginx: cosockets check certificates "
      .. "against lua_ssl_trusted_certificate; put the CA there and leave cafile unset", { phase = "tls" })
  end
  if self.closed then return nil, closed_error("starttls") end
  if self.tls then
    -- A pooled connection already speaks TLS; anything else is a caller's mistake.
    if self.reused_times > 0 then return true end
    error("starttls: TLS is already on for this connection", 2)
  end
  local verify = opts.verify ~= false
  local verify_name = verify and opts.verify_name ~= false
  local name = opts.servername
  if name == nil then name = self.host end
  -- An empty name would make nginx skip the name check (a blank setting must not).
  if name == nil or name == "" or name:find("%z") then
    self.sock:close()
    self.closed = true
    return errors.invalid("starttls: servername is empty or holds a NUL", { phase = "tls" })
  end
  local ip = ngx_dns.literal(name)
  local sni = not ip and name or nil
  if verify and not verify_name then sni = nil end
  local t = ms(opts.timeout, self.default_timeout)
  self.sock:settimeouts(t, t, t)
  local okc, sess, err = pcall(self.sock.sslhandshake, self.sock, nil, sni, verify)
  if not okc then
    -- Debian's lua-resty-core asserts (instead of returning the error) when a handshake that
    -- finished at once failed its certificate check: the check failed, but nginx's reason is lost.
    sess, err = nil, "certificate verify failed (nginx gave no reason: " .. tostring(sess) .. ")"
  end
  if not sess then
    local text = "TLS handshake with " .. tostring(name) .. " failed: " .. tostring(err)
    -- nginx reports a failed chain check as "<X509 code>: <reason>".
    if verify and (tostring(err):match("^%d+: ") or tostring(err):find("verify", 1, true)) then
      text = text .. " (inside nginx certificates are checked against lua_ssl_trusted_certificate)"
    end
    local kind = err == "timeout" and "timeout" or "tls"
    self.sock:close()
    self.closed = true
    return nil, errors.new { kind = kind, phase = "tls", text = text, temporary = kind == "timeout" }
  end
  local check_ip = verify_name and ip or nil
  local info = session_info(sess, check_ip) or {}
  if check_ip and info.ip_ok ~= true then
    self.sock:close()
    self.closed = true
    return nil, errors.new { kind = "tls", phase = "tls", temporary = false,
      text = info.ip_ok == false
        and "certificate verify failed: IP address mismatch (the certificate is not for " .. ip .. ")"
        or "certificate verify failed: cannot check the certificate against " .. ip
          .. " (no FFI access to libssl); give servername = a name the certificate holds" }
  end
  -- RFC 8997: nothing below TLS 1.2, whatever lua_ssl_protocols allows.
  if info.version_number and info.version_number < 0x0303 then
    self.sock:close()
    self.closed = true
    return nil, errors.new { kind = "tls", phase = "tls", temporary = false,
      text = "server negotiated " .. info.version .. "; TLS 1.2 is the minimum" }
  end
  info.version_number, info.ip_ok = nil, nil
  info.verified = verify
  self.tls, self.tls_info = true, info
  return true
end

function S:tls_accept()
  check_sock(self, "tls_accept")
  return errors.invalid("no server-side TLS inside nginx http handlers (no stream Lua module)", { phase = "tls" })
end

-- s:info() -> { address=, port=, tls = false | "TLSv1.3", version=, cipher=, bits=, peer_subject=,
-- peer_issuer=, reused= } as natively; `tls` is "unknown" in the unlikely case that nginx's
-- libssl could not be asked (no FFI symbols).
function S:info()
  check_sock(self, "info")
  local ti = self.tls_info or {}
  return {
    address = self.address, port = self.port, tls = self.tls == true and (ti.version or "unknown") or false,
    version = ti.version, cipher = ti.cipher, bits = ti.bits, peer_subject = ti.peer_subject,
    peer_issuer = ti.peer_issuer, reused = self.reused_times,
  }
end

-- keepalive(idle_timeout, size, state): hands the connection back to its cosocket pool (the
-- `pool` given to connect; nginx fixes the pool name at connect time) and stores `state` for
-- that pool, so the next s:state() after a reuse sees it. nginx refuses (and this returns
-- nil, err) when unread bytes are pending: such a connection is closed instead.
function S:keepalive(idle_timeout, size, state)
  check_sock(self, "keepalive")
  numcheck(idle_timeout, 1, "keepalive")
  numcheck(size, 2, "keepalive")
  if self.closed then return nil, closed_error("keepalive") end
  if not self.pool then
    -- Without a pool name nginx would file it under "address:port", shared with anyone.
    self:close()
    return nil, errors.new { kind = "closed", temporary = true,
      text = "connection was not made with a pool; closed instead" }
  end
  if state ~= nil then
    if type(state) == "table" and self.tls_info and state.tls_info == nil then
      state.tls_info = self.tls_info
    end
    M.set_session_state(self.pool, state)
  end
  local ok, err = self.sock:setkeepalive(ms(idle_timeout), size)
  self.closed = true
  if not ok then
    self.sock:close()
    return nil, errors.new { kind = "closed", temporary = true,
      text = "could not keep the connection: " .. tostring(err) }
  end
  return true
end

function S:close()
  check_sock(self, "close")
  if self.closed then return true end
  self.closed = true
  self.sock:close()
  return true
end

-- Cosockets wait inside nginx; there is no descriptor to poll.
function S:pollfd() return nil end
function S:events() return nil end
function S:timeout() return nil end

function M.listen()
  return errors.invalid("no SMTP server inside nginx http handlers (Debian has no stream Lua module)")
end

return M
