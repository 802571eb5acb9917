-- SPF (RFC 7208): is this client address allowed to send mail for the MAIL FROM (or HELO)
-- domain? check_host() with every mechanism, the modifiers, the macro language and the
-- processing limits, over any resolver: smtp.dns (c-ares), the nginx resolver, or a function
-- the caller gives (tests, caches, other resolvers). Pure Lua.
local M = {}

M.max_lookups = 10      -- RFC 7208 4.6.4: terms that cause DNS lookups (include a mx ptr exists redirect)
M.max_void = 2          -- 4.6.4: lookups that answer NXDOMAIN or nothing
M.max_mx = 10           -- 4.6.4: MX names per mx term (more is a permerror)
M.max_ptr = 10          -- 4.6.4: PTR names per ptr term or %{p} (the rest are ignored)
M.default_timeout = 20  -- 4.6.4: seconds for the whole check
M.default_explanation = "%{c} is not allowed to send mail for %{d}"

local type, tostring, tonumber, error, pcall, ipairs = type, tostring, tonumber, error, pcall, ipairs
local concat, format, floor = table.concat, string.format, math.floor

-- A result that ends the whole check (permerror, temperror) travels as an error value of this
-- metatable; anything else raised is a bug and is raised again.
local Abort = {}

local function abort(result, reason, err, final)
  error(setmetatable({ result = result, reason = reason, err = err, final = final }, Abort), 0)
end
local function permerror(reason) abort("permerror", reason) end

---------------------------------------------------------------------------------------------
-- Addresses: 4 or 16 bytes.

-- "a.b.c.d" without leading zeros (the ip4-network of the grammar) -> { bytes }, and IPv6 text
-- -> its 16 bytes, through the one address parser (smtp.dnsutil).
local ip_bytes = require("smtp.dnsutil").ip_bytes

local function parse_v4(s)
  local b = ip_bytes(s)
  if not b or #b ~= 4 then return nil end
  return { b:byte(1, 4) }
end

local function parse_v6(s)
  local b = ip_bytes(s)
  if not b or #b ~= 16 then return nil end
  return { b:byte(1, 16) }
end

-- { family = 4|6, bytes = {...} } or nil. An IPv4-mapped IPv6 address is the IPv4 address it
-- carries (RFC 7208 5: such a client is an IPv4 client, checked against A records and ip4).
local function parse_ip(s)
  s = s:match("^%[(.*)%]$") or s
  local b = parse_v4(s)
  if b then return { family = 4, bytes = b } end
  if not s:find(":", 1, true) then return nil end
  b = parse_v6(s)
  if not b then return nil end
  for i = 1, 10 do if b[i] ~= 0 then return { family = 6, bytes = b } end end
  if b[11] == 255 and b[12] == 255 then
    return { family = 4, bytes = { b[13], b[14], b[15], b[16] } }
  end
  return { family = 6, bytes = b }
end

-- The first `bits` bits of two byte lists agree.
local function prefix_match(a, b, bits)
  local i = 1
  while bits >= 8 do
    if a[i] ~= b[i] then return false end
    i, bits = i + 1, bits - 8
  end
  if bits == 0 then return true end
  local size = 2 ^ (8 - bits)
  return floor(a[i] / size) == floor(b[i] / size)
end

local function v6_text(b)
  local g = {}
  for i = 1, 16, 2 do g[#g + 1] = b[i] * 256 + b[i + 1] end
  -- the longest run of two or more zero groups becomes "::" (RFC 5952)
  local best, best_len, i = nil, 1, 1
  while i <= 8 do
    if g[i] == 0 then
      local j = i
      while j < 8 and g[j + 1] == 0 do j = j + 1 end
      if j - i + 1 > best_len then best, best_len = i, j - i + 1 end
      i = j + 1
    else
      i = i + 1
    end
  end
  local function hex(from, to)
    local t = {}
    for k = from, to do t[#t + 1] = format("%x", g[k]) end
    return concat(t, ":")
  end
  if not best then return hex(1, 8) end
  return hex(1, best - 1) .. "::" .. hex(best + best_len, 8)
end

-- %{i}: dotted quad, or 32 dotted nibbles for IPv6 (RFC 7208 7.3)
local function ip_dotted(ip)
  if ip.family == 4 then return concat(ip.bytes, ".") end
  local t = {}
  for _, b in ipairs(ip.bytes) do
    t[#t + 1] = format("%x", floor(b / 16))
    t[#t + 1] = format("%x", b % 16)
  end
  return concat(t, ".")
end

local function reverse_name(ip)
  local parts = {}
  for p in ip_dotted(ip):gmatch("[^.]+") do table.insert(parts, 1, p) end
  return concat(parts, ".") .. (ip.family == 4 and ".in-addr.arpa" or ".ip6.arpa")
end

---------------------------------------------------------------------------------------------
-- Names and the macro language (RFC 7208 7).

local function valid_toplabel(l)
  if l:match("^%w+$") then return l:find("%a") ~= nil end
  return l:match("^%w+%-[%w%-]*%w$") ~= nil
end

-- A domain check_host() can look at (4.3): ASCII, two labels or more, none empty or longer than
-- 63, a top label that is not all digits (so not an address literal either).
local function valid_domain(d)
  if #d > 253 or d:find("[%[%]\128-\255]") then return false end
  local labels = {}
  for l in (d .. "."):gmatch("([^.]*)%.") do
    if #l == 0 or #l > 63 then return false end
    labels[#labels + 1] = l
  end
  return #labels >= 2 and valid_toplabel(labels[#labels])
end

-- A name worth asking DNS about: labels of 1..63 octets, 253 in all.
local function queryable(name)
  if #name == 0 or #name > 253 then return false end
  for l in (name .. "."):gmatch("([^.]*)%.") do
    if #l == 0 or #l > 63 then return false end
  end
  return true
end

local LETTERS = { s = true, l = true, o = true, d = true, i = true, p = true, h = true, v = true,
                  c = "exp", r = "exp", t = "exp" }

-- Splits a macro-string (or with `exp`, an explain-string, which may hold spaces and the c, r,
-- t macros) into tokens: { literal text } or { letter=, digits=, reverse=, delims=, upper= } or
-- { escape = "%"|" "|"%20" }. Returns tokens | nil, why.
local function tokenize(s, exp)
  local out, i, n = {}, 1, #s
  local lit_from = nil
  local function flush(to)
    if lit_from then out[#out + 1] = { text = s:sub(lit_from, to) } end
    lit_from = nil
  end
  while i <= n do
    local c = s:byte(i)
    if c == 37 then                                           -- "%"
      flush(i - 1)
      local nx = s:sub(i + 1, i + 1)
      if nx == "%" or nx == "_" or nx == "-" then
        out[#out + 1] = { escape = nx == "%" and "%" or nx == "_" and " " or "%20" }
        i = i + 2
      elseif nx == "{" then
        local close = s:find("}", i + 2, true)
        if not close then return nil, "unterminated macro in " .. s end
        local body = s:sub(i + 2, close - 1)
        local letter, digits, rev, delims = body:match("^(%a)(%d*)([rR]?)(.*)$")
        local kind = letter and LETTERS[letter:lower()]
        if not kind then return nil, "unknown macro %{" .. body .. "}" end
        if kind == "exp" and not exp then return nil, "%{" .. body .. "} is allowed in exp= text only" end
        if digits ~= "" and tonumber(digits) == 0 then return nil, "zero digit transformer in %{" .. body .. "}" end
        if not delims:match("^[%.%-%+,/_=]*$") then return nil, "bad delimiter in %{" .. body .. "}" end
        out[#out + 1] = { letter = letter:lower(), upper = letter:match("%u") ~= nil,
                          digits = tonumber(digits), reverse = rev ~= "", delims = delims }
        i = close + 1
      else
        return nil, "bad macro at '" .. s:sub(i, i + 1) .. "'"
      end
    elseif (c >= 0x21 and c <= 0x7e) or (exp and c == 0x20) then
      lit_from = lit_from or i
      i = i + 1
    else
      return nil, "character " .. format("0x%02x", c) .. " not allowed"
    end
  end
  flush(n)
  return out
end

-- domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) / macro-expand
local function check_domain_spec(spec)
  if spec == "" then return nil, "empty domain" end
  local tokens, why = tokenize(spec, false)
  if not tokens then return nil, why end
  local last = tokens[#tokens]
  if not last.text then return tokens end
  local top = last.text:gsub("%.$", ""):match("%.([^.]*)$")
  if top and valid_toplabel(top) then return tokens end
  return nil, "not a domain name: " .. spec
end

local UNRESERVED = "[^%w%-%._~]"
local function url_escape(s)
  return (s:gsub(UNRESERVED, function(ch) return format("%%%02X", ch:byte()) end))
end

-- The validated host names of the client address (RFC 7208 5.5): PTR names (the first
-- max_ptr) whose own addresses include the client. DNS errors leave a name out.
local lookup_soft

local function validated_names(st)
  local names = lookup_soft(st, st.reverse, "PTR")
  local out = {}
  if not names then return out, false end     -- a failure, not a void lookup
  for i = 1, math.min(#names, M.max_ptr) do
    local name = tostring(names[i]):gsub("%.$", ""):lower()
    local addrs = queryable(name) and lookup_soft(st, name, st.addr_type)
    for _, a in ipairs(addrs or {}) do
      local parsed = parse_ip(a)
      if parsed and parsed.family == st.ip.family and prefix_match(parsed.bytes, st.ip.bytes, st.ip.family == 4 and 32 or 128) then
        out[#out + 1] = name
        break
      end
    end
  end
  return out, #names == 0
end

local function is_subdomain(name, domain)
  return name == domain or name:sub(-#domain - 1) == "." .. domain
end

-- %{p}: a validated name that is the domain or under it, else any validated name, else "unknown".
local function p_macro(st, domain)
  local names = validated_names(st)
  domain = domain:lower()
  for _, n in ipairs(names) do if n == domain then return n end end
  for _, n in ipairs(names) do if is_subdomain(n, domain) then return n end end
  return names[1] or "unknown"
end

local function macro_value(st, letter, domain)
  if letter == "s" then return st.sender
  elseif letter == "l" then return st.localpart
  elseif letter == "o" then return st.sender_domain
  elseif letter == "d" then return domain
  elseif letter == "i" then return ip_dotted(st.ip)
  elseif letter == "p" then return p_macro(st, domain)
  elseif letter == "v" then return st.ip.family == 4 and "in-addr" or "ip6"
  elseif letter == "h" then return st.helo
  elseif letter == "c" then return st.ip.family == 4 and concat(st.ip.bytes, ".") or v6_text(st.ip.bytes)
  elseif letter == "r" then return st.receiver
  elseif letter == "t" then return format("%d", floor(st.now))
  end
end

-- Expands what tokenize made of a string.
local function expand(st, tokens, domain)
  local out = {}
  for _, t in ipairs(tokens) do
    if t.text then
      out[#out + 1] = t.text
    elseif t.escape then
      out[#out + 1] = t.escape
    else
      local value = macro_value(st, t.letter, domain)
      if t.digits or t.reverse or t.delims ~= "" then
        local set = "[" .. (t.delims == "" and "." or t.delims):gsub(".", "%%%0") .. "]"
        local parts, from = {}, 1
        while true do
          local at = value:find(set, from)
          if not at then parts[#parts + 1] = value:sub(from); break end
          parts[#parts + 1] = value:sub(from, at - 1)
          from = at + 1
        end
        if t.reverse then
          local r = {}
          for k = #parts, 1, -1 do r[#r + 1] = parts[k] end
          parts = r
        end
        if t.digits and t.digits < #parts then
          local r = {}
          for k = #parts - t.digits + 1, #parts do r[#r + 1] = parts[k] end
          parts = r
        end
        value = concat(parts, ".")
      end
      if t.upper then value = url_escape(value) end
      out[#out + 1] = value
    end
  end
  return concat(out)
end

-- A domain-spec (its tokens) expanded into the name to query (7.3: no trailing dot, cut from the
-- left to 253).
local function target_name(st, tokens, domain)
  local name = expand(st, tokens, domain):gsub("%.$", "")
  while #name > 253 do
    local cut = name:find(".", 1, true)
    if not cut then break end
    name = name:sub(cut + 1)
  end
  return name
end

---------------------------------------------------------------------------------------------
-- DNS.

local function now(st)
  return st.clock and st.clock() or nil
end

-- One answer: a list (empty for NXDOMAIN or no records) | raises temperror.
local function lookup(st, name, qtype)
  local key = qtype .. " " .. name:lower()
  local cached = st.cache[key]
  if cached then return cached end
  if not queryable(name) then
    st.cache[key] = {}
    return st.cache[key]
  end
  local timeout
  if st.deadline then
    timeout = st.deadline - now(st)
    if timeout <= 0 then abort("temperror", "time limit for the SPF check exceeded", nil, true) end
  end
  st.queries = st.queries + 1
  local ans, err = st.dns(name, qtype, timeout)   -- the time left, for resolvers that take one
  if type(ans) == "table" then
    st.cache[key] = ans
    return ans
  end
  if ans ~= nil then
    error(format("bad argument #4 to 'check' (dns: returned %s, expected a table or nil, err)", type(ans)), 0)
  end
  local rcode = type(err) == "table" and err.rcode or nil
  -- NXDOMAIN, no records, or a name no server could hold (bytes DNS names do not carry)
  if rcode == "nxdomain" or rcode == "nodata" or rcode == "badname" then
    st.cache[key] = {}
    return st.cache[key]
  end
  abort("temperror", format("%s %s: %s", name, qtype, tostring(err or "lookup failed")), err)
end

-- As lookup, but a DNS failure is nil (ptr and %{p} skip what they cannot resolve).
function lookup_soft(st, name, qtype)
  local ok, res = pcall(lookup, st, name, qtype)
  if ok then return res end
  if getmetatable(res) ~= Abort or res.final then error(res, 0) end
  return nil
end

local function count_lookup(st, term)
  st.lookups = st.lookups + 1
  if st.lookups > M.max_lookups then
    permerror(format("more than %d DNS lookups (at %s)", M.max_lookups, term))
  end
end

local function count_void(st, name)
  st.voids = st.voids + 1
  if st.voids > M.max_void then
    permerror(format("more than %d void lookups (at %s)", M.max_void, name))
  end
end

-- Any address in `list` (strings) within `bits` of the client.
local function any_match(st, list, bits)
  for _, a in ipairs(list) do
    local parsed = parse_ip(tostring(a))
    if parsed and parsed.family == st.ip.family and prefix_match(parsed.bytes, st.ip.bytes, bits) then
      return true
    end
  end
  return false
end

---------------------------------------------------------------------------------------------
-- Records (RFC 7208 4.5, 4.6).

local QUALIFIERS = { ["+"] = "pass", ["-"] = "fail", ["~"] = "softfail", ["?"] = "neutral" }

-- "/24" or "//64" suffix: returns rest, number | raises on a bad length
local function cut_cidr(s, pat, max, term)
  local rest, digits = s:match("^(.-)" .. pat .. "(%d+)$")
  if not rest then return s, nil end
  if #digits > 1 and digits:sub(1, 1) == "0" then permerror("bad CIDR length in " .. term) end
  local n = tonumber(digits)
  if n > max then permerror("CIDR length out of range in " .. term) end
  return rest, n
end

local function parse_directive(term)
  local q = term:sub(1, 1)
  local result = QUALIFIERS[q]
  local body = result and term:sub(2) or term
  result = result or "pass"
  local name, rest = body:match("^(%a[%w]*)(.*)$")
  name = name and name:lower()
  local d = { result = result, name = name, text = term }
  if not name then permerror("unknown mechanism " .. term) end
  local arg
  if rest:sub(1, 1) == ":" then
    arg = rest:sub(2)
    rest = nil
  elseif rest ~= "" and rest:sub(1, 1) ~= "/" then
    permerror("unknown mechanism " .. term)
  end

  if name == "all" then
    if arg or rest ~= "" then permerror("all takes no argument: " .. term) end
  elseif name == "include" or name == "exists" then
    if not arg then permerror(name .. " needs a domain: " .. term) end
    if rest and rest ~= "" then permerror("bad " .. name .. ": " .. term) end
    d.spec = arg
  elseif name == "a" or name == "mx" then
    local s = arg or rest
    local v6, v4
    s, v6 = cut_cidr(s, "//", 128, term)
    s, v4 = cut_cidr(s, "/", 32, term)
    if arg then
      d.spec = s
    elseif s ~= "" then
      permerror("bad " .. name .. ": " .. term)
    end
    d.cidr4, d.cidr6 = v4 or 32, v6 or 128
  elseif name == "ptr" then
    if rest and rest ~= "" then permerror("ptr takes no CIDR length: " .. term) end
    d.spec = arg
  elseif name == "ip4" or name == "ip6" then
    if not arg then permerror(name .. " needs an address: " .. term) end
    local addr, len = arg:match("^([^/]*)/(%d+)$")
    addr = addr or arg
    if len and #len > 1 and len:sub(1, 1) == "0" then permerror("bad CIDR length in " .. term) end
    local max = name == "ip4" and 32 or 128
    len = tonumber(len or max)
    if len > max then permerror("CIDR length out of range in " .. term) end
    local bytes = name == "ip4" and parse_v4(addr) or (addr:find(":", 1, true) and parse_v6(addr))
    if not bytes then permerror("bad address in " .. term) end
    d.bytes, d.bits, d.family = bytes, len, name == "ip4" and 4 or 6
  else
    permerror("unknown mechanism " .. term)
  end
  if d.spec ~= nil then
    local tokens, why = check_domain_spec(d.spec)
    if not tokens then permerror(why .. " (in " .. term .. ")") end
    d.spec = tokens
  end
  return d
end

-- The record text -> { directives..., redirect=, exp= } | raises permerror (any syntax error
-- anywhere makes the whole record a permerror, 4.6).
local function parse_record(rec)
  if rec:find("[\128-\255]") then permerror("non-ASCII characters in the SPF record") end
  local out = {}
  local seen = {}
  for term in rec:sub(7):gmatch("[^ ]+") do
    local mod, value = term:match("^(%a[%w%-_%.]*)=(.*)$")
    if mod then
      mod = mod:lower()
      if mod == "redirect" or mod == "exp" then
        if seen[mod] then permerror(mod .. "= appears twice") end
        seen[mod] = true
        local tokens, why = check_domain_spec(value)
        if not tokens then permerror(why .. " (in " .. term .. ")") end
        out[mod] = tokens
        out[mod .. "_text"] = value
      else
        local ok, why = tokenize(value, false)
        if not ok then permerror(why .. " (in " .. term .. ")") end
      end
    else
      out[#out + 1] = parse_directive(term)
    end
  end
  return out
end

-- The one SPF record of `domain`: text | nil (none) | raises (permerror for several).
local function find_record(st, domain)
  local txts = lookup(st, domain, "TXT")
  local found
  for _, t in ipairs(txts) do
    t = tostring(t)
    if t:sub(1, 6):lower() == "v=spf1" and (#t == 6 or t:sub(7, 7) == " ") then
      if found then permerror("more than one SPF record for " .. domain) end
      found = t
    end
  end
  return found, #txts == 0
end

---------------------------------------------------------------------------------------------
-- check_host() (RFC 7208 4).

local check_host

local function evaluate(st, d, domain)
  local name = d.name
  if name == "all" then return true end
  if name == "ip4" or name == "ip6" then
    return d.family == st.ip.family and prefix_match(d.bytes, st.ip.bytes, d.bits)
  end
  count_lookup(st, d.text)
  local target = d.spec and target_name(st, d.spec, domain) or domain
  if name == "include" then
    local res = check_host(st, target, true)
    if res.result == "pass" then return true end
    if res.result == "none" then permerror("include:" .. target .. " has no SPF record") end
    return false
  elseif name == "exists" then
    local list = lookup(st, target, "A")
    if #list == 0 then count_void(st, target) end
    return #list > 0
  elseif name == "a" then
    local list = lookup(st, target, st.addr_type)
    if #list == 0 then count_void(st, target) end
    return any_match(st, list, st.ip.family == 4 and d.cidr4 or d.cidr6)
  elseif name == "mx" then
    local mxs = lookup(st, target, "MX")
    if #mxs == 0 then count_void(st, target) end
    if #mxs > M.max_mx then permerror(format("%s has more than %d MX records", target, M.max_mx)) end
    local hosts = {}
    for _, m in ipairs(mxs) do
      local h = type(m) == "table" and m.host or m
      h = tostring(h):gsub("%.$", "")
      if h ~= "" then hosts[#hosts + 1] = h end
    end
    local bits = st.ip.family == 4 and d.cidr4 or d.cidr6
    for _, h in ipairs(hosts) do
      if any_match(st, lookup(st, h, st.addr_type), bits) then return true end
    end
    return false
  elseif name == "ptr" then
    local names, void = validated_names(st)
    if void then count_void(st, st.reverse) end
    target = target:lower()
    for _, n in ipairs(names) do
      if is_subdomain(n, target) then return true end
    end
    return false
  end
end

-- Returns { result=, mechanism=, domain=, exp=, reason= }; permerror and temperror raise.
-- Recursion (include, redirect) is bounded by the lookup limit: each level costs a lookup.
function check_host(st, domain, nested)
  if not valid_domain(domain) then
    return { result = "none", domain = domain, reason = "not a valid domain name: " .. domain }
  end
  local rec, void = find_record(st, domain)
  if not rec then
    if void and nested then count_void(st, domain) end
    return { result = "none", domain = domain, reason = "no SPF record for " .. domain }
  end
  local parsed = parse_record(rec)
  for _, d in ipairs(parsed) do
    if evaluate(st, d, domain) then
      return { result = d.result, mechanism = d.text, domain = domain, exp = parsed.exp,
               reason = format("%s matched %s in the record of %s", d.result, d.text, domain) }
    end
  end
  if parsed.redirect then
    count_lookup(st, "redirect=" .. parsed.redirect_text)
    local target = target_name(st, parsed.redirect, domain)
    local res = check_host(st, target, true)
    if res.result == "none" then permerror("redirect=" .. target .. ": " .. res.reason) end
    return res
  end
  return { result = "neutral", mechanism = "default", domain = domain, exp = parsed.exp,
           reason = "no mechanism matched in the record of " .. domain }
end

-- The explanation of a fail (6.2): the exp= TXT record expanded, or the default. Anything wrong
-- with exp= (DNS errors, no or several records, bad syntax, non-ASCII) falls back to the default.
local function explanation(st, res)
  -- a DNS failure here (or the time running out) only means no explanation from DNS
  local function try(f)
    local ok, r = pcall(f)
    if ok then return r end
    if getmetatable(r) ~= Abort then error(r, 0) end
    return nil
  end
  local text
  if res.exp then
    text = try(function()
      local txts = lookup(st, target_name(st, res.exp, res.domain), "TXT")
      if #txts ~= 1 then return nil end
      local tokens = tokenize(tostring(txts[1]), true)
      return tokens and expand(st, tokens, res.domain)
    end)
  end
  if not text and st.default_explanation then
    text = try(function()
      local tokens = tokenize(st.default_explanation, true)
      return tokens and expand(st, tokens, res.domain)
    end)
  end
  return text
end

---------------------------------------------------------------------------------------------
-- The default resolver: smtp.dns, or inside nginx the cosocket one (smtp.transport picks). One
-- resolver serves the whole check, under its time limit. Queries go through the backend's
-- resolver object rather than dns.query, which takes only host names for A, AAAA and MX: SPF
-- asks for the addresses of names its macros build ("1.2.0.192.in-addr._spf.example.com").
local function default_dns(opts)
  local dns = require("smtp.transport").dns()
  local util = require "smtp.dnsutil"
  local r, deadline
  local function query(name, qtype)
    local qname = util.normalize_qname(name)
    if not qname then return nil, util.error(name, "badname") end
    if not r then
      r, deadline = dns.resolver { nameservers = opts.nameservers, timeout = opts.timeout or M.default_timeout }
      if not r then return nil, deadline end
    end
    local id, why = r:query(qname, qtype)
    if not id then return nil, util.error(qname, why == "badname" and "badname" or "error", tostring(why)) end
    dns.drive(r, deadline)
    return dns.collect(r, id, qname)
  end
  local function close()
    if r then dns.close(r) end
    r = nil
  end
  local clock
  local ngx = rawget(_G, "ngx")
  if ngx and ngx.now then
    clock = function() ngx.update_time(); return ngx.now() end
  else
    local ok, core = pcall(require, "smtp.core")
    clock = ok and core.now or nil
  end
  return query, clock, close
end

local function check_args(ip, mail_from, helo, opts)
  local function bad(n, msg) error(format("bad argument #%d to 'check' (%s)", n, msg), 4) end
  if type(ip) ~= "string" then bad(1, "string expected, got " .. type(ip)) end
  if mail_from ~= nil and type(mail_from) ~= "string" then bad(2, "string or nil expected, got " .. type(mail_from)) end
  if helo ~= nil and type(helo) ~= "string" then bad(3, "string or nil expected, got " .. type(helo)) end
  if opts == nil then return {} end
  if type(opts) ~= "table" then bad(4, "table expected, got " .. type(opts)) end
  local kinds = { dns = "function", nameservers = "table", timeout = "number", query_timeout = "number",
                  receiver = "string", now = "number", clock = "function", identity = "string",
                  default_explanation = "string" }
  for k, want in pairs(kinds) do
    if opts[k] ~= nil and type(opts[k]) ~= want then
      bad(4, format("option '%s': %s expected, got %s", k, want, type(opts[k])))
    end
  end
  if opts.identity ~= nil and opts.identity ~= "mailfrom" and opts.identity ~= "helo" then
    bad(4, "option 'identity': \"mailfrom\" or \"helo\" expected")
  end
  return opts
end

-- spf.check(ip, mail_from, helo[, opts]) -> result table | nil, err (see docs/reference.md).
function M.check(ip, mail_from, helo, opts)
  opts = check_args(ip, mail_from, helo, opts)
  local errors = require "smtp.errors"
  local parsed_ip = parse_ip(ip)
  if not parsed_ip then return errors.invalid("not an IP address: " .. ("%q"):format(ip)) end
  local identity = opts.identity or "mailfrom"
  local sender = mail_from or ""
  sender = sender:match("^<(.*)>$") or sender
  helo = helo and helo:gsub("%.$", "") or nil
  if identity == "helo" or sender == "" then
    if not helo or helo == "" then
      return errors.invalid(identity == "helo" and "no HELO name to check" or "null sender and no HELO name to check")
    end
    sender = "postmaster@" .. helo
  end
  local localpart, sdomain = sender:match("^(.*)@([^@]*)$")
  if not localpart then localpart, sdomain = "postmaster", sender end
  if localpart == "" then localpart = "postmaster" end
  sdomain = sdomain:gsub("%.$", "")
  if sdomain:find("[\128-\255]") then
    -- RFC 7208 4.3: an international domain is checked as its A-labels; one that is not a valid
    -- name stays as it is and comes out "none"
    sdomain = require("smtp.check").idna_domain(sdomain) or sdomain
  end
  sender = localpart .. "@" .. sdomain

  local dns, clock, close = opts.dns, opts.clock, nil
  if not dns then dns, clock, close = default_dns(opts) end
  local st = {
    ip = parsed_ip, addr_type = parsed_ip.family == 4 and "A" or "AAAA",
    sender = sender, localpart = localpart, sender_domain = sdomain,
    helo = (helo and helo ~= "") and helo or "unknown",
    receiver = opts.receiver or "unknown", now = opts.now or os.time(),
    dns = dns, clock = clock, cache = {}, lookups = 0, voids = 0, queries = 0,
    default_explanation = opts.default_explanation or M.default_explanation,
  }
  st.reverse = reverse_name(parsed_ip)
  if clock then st.deadline = clock() + (opts.timeout or M.default_timeout) end

  local out = { identity = identity, sender = sender, domain = sdomain }
  local ok, res = pcall(check_host, st, sdomain, false)
  if ok then
    out.result, out.mechanism, out.reason = res.result, res.mechanism, res.reason
    if res.result == "fail" then
      ok, res = pcall(explanation, st, res)
      out.explanation = ok and res or nil
    end
  end
  if close then close() end
  if ok then
    out.lookups, out.void_lookups, out.queries = st.lookups, st.voids, st.queries
    return out
  elseif getmetatable(res) == Abort then
    out.result, out.reason, out.error = res.result, res.reason, res.err
  else
    error(res, 0)
  end
  out.lookups, out.void_lookups, out.queries = st.lookups, st.voids, st.queries
  return out
end

-- For other modules and tests: the macro expander on its own.
-- spf.expand(text, {ip=, sender=, helo=, domain=, receiver=, now=, exp=}) -> string | nil, why
function M.expand(text, ctx)
  local ip = parse_ip(ctx.ip or "")
  if not ip then return nil, "not an IP address" end
  local sender = ctx.sender or ("postmaster@" .. (ctx.helo or ""))
  local lp, sd = sender:match("^(.*)@([^@]*)$")
  if not lp then lp, sd = "postmaster", sender end
  if lp == "" then lp = "postmaster" end
  local tokens, why = tokenize(text, ctx.exp)
  if not tokens then return nil, why end
  local st = { ip = ip, addr_type = ip.family == 4 and "A" or "AAAA", sender = lp .. "@" .. sd,
               localpart = lp, sender_domain = sd, helo = ctx.helo or "unknown",
               receiver = ctx.receiver or "unknown", now = ctx.now or 0, cache = {},
               lookups = 0, voids = 0, queries = 0, reverse = reverse_name(ip),
               dns = ctx.dns or function() return {} end }
  local eok, res = pcall(expand, st, tokens, ctx.domain or sd)
  if eok then return res end
  if getmetatable(res) == Abort then return nil, res.reason end
  error(res, 0)
end

return M
