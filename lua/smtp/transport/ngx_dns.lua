-- Name and MX lookups inside nginx over resty.dns.resolver cosockets (Debian installs it as
-- nginx.dns.resolver), with the same result shapes as the native smtp.dns, so smtp.mx and
-- smtp.deliver work unchanged in OpenResty handlers without blocking the worker.
local util = require "smtp.dnsutil"

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

-- The error value for a failed lookup, as smtp.dns makes it: kind "dns", `rcode` names the case.
-- `extra` is a table of more fields (text, temporary, code, enhanced) or just the text.
M.error = util.error

local function dns_error(name, rcode, extra) return nil, util.error(name, rcode, extra) end

M.is_ipv4, M.is_ipv6, M.is_ip, M.literal = util.is_ipv4, util.is_ipv6, util.is_ip, util.literal

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

local function new_resolver(opts, name, timeout)
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
  local retrans = opts.tries or M.tries
  local r, err = R:new { nameservers = list, retrans = retrans,
    timeout = math.max(1, math.floor(timeout * 1000 / (retrans * #list))) }
  if not r then return dns_error(name, "error", "resolver: " .. tostring(err)) end
  return r
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

-- MX records -> { {host=, preference=}... } in preference order (ties keep the server's order),
-- `null = true` for a null MX (RFC 7505; the list is then empty), `dropped` = records left out
-- (invalid host names, duplicates, past the cap).
local function mx_answer(r, answers)
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

-- TXT records -> a list of strings, each record's character-strings joined (resty.dns gives a
-- string for one, a table for several), at most 64 as the core keeps.
local function txt_answer(r, answers)
  local out = { dropped = 0 }
  for _, a in ipairs(answers) do
    if a.type == r.TYPE_TXT then
      local v = type(a.txt) == "table" and table.concat(a.txt) or a.txt or ""
      if #out < 64 then out[#out + 1] = v else out.dropped = out.dropped + 1 end
    end
  end
  return out
end

-- PTR records -> valid host names, lower case, unique, at most 16 as the core keeps.
local function ptr_answer(r, answers)
  local out, seen = { dropped = 0 }, {}
  for _, a in ipairs(answers) do
    if a.type == r.TYPE_PTR then
      local h = (a.ptrdname or ""):gsub("%.$", ""):lower()
      if valid_hostname(h) and not seen[h] and #out < 16 then
        seen[h] = true
        out[#out + 1] = h
      else
        out.dropped = out.dropped + 1
      end
    end
  end
  return out
end

-- One query of one type: the answer as smtp.dns gives it | nil, err.
local function run_one(opts, name, qtype, timeout)
  local r, err = new_resolver(opts, name, timeout)
  if not r then return nil, err end
  local t = r["TYPE_" .. qtype]
  local answers
  answers, err = r:query(name, { qtype = t })
  if not answers then
    local e = tostring(err)
    local rcode = e:find("timeout", 1, true) and "timeout"
      or e:find("connection refused", 1, true) and "connrefused" or "error"
    return dns_error(name, rcode, rcode == "error" and (name .. ": " .. e) or nil)
  end
  if answers.errcode then
    return dns_error(name, rcode_names[answers.errcode] or "error")
  end
  if qtype == "MX" then return mx_answer(r, answers) end
  if qtype == "TXT" then return txt_answer(r, answers) end
  if qtype == "PTR" then return ptr_answer(r, answers) end
  return addresses_of(r, answers, t)
end


local function ngx_now()
  local ngx = rawget(_G, "ngx")
  ngx.update_time()
  return ngx.now()
end

----------------------------------------------------------------------------------------------------
-- The batch shape smtp.mx drives, as smtp.dns has it: queries are queued, then run together
-- (one light thread each) under one deadline.
--   local r, deadline = dns.resolver(opts); local id = r:query(name, "MX")
--   dns.drive(r, deadline); local answer, err = dns.collect(r, id, name); dns.close(r)
local Batch = {}
local Batch_mt = { __name = "smtp.transport.ngx_dns.batch", __index = Batch }

function M.resolver(opts)
  opts = util.check_opts(opts, 2)
  local timeout = opts.timeout or M.default_timeout
  if timeout <= 0 then timeout = 0.001 end
  return setmetatable({ opts = opts, queue = {}, results = {}, n = 0 }, Batch_mt), ngx_now() + timeout
end

function Batch:query(name, qtype)
  if not util.QTYPES[qtype] then
    error("bad argument 'qtype': \"A\", \"AAAA\", \"MX\", \"TXT\" or \"PTR\" expected", 2)
  end
  self.n = self.n + 1
  self.queue[#self.queue + 1] = { id = self.n, name = name, qtype = qtype }
  return self.n
end

-- Addresses of `host` in /etc/hosts, or nil.
function Batch:hosts(host)
  local h = hosts_table()[host]
  if not h then return nil end
  local copy = {}
  for i, a in ipairs(h) do copy[i] = a end
  return copy
end

function Batch:close() self.queue, self.results = {}, {} end

-- close(r), as smtp.dns has it.
function M.close(r) r:close() end

-- Runs every queued query; true.
function M.drive(r, deadline)
  local q = r.queue
  r.queue = {}
  local left = math.max(0.001, deadline - ngx_now())
  local function run(item)
    local res, err = run_one(r.opts, item.name, item.qtype, left)
    r.results[item.id] = { res, err }
  end
  local ngx = rawget(_G, "ngx")
  local threads = {}
  if #q > 1 and ngx.thread and ngx.thread.spawn then
    for _, item in ipairs(q) do
      local ok, th = pcall(ngx.thread.spawn, run, item)
      if ok and th then threads[#threads + 1] = th else run(item) end
    end
    for _, th in ipairs(threads) do ngx.thread.wait(th) end
  else
    for _, item in ipairs(q) do run(item) end
  end
  return true
end

-- The answer of query `id` | nil, err.
function M.collect(r, id, name)
  local res = r.results[id]
  r.results[id] = nil
  if not res then return dns_error(name, "timeout") end
  if res[1] then return res[1] end
  return nil, res[2]
end

-- Starts AAAA and A queries for a host; finish_addresses gives the result after drive.
function M.start_addresses(r, host, opts)
  return util.start_addresses(r, host, opts or r.opts)
end

----------------------------------------------------------------------------------------------------
-- Written once in smtp.dnsutil for both resolvers:
-- finish_addresses(r, p[, max]) -> addresses (AAAA first, then A) | nil, err;
-- resolve(name, { nameservers = {"127.0.0.1:5353"}, timeout = 10 })
--   -> { "2001:db8::1", "192.0.2.1", ... } (AAAA, then A) | nil, err (kind "dns", `rcode`,
--   temporary true|false). Without nameservers, /etc/hosts first, as the system would;
-- query(name, "MX"|"A"|"AAAA"|"TXT"|"PTR", opts) -> answer | nil, err, as smtp.dns.query: A/AAAA a
--   list of address strings; MX as mx_answer above; TXT and PTR as txt_answer and ptr_answer. NOERROR
--   without records of the type is an empty list.
util.frontend(M)

-- mx(name, opts): query(name, "MX", opts).
function M.mx(name, opts) return M.query(name, "MX", opts) end

return M
