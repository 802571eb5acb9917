-- smtp.url: connection URLs (smtp://, smtp+starttls://, smtps://, lmtp://), proxy URLs (socks5://,
-- socks5h://, http://) and local addresses to bind to, turned into the option tables
-- smtp.config checks. Pure Lua (loaded inside nginx too). Errors name the part of the URL that is
-- wrong and never repeat what came before the host: it may hold a password.
local errors = require "smtp.errors"
local dnsutil = require "smtp.dnsutil"

local M = {}

local type, tonumber, pairs = type, tonumber, pairs
local find, match, sub, gsub, char, lower, upper = string.find, string.match, string.sub, string.gsub,
  string.char, string.lower, string.upper

-- What each scheme means. A scheme is a row, so another protocol (lmtp:// in a later version,
-- with its own default port and a unix-socket form) is one more row and, if it needs one, one more
-- field that the session reads.
M.SCHEMES = {
  smtp = { tls = "opportunistic", port = 25, tls_query = true },
  ["smtp+starttls"] = { tls = "starttls", port = 587 },
  smtps = { tls = "implicit", port = 465 },
  -- LMTP (RFC 2033) over TCP (port 24), or over a Unix socket: lmtp:///run/dovecot/lmtp, where
  -- TLS is off unless the query asks
  lmtp = { tls = "opportunistic", port = 24, tls_query = true, lmtp = true, unix_tls = "none" },
}

M.PROXY_SCHEMES = {
  socks5 = { kind = "socks5", port = 1080, remote_dns = false },
  socks5h = { kind = "socks5", port = 1080, remote_dns = true },
  http = { kind = "http", port = 80 },
}

local function bad(what, text)
  return errors.invalid(what .. ": " .. text)
end

-- %XX -> byte; nil when a % is not followed by two hex digits.
local function pct_decode(s)
  if find(s, "%%") and (find(s, "%%%X") or find(s, "%%%x%X") or find(s, "%%.?$")) then return nil end
  return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end
M.pct_decode = pct_decode

-- A host as a URL writes it: a name, an IPv4 address or an IPv6 literal in brackets. Returns the
-- host as the options take it (IPv6 in brackets, as `server` allows) | nil.
local function host_of(h)
  if h == "" then return nil end
  local v6 = match(h, "^%[(.*)%]$")
  if v6 then return dnsutil.is_ipv6(v6) and h or nil end
  if #h > 255 or not match(h, "^[%w%.%-_\128-\255]+$") or find(h, "^%.") or find(h, "%.%.") then return nil end
  return h
end

-- authority -> userinfo (or nil), host, port (or nil) | nil, err. `what` names the URL kind.
local function split_authority(auth, what)
  local userinfo, hostport
  local at = match(auth, "^.*()@")
  if at then userinfo, hostport = sub(auth, 1, at - 1), sub(auth, at + 1) else hostport = auth end
  local host, port
  if sub(hostport, 1, 1) == "[" then
    host, port = match(hostport, "^(%[[^%]]*%])(.*)$")
    if not host then return bad(what, "an IPv6 address is not closed with ']'") end
  else
    host, port = match(hostport, "^([^:]*)(.*)$")
  end
  if port ~= "" then
    port = match(port, "^:(%d+)$")
    local n = port and tonumber(port)
    if not n or #port > 5 or n < 1 or n > 65535 then return bad(what, "the port is not a number from 1 to 65535") end
    port = n
  else
    port = nil
  end
  local h = host_of(host)
  if not h then return bad(what, "the host is not a host name, an IPv4 address or an IPv6 address in brackets") end
  local user, password
  if userinfo then
    local u, p = match(userinfo, "^([^:]*):(.*)$")
    if not u then u = userinfo end
    user = pct_decode(u)
    if not user then return bad(what, "bad percent-encoding in the user name") end
    if p then
      password = pct_decode(p)
      if not password then return bad(what, "bad percent-encoding in the password") end
    end
    if user == "" then return bad(what, "an empty user name") end
  end
  return { user = user, password = password, host = h, port = port }
end

-- scheme://authority[/path][?query] -> scheme, authority, query (or nil), path ("" for none or
-- "/") | nil, err
local function split(s, what)
  local scheme, rest = match(s, "^([%a][%w+.-]*)://(.*)$")
  if not scheme then return bad(what, "not a URL (scheme://host...)") end
  scheme = lower(scheme)
  local auth_end = find(rest, "[/?#]") or (#rest + 1)
  local auth, tail = sub(rest, 1, auth_end - 1), sub(rest, auth_end)
  -- An '@' after the host (outside a proxy URL, which has its own) means a '/', '?' or '#' in a
  -- password cut the authority short: say so before anything shows a piece of the password.
  if not find(auth, "@", 1, true) and find((gsub(tail, "[?&]proxy=[^&#]*", "")), "@", 1, true) then
    return bad(what, "an '@' after the host: write '/', '?' and '#' in a user name or password as %2F, %3F and %23")
  end
  if find(tail, "#", 1, true) then return bad(what, "a fragment (#...) is not allowed") end
  local path, query = match(tail, "^([^?]*)%?(.*)$")
  if not path then path = tail end
  if path == "/" then path = "" end
  return scheme, auth, query, path
end

local BOOL = { ["true"] = true, ["1"] = true, yes = true, ["false"] = false, ["0"] = false, no = false }
local MECHANISMS = { PLAIN = true, LOGIN = true, ["CRAM-MD5"] = true, XOAUTH2 = true, OAUTHBEARER = true }

-- Query options: name -> function(value) -> option value | nil, reason. Each maps to the
-- connection option of the same name (auth= is auth.mechanism). Values may be shown in errors,
-- except proxy's (it may hold the proxy's password).
local function boolean(v)
  local b = BOOL[lower(v)]
  if b == nil then return nil, "true or false expected" end
  return b
end
local QUERY = {
  verify = boolean, verify_name = boolean, allow_plaintext_auth = boolean, pipelining = boolean,
  chunking = boolean,
  helo = function(v) return v end,
  servername = function(v) return v end,
  cafile = function(v) return v end,
  timeout = function(v)
    local n = tonumber(v)
    if not n or n <= 0 or n ~= n then return nil, "a positive number of seconds expected" end
    return n
  end,
  auth = function(v)
    local m = upper(v)
    if not MECHANISMS[m] then return nil, "one of plain, login, cram-md5, xoauth2, oauthbearer" end
    return m
  end,
  tls = function(v)
    if v ~= "none" and v ~= "opportunistic" then return nil, "none or opportunistic expected" end
    return v
  end,
  proxy = function(v)
    local p, err = M.proxy(v)
    if not p then return nil, err end
    return p
  end,
  bind = function(v)
    local b, err = M.bind(v)
    if not b then return nil, err end
    return b
  end,
}
M.QUERY_KEYS = QUERY

-- url.parse(s) -> connection options { server=, port=, tls=, auth=, ...query options } | nil, err
-- The user and password are percent-decoded; with ?auth=xoauth2 or oauthbearer the password is
-- the access token.
function M.parse(s)
  if type(s) ~= "string" then return bad("url", "string expected") end
  if find(s, "[%z\1-\32\127]") then return bad("url", "a space or control character") end
  local scheme, auth, query, path = split(s, "url")
  if not scheme then return nil, auth end
  local sch = M.SCHEMES[scheme]
  if not sch then
    -- the scheme is all before "://" and so holds no password
    return bad("url", "unknown scheme '" .. scheme .. "' (smtp, smtp+starttls, smtps or lmtp)")
  end
  local o
  if path ~= "" then
    -- a Unix socket: lmtp:///path, no host (the authority is empty)
    if not sch.unix_tls then return bad("url", "a path is not allowed") end
    if auth ~= "" then return bad("url", "a socket path goes with no host (" .. scheme .. ":///path)") end
    local p = pct_decode(path)
    if not p or find(p, "%z") then return bad("url", "bad percent-encoding in the socket path") end
    o = { path = p, tls = sch.unix_tls, lmtp = sch.lmtp }
  else
    local a, err = split_authority(auth, "url")
    if not a then return nil, err end
    -- no port: the scheme's default (for smtp schemes smtp.config's default for the TLS mode)
    o = { server = a.host, port = a.port or (sch.lmtp and sch.port) or nil, tls = sch.tls, lmtp = sch.lmtp }
    if a.user then o._user, o._password = a.user, a.password end
  end
  local seen = {}
  if query and query ~= "" then
    for pair in (query .. "&"):gmatch("([^&]*)&") do
      local k, v = match(pair, "^([^=]*)=(.*)$")
      if not k then k, v = pair, nil end
      local key = pct_decode(k)
      if not key or not QUERY[key] then
        local shown = key and match(key, "^[%w_%-]+$") and ("'" .. key .. "'") or "(not a name)"
        return bad("url", "unknown query option " .. shown)
      end
      if key == "tls" and not sch.tls_query then
        return bad("url", "query option 'tls' goes with smtp:// only (and lmtp://; the other schemes say the TLS mode)")
      end
      if seen[key] then return bad("url", "query option '" .. key .. "' given twice") end
      seen[key] = true
      local val = v and pct_decode(v)
      if not val or val == "" then return bad("url", "query option '" .. key .. "' needs a value") end
      local out, why = QUERY[key](val)
      if out == nil then
        if type(why) == "table" then
          -- proxy/bind errors: already named, never showing the value
          return bad("url", "query option '" .. key .. "': " .. (why.text or ""))
        end
        return bad("url", "query option '" .. key .. "': " .. why)
      end
      if key == "auth" then o.mechanism = out else o[key] = out end
    end
  end
  local user, password = o._user, o._password
  o._user, o._password = nil, nil
  if user then
    local au = { user = user }
    if o.mechanism == "XOAUTH2" or o.mechanism == "OAUTHBEARER" then au.token = password
    else au.password = password end
    au.mechanism = o.mechanism
    o.auth = au
  elseif o.mechanism then
    o.auth = { mechanism = o.mechanism }
  end
  o.mechanism = nil
  return o
end

-- url.proxy(s) -> { kind = "socks5"|"http", remote_dns =, host =, port =, user =, password =,
-- scheme = } | nil, err. socks5:// resolves the server's name here, socks5h:// at the proxy,
-- http:// asks the proxy for a tunnel (CONNECT) to the name.
function M.proxy(s)
  if type(s) ~= "string" then return bad("proxy", "string expected") end
  if find(s, "[%z\1-\32\127]") then return bad("proxy", "a space or control character") end
  local scheme, auth, query, path = split(s, "proxy")
  if not scheme then return nil, auth end
  if path ~= "" then return bad("proxy", "a path is not allowed") end
  local sch = M.PROXY_SCHEMES[scheme]
  if not sch then return bad("proxy", "unknown scheme '" .. scheme .. "' (socks5, socks5h or http)") end
  if query then return bad("proxy", "a query (?...) is not allowed") end
  local a, err = split_authority(auth, "proxy")
  if not a then return nil, err end
  if a.user then
    if a.password == nil then return bad("proxy", "a user name without a password") end
    -- RFC 1929 gives each one byte of length
    if sch.kind == "socks5" and (#a.user > 255 or #a.password > 255) then
      return bad("proxy", "SOCKS5 user names and passwords are at most 255 bytes")
    end
    if sch.kind == "http" and find(a.user, ":", 1, true) then
      return bad("proxy", "an HTTP proxy user name cannot hold ':'")
    end
    if find(a.user, "[%z\1-\31\127]") or find(a.password, "[%z\1-\31\127]") then
      return bad("proxy", "a control character in the user name or password")
    end
  end
  return setmetatable({ scheme = scheme, kind = sch.kind, remote_dns = sch.remote_dns,
    host = a.host, port = a.port or sch.port, user = a.user, password = a.password }, M.proxy_mt)
end

-- A parsed proxy prints without its credentials.
M.proxy_mt = { __name = "smtp.url.proxy" }
function M.proxy_mt.__tostring(p)
  return p.scheme .. "://" .. (p.user and "***@" or "") .. p.host .. ":" .. p.port
end

-- url.bind(s) -> { ip =, port = } | nil, err: "192.0.2.1", "192.0.2.1:2525", "::1", "[::1]",
-- "[::1]:2525". Only numeric addresses: the local address is one this host holds.
function M.bind(s)
  if type(s) ~= "string" then return bad("bind", "string expected") end
  local ip, port = match(s, "^%[(.-)%]:(%d+)$")
  if not ip then ip = match(s, "^%[(.-)%]$") end
  if not ip then
    if dnsutil.is_ipv6(s) then ip = s
    else ip, port = match(s, "^([^:]+):(%d+)$"); ip = ip or s end
  end
  if not dnsutil.is_ip(ip) then return bad("bind", "not a numeric IP address: " .. s) end
  local n
  if port then
    n = tonumber(port)
    if #port > 5 or n > 65535 then return bad("bind", "port out of range: " .. port) end
  end
  return { ip = ip, port = n or 0, text = s }
end

-- A URL for printing: the password replaced by ***, and a proxy's in its query too.
local function redact_authority(s)
  local head, auth, tail = match(s, "^([^/]*//)([^/?#]*)(.*)$")
  if not head then return s end
  local at = match(auth, "^.*()@")
  if at then
    local userinfo = sub(auth, 1, at - 1)
    local u = match(userinfo, "^([^:]*):")
    if u then auth = u .. ":***" .. sub(auth, at) end
  end
  return head .. auth .. tail
end
function M.redact(s)
  if type(s) ~= "string" then return s end
  s = redact_authority(s)
  return (gsub(s, "([?&]proxy=)([^&#]*)", function(k, v)
    local d = pct_decode(v)
    if d and d ~= v then return k .. redact_authority(d) end
    return k .. redact_authority(v)
  end))
end

return M
