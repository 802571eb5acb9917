-- Name and MX lookups inside nginx over resty.dns.resolver cosockets (Debian installs it as
-- nginx.dns.resolver), with the same result shapes as the native smtp.dns, so smtp.mx and
-- smtp.deliver work unchanged in OpenResty handlers without blocking the worker.
local errors = require "smtp.errors"

local M = { _VERSION = "0.1.0" }

M.default_timeout = 10   -- seconds for a whole lookup
M.tries = 2              -- attempts per query
M.max_addresses = 16     -- addresses returned by resolve (AAAA then A)
M.max_mx = 32            -- MX hosts kept

local resolver_mod
local function resolver()
  if resolver_mod == nil then
    resolver_mod = false
    for _, name in ipairs { "resty.dns.resolver", "nginx.dns.resolver" } do
      local ok, r = pcall(require, name)
      if ok then resolver_mod = r; break end
    end
  end
  return resolver_mod or nil
end

local rcode_names = { [1] = "formerr", [2] = "servfail", [3] = "nxdomain", [4] = "notimp", [5] = "refused" }
local temporary_rcode = {
  servfail = true, refused = true, timeout = true, connrefused = true, formerr = true, notimp = true, badresp = true,
  error = true,
}
local rcode_text = {
  nxdomain = "domain does not exist (NXDOMAIN)",
  servfail = "server failure (SERVFAIL)",
  refused = "query refused (REFUSED)",
  timeout = "no answer from the name servers (timeout)",
  connrefused = "name servers unreachable",
  formerr = "name server reported a format error",
  badresp = "malformed answer",
  notimp = "query type not implemented by the name server",
  nodata = "no records of that type",
}

-- The error value for a failed lookup, as smtp.dns makes it: kind "dns", `rcode` names the case.
local function dns_error(name, rcode, text)
  return nil, errors.new {
    kind = "dns", rcode = rcode, name = name,
    text = text or (tostring(name) .. ": " .. (rcode_text[rcode] or rcode)),
    temporary = temporary_rcode[rcode] == true,
  }
end
M.error = function(...) return select(2, dns_error(...)) end

local function is_ipv4(s)
  local a, b, c, d = s:match("^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  return a ~= nil and tonumber(a) < 256 and tonumber(b) < 256 and tonumber(c) < 256 and tonumber(d) < 256
end
local function is_ipv6(s)
  return s:find(":", 1, true) ~= nil and s:match("^[%x:%.]+$") ~= nil and #s <= 45
end
M.is_ipv4, M.is_ipv6 = is_ipv4, is_ipv6
function M.is_ip(s) return is_ipv4(s) or is_ipv6(s) end

-- Literal address in `name` ("192.0.2.1", "::1", "[::1]"), or nil.
function M.literal(name)
  local inner = name:match("^%[(.*)%]$") or name
  if M.is_ip(inner) then return inner end
  return nil
end

-- A host name as RFC 1123 allows it (letters, digits, inner hyphens; labels of 1..63; 253 in all).
local function valid_hostname(n)
  if n == "" or #n > 253 then return false end
  for label in (n .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 or not label:match("^[%w%-]+$")
      or label:sub(1, 1) == "-" or label:sub(-1) == "-" then
      return false
    end
  end
  return true
end
M.valid_hostname = valid_hostname

-- Normalized domain name or nil: lower case, no final dot, a valid host name.
function M.normalize(name)
  if type(name) ~= "string" then return nil end
  local n = name:gsub("%.$", ""):lower()
  if not valid_hostname(n) then return nil end
  return n
end

local function is_localhost(n) return n == "localhost" or n:sub(-10) == ".localhost" end

-- "127.0.0.1:5353" -> {"127.0.0.1", 5353}; "[::1]:53" -> {"::1", 53}; "10.0.0.1" -> {"10.0.0.1", 53}
local function parse_nameserver(ns)
  if type(ns) == "table" then return { ns[1], tonumber(ns[2]) or 53 } end
  if type(ns) ~= "string" or ns == "" then return nil end
  local h, p = ns:match("^%[([^%]]+)%]:(%d+)$")
  if h then return { h, tonumber(p) } end
  h = ns:match("^%[([^%]]+)%]$")
  if h then return { h, 53 } end
  h, p = ns:match("^([^:]+):(%d+)$")
  if h then return { h, tonumber(p) } end
  return { ns, 53 }
end
M.parse_nameserver = parse_nameserver

-- /etc/resolv.conf and /etc/hosts are read once per worker (two small local files) and only when
-- the caller gives no nameservers.
local system_ns, hosts
local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("*a"); f:close(); return d
end

local function system_nameservers()
  if not system_ns then
    system_ns = {}
    for line in (read_file("/etc/resolv.conf") or ""):gmatch("[^\n]+") do
      local ns = line:match("^%s*nameserver%s+(%S+)")
      if ns then system_ns[#system_ns + 1] = { (ns:gsub("%%.*$", "")), 53 } end
    end
  end
  return system_ns
end

local function hosts_table()
  if not hosts then
    hosts = {}
    for line in (read_file("/etc/hosts") or ""):gmatch("[^\n]+") do
      line = line:gsub("#.*$", "")
      local addr, names = line:match("^%s*(%S+)%s+(.+)$")
      if addr then
        for n in names:gmatch("%S+") do
          n = n:lower()
          local list = hosts[n] or {}
          list[#list + 1] = addr
          hosts[n] = list
        end
      end
    end
  end
  return hosts
end

local function new_resolver(opts, name)
  local R = resolver()
  if not R then
    return dns_error(name, "error", "no DNS resolver inside nginx: install lua-resty-dns "
      .. "(resty.dns.resolver) or Debian's lua-nginx-dns (nginx.dns.resolver)")
  end
  local list = {}
  for _, ns in ipairs(opts.nameservers or system_nameservers()) do
    list[#list + 1] = parse_nameserver(ns)
  end
  if #list == 0 then return dns_error(name, "error", "no nameservers (none given, none in /etc/resolv.conf)") end
  local timeout = opts.timeout or M.default_timeout
  local retrans = opts.tries or M.tries
  local r, err = R:new { nameservers = list, retrans = retrans,
    timeout = math.max(1, math.floor(timeout * 1000 / (retrans * #list))) }
  if not r then return dns_error(name, "error", "resolver: " .. tostring(err)) end
  return r
end

-- One query: the answer records (a list, possibly empty) | nil, err.
local function query(r, name, qtype)
  local answers, err = r:query(name, { qtype = qtype })
  if not answers then
    local e = tostring(err)
    local rcode = e:find("timeout", 1, true) and "timeout"
      or e:find("connection refused", 1, true) and "connrefused" or "error"
    return dns_error(name, rcode, rcode == "error" and (name .. ": " .. e) or nil)
  end
  if answers.errcode then
    return dns_error(name, rcode_names[answers.errcode] or "error")
  end
  return answers
end

local function check_opts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error("bad argument 'opts': table expected", 3) end
  if opts.nameservers ~= nil and type(opts.nameservers) ~= "table" then
    error("bad argument 'opts.nameservers': table of \"host:port\" strings expected", 3)
  end
  if opts.timeout ~= nil and type(opts.timeout) ~= "number" then
    error("bad argument 'opts.timeout': number expected", 3)
  end
  return opts
end

local function addresses_of(r, answers, qtype)
  local out = {}
  for _, a in ipairs(answers) do
    if a.type == qtype and a.address then
      out[#out + 1] = qtype == r.TYPE_AAAA and r.compress_ipv6_addr and r.compress_ipv6_addr(a.address)
        or a.address
    end
  end
  return out
end

-- resolve(name, { nameservers = {"127.0.0.1:5353"}, timeout = 10 })
--   -> { "2001:db8::1", "192.0.2.1", ... } (AAAA, then A) | nil, err (kind "dns", `rcode`,
--   temporary true|false). Without nameservers, /etc/hosts first, as the system would.
function M.resolve(name, opts)
  if type(name) ~= "string" then error("bad argument 'name': string expected", 2) end
  opts = check_opts(opts)
  local lit = M.literal(name)
  if lit then return { lit } end
  local host = M.normalize(name)
  if not host then return errors.invalid("not a valid host name: " .. ("%q"):format(name)) end
  if is_localhost(host) then return { "::1", "127.0.0.1" } end
  if not opts.nameservers then
    local h = hosts_table()[host]
    if h then
      local copy = {}
      for i, a in ipairs(h) do copy[i] = a end
      return copy
    end
  end
  local r, err = new_resolver(opts, host)
  if not r then return nil, err end
  local six, err6 = query(r, host, r.TYPE_AAAA)
  local four, err4 = query(r, host, r.TYPE_A)
  local out = {}
  for _, list in ipairs { six and addresses_of(r, six, r.TYPE_AAAA) or {},
                          four and addresses_of(r, four, r.TYPE_A) or {} } do
    for _, a in ipairs(list) do
      if #out < M.max_addresses then out[#out + 1] = a end
    end
  end
  if #out > 0 then return out end
  if err6 and err6.rcode == "nxdomain" then return nil, err6 end
  if err4 and err4.rcode == "nxdomain" then return nil, err4 end
  if err4 then return nil, err4 end
  if err6 then return nil, err6 end
  return dns_error(host, "nodata", host .. ": no address records")
end

-- query(name, "MX"|"A"|"AAAA", opts) -> answer | nil, err, as smtp.dns.query:
-- A/AAAA a list of address strings; MX a list of { host=, preference= } in preference order
-- (ties keep the server's order), `null = true` for a null MX (RFC 7505, then the list is empty)
-- and `dropped` = records left out (invalid host names, duplicates). NOERROR without records of
-- the type is an empty list.
function M.query(name, qtype, opts)
  if type(name) ~= "string" then error("bad argument 'name': string expected", 2) end
  if qtype ~= "A" and qtype ~= "AAAA" and qtype ~= "MX" then
    error("bad argument 'qtype': \"A\", \"AAAA\" or \"MX\" expected", 2)
  end
  opts = check_opts(opts)
  local host = M.normalize(name)
  if not host then return errors.invalid("not a valid domain name: " .. ("%q"):format(name)) end
  local r, err = new_resolver(opts, host)
  if not r then return nil, err end
  local answers
  answers, err = query(r, host, r["TYPE_" .. qtype])
  if not answers then return nil, err end
  if qtype ~= "MX" then return addresses_of(r, answers, r["TYPE_" .. qtype]) end
  local cand, seen, total, roots, dropped = {}, {}, 0, 0, 0
  for _, a in ipairs(answers) do
    if a.type == r.TYPE_MX then
      total = total + 1
      local h = (a.exchange or ""):gsub("%.$", ""):lower()
      if h == "" then
        roots = roots + 1
      elseif not valid_hostname(h) then
        dropped = dropped + 1
      elseif seen[h] then
        -- A duplicate keeps the better preference.
        if a.preference < seen[h].preference then seen[h].preference = a.preference end
        dropped = dropped + 1
      elseif #cand >= M.max_mx then
        dropped = dropped + 1
      else
        local e = { host = h, preference = a.preference, i = #cand + 1 }
        cand[#cand + 1] = e
        seen[h] = e
      end
    end
  end
  local out = { dropped = 0 }
  -- RFC 7505: a null MX is the only record of its domain; a "." next to real hosts is junk.
  if total == 1 and roots == 1 then
    out.null = true
    return out
  end
  table.sort(cand, function(x, y)
    if x.preference ~= y.preference then return x.preference < y.preference end
    return x.i < y.i
  end)
  for i, e in ipairs(cand) do
    e.i = nil
    out[i] = e
  end
  out.dropped = dropped + roots
  return out
end

-- mx(name, opts): query(name, "MX", opts).
function M.mx(name, opts) return M.query(name, "MX", opts) end

return M
