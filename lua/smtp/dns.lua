-- Name resolution for lua-smtp: A/AAAA/MX/TXT/PTR through the core's c-ares resolver, waiting with
-- smtp.wait (so it yields inside smtp.loop or cqueues), never through getaddrinfo.
--
-- Numeric addresses and "localhost" resolve without DNS. When no `nameservers` are given, the
-- system's resolver configuration is used and the hosts file (/etc/hosts) is consulted first for
-- address lookups, as the system's own resolver would; with explicit `nameservers` only those
-- servers are asked (tests and MTAs want exactly what the zone says).
local core = require "smtp.core"
local errors = require "smtp.errors"
local util = require "smtp.dnsutil"

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

-- The error value for a failed lookup; `rcode` is kept so callers can tell the cases apart.
M.error = util.error

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

M.is_ipv4, M.is_ipv6, M.literal = util.is_ipv4, util.is_ipv6, util.literal

-- Normalized domain name or nil: lower case, no final dot, a valid host name.
function M.normalize(name)
  if type(name) ~= "string" then return nil end
  local n = name:gsub("%.$", ""):lower()
  if not core.valid_hostname(n) then return nil end
  return n
end

-- Starts AAAA and A queries for a host; returns a pending lookup for finish_addresses.
M.start_addresses = util.start_addresses

-- Written once in smtp.dnsutil for both resolvers:
-- dns.finish_addresses(r, p[, max]) -> addresses (AAAA first, then A) | nil, err, for a lookup
--   begun by start_addresses and driven;
-- dns.resolve(name, {nameservers=, timeout=}) -> { addresses... } (AAAA, then A) | nil, err;
-- dns.query(name, "MX"|"A"|"AAAA"|"TXT"|"PTR", opts) -> answer | nil, err. A/AAAA: a list of
--   address strings; MX: a list of {host=, preference=} in preference order with `null = true` for
--   a null MX and `dropped` = records left out (bad names, duplicates, cap); TXT: a list of strings,
--   each record's character-strings joined; PTR (name or IP address): a list of host names. NOERROR
--   without records of the type is an empty list;
-- dns.reverse_name(ip) -> the in-addr.arpa / ip6.arpa name.
return util.frontend(M)
