-- smtp.config: the options of smtp.send / smtp.connect / conn:send checked and turned into the
-- plain tables the session and the transactions use. Everything here runs before any connection
-- is opened: bad values are refused (kind "invalid"), misuse raises.
local check = require "smtp.check"
local errors = require "smtp.errors"
local source = require "smtp.source"
local url = require "smtp.url"

local M = {}

local type, pairs, ipairs, tostring, tonumber = type, pairs, ipairs, tostring, tonumber
local getmetatable, setmetatable = getmetatable, setmetatable
local concat, sort = table.concat, table.sort
local has_ctl, has_8bit = check.has_ctl, check.has_8bit

-- RFC 5321 §4.5.3.2 waits are the upper defaults; connect, ehlo, tls, auth and quit have no RFC
-- value and get shorter ones. `data_block` bounds each write of the body.
M.DEFAULT_TIMEOUTS = {
  connect = 30, greeting = 300, ehlo = 300, tls = 60, auth = 120, mail = 300, rcpt = 300,
  data = 120, data_block = 180, data_end = 600, quit = 60,
}
local DEFAULT_TIMEOUTS = M.DEFAULT_TIMEOUTS
M.PORTS = { starttls = 587, implicit = 465, opportunistic = 25, none = 25 }
local PORTS = M.PORTS
local MECHANISMS = { PLAIN = true, LOGIN = true, ["CRAM-MD5"] = true, XOAUTH2 = true, OAUTHBEARER = true }

-- Raises the standard "bad argument" error for the public function `fname` (level 3: the caller
-- of the function that called the check).
local function misuse(fname, msg, level)
  error("bad argument #1 to '" .. fname .. "' (" .. msg .. ")", (level or 3) + 1)
end
M.misuse = misuse

local invalid = errors.invalid

local NOTIFY = { NEVER = true, SUCCESS = true, FAILURE = true, DELAY = true }

local function check_dsn(dsn, fname)
  if dsn == nil then return true end
  if type(dsn) ~= "table" then misuse(fname, "dsn: table expected") end
  local out = {}
  if dsn.notify ~= nil then
    local list = type(dsn.notify) == "string" and { dsn.notify } or dsn.notify
    if type(list) ~= "table" then misuse(fname, "dsn.notify: list expected") end
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
    if type(dsn.envid) ~= "string" then misuse(fname, "dsn.envid: string expected") end
    if has_ctl(dsn.envid) then return invalid("dsn.envid: control character") end
    if #dsn.envid > 100 or has_8bit(dsn.envid) then return invalid("dsn.envid: over 100 ASCII characters") end
    out.envid = check.xtext(dsn.envid)
  end
  out.orcpt = dsn.orcpt ~= false
  return out
end

local function default_helo()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local name = f and f:read("*l")
  if f then f:close() end
  if not name or not check.hostname(name) then name = "localhost" end
  return name
end

-- Sessions without timeout options share one copy of the defaults (nothing writes into a
-- session's timeouts: 460 bytes less per idle session), made again if smtp.DEFAULT_TIMEOUTS changed.
local shared_defaults
local function default_timeouts()
  local d = shared_defaults
  if d then
    for k, v in pairs(DEFAULT_TIMEOUTS) do
      if d[k] ~= v then d = nil; break end
    end
  end
  if d then
    for k in pairs(d) do
      if DEFAULT_TIMEOUTS[k] == nil then d = nil; break end
    end
  end
  if not d then
    d = {}
    for k, v in pairs(DEFAULT_TIMEOUTS) do d[k] = v end
    shared_defaults = d
  end
  return d
end

local function check_timeouts(t, fname)
  if t == nil then return default_timeouts() end
  local out = {}
  for k, v in pairs(DEFAULT_TIMEOUTS) do out[k] = v end
  if type(t) == "number" then
    if t <= 0 then misuse(fname, "timeout must be positive") end
    for k in pairs(out) do out[k] = t end
  elseif type(t) == "table" then
    for k, v in pairs(t) do
      if DEFAULT_TIMEOUTS[k] == nil then misuse(fname, "timeout: unknown phase " .. tostring(k)) end
      if type(v) ~= "number" or v <= 0 then misuse(fname, "timeout." .. k .. ": positive number expected") end
      out[k] = v
    end
  else
    misuse(fname, "timeout: number or table expected")
  end
  return out
end

local function check_auth(a, fname)
  if a == nil then return true end
  if type(a) ~= "table" then misuse(fname, "auth: table expected") end
  if type(a.user) ~= "string" then misuse(fname, "auth.user: string expected") end
  if has_ctl(a.user) then return invalid("auth.user: control character (CR, LF, NUL, ...)") end
  if a.authzid ~= nil and (type(a.authzid) ~= "string" or has_ctl(a.authzid)) then
    return invalid("auth.authzid: control character or not a string")
  end
  local has_pw, has_tok = a.password ~= nil, a.token ~= nil
  if has_pw == has_tok then misuse(fname, "auth: give password or token") end
  if has_pw and type(a.password) ~= "string" then misuse(fname, "auth.password: string expected") end
  -- CR and LF too: a LOGIN server that decodes the password into a line must not see two lines
  if has_pw and check.breaks_line(a.password) then return invalid("auth.password: CR, LF or NUL") end
  if has_tok and type(a.token) ~= "string" and type(a.token) ~= "function" then
    misuse(fname, "auth.token: string or function expected")
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

-- `url = ...` and the table's own options: the URL fills in what the table leaves out, and an
-- option given both ways must be the same (else kind "invalid", naming it): a URL from the
-- environment must not silently lose to, or override, what the program says. auth merges field
-- by field, so a URL may name the user and the table give a token function.
local function merge_url(opts, fname)
  if type(opts.url) ~= "string" then misuse(fname, "url: string expected") end
  local u, err = url.parse(opts.url)
  if not u then return nil, err end
  local out = {}
  for k, v in pairs(opts) do out[k] = v end
  out.url = nil
  for k, v in pairs(u) do
    local mine = opts[k]
    if k == "auth" and type(mine) == "table" then
      local a = {}
      for ak, av in pairs(mine) do a[ak] = av end
      for ak, av in pairs(v) do
        if a[ak] ~= nil and a[ak] ~= av then
          return invalid("url: auth." .. ak .. " is given both in the URL and in the options, differently")
        end
        a[ak] = av
      end
      out.auth = a
    elseif mine ~= nil and k == "proxy" then
      -- a proxy option is a URL string, the URL's a parsed one: compare what they mean
      local p = type(mine) == "string" and url.proxy(mine) or mine
      if type(p) ~= "table" or p.scheme ~= v.scheme or p.host ~= v.host or p.port ~= v.port
        or p.user ~= v.user or p.password ~= v.password then
        return invalid("url: proxy is given both in the URL and in the options, differently")
      end
    elseif mine ~= nil and k == "bind" then
      local b = type(mine) == "string" and url.bind(mine) or mine
      if type(b) ~= "table" or b.ip ~= v.ip or b.port ~= v.port then
        return invalid("url: bind is given both in the URL and in the options, differently")
      end
    elseif mine ~= nil and mine ~= v then
      return invalid("url: " .. k .. " is given both in the URL and in the options, differently")
    else
      out[k] = v
    end
  end
  if out.auth and out.auth.user == nil then
    return invalid("url: auth=" .. tostring(out.auth.mechanism):lower() .. " needs a user name in the URL or auth.user")
  end
  if out.auth and out.auth.password == nil and out.auth.token == nil then
    return invalid("url: a user name without a password (put it in the URL, or give auth.password or auth.token)")
  end
  return out
end

-- The redacted form of a validated config (for tostring): never the password or token.
local cfg_mt = { __name = "smtp.config" }
function cfg_mt.__tostring(c)
  if c.path then return ("smtp.config (%s://%s)"):format(c.lmtp and "lmtp" or "unix", c.path) end
  local scheme = c.lmtp and "lmtp" or c.tls == "implicit" and "smtps" or c.tls == "starttls" and "smtp+starttls" or "smtp"
  local user = ""
  if c.auth and c.auth.user then
    user = c.auth.user:gsub("[%%@:/?#]", function(ch) return ("%%%02X"):format(ch:byte()) end)
    user = user .. ((c.auth.password or c.auth.token) and ":***@" or "@")
  end
  local s = ("smtp.config (%s://%s%s:%d"):format(scheme, user, c.server, c.port)
  if c.proxy then s = s .. " via " .. tostring(c.proxy) end
  if c.bind then s = s .. " from " .. c.bind.text end
  return s .. ")"
end

-- Connection options -> a validated config, or nil, err. Raises on misuse.
function M.connection(opts, fname)
  if type(opts) ~= "table" then misuse(fname, "options table expected") end
  if opts.url ~= nil then
    local merged, uerr = merge_url(opts, fname)
    if not merged then return nil, uerr end
    opts = merged
  end
  if opts.lmtp ~= nil and type(opts.lmtp) ~= "boolean" then misuse(fname, "lmtp: boolean expected") end
  local lmtp, path = opts.lmtp == true, opts.path
  local ok, err, server
  if path ~= nil then
    -- a Unix socket (an LMTP server's, usually) instead of a host and port
    if type(path) ~= "string" or path == "" then misuse(fname, "path: socket path expected") end
    if opts.server ~= nil or opts.port ~= nil then misuse(fname, "path: give path or server and port, not both") end
    if has_ctl(path) then return invalid("path: control character in the socket path") end
    if #path > 107 then return invalid("path: longer than a Unix socket path can be (107 bytes)") end
    if opts.proxy ~= nil or opts.bind ~= nil then return invalid("path: proxy and bind do not go with a Unix socket") end
    server = path
  else
    if type(opts.server) ~= "string" or opts.server == "" then misuse(fname, "server: host name expected") end
    ok, err = check.hostname(opts.server, "server")
    if not ok then return nil, err end
    server = opts.server
    if has_8bit(server) then
      -- an international host name: resolved, sent as SNI and checked in the certificate as its A-label
      local ascii, why = check.idna_domain(server)
      if not ascii then return invalid("server: bad international domain name " .. server .. ": " .. why) end
      server = ascii
    end
  end
  -- LMTP delivers locally: no TLS over a Unix socket, and STARTTLS when offered over TCP, unless asked
  local tls = opts.tls
  if tls == nil then tls = path and "none" or lmtp and "opportunistic" or "starttls" end
  if PORTS[tls] == nil then misuse(fname, "tls: starttls, implicit, opportunistic or none") end
  local port = opts.port == nil and (lmtp and 24 or PORTS[tls]) or tonumber(opts.port)
  if path then port = nil
  elseif not port or port < 1 or port > 65535 or port % 1 ~= 0 then misuse(fname, "port: 1..65535") end
  local helo = opts.helo
  if helo == nil then helo = default_helo() else
    if type(helo) ~= "string" then misuse(fname, "helo: string expected") end
    ok, err = check.hostname(helo, "helo")
    if not ok then return nil, err end
  end
  ok, err = check_auth(opts.auth, fname)
  if not ok then return nil, err end
  local servername = opts.servername
  if servername ~= nil and type(servername) ~= "string" then misuse(fname, "servername: string expected") end
  -- A blank name (an unset environment variable) must not quietly turn the name check off.
  if servername == "" then return invalid("servername: empty name") end
  if servername ~= nil and has_ctl(servername) then return invalid("servername: control character (NUL, CR, LF, ...)") end
  if servername ~= nil and has_8bit(servername) then
    local ascii, why = check.idna_domain(servername)
    if not ascii then return invalid("servername: bad international domain name " .. servername .. ": " .. why) end
    servername = ascii
  end
  if opts.verify_name ~= nil and type(opts.verify_name) ~= "boolean" then misuse(fname, "verify_name: boolean expected") end
  if opts.cafile ~= nil and type(opts.cafile) ~= "string" then misuse(fname, "cafile: string expected") end
  if opts.session_cache ~= nil and type(opts.session_cache) ~= "boolean" then misuse(fname, "session_cache: boolean expected") end
  local proxy, bind
  if opts.proxy ~= nil then
    if type(opts.proxy) == "string" then
      proxy, err = url.proxy(opts.proxy)
      if not proxy then return nil, err end
    elseif getmetatable(opts.proxy) == url.proxy_mt then
      proxy = opts.proxy
    else
      misuse(fname, "proxy: URL string expected")
    end
  end
  if opts.bind ~= nil then
    if type(opts.bind) == "string" then
      bind, err = url.bind(opts.bind)
      if not bind then return nil, err end
    elseif type(opts.bind) == "table" and type(opts.bind.ip) == "string" and opts.bind.text then
      bind = opts.bind
    else
      misuse(fname, "bind: string expected")
    end
  end
  -- AUTH in the clear is let through to loopback only when nothing but this host carries it
  local local_only = path ~= nil or (check.is_loopback(opts.server) and (not proxy or check.is_loopback(proxy.host)))
  if opts.auth and tls == "none" and not opts.allow_plaintext_auth and not local_only then
    return invalid("auth over a plaintext connection: use TLS or allow_plaintext_auth = true")
  end
  local cfg = setmetatable({
    server = server, port = port, tls = tls, helo = helo,
    verify = opts.verify ~= false, verify_name = opts.verify_name ~= false,
    session_cache = opts.session_cache ~= false,
    servername = servername or (path and "localhost") or (server:gsub("^%[(.*)%]$", "%1")),
    lmtp = lmtp,
    timeouts = check_timeouts(opts.timeout, fname),
    allow_plaintext_auth = opts.allow_plaintext_auth == true,
    chunking = opts.chunking ~= false,
    pipelining = opts.pipelining ~= false,
    local_only = local_only,
  }, cfg_mt)
  -- The options most sessions leave out are stored only when given: a table constructor makes
  -- room for every field it names, nil or not (32 slots instead of 16, ~400 bytes per session).
  if opts.auth ~= nil then cfg.auth = opts.auth end
  if opts.cafile ~= nil then cfg.cafile = opts.cafile end
  if path ~= nil then cfg.path = path end
  if opts.nameservers ~= nil then cfg.nameservers = opts.nameservers end
  if opts.transport ~= nil then cfg.transport = opts.transport end
  local pool = check_pool(opts.pool, fname)
  if pool ~= nil then cfg.pool = pool end
  if proxy ~= nil then cfg.proxy = proxy end
  if bind ~= nil then cfg.bind = bind end
  -- smtp.deliver's DANE policy for this host ({ base=, tlsa=, names= } from smtp.dane)
  if type(opts.dane) == "table" then cfg.dane = opts.dane end
  return cfg
end

local function to_list(v, fname, what)
  if v == nil then return nil end
  if type(v) == "string" then return { v } end
  if type(v) ~= "table" then misuse(fname, what .. ": string or list expected", 4) end
  local out = {}
  for i, a in ipairs(v) do out[i] = a end
  return out
end

-- Message options -> a transaction description { message, from, to, given, dsn, smtputf8, head },
-- or nil, err (`given`: the recipients as the caller wrote them, when some differ from `to`).
-- Raises on misuse.
function M.message(opts, fname)
  if type(opts) ~= "table" then misuse(fname, "options table expected") end
  local m = opts.message
  local mt = type(m)
  local is_msg = source.is_message(m)
  if not (mt == "string" or mt == "function" or io.type(m) == "file" or is_msg) then
    misuse(fname, "message: string, file, function or smtp.message expected")
  end
  local from, to = opts.from, to_list(opts.to, fname, "to")
  local needs_utf8, head = false, nil
  if is_msg then
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
    head = source.headers_of(m)
    needs_utf8 = has_8bit(head)
  end
  if from == nil then return invalid("from: no envelope sender (give from = ...)") end
  if type(from) ~= "string" then misuse(fname, "from: string expected") end
  -- An international domain goes as its A-label (`wire`); results name the address as given.
  local ok, u8, wire = check.address(from, "from", true)
  if not ok then return nil, u8 end
  if u8 then needs_utf8 = true end
  from = wire
  if to == nil or #to == 0 then return invalid("to: no recipients") end
  local given
  for i, r in ipairs(to) do
    if type(r) ~= "string" then misuse(fname, "to: strings expected") end
    ok, u8, wire = check.address(r, "to")
    if not ok then return nil, u8 end
    if u8 then needs_utf8 = true end
    if wire ~= r then
      if not given then given = {}; for k, v in ipairs(to) do given[k] = v end end
      to[i] = wire
    end
  end
  local dsn, err = check_dsn(opts.dsn, fname)
  if not dsn then return nil, err end
  if opts.requiretls ~= nil and type(opts.requiretls) ~= "boolean" then misuse(fname, "requiretls: boolean expected") end
  return { message = m, from = from, to = to, given = given, dsn = opts.dsn and dsn or nil,
    smtputf8 = needs_utf8, head = head, requiretls = opts.requiretls or nil }
end

-- MAIL/RCPT parameters given as a table -> "KEY=value KEY2" in a stable order.
function M.params(p, fname)
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

return M
