-- Name resolution for lua-smtp: A/AAAA/MX through the core's c-ares resolver, waiting with
-- smtp.wait (so it yields inside smtp.loop or cqueues), never through getaddrinfo.
--
-- Numeric addresses and "localhost" resolve without DNS. When no `nameservers` are given, the
-- system's resolver configuration is used and the hosts file (/etc/hosts) is consulted first for
-- address lookups, as the system's own resolver would; with explicit `nameservers` only those
-- servers are asked (tests and MTAs want exactly what the zone says).
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

M.default_timeout = 10   -- seconds for a whole lookup
M.tries = 2              -- c-ares attempts per server
M.max_addresses = 16     -- addresses returned by resolve (AAAA then A)

-- smtp.wait comes from the transport part; without it (or a clock) we block in C on the
-- resolver's own fd, which c-ares's timers bound.
local wait
do
  local ok, w = pcall(require, "smtp.wait")
  if ok then
    wait = w
  elseif not tostring(w):find("module 'smtp.wait' not found", 1, true) then
    error(w, 0)
  end
end

local temporary_rcode = {
  servfail = true, refused = true, timeout = true, connrefused = true, formerr = true,
  badresp = true, notimp = true, closed = true, nomem = true, cancelled = true, error = true,
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
  badname = "not a valid domain name",
  nodata = "no records of that type",
}

-- The error value for a failed lookup; `rcode` is kept so callers can tell the cases apart.
function M.error(name, rcode, extra)
  local t = extra or {}
  t.kind = "dns"
  t.rcode = rcode
  t.name = name
  t.text = t.text or (name .. ": " .. (rcode_text[rcode] or rcode))
  if t.temporary == nil then t.temporary = temporary_rcode[rcode] == true end
  return errors.new(t)
end

local function check_opts(opts, level)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error("bad argument 'opts': table expected", level + 1) end
  if opts.nameservers ~= nil and type(opts.nameservers) ~= "table" then
    error("bad argument 'opts.nameservers': table of \"host:port\" strings expected", level + 1)
  end
  if opts.timeout ~= nil and type(opts.timeout) ~= "number" then
    error("bad argument 'opts.timeout': number expected", level + 1)
  end
  return opts
end

-- A resolver whose per-try timeout lets every try (c-ares doubles it each round) fit into the
-- whole timeout. Returns r, deadline | nil, err.
function M.resolver(opts)
  local timeout = opts.timeout or M.default_timeout
  if timeout <= 0 then timeout = 0.001 end
  local servers = opts.nameservers
  local nservers = (servers and #servers > 0) and #servers or 1
  local tries = opts.tries or M.tries
  local per_try = timeout / (nservers * (2 ^ tries - 1))
  if per_try < 0.001 then per_try = 0.001 end
  local ok, r, msg = pcall(core.resolver, { nameservers = servers, timeout = per_try, tries = tries })
  if not ok then return errors.invalid("nameservers: " .. tostring(r)) end
  if not r then
    return nil, errors.new { kind = "dns", text = "resolver: " .. tostring(msg), temporary = true }
  end
  local deadline = core.now and (core.now() + timeout) or nil
  return r, deadline
end

-- Processes answers until nothing is pending or the deadline passes. True when done.
function M.drive(r, deadline)
  while true do
    local pending = r:process()
    if pending == 0 then return true end
    local t = r:timeout()
    if wait and deadline then
      local now = core.now()
      if now >= deadline then return false end
      local d = deadline
      if t and now + t < d then d = now + t end
      wait.fd(r:fd(), "r", d)
    else
      r:wait(t or 1)
    end
  end
end

-- Closes a resolver, first telling a loop that may watch its fd (the fd number is reused).
function M.close(r)
  if wait and wait.closing then wait.closing(r:fd()) end
  r:close()
end

-- Collects one query's answer: result | nil, err (pending ones past the deadline time out).
function M.collect(r, id, name)
  local res, rcode = r:result(id)
  if res then return res end
  if rcode == "pending" then
    r:cancel(id)
    rcode = "timeout"
  end
  return nil, M.error(name, rcode)
end

local function is_ipv4(s)
  local a, b, c, d = s:match("^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  return a and tonumber(a) < 256 and tonumber(b) < 256 and tonumber(c) < 256 and tonumber(d) < 256
end
local function is_ipv6(s)
  return s:find(":", 1, true) and s:match("^[%x:%.]+$") and #s <= 45 and true or false
end
M.is_ipv4, M.is_ipv6 = is_ipv4, is_ipv6

-- Literal address in `name` ("192.0.2.1", "::1", "[::1]"), or nil.
function M.literal(name)
  local inner = name:match("^%[(.*)%]$") or name
  if is_ipv4(inner) or is_ipv6(inner) then return inner end
  return nil
end

-- Normalized domain name or nil: lower case, no final dot, a valid host name.
function M.normalize(name)
  if type(name) ~= "string" then return nil end
  local n = name:gsub("%.$", ""):lower()
  if not core.valid_hostname(n) then return nil end
  return n
end

local function is_localhost(n)
  return n == "localhost" or n:sub(-10) == ".localhost"
end

-- Starts AAAA and A queries for a host; returns a pending lookup for finish_addresses.
function M.start_addresses(r, host, opts)
  local p = { host = host }
  if is_localhost(host) then
    p.fixed = { "::1", "127.0.0.1" }
    return p
  end
  if not opts.nameservers then
    p.fixed = r:hosts(host)
    if p.fixed then return p end
  end
  p.id6 = assert(r:query(host, "AAAA"))
  p.id4 = assert(r:query(host, "A"))
  return p
end

-- Addresses (AAAA first, then A, at most `max`) | nil, err for a lookup begun by start_addresses.
function M.finish_addresses(r, p, max)
  if p.fixed then return p.fixed end
  local six, err6 = M.collect(r, p.id6, p.host)
  local four, err4 = M.collect(r, p.id4, p.host)
  local out = {}
  for _, list in ipairs { six or {}, four or {} } do
    for _, a in ipairs(list) do
      if #out < max then out[#out + 1] = a end
    end
  end
  if #out > 0 then return out end
  -- Nothing: NXDOMAIN from either is final; any other failure may pass; both empty is final.
  if err6 and err6.rcode == "nxdomain" then return nil, err6 end
  if err4 and err4.rcode == "nxdomain" then return nil, err4 end
  if err4 then return nil, err4 end
  if err6 then return nil, err6 end
  return nil, M.error(p.host, "nodata", { text = p.host .. ": no address records" })
end

-- dns.resolve(name, {nameservers=, timeout=}) -> { addresses... } (AAAA, then A) | nil, err
function M.resolve(name, opts)
  if type(name) ~= "string" then error("bad argument 'name': string expected", 2) end
  opts = check_opts(opts, 2)
  local lit = M.literal(name)
  if lit then return { lit } end
  local host = M.normalize(name)
  if not host then return errors.invalid("not a valid host name: " .. ("%q"):format(name)) end
  if is_localhost(host) then return { "::1", "127.0.0.1" } end
  local r, deadline = M.resolver(opts)
  if not r then return nil, deadline end
  local p = M.start_addresses(r, host, opts)
  if not p.fixed then M.drive(r, deadline) end
  local res, err = M.finish_addresses(r, p, M.max_addresses)
  M.close(r)
  return res, err
end

local qtypes = { A = true, AAAA = true, MX = true }

-- dns.query(name, "MX"|"A"|"AAAA", opts) -> answer | nil, err
-- A/AAAA: a list of address strings; MX: a list of {host=, preference=} in preference order with
-- `null = true` for a null MX and `dropped` = records left out (bad names, duplicates, cap).
-- NOERROR without records of the type is an empty list.
function M.query(name, qtype, opts)
  if type(name) ~= "string" then error("bad argument 'name': string expected", 2) end
  if not qtypes[qtype] then error("bad argument 'qtype': \"A\", \"AAAA\" or \"MX\" expected", 2) end
  opts = check_opts(opts, 2)
  local host = M.normalize(name)
  if not host then return errors.invalid("not a valid domain name: " .. ("%q"):format(name)) end
  local r, deadline = M.resolver(opts)
  if not r then return nil, deadline end
  local id = assert(r:query(host, qtype))
  M.drive(r, deadline)
  local res, err = M.collect(r, id, host)
  M.close(r)
  return res, err
end

return M
