-- What the two name resolvers share: smtp.dns (c-ares in the core) and smtp.transport.ngx_dns
-- (resty.dns.resolver cosockets inside nginx). Address literals, the DNS error value, option
-- checks, the A/AAAA lookup of one host and the resolve/query drivers, written once over a
-- backend that gives resolver, drive, collect, close and normalize. Pure Lua: it must load
-- nothing native, since inside nginx the C resolver would block the worker.
local errors = require "smtp.errors"

local M = {}

-- Failures a retry may cure (rcode names as both backends report them).
M.temporary_rcode = {
  servfail = true, refused = true, timeout = true, connrefused = true, formerr = true,
  badresp = true, notimp = true, closed = true, nomem = true, cancelled = true, error = true,
}

M.rcode_text = {
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

-- The error value for a failed lookup: kind "dns", `rcode` kept so callers can tell the cases
-- apart. `extra` is a table of more fields (text, temporary, code, enhanced) or just the text.
function M.error(name, rcode, extra)
  local t = type(extra) == "table" and extra or { text = extra }
  t.kind, t.rcode, t.name = "dns", rcode, name
  t.text = t.text or (tostring(name) .. ": " .. (M.rcode_text[rcode] or rcode))
  if t.temporary == nil then t.temporary = M.temporary_rcode[rcode] == true end
  return errors.new(t)
end

function M.is_ipv4(s)
  local a, b, c, d = s:match("^(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)%.(%d%d?%d?)$")
  return a ~= nil and tonumber(a) < 256 and tonumber(b) < 256 and tonumber(c) < 256 and tonumber(d) < 256
end

-- Every IPv6 address has two colons at least ("::1"): "de.ad:53" is a name and a port.
function M.is_ipv6(s)
  return select(2, s:gsub(":", "")) >= 2 and s:match("^[%x:%.]+$") ~= nil and #s <= 45
end

function M.is_ip(s) return M.is_ipv4(s) or M.is_ipv6(s) end

-- Literal address in `name` ("192.0.2.1", "::1", "[::1]"), or nil.
function M.literal(name)
  local inner = name:match("^%[(.*)%]$") or name
  if M.is_ip(inner) then return inner end
  return nil
end

-- "localhost" and names under it resolve to loopback without DNS (RFC 6761).
function M.is_localhost(n)
  return n == "localhost" or n:sub(-10) == ".localhost"
end

-- The `opts` of resolve/query/resolver (argument #n of function fname), checked; raises at
-- `level` (of the caller) on misuse.
function M.check_opts(opts, level, fname, n)
  if opts == nil then return {} end
  local function bad(msg)
    error(("bad argument #%d to '%s' (%s)"):format(n or 1, fname or "resolver", msg), level + 2)
  end
  if type(opts) ~= "table" then bad("table expected, got " .. type(opts)) end
  if opts.nameservers ~= nil and type(opts.nameservers) ~= "table" then
    bad("nameservers: table of \"host:port\" strings expected")
  end
  if opts.timeout ~= nil and type(opts.timeout) ~= "number" then bad("timeout: number expected") end
  return opts
end

-- Starts AAAA and A queries for `host` on resolver `r` (r:query, r:hosts); returns a pending
-- lookup for finish_addresses. Without explicit nameservers the hosts file is consulted first,
-- as the system's own resolver would.
function M.start_addresses(r, host, opts)
  local p = { host = host }
  if M.is_localhost(host) then
    p.fixed = { "::1", "127.0.0.1" }
    return p
  end
  if not (opts and opts.nameservers) then
    p.fixed = r:hosts(host)
    if p.fixed then return p end
  end
  p.id6 = assert(r:query(host, "AAAA"))
  p.id4 = assert(r:query(host, "A"))
  return p
end

-- Addresses (AAAA first, then A, at most `max`) | nil, err for a lookup begun by start_addresses,
-- the answers taken with `collect(r, id, name)` of the backend.
function M.finish_addresses(collect, r, p, max)
  if p.fixed then return p.fixed end
  local six, err6 = collect(r, p.id6, p.host)
  local four, err4 = collect(r, p.id4, p.host)
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
  return nil, M.error(p.host, "nodata", p.host .. ": no address records")
end

-- resolve(name, opts) of backend D -> { addresses... } (AAAA, then A) | nil, err. Misuse raises
-- at `level` of the caller.
function M.resolve(D, name, opts, level)
  if type(name) ~= "string" then error("bad argument #1 to 'resolve' (string expected)", level + 1) end
  opts = M.check_opts(opts, level + 1, "resolve", 2)
  local lit = M.literal(name)
  if lit then return { lit } end
  local host = D.normalize(name)
  if not host then return errors.invalid("not a valid host name: " .. ("%q"):format(name)) end
  if M.is_localhost(host) then return { "::1", "127.0.0.1" } end
  local r, deadline = D.resolver(opts)
  if not r then return nil, deadline end
  local p = M.start_addresses(r, host, opts)
  if not p.fixed then D.drive(r, deadline) end
  local res, err = M.finish_addresses(D.collect, r, p, D.max_addresses)
  D.close(r)
  return res, err
end

local qtypes = { A = true, AAAA = true, MX = true }

-- query(name, "MX"|"A"|"AAAA", opts) of backend D -> answer | nil, err.
function M.query(D, name, qtype, opts, level)
  if type(name) ~= "string" then error("bad argument #1 to 'query' (string expected)", level + 1) end
  if not qtypes[qtype] then error("bad argument #2 to 'query' (\"A\", \"AAAA\" or \"MX\" expected)", level + 1) end
  opts = M.check_opts(opts, level + 1, "query", 3)
  local host = D.normalize(name)
  if not host then return errors.invalid("not a valid domain name: " .. ("%q"):format(name)) end
  local r, deadline = D.resolver(opts)
  if not r then return nil, deadline end
  local id = assert(r:query(host, qtype))
  D.drive(r, deadline)
  local res, err = D.collect(r, id, host)
  D.close(r)
  return res, err
end

-- Gives backend D (with resolver, drive, collect, close, normalize, max_addresses) the functions
-- written here once: finish_addresses(r, p[, max]), resolve(name, opts), query(name, qtype, opts).
function M.frontend(D)
  function D.finish_addresses(r, p, max)
    return M.finish_addresses(D.collect, r, p, max or D.max_addresses)
  end
  function D.resolve(name, opts)
    local res, err = M.resolve(D, name, opts, 2)   -- not a tail call: misuse raises at the caller
    return res, err
  end
  function D.query(name, qtype, opts)
    local res, err = M.query(D, name, qtype, opts, 2)
    return res, err
  end
  return D
end

return M
