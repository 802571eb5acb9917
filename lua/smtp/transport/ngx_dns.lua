-- Name and MX lookups inside nginx over resty.dns.resolver cosockets (Debian installs it as
-- nginx.dns.resolver), with the same result shapes as the native smtp.dns, so smtp.mx and
-- smtp.deliver work unchanged in OpenResty handlers without blocking the worker.
local errors = require "smtp.errors"

local M = { _VERSION = "0.1.0" }

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

local function dns_error(text, temporary, name)
  return nil, errors.new { kind = "dns", phase = "dns", text = text, temporary = temporary, name = name }
end

local function is_ipv4(s) return s:match("^%d+%.%d+%.%d+%.%d+$") ~= nil end
local function is_ipv6(s) return s:find(":", 1, true) ~= nil and s:match("^[%x:%.]+$") ~= nil end
M.is_ipv4, M.is_ipv6 = is_ipv4, is_ipv6
function M.is_ip(s) return is_ipv4(s) or is_ipv6(s) end

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

local function new_resolver(opts)
  local R = resolver()
  if not R then
    return dns_error("no DNS resolver inside nginx: install lua-resty-dns (resty.dns.resolver) "
      .. "or Debian's lua-nginx-dns (nginx.dns.resolver)", false)
  end
  local list = {}
  local given = opts.nameservers
  if type(given) == "string" then given = { given } end
  for _, ns in ipairs(given or system_nameservers()) do
    list[#list + 1] = parse_nameserver(ns)
  end
  if #list == 0 then return dns_error("no nameservers (none given, none in /etc/resolv.conf)", true) end
  local timeout = tonumber(opts.timeout) or 5
  local retrans = 2
  local r, err = R:new { nameservers = list, retrans = retrans,
    timeout = math.max(1, math.floor(timeout * 1000 / retrans)) }
  if not r then return dns_error("resolver: " .. tostring(err), true) end
  return r
end

-- One query; returns answers (a list, possibly empty) or nil, err.
local function query(r, name, qtype)
  local answers, err = r:query(name, { qtype = qtype })
  if not answers then
    return dns_error(name .. ": " .. tostring(err), true, name)
  end
  if answers.errcode then
    -- 3 = NXDOMAIN: the name does not exist, which no retry cures; anything else (SERVFAIL,
    -- REFUSED) may pass.
    local permanent = answers.errcode == 3
    return dns_error(name .. ": " .. tostring(answers.errstr or ("rcode " .. answers.errcode)),
      not permanent, name), answers.errcode
  end
  return answers
end

local function check_name(name, what)
  if type(name) ~= "string" then
    error("bad argument #1 to '" .. what .. "' (string expected, got " .. type(name) .. ")", 3)
  end
  if name == "" or #name > 255 or name:find("[%z\1-\32\127]") then
    return errors.invalid("bad domain name: " .. name:sub(1, 64))
  end
  return true
end

-- resolve(name, { nameservers = {"127.0.0.1:5353"}, timeout = 5 })
--   -> { "192.0.2.1", "2001:db8::1", ... } | nil, err (kind "dns", temporary true|false)
function M.resolve(name, opts)
  local ok, err = check_name(name, "resolve")
  if not ok then return nil, err end
  opts = opts or {}
  if M.is_ip(name) then return { name } end
  local lname = name:lower():gsub("%.$", "")
  if not opts.nameservers then
    local h = hosts_table()[lname]
    if h then
      local copy = {}
      for i, a in ipairs(h) do copy[i] = a end
      return copy
    end
  end
  local r
  r, err = new_resolver(opts)
  if not r then return nil, err end
  local out, errs, nx = {}, {}, 0
  for _, qtype in ipairs { r.TYPE_A, r.TYPE_AAAA } do
    local answers, qerr, rcode = query(r, lname, qtype)
    if answers then
      for _, a in ipairs(answers) do
        if a.type == r.TYPE_A then
          out[#out + 1] = a.address
        elseif a.type == r.TYPE_AAAA then
          out[#out + 1] = r.compress_ipv6_addr and r.compress_ipv6_addr(a.address) or a.address
        end
      end
    else
      errs[#errs + 1] = qerr
      if rcode == 3 then nx = nx + 1 end
    end
  end
  if #out > 0 then return out end
  if nx == 2 then return dns_error(lname .. ": no such domain", false, lname) end
  for _, e in ipairs(errs) do
    if e.temporary then return nil, e end
  end
  return dns_error(lname .. ": no A or AAAA record", false, lname)
end

-- mx(name, opts) -> { { host = "mx1.example.org", preference = 10 }, ... } ordered by preference;
-- {} when the domain exists without MX records; a null MX (RFC 7505) is { host = "", preference = 0 }.
function M.mx(name, opts)
  local ok, err = check_name(name, "mx")
  if not ok then return nil, err end
  opts = opts or {}
  local lname = name:lower():gsub("%.$", "")
  local r
  r, err = new_resolver(opts)
  if not r then return nil, err end
  local answers, qerr = query(r, lname, r.TYPE_MX)
  if not answers then return nil, qerr end
  local list = {}
  for _, a in ipairs(answers) do
    if a.type == r.TYPE_MX then
      list[#list + 1] = { host = (a.exchange or ""):gsub("%.$", ""), preference = a.preference }
    end
  end
  -- Stable order by preference (ties keep the server's order).
  for i, e in ipairs(list) do e.i = i end
  table.sort(list, function(a, b)
    if a.preference ~= b.preference then return a.preference < b.preference end
    return a.i < b.i
  end)
  for _, e in ipairs(list) do e.i = nil end
  return list
end

return M
