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

-- What kind of address an IP address is, for deciding where direct delivery may connect.
-- Scopes on this host or its link (refused by default): "unspecified", "loopback", "link-local",
-- "multicast", "reserved"; not on the public Internet (refused when only public destinations are
-- allowed): "private" (RFC 1918, ULA, site-local), "shared" (CGNAT, RFC 6598), "documentation",
-- "special" (benchmarking, IETF protocol assignments, discard, unassigned IPv6); else "public".
local V4_RANGES = {                 -- { first octets as a number, prefix length, scope }
  { 0x00000000, 8, "unspecified" }, { 0x7f000000, 8, "loopback" }, { 0xa9fe0000, 16, "link-local" },
  { 0xe0000000, 4, "multicast" }, { 0xf0000000, 4, "reserved" },
  { 0x0a000000, 8, "private" }, { 0xac100000, 12, "private" }, { 0xc0a80000, 16, "private" },
  { 0x64400000, 10, "shared" },
  { 0xc0000200, 24, "documentation" }, { 0xc6336400, 24, "documentation" }, { 0xcb007100, 24, "documentation" },
  { 0xc0000000, 24, "special" }, { 0xc6120000, 15, "special" },
}

-- "a.b.c.d" -> the address as a number; nil unless four decimal octets without leading zeros
-- (what inet_pton takes: "010.0.0.1" must not be read one way here and another way by connect).
local function v4_number(s)
  local n = 0
  local count = 0
  for octet in (s .. "."):gmatch("([^.]*)%.") do
    if not octet:match("^%d%d?%d?$") or (#octet > 1 and octet:sub(1, 1) == "0") then return nil end
    local v = tonumber(octet)
    if v > 255 then return nil end
    n, count = n * 256 + v, count + 1
  end
  if count ~= 4 then return nil end
  return n
end

local function v4_scope(n)
  for _, r in ipairs(V4_RANGES) do
    local size = 2 ^ (32 - r[2])
    if math.floor(n / size) == math.floor(r[1] / size) then return r[3] end
  end
  return "public"
end

-- IPv6 text (no zone) -> its eight 16-bit groups, or nil.
local function v6_groups(s)
  local function parts(str)
    local out = {}
    if str == "" then return out end
    for p in (str .. ":"):gmatch("([^:]*):") do out[#out + 1] = p end
    return out
  end
  local head, tail = s:match("^(.-)::(.*)$")
  local h, t = parts(head or s), parts(tail or "")
  if head and (tail:find("::", 1, true)) then return nil end
  local function expand(list, last)
    local out = {}
    for i, p in ipairs(list) do
      if last and i == #list and p:find(".", 1, true) then
        local n = v4_number(p)
        if not n then return nil end
        out[#out + 1] = math.floor(n / 65536)
        out[#out + 1] = n % 65536
      elseif p:match("^%x%x?%x?%x?$") then
        out[#out + 1] = tonumber(p, 16)
      else
        return nil
      end
    end
    return out
  end
  h = expand(h, not head)
  t = t and expand(t, true)
  if not h or not t then return nil end
  local fill = 8 - #h - #t
  if (head and fill < 1) or (not head and fill ~= 0) then return nil end
  local g = {}
  for _, v in ipairs(h) do g[#g + 1] = v end
  for _ = 1, fill do g[#g + 1] = 0 end
  for _, v in ipairs(t) do g[#g + 1] = v end
  return g
end

local function v6_scope(g)
  local zero_to = 0
  while zero_to < 8 and g[zero_to + 1] == 0 do zero_to = zero_to + 1 end
  if zero_to == 8 then return "unspecified" end
  if zero_to == 7 and g[8] == 1 then return "loopback" end
  -- An IPv4 address inside: mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96), 6to4 (2002::/16).
  if zero_to == 5 and g[6] == 0xffff then return v4_scope(g[7] * 65536 + g[8]) end
  if zero_to >= 6 then return "reserved" end                -- IPv4-compatible (deprecated)
  if g[1] == 0x64 and g[2] == 0xff9b and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0 then
    return v4_scope(g[7] * 65536 + g[8])
  end
  if g[1] == 0x2002 then
    local inner = v4_scope(g[2] * 65536 + g[3])
    if inner ~= "public" then return inner end
  end
  local top = g[1]
  if top >= 0xfe80 and top <= 0xfebf then return "link-local" end
  if top >= 0xfec0 and top <= 0xfeff then return "private" end     -- site-local (deprecated)
  if top >= 0xfc00 and top <= 0xfdff then return "private" end     -- unique local (ULA)
  if top >= 0xff00 then return "multicast" end
  if top == 0x2001 and g[2] == 0x0db8 then return "documentation" end
  if top < 0x2000 or top > 0x3fff then return "special" end        -- outside global unicast
  return "public"
end

-- The address as a string of 4 or 16 bytes in network order, or nil: four decimal octets without
-- leading zeros, or IPv6 in any RFC 4291 text form (an IPv4 tail included); no brackets, no zone.
-- The one address parser of the pure-Lua parts (SPF, the server's trusted-address lists, scopes).
function M.ip_bytes(s)
  if type(s) ~= "string" then return nil end
  local n = v4_number(s)
  if n then
    return string.char(math.floor(n / 2 ^ 24) % 256, math.floor(n / 2 ^ 16) % 256, math.floor(n / 256) % 256, n % 256)
  end
  if #s > 45 or not s:find(":", 1, true) or s:find("[^%x:%.]") then return nil end
  local g = v6_groups(s)
  if not g then return nil end
  local out = {}
  for i = 1, 8 do out[i] = string.char(math.floor(g[i] / 256), g[i] % 256) end
  return table.concat(out)
end

-- scope("192.0.2.1") -> "documentation"; nil for text that is not an IP address.
function M.address_scope(addr)
  if type(addr) ~= "string" then return nil end
  addr = (addr:match("^%[(.*)%]$") or addr):gsub("%%.*$", "")
  local n = v4_number(addr)
  if n then return v4_scope(n) end
  if not addr:find(":", 1, true) then return nil end
  local g = v6_groups(addr)
  return g and v6_scope(g) or nil
end

local NEAR = { unspecified = true, loopback = true, ["link-local"] = true, multicast = true, reserved = true }

-- Where smtp.deliver may connect: "any", "remote" (the default: not this host, its link,
-- multicast or reserved space) or "public" (public Internet addresses only).
M.DESTINATIONS = { any = true, remote = true, public = true }

-- nil when `policy` allows connecting to `addr`, else why not ("loopback address").
function M.destination_refused(addr, policy)
  if policy == "any" then return nil end
  local scope = M.address_scope(addr)
  if not scope then return "not an IP address" end
  if scope == "public" or (policy ~= "public" and not NEAR[scope]) then return nil end
  return scope .. " address"
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

M.QTYPES = { A = true, AAAA = true, MX = true, TXT = true, PTR = true }

-- A name that may be asked for TXT or PTR records, normalized (lower case, no final dot), or nil:
-- labels of 1 to 63 printable ASCII bytes but "\\" (underscores as in "_dmarc" and whatever SPF
-- macros produce), 253 bytes at most. The same rule as dns_valid_qname in the core.
function M.normalize_qname(name)
  if type(name) ~= "string" then return nil end
  local n = name:gsub("%.$", ""):lower()
  if n == "" or #n > 253 or n:find("[^%w%p]") or n:find("\\", 1, true) then return nil end
  for label in (n .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 then return nil end
  end
  return n
end

-- The name a PTR query asks for an address: "192.0.2.1" -> "1.2.0.192.in-addr.arpa",
-- "2001:db8::1" -> "1.0.0.0...8.b.d.0.1.0.0.2.ip6.arpa"; nil for text that is not an address.
function M.reverse_name(addr)
  if type(addr) ~= "string" then return nil end
  addr = addr:match("^%[(.*)%]$") or addr
  local n = v4_number(addr)
  if n then
    local o = {}
    for i = 4, 1, -1 do o[i] = tostring(n % 256); n = math.floor(n / 256) end
    return ("%s.%s.%s.%s.in-addr.arpa"):format(o[4], o[3], o[2], o[1])
  end
  if not addr:find(":", 1, true) then return nil end
  local g = v6_groups(addr)
  if not g then return nil end
  local hex = {}
  for i = 1, 8 do hex[#hex + 1] = ("%04x"):format(g[i]) end
  local nibbles = table.concat(hex):reverse()
  return nibbles:gsub(".", "%0.") .. "ip6.arpa"
end

-- query(name, "MX"|"A"|"AAAA"|"TXT"|"PTR", opts) of backend D -> answer | nil, err. For PTR the
-- name may be an IP address: its reverse name is asked.
function M.query(D, name, qtype, opts, level)
  if type(name) ~= "string" then error("bad argument #1 to 'query' (string expected)", level + 1) end
  if not M.QTYPES[qtype] then
    error("bad argument #2 to 'query' (\"A\", \"AAAA\", \"MX\", \"TXT\" or \"PTR\" expected)", level + 1)
  end
  opts = M.check_opts(opts, level + 1, "query", 3)
  local host
  if qtype == "PTR" and M.literal(name) then
    host = M.reverse_name(M.literal(name))
  elseif qtype == "TXT" or qtype == "PTR" then
    host = M.normalize_qname(name)
  else
    host = D.normalize(name)
  end
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
-- written here once: finish_addresses(r, p[, max]), resolve(name, opts), query(name, qtype, opts),
-- reverse_name(addr).
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
  D.reverse_name = M.reverse_name
  return D
end

return M
