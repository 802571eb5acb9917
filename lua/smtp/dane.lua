-- DANE for direct delivery (RFC 7672): which MX hosts of a domain must present a certificate
-- matching their DNSSEC-validated TLSA records, found through the AD bit of a validating resolver
-- on loopback; smtp.deliver asks it per domain and per host. The TLSA matching itself is
-- OpenSSL's (sock:tls_dane in csrc/tls.c).
local errors = require "smtp.errors"
local dnsutil = require "smtp.dnsutil"

local M = {}

-- Usable parameters (RFC 7672 §3.1): DANE-TA(2) and DANE-EE(3); selectors full certificate(0)
-- and SubjectPublicKeyInfo(1); matching exact(0), SHA2-256(1), SHA2-512(2) with their lengths.
local DIGEST_LEN = { [1] = 32, [2] = 64 }

local function usable(rec)
  if rec.usage ~= 2 and rec.usage ~= 3 then return false end
  if rec.selector ~= 0 and rec.selector ~= 1 then return false end
  if rec.mtype == 0 then return #rec.data > 0 end
  return DIGEST_LEN[rec.mtype] == #rec.data
end

-- dane option -> "opportunistic" | "required" | nil (off); raises on anything else.
function M.mode(v, fname)
  if v == nil or v == false then return nil end
  if v == true then return "opportunistic" end
  if v == "required" then return "required" end
  error("bad argument #1 to '" .. (fname or "deliver") .. "' (dane: true, \"required\" or false expected)", 3)
end

-- The AD bit is believed only from a resolver on this machine: between us and any other resolver
-- anyone on the path could set it. nil when every server is on loopback, else why not.
local function untrusted(r)
  local servers = r:servers()
  if #servers == 0 then return "no name server configured" end
  for _, ip in ipairs(servers) do
    if dnsutil.address_scope(ip) ~= "loopback" then
      return ("name server %s is not on loopback: its AD bit (DNSSEC validated) cannot be trusted"):format(ip)
    end
  end
  return nil
end

local function tlsa_line(rec)
  local hex = rec.data:gsub(".", function(c) return ("%02x"):format(c:byte()) end)
  if #hex > 16 then hex = hex:sub(1, 16) .. "..." end
  return ("%d %d %d %s"):format(rec.usage, rec.selector, rec.mtype, hex)
end

-- One host's decision. state:
--   "dane"      usable TLSA records, validated: STARTTLS required, the chain checked against them
--   "none"      no TLSA records, and that denial is validated: opportunistic TLS
--   "unusable"  validated TLSA records, none usable (PKIX usages, unknown parameters): opportunistic
--   "insecure"  the MX RRset, the host's addresses or its TLSA answer are not validated: opportunistic
--   "untrusted" the resolver is not one whose AD bit we believe: opportunistic
--   "defer"     the TLSA lookup failed or was bogus: this host is not used (err says why)
local Policy = {}
Policy.__index = Policy

-- dane.domain(domain, hosts, { mode=, nameservers=, timeout= }) -> policy
-- hosts as smtp.mx returns them. Never fails: a failed lookup is a "defer" decision. The policy
-- is `active` when DANE governs this domain's delivery (a host with usable TLSA records, or
-- mode "required"); an active policy means MTA-STS is not consulted (RFC 8461 §2).
function M.domain(domain, hosts, opts)
  local self = setmetatable({ mode = opts.mode, domain = domain, hosts = {}, lines = {} }, Policy)
  local function all(state, reason, err)
    for _, h in ipairs(hosts) do self.hosts[h.host] = { state = state, reason = reason, err = err } end
  end
  if ngx and ngx.socket then
    -- resty.dns neither sets nor reports the AD bit: an answer there is never known validated.
    all("untrusted", "DANE is not available inside nginx (resty.dns does not report the AD bit)")
    return self:finish()
  end
  if dnsutil.literal(domain) or domain:match("^%[") then
    all("insecure", "an address literal has no MX RRset to validate")
    return self:finish()
  end
  local dns = require "smtp.dns"
  local r, deadline = dns.resolver({ nameservers = opts.nameservers, timeout = opts.timeout })
  if not r then
    all("defer", "resolver: " .. tostring(deadline), deadline)
    return self:finish()
  end
  local why = untrusted(r)
  if why then
    dns.close(r)
    all("untrusted", why)
    return self:finish()
  end
  -- RFC 7672 §2.2.1: DANE applies only when the MX RRset (or, for an implicit MX, its
  -- non-existence) is validated.
  local qmx = assert(r:query(domain, "MX", "ad"))
  local pend = {}
  for i, h in ipairs(hosts) do
    pend[i] = {
      a = assert(r:query(h.host, "A", "ad")), aaaa = assert(r:query(h.host, "AAAA", "ad")),
      tlsa = assert(r:query("_25._tcp." .. h.host, "TLSA", "ad")),
    }
  end
  dns.drive(r, deadline)
  local mxa, mxerr, mxsec = r:result(qmx)
  if mxa == nil and mxerr == "pending" then r:cancel(qmx) end
  local mx_secure = (mxa and mxa.secure) or (mxa == nil and mxerr == "nxdomain" and mxsec) or false
  -- A lookup that failed is not an insecure one: whoever can make the resolver fail must not
  -- turn DANE off (RFC 7672 §2.1.1), so the host is not used.
  local mx_failed = mxa == nil and mxerr ~= "nxdomain" and (mxerr == "pending" and "timeout" or mxerr)
  self.mx_secure = mx_secure
  local cd = {}
  for i, h in ipairs(hosts) do
    local p = pend[i]
    local function take(id)
      local a, e, sec = r:result(id)
      if a == nil and e == "pending" then r:cancel(id); e = "timeout" end
      return a, e, sec
    end
    local a4, e4, s4 = take(p.a)
    local a6, e6, s6 = take(p.aaaa)
    local t, te, tsec = take(p.tlsa)
    local addr_secure = (a4 and a4.secure or (e4 == "nxdomain" and s4)) and
                        (a6 and a6.secure or (e6 == "nxdomain" and s6))
    local addr_failed = (not a4 and e4 ~= "nxdomain" and e4) or (not a6 and e6 ~= "nxdomain" and e6)
    local d
    if mx_failed then
      d = { state = "defer", reason = ("MX lookup of %s with DNSSEC failed: %s"):format(domain,
        dnsutil.rcode_text[mx_failed] or tostring(mx_failed)) }
    elseif not mx_secure then
      d = { state = "insecure", reason = ("MX RRset of %s not DNSSEC-validated"):format(domain) }
    elseif addr_failed then
      d = { state = "defer", reason = ("address lookup of %s with DNSSEC failed: %s"):format(h.host,
        dnsutil.rcode_text[addr_failed] or tostring(addr_failed)) }
    elseif not addr_secure then
      d = { state = "insecure", reason = ("address records of %s not DNSSEC-validated"):format(h.host) }
    elseif t then
      if not t.secure then
        d = { state = "insecure", reason = ("TLSA answer for _25._tcp.%s not DNSSEC-validated"):format(h.host) }
      elseif #t == 0 then
        d = { state = "none", reason = ("no TLSA records for _25._tcp.%s (validated denial)"):format(h.host) }
      else
        local use = {}
        for _, rec in ipairs(t) do if usable(rec) then use[#use + 1] = rec end end
        if #use == 0 then
          d = { state = "unusable", reason = ("%d TLSA record%s for _25._tcp.%s, none usable (DANE-TA/EE with a known selector and matching type)"):format(#t, #t == 1 and "" or "s", h.host) }
        else
          d = { state = "dane", tlsa = use, records = #t,
                reason = ("%d usable TLSA record%s for _25._tcp.%s"):format(#use, #use == 1 and "" or "s", h.host) }
        end
        for _, rec in ipairs(t) do self.lines[#self.lines + 1] = ("TLSA _25._tcp.%s: %s%s"):format(h.host, tlsa_line(rec), usable(rec) and "" or " (unusable)") end
      end
    elseif te == "nxdomain" then
      d = tsec and { state = "none", reason = ("no TLSA records for _25._tcp.%s (validated NXDOMAIN)"):format(h.host) }
               or { state = "insecure", reason = ("NXDOMAIN for _25._tcp.%s not DNSSEC-validated"):format(h.host) }
    else
      -- RFC 7672 §2.2: a failed TLSA lookup makes the host unusable; asked again with checking
      -- disabled, an answer means the validator rejected it (bogus), none means a plain failure.
      d = { state = "defer", rcode = te }
      if te == "servfail" then cd[#cd + 1] = { d = d, host = h.host, id = assert(r:query("_25._tcp." .. h.host, "TLSA", "cd")) } end
    end
    self.hosts[h.host] = d
  end
  if #cd > 0 then
    dns.drive(r, deadline)
    for _, c in ipairs(cd) do
      local a, e = r:result(c.id)
      if a == nil and e == "pending" then r:cancel(c.id) end
      c.d.bogus = a ~= nil or e == "nxdomain"
    end
  end
  dns.close(r)
  for _, h in ipairs(hosts) do
    local d = self.hosts[h.host]
    if d.state == "defer" and not d.reason then
      d.reason = d.bogus
        and ("TLSA lookup for _25._tcp.%s failed DNSSEC validation (bogus answer)"):format(h.host)
        or ("TLSA lookup for _25._tcp.%s failed: %s"):format(h.host, dnsutil.rcode_text[d.rcode] or tostring(d.rcode))
    end
  end
  return self:finish()
end

function Policy:finish()
  for _, d in pairs(self.hosts) do
    if d.state == "dane" then self.active = true end
  end
  if self.mode == "required" then self.active = true end
  for host, d in pairs(self.hosts) do
    if d.state == "defer" then
      d.err = d.err or errors.new { kind = "tls", phase = "tls", temporary = true, text = "DANE: " .. d.reason }
    elseif d.state ~= "dane" and self.mode == "required" then
      d.err = errors.new { kind = "tls", phase = "tls", temporary = true,
        text = ("DANE: %s (dane = \"required\" delivers only to hosts with usable TLSA records)"):format(d.reason) }
    end
    d.host = host
  end
  return self
end

-- policy:apply(h, copts) -> true | nil, err. Sets the connection options for host h (TLS
-- required, the TLSA records to match, names for DANE-TA) or says why h must not be used.
function Policy:apply(h, copts)
  local d = self.hosts[h.host]
  if not d then return true end
  if d.err then return nil, d.err end
  if d.state ~= "dane" then return true end
  copts.tls = "starttls"
  -- No CA store: the TLSA records are the trust anchors. SNI and DANE-TA's name check use the
  -- MX host name, which is also the TLSA base domain (CNAMEs are not expanded).
  copts.verify = false
  copts.servername = h.host
  copts.dane = { base = h.host, tlsa = d.tlsa, names = { h.host } }
  return true
end

-- policy:connect(h, copts, connect) -> conn | nil, err: connect(copts) under this policy. A TLS
-- failure at a DANE host (no STARTTLS, a refused STARTTLS, a chain matching no TLSA record) is a
-- temporary error whose text starts "DANE:", so the next host is tried and the message deferred,
-- never sent in plaintext nor failed for good.
function Policy:connect(h, copts, connect)
  local ok, err = self:apply(h, copts)
  if not ok then return nil, err end
  local conn
  conn, err = connect(copts)
  local d = self.hosts[h.host]
  if not conn and d and d.state == "dane" and errors.is(err) and err.kind == "tls" then
    local text = err.text or tostring(err)
    if text:find("does not offer STARTTLS", 1, true) then
      -- (the session's own words name tls = "starttls", which here is DANE's doing, not the caller's)
      text = "the server does not offer STARTTLS, which its TLSA records require"
    end
    err = errors.new { kind = "tls", phase = "tls", temporary = true,
      text = ("DANE: %s (_25._tcp.%s)"):format(text, h.host) }
  end
  return conn, err
end

-- policy:fields(host, conn) -> fields for a delivery result: tls_policy = "dane" when DANE
-- applied to the host, and dane = { state=, reason=, verified=, usage=, selector=, mtype=, depth= }.
function Policy:fields(host, conn)
  local d = self.hosts[host]
  if not d then return {} end
  local info = { state = d.state, reason = d.reason }
  if d.state == "dane" and conn then
    local m = conn.dane
    if m then
      info.verified, info.usage, info.selector, info.mtype, info.depth = true, m.usage, m.selector, m.mtype, m.depth
    end
  end
  -- DANE governed this host when it had usable records, or when its lookup (bogus, failed) or
  -- dane = "required" kept us from using it.
  return { tls_policy = (d.state == "dane" or d.err) and "dane" or nil, dane = info }
end

-- For the CLI and transcripts: "host: state (reason)" lines, TLSA records first.
function Policy:describe(hosts)
  local out = {}
  for _, l in ipairs(self.lines) do out[#out + 1] = l end
  out[#out + 1] = ("MX RRset of %s: %s"):format(self.domain, self.mx_secure and "secure" or "not validated")
  for _, h in ipairs(hosts) do
    local d = self.hosts[h.host]
    if d then out[#out + 1] = ("%s: %s (%s)"):format(h.host, d.state, d.reason) end
  end
  return out
end

M.usable = usable
return M
