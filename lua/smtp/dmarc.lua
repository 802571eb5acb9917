-- DMARC (RFC 7489): the From domain's policy record (or its organizational domain's), whether a
-- passing DKIM signature or SPF check is aligned with the From domain, the result and what the
-- domain asks the receiver to do with a failing message.
local core = require "smtp.core"
local errors = require "smtp.errors"
local psl = require "smtp.psl"

local M = {}

M.max_records_seen = 10   -- TXT records looked at per name

local function lower_ascii(d)
  d = d:gsub("%.$", "")
  if d:find("[\128-\255]") then
    local a = core.idna_to_ascii(d)
    if not a then return nil end
    d = a
  end
  return d:lower()
end

-- A From value with quoted strings made empty and comments made a space: what remains cannot
-- hide an "@", "<" or "," from the split below.
local function strip_quoted(s)
  local out, i, n, depth, inq = {}, 1, #s, 0, false
  while i <= n do
    local c = s:sub(i, i)
    if inq then
      if c == "\\" then i = i + 1 elseif c == '"' then inq = false; out[#out + 1] = '""' end
    elseif depth > 0 then
      if c == "\\" then i = i + 1
      elseif c == "(" then depth = depth + 1
      elseif c == ")" then depth = depth - 1; if depth == 0 then out[#out + 1] = " " end end
    elseif c == '"' then inq = true
    elseif c == "(" then depth = 1
    else out[#out + 1] = c end
    i = i + 1
  end
  return table.concat(out)
end

-- dmarc.from_domain(from) -> the domain of the RFC5322.From field's address | nil, why.
-- `from` is the field's value (display names, comments, several addresses) or a bare address
-- or domain. Several addresses must share one domain (RFC 7489 6.6.1 leaves the choice to the
-- receiver; one domain keeps the verdict unambiguous).
function M.from_domain(from)
  if type(from) ~= "string" then error("bad argument #1 to 'from_domain' (string expected)", 2) end
  local s = strip_quoted((from:gsub("\r?\n[ \t]", " ")))
  local domains = {}
  for part in (s .. ","):gmatch("([^,]*),") do
    part = part:gsub("^[^:<@]*:", "")          -- a group's display name
    part = part:match("<([^>]*)>") or part
    part = part:gsub("[%s;]+$", ""):gsub("^%s+", "")
    if part ~= "" then
      local dom = part:match("@%s*([^@%s]+)$")
      if not dom and not part:find("[@%s]") then dom = part end   -- a bare domain
      if not dom then return nil, "no domain in From: " .. from:sub(1, 80) end
      domains[#domains + 1] = dom
    end
  end
  if #domains == 0 then return nil, "From has no address" end
  local first = lower_ascii(domains[1])
  if not first or not first:match("^[%w_%-%.]+$") or first:find("..", 1, true)
    or first:sub(1, 1) == "." then
    return nil, "not a domain in From: " .. domains[1]
  end
  for i = 2, #domains do
    if lower_ascii(domains[i]) ~= first then return nil, "From has addresses in several domains" end
  end
  return first
end

-- dmarc.parse(text) -> record | nil, why: a DMARC record (RFC 7489 6.3). v=DMARC1 first; p=
-- (none, quarantine, reject); sp=, np= (as p, for subdomains and non-existent subdomains);
-- adkim=, aspf= (r or s, default r); pct= (0..100, default 100); rua=, ruf= (lists of URIs,
-- kept); fo=, rf=, ri= kept as written. A record without a usable p= stands for p=none when it
-- has a rua= (6.6.3 step 6), else it is refused. Unknown tags are ignored.
local policies = { none = true, quarantine = true, reject = true }
function M.parse(text)
  if type(text) ~= "string" then error("bad argument #1 to 'parse' (string expected)", 2) end
  local dkim = require "smtp.dkim"
  if not text:match("^v%s*=%s*DMARC1%s*;") and not text:match("^v%s*=%s*DMARC1%s*$") then
    return nil, "not a DMARC1 record"
  end
  local tags, why = dkim.parse_tags(text)
  if not tags then return nil, "record syntax: " .. why end
  local rec = { v = "DMARC1", tags = tags }
  local function uris(v)
    if not v then return nil end
    local out = {}
    for u in (v .. ","):gmatch("([^,]*),") do
      u = u:gsub("^%s+", ""):gsub("%s+$", "")
      if u:match("^%a[%w+%-.]*:[^%s]+$") then out[#out + 1] = u end
    end
    return out
  end
  rec.rua, rec.ruf = uris(tags.rua), uris(tags.ruf)
  local p = tags.p and tags.p:lower()
  if not policies[p] then
    if rec.rua and #rec.rua > 0 then
      p = "none"
    else
      return nil, tags.p and ("bad p=" .. tags.p) or "record lacks p="
    end
  end
  rec.p = p
  for _, t in ipairs({ "sp", "np" }) do
    if tags[t] then
      local v = tags[t]:lower()
      if not policies[v] then return nil, "bad " .. t .. "=" .. tags[t] end
      rec[t] = v
    end
  end
  for _, t in ipairs({ "adkim", "aspf" }) do
    local v = (tags[t] or "r"):lower()
    if v ~= "r" and v ~= "s" then return nil, "bad " .. t .. "=" .. tags[t] end
    rec[t] = v
  end
  if tags.pct then
    local n = tags.pct:match("^%d+$") and tonumber(tags.pct)
    if not n or n > 100 then return nil, "bad pct=" .. tags.pct end
    rec.pct = n
  else
    rec.pct = 100
  end
  rec.fo, rec.rf = tags.fo, tags.rf
  if tags.ri then rec.ri = tags.ri:match("^%d+$") and tonumber(tags.ri) or nil end
  return rec
end

-- The DMARC record at _dmarc.<domain>: record | nil, "none" | nil, "temperror"|"permerror", why.
local function fetch(domain, lookup)
  local name = "_dmarc." .. domain
  local recs, err = lookup(name)
  if type(recs) == "string" then recs = { recs } end
  if type(recs) ~= "table" then
    if type(err) == "table" and err.temporary then
      return nil, "temperror", "DNS: " .. tostring(err.text or err)
    end
    return nil, "none"
  end
  local found = {}
  for i, r in ipairs(recs) do
    if i > M.max_records_seen then break end
    -- records that do not start with v=DMARC1 are not DMARC records (6.6.3 step 2)
    if type(r) == "string" and r:match("^v%s*=%s*DMARC1") then found[#found + 1] = r end
  end
  -- none, or several: no policy (6.6.3 step 3)
  if #found ~= 1 then return nil, "none", #found > 1 and ("several DMARC records at " .. name) or nil end
  local rec, why = M.parse(found[1])
  if not rec then return nil, "permerror", name .. ": " .. why end
  rec.domain = domain
  return rec
end

-- Aligned: identical (strict), or the same organizational domain (relaxed).
local function aligned(a, b, mode, org)
  if a == b then return true end
  if mode == "s" then return false end
  local oa, ob = org(a), org(b)
  return oa ~= nil and oa == ob
end

local function default_lookup(opts)
  return function(name)
    local dns = require("smtp.transport").dns()
    return dns.query(name, "TXT", { nameservers = opts.nameservers, timeout = opts.timeout })
  end
end

-- dmarc.check(opts) -> result | nil, err (the From domain missing or not a domain, no public
-- suffix list). opts:
--   from    the From field's value, an address, or a domain
--   dkim    results of dkim.verify (the passing ones count, by their d=)
--   spf     { result =, domain = } (smtp.auth.spf's result has both): the domain SPF checked
--   txt     function(name) -> records | nil, err, for tests; else DNS TXT (nameservers, timeout)
--   random  function() -> [0, 1) deciding pct=; default math.random
--   psl     a list from smtp.psl.parse/load; default the Debian one
-- result: { result = "pass"|"fail"|"none"|"temperror"|"permerror", reason =, domain = (From),
--   policy_domain =, org_domain =, record = (parsed), policy = (p=, sp= or np= as applies),
--   disposition = "none"|"quarantine"|"reject", sampled = (false when pct= spared the message),
--   dkim_domain = (the aligned d=), spf_aligned = bool, dkim_aligned = bool }
function M.check(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'check' (options table expected)", 2) end
  if type(opts.from) ~= "string" then error("bad argument #1 to 'check' (from must be a string)", 2) end
  if opts.txt ~= nil and type(opts.txt) ~= "function" then
    error("bad argument #1 to 'check' (txt must be a function)", 2)
  end
  local list = opts.psl
  if not list then
    local err
    list, err = psl.load()
    if not list then return nil, err end
  end
  local from, why = M.from_domain(opts.from)
  if not from then return errors.invalid("dmarc: " .. why:gsub("%c+", " ")) end
  local function org(d) return list:organizational_domain(d) or d end
  local lookup = opts.txt or default_lookup(opts)
  local out = { domain = from, org_domain = org(from), disposition = "none" }

  -- policy discovery (6.6.3): the From domain, then its organizational domain
  local rec, res, rwhy = fetch(from, lookup)
  if not rec and res == "none" and out.org_domain ~= from then
    rec, res, rwhy = fetch(out.org_domain, lookup)
  end
  if not rec then
    -- the reason may quote the record: no control characters in it
    out.result, out.reason = res, (rwhy or ("no DMARC record for " .. from)):gsub("%c+", " ")
    return out
  end
  out.record, out.policy_domain = rec, rec.domain
  out.policy = rec.p
  if rec.domain ~= from then out.policy = rec.sp or rec.p end

  -- identifier alignment (3.1)
  for _, r in ipairs(opts.dkim or {}) do
    if r.result == "pass" and type(r.d) == "string" then
      local d = lower_ascii(r.d)
      if d and aligned(d, from, rec.adkim, org) then
        out.dkim_aligned, out.dkim_domain = true, d
        break
      end
    end
  end
  out.dkim_aligned = out.dkim_aligned or false
  local spf = opts.spf
  out.spf_aligned = false
  if type(spf) == "table" and spf.result == "pass" and type(spf.domain) == "string" then
    local d = lower_ascii(spf.domain)
    out.spf_aligned = d ~= nil and aligned(d, from, rec.aspf, org)
  end
  if out.dkim_aligned or out.spf_aligned then
    out.result = "pass"
    return out
  end
  out.result = "fail"
  out.reason = "no aligned DKIM or SPF pass"
  -- pct= (6.6.4): a message outside the sample gets the next milder policy
  local random = opts.random or math.random
  out.sampled = rec.pct >= 100 or random() * 100 < rec.pct
  local p = out.policy
  if not out.sampled then
    p = p == "reject" and "quarantine" or "none"
  end
  out.disposition = p
  return out
end

return M
