-- smtp.mtasts: MTA-STS (RFC 8461) for direct delivery. Discovers a domain's policy (the
-- `_mta-sts` TXT record, then the policy over HTTPS), parses it strictly, caches it (memory, and a
-- directory when asked), and gives smtp.deliver a per-domain plan: which MX hosts may be used,
-- whether TLS with a verified certificate is required, and what to report (smtp.tlsrpt).
--
-- The HTTPS fetch is a small HTTP/1.1 GET written here rather than a library: it fetches one fixed
-- path, must not follow redirects (RFC 8461 §3.3), must stop at 64 KB and a deadline, and must go
-- through the project's own transports (smtp.transport: native sockets and TLS, or cosockets inside
-- nginx) so that certificate checking, name resolution and the `destinations` policy are the ones
-- every other connection of the library uses. None of that is what an HTTP library is for.
local errors = require "smtp.errors"
local dnsutil = require "smtp.dnsutil"

local M = {}

M.max_policy_size = 65536          -- RFC 8461 §3.3: senders may refuse larger bodies (64 KB)
M.max_header_size = 16384          -- the response head, status line and fields
M.fetch_timeout = 10               -- seconds for the whole HTTPS fetch
M.max_age_limit = 31557600         -- RFC 8461 §3.2: at most one year
M.refresh_fraction = 0.5           -- a cached policy older than this part of max_age is refreshed
M.PATH = "/.well-known/mta-sts.txt"

local transport_mod = require "smtp.transport"

local function fail(result_type, text)
  return nil, errors.new { kind = "tls", phase = "mta-sts", temporary = true, text = text,
    result_type = result_type }
end

-- TXT record ---------------------------------------------------------------------------------

-- parse_txt(s) -> { id = } | nil, why. "v=STSv1; id=20160831085700Z;" (fields ";"-separated,
-- extension fields ignored, id 1 to 32 letters and digits).
function M.parse_txt(s)
  if type(s) ~= "string" then error("bad argument #1 to 'parse_txt' (string expected)", 2) end
  if s:sub(1, 8) ~= "v=STSv1;" and s ~= "v=STSv1" then return nil, "not an STSv1 record" end
  local id
  for field in (s .. ";"):gmatch("([^;]*);") do
    local f = field:match("^[ \t]*(.-)[ \t]*$")
    if f ~= "" then
      local k, v = f:match("^([%w_%.%-]+)=([\33-\58\60-\126]*)$")
      if not k then return nil, ("bad field %q"):format(f) end
      if k == "id" then
        if id then return nil, "two id fields" end
        if not v:match("^[%w]+$") or #v > 32 then return nil, ("bad id %q"):format(v) end
        id = v
      end
    end
  end
  if not id then return nil, "no id field" end
  return { id = id }
end

-- Policy -------------------------------------------------------------------------------------

-- parse(text) -> policy | nil, why. policy = { version = "STSv1", mode =, max_age =, mx = {...} }.
-- Strict: version, mode and max_age exactly once, mx at least once unless mode is none; unknown
-- fields are extensions and ignored (RFC 8461 §3.2); lines end with LF or CRLF.
function M.parse(text)
  if type(text) ~= "string" then error("bad argument #1 to 'parse' (string expected)", 2) end
  if #text > M.max_policy_size then return nil, "policy larger than " .. M.max_policy_size .. " bytes" end
  local p = { mx = {} }
  local seen = {}
  local body = text:gsub("\r\n", "\n")
  if body:find("\r", 1, true) then return nil, "bare CR in the policy" end
  if body:sub(-1) ~= "\n" then body = body .. "\n" end
  local n = 0
  for line in body:gmatch("([^\n]*)\n") do
    n = n + 1
    if line ~= "" then
      local k, v = line:match("^([%w_%.%-]+):[ \t]*(.-)[ \t]*$")
      if not k or v == "" or v:find("[%z\1-\31\127]") then
        return nil, ("line %d is not a 'key: value' field"):format(n)
      end
      if k == "mx" then
        local pat = v:lower()
        local rest = pat:match("^%*%.(.+)$") or pat
        if not rest:match("^[%w%-]+%.[%w%-%.]*[%w]$") or rest:find("..", 1, true) then
          return nil, ("bad mx pattern %q"):format(v)
        end
        p.mx[#p.mx + 1] = pat
      elseif k == "version" or k == "mode" or k == "max_age" then
        if seen[k] then return nil, "field " .. k .. " given twice" end
        seen[k] = true
        p[k] = v
      end
    end
  end
  if p.version ~= "STSv1" then return nil, "version is not STSv1" end
  if p.mode ~= "enforce" and p.mode ~= "testing" and p.mode ~= "none" then
    return nil, ("bad mode %q"):format(tostring(p.mode))
  end
  if not (p.max_age and p.max_age:match("^%d+$") and #p.max_age <= 10) then
    return nil, ("bad max_age %q"):format(tostring(p.max_age))
  end
  p.max_age = tonumber(p.max_age)
  if p.max_age > M.max_age_limit then return nil, "max_age over " .. M.max_age_limit end
  if #p.mx == 0 and p.mode ~= "none" then return nil, "no mx field" end
  p.text = text
  return p
end

-- matches(policy, host) -> true when the MX host name matches one of the policy's mx patterns;
-- "*.example.net" matches exactly one more label (RFC 8461 §4.1).
function M.matches(policy, host)
  host = host:lower():gsub("%.$", "")
  for _, pat in ipairs(policy.mx) do
    if pat:sub(1, 2) == "*." then
      local first, rest = host:match("^([^%.]+)%.(.+)$")
      if first and rest == pat:sub(3) then return true end
    elseif pat == host then
      return true
    end
  end
  return false
end

-- HTTPS fetch --------------------------------------------------------------------------------

-- Decodes a chunked body (RFC 9112 §7.1); nil, why when it is malformed or over the limit.
local function unchunk(data, limit)
  local out, n, i = {}, 0, 1
  while true do
    local size_hex, e = data:match("^(%x+)[^\r\n]*\r\n()", i)
    if not size_hex then return nil, "bad chunk" end
    local size = tonumber(size_hex, 16)
    if size == 0 then return table.concat(out) end
    n = n + size
    if n > limit then return nil, "too big" end
    local chunk = data:sub(e, e + size - 1)
    if #chunk < size or data:sub(e + size, e + size + 1) ~= "\r\n" then return nil, "bad chunk" end
    out[#out + 1] = chunk
    i = e + size + 2
  end
end

-- The address list of `host` that the destination policy allows (the HTTPS host, like an MX
-- host, is named by a domain a user may have given).
local function allowed_addresses(host, o)
  local dns = transport_mod.dns()
  local addrs, err = dns.resolve(host, { nameservers = o.nameservers, timeout = o.timeout })
  if not addrs then return nil, err end
  local ok, why = {}, nil
  for _, a in ipairs(addrs) do
    local refused = dnsutil.destination_refused(a, o.destinations or "remote")
    if refused then why = why or (a .. " (" .. refused .. ")") else ok[#ok + 1] = a end
  end
  if #ok == 0 then return nil, "refusing to connect to " .. tostring(why) end
  return ok
end

-- fetch(domain, { nameservers=, timeout=, cafile=, port=443, destinations=, bind=, proxy= }) -> policy text |
-- nil, err (err.result_type "sts-policy-fetch-error" or "sts-webpki-invalid"). One GET of
-- https://mta-sts.<domain>/.well-known/mta-sts.txt, the certificate verified for that name.
function M.fetch(domain, o)
  o = o or {}
  local host = "mta-sts." .. domain
  local t = transport_mod.get()
  local now = require("smtp.core").now
  local timeout = o.timeout or M.fetch_timeout
  local deadline = now() + timeout
  local addrs, aerr = allowed_addresses(host, o)
  if not addrs then return fail("sts-policy-fetch-error", host .. ": " .. tostring(aerr)) end
  local s, err
  for _, a in ipairs(addrs) do
    local left = deadline - now()
    if left <= 0 then break end
    s, err = t.connect { host = a, port = o.port or 443, timeout = left, bind = o.bind, proxy = o.proxy,
      tls = { servername = host, verify = true, cafile = o.cafile, timeout = left } }
    if s then break end
    if errors.is(err) and err.kind == "tls" then
      return fail("sts-webpki-invalid", host .. ": " .. tostring(err.text))
    end
  end
  if not s then return fail("sts-policy-fetch-error", host .. ": " .. tostring(err or "timed out")) end
  local req = "GET " .. M.PATH .. " HTTP/1.1\r\nHost: " .. host ..
    "\r\nUser-Agent: lua-smtp\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
  local ok, werr = s:write(req, math.max(deadline - now(), 0.001))
  if not ok then s:close(); return fail("sts-policy-fetch-error", host .. ": " .. tostring(werr)) end
  local parts, have, head, body_at, clen, chunked = {}, 0, nil, nil, nil, false
  local limit = M.max_header_size + M.max_policy_size
  while true do
    local left = deadline - now()
    if left <= 0 then s:close(); return fail("sts-policy-fetch-error", host .. ": timed out") end
    local chunk, rerr = s:read(left)
    if not chunk then
      if errors.is(rerr) and rerr.kind == "closed" then break end
      s:close()
      return fail("sts-policy-fetch-error", host .. ": " .. tostring(rerr))
    end
    parts[#parts + 1] = chunk
    have = have + #chunk
    if not head then
      local all = table.concat(parts)
      parts = { all }
      local e = all:find("\r\n\r\n", 1, true)
      if e then
        head, body_at = all:sub(1, e - 1), e + 4
      elseif #all > M.max_header_size then
        s:close()
        return fail("sts-policy-fetch-error", host .. ": response head over " .. M.max_header_size .. " bytes")
      end
      if head then
        local code = head:match("^HTTP/1%.[01] (%d%d%d)")
        if not code then s:close(); return fail("sts-policy-fetch-error", host .. ": not an HTTP/1.x response") end
        if code ~= "200" then
          s:close()
          -- RFC 8461 §3.3: redirects are not followed; any other status is no policy
          return fail("sts-policy-fetch-error", ("%s: HTTP %s%s"):format(host, code,
            code:sub(1, 1) == "3" and " (redirects are not followed)" or ""))
        end
        local ctype
        for line in head:gmatch("\r\n([^\r\n]*)") do
          local k, v = line:match("^([^:]+):[ \t]*(.-)[ \t]*$")
          if k then
            k = k:lower()
            if k == "content-type" then ctype = v:lower()
            elseif k == "content-length" then clen = tonumber(v:match("^%d+$") or "")
            elseif k == "transfer-encoding" then chunked = v:lower():find("chunked", 1, true) ~= nil
            end
          end
        end
        if not ctype or not ctype:match("^text/plain%s*;?") and ctype ~= "text/plain" then
          s:close()
          return fail("sts-policy-invalid", host .. ": Content-Type is " .. tostring(ctype) .. ", not text/plain")
        end
        if clen and clen > M.max_policy_size then
          s:close()
          return fail("sts-policy-invalid", ("%s: policy of %d bytes over the %d-byte limit"):format(host, clen, M.max_policy_size))
        end
      end
    end
    if head then
      local got = have - body_at + 1
      if got > M.max_policy_size + (chunked and 4096 or 0) then
        s:close()
        return fail("sts-policy-invalid", ("%s: policy over the %d-byte limit"):format(host, M.max_policy_size))
      end
      if clen and got >= clen then break end
      if chunked and table.concat(parts):find("\r\n0\r\n", body_at - 2, true) then break end
    end
    if have > limit + 4096 then
      s:close()
      return fail("sts-policy-invalid", host .. ": response over the size limit")
    end
  end
  s:close()
  if not head then return fail("sts-policy-fetch-error", host .. ": the connection closed before the response head") end
  local body = table.concat(parts):sub(body_at)
  if chunked then
    local b, why = unchunk(body, M.max_policy_size)
    if not b then return fail("sts-policy-invalid", host .. ": chunked body: " .. why) end
    body = b
  elseif clen then
    if #body < clen then return fail("sts-policy-fetch-error", host .. ": body shorter than Content-Length") end
    body = body:sub(1, clen)
  end
  if #body > M.max_policy_size then
    return fail("sts-policy-invalid", ("%s: policy over the %d-byte limit"):format(host, M.max_policy_size))
  end
  return body
end

-- Cache --------------------------------------------------------------------------------------

local Cache = {}
Cache.__index = Cache

local caches = {}   -- by directory ("" for memory only): deliveries in one process share them

-- cache{ dir = } -> the process's cache for that directory (memory only without dir). Entries
-- are { id =, policy =, fetched = <os.time()> }; in the directory, one file per domain holding
-- "id fetched\n" and the policy text, written to a temporary name and renamed.
function M.cache(o)
  local dir = o and o.dir or ""
  if type(dir) ~= "string" then error("bad argument #1 to 'cache' (dir: string expected)", 2) end
  local c = caches[dir]
  if not c then
    c = setmetatable({ dir = dir ~= "" and dir or nil, mem = {} }, Cache)
    caches[dir] = c
  end
  return c
end

local function file_of(self, domain)
  return self.dir .. "/" .. domain .. ".sts"
end

-- new_cache{ dir = } -> a cache of its own (not the process's shared one).
function M.new_cache(o)
  local dir = o and o.dir
  if dir ~= nil and type(dir) ~= "string" then error("bad argument #1 to 'new_cache' (dir: string expected)", 2) end
  return setmetatable({ dir = dir, mem = {} }, Cache)
end

function Cache:get(domain)
  local e = self.mem[domain]
  if e or not self.dir then return e end
  local f = io.open(file_of(self, domain), "rb")
  if not f then return nil end
  local data = f:read("*a")
  f:close()
  local id, fetched, text = data:match("^(%w+) (%d+)\n(.*)$")
  local p = text and M.parse(text)
  if not p then return nil end
  e = { id = id, policy = p, fetched = tonumber(fetched) }
  self.mem[domain] = e
  return e
end

function Cache:put(domain, e)
  self.mem[domain] = e
  if not self.dir then return true end
  local path = file_of(self, domain)
  local tmp = path .. ".tmp" .. tostring(math.random(1, 1e9))
  local f, err = io.open(tmp, "wb")
  if not f then return nil, err end
  f:write(("%s %d\n"):format(e.id, e.fetched), e.policy.text)
  f:close()
  local ok, rerr = os.rename(tmp, path)
  if not ok then os.remove(tmp); return nil, rerr end
  return true
end

function Cache:forget(domain)
  self.mem[domain] = nil
  if self.dir then os.remove(file_of(self, domain)) end
end

-- Discovery ----------------------------------------------------------------------------------

local function clock(o) return (o.now or os.time)() end

local function usable(e, o)
  return e and clock(o) < e.fetched + e.policy.max_age
end

-- The one STSv1 TXT record of the domain: { id = } | false (none, or not exactly one valid) |
-- nil, err (lookup failed).
local function txt_record(domain, o)
  local dns = transport_mod.dns()
  local recs, err = dns.query("_mta-sts." .. domain, "TXT", { nameservers = o.nameservers, timeout = o.dns_timeout or o.timeout })
  if not recs then
    if errors.is(err) and not err.temporary then return false end   -- NXDOMAIN: no policy
    return nil, err
  end
  local found
  for _, r in ipairs(recs) do
    if r:sub(1, 7) == "v=STSv1" then
      if found then return false, "more than one STSv1 record" end
      local rec, why = M.parse_txt(r)
      if not rec then return false, why end
      found = rec
    end
  end
  return found or false
end

-- Fetches and caches a policy for `id`; the entry | nil, err.
local function refetch(domain, id, o, cache)
  local text, err = M.fetch(domain, o)
  if not text then return nil, err end
  local p, why = M.parse(text)
  if not p then
    return fail("sts-policy-invalid", "mta-sts." .. domain .. ": " .. why)
  end
  local e = { id = id, policy = p, fetched = clock(o) }
  cache:put(domain, e)
  return e
end

-- Starts a refresh of `domain`'s policy beside the caller, where the runtime has a way to run
-- one (a timer inside nginx, a task inside smtp.loop); false otherwise.
local function refresh_later(domain, id, o, cache)
  local job = function() pcall(refetch, domain, id, o, cache) end
  if transport_mod.inside_nginx() then
    local ok = pcall(ngx.timer.at, 0, job)   -- luacheck: ignore (ngx is the OpenResty global)
    return ok
  end
  local ok, loop = pcall(require, "smtp.loop")
  if ok and type(loop) == "table" and loop.current and loop.current() then
    loop.spawn(job)
    return true
  end
  return false
end

-- policy(domain, o) -> state. o: nameservers=, timeout=, dns_timeout=, cafile=, port=,
-- destinations=, cache_dir=, cache= (an mtasts.cache), now= (a clock in seconds, os.time).
-- state = { domain=, mode = "enforce"|"testing"|"none"|nil, policy=, id=, source = "fetched"|
-- "cache"|"none", failure = err (with result_type) when discovery or the fetch failed }.
-- Never fails: every failure means "no policy" unless a cached policy is still valid (§5.1).
function M.policy(domain, o)
  if type(domain) ~= "string" then error("bad argument #1 to 'policy' (string expected)", 2) end
  o = o or {}
  domain = domain:lower():gsub("%.$", "")
  local cache = o.cache or M.cache { dir = o.cache_dir }
  local cached = cache:get(domain)
  if cached and not usable(cached, o) then cached = nil end
  local st = { domain = domain }
  local rec, terr = txt_record(domain, o)
  local function use(e, source)
    st.policy, st.id, st.mode, st.source = e.policy, e.id, e.policy.mode, source
    return st
  end
  if not rec then
    -- no record (or a failed lookup): a still-valid cached policy goes on applying (§5.1)
    if cached then return use(cached, "cache") end
    st.source = "none"
    if rec == nil then
      -- the lookup failed (not "no record"): reported as a fetch failure; a malformed record
      -- is no policy, as RFC 8461 §3.1 says, and nothing to report
      st.failure = errors.new { kind = "dns", phase = "mta-sts", text = tostring(terr and terr.text or terr),
        temporary = true, result_type = "sts-policy-fetch-error" }
    end
    return st
  end
  if cached and cached.id == rec.id then
    if clock(o) - cached.fetched > cached.policy.max_age * M.refresh_fraction and o.background ~= false then
      refresh_later(domain, rec.id, o, cache)
    end
    return use(cached, "cache")
  end
  local e, err = refetch(domain, rec.id, o, cache)
  if e then return use(e, "fetched") end
  if cached then
    st.failure = err
    return use(cached, "cache")
  end
  st.source, st.id, st.failure = "none", rec.id, err
  return st
end

-- Delivery plan ------------------------------------------------------------------------------

-- The TLS-RPT result type for a failed connection attempt under a policy.
function M.result_type(err)
  local text = errors.is(err) and tostring(err.text or "") or tostring(err)
  if text:find("does not offer STARTTLS", 1, true) then return "starttls-not-supported" end
  -- OpenSSL's words natively ("hostname mismatch"), lua-nginx-module's inside nginx ("certificate
  -- host mismatch")
  if text:find("host%s*name mismatch") or text:find("host mismatch", 1, true) or text:find("is not for", 1, true) then
    return "certificate-host-mismatch"
  end
  if text:find("expired", 1, true) then return "certificate-expired" end
  if text:find("unknown CA", 1, true) or text:find("self.signed") or text:find("issuer", 1, true) then
    return "certificate-not-trusted"
  end
  return "validation-failure"
end

local Plan = {}
Plan.__index = Plan

-- plan(domain, o, report) -> a Plan for smtp.deliver (o as for policy, plus `cafile` for the MX
-- hosts' certificates; report: an smtp.tlsrpt or nil).
function M.plan(domain, o, report)
  local st = M.policy(domain, o)
  local self = setmetatable({ st = st, o = o, report = report, failures = {}, verified = false }, Plan)
  if report and st.failure and not st.policy then
    report:record { policy_type = "sts", policy_domain = domain, result_type = st.failure.result_type,
      failure_reason = st.failure.text }
  end
  return self
end

function Plan:mode() return self.st.mode end

-- Whether the policy asks for verified TLS to this host (enforce and testing).
function Plan:strict()
  local m = self.st.mode
  return m == "enforce" or m == "testing"
end

function Plan:_fail(h, address, result_type, text)
  self.failures[#self.failures + 1] = { result_type = result_type, host = h.host, address = address, text = text }
  if self.report then
    self.report:record { policy_type = "sts", policy_domain = self.st.domain, policy = self.st.policy,
      mx_host = h.host, receiving_ip = address, result_type = result_type, failure_reason = text }
  end
end

-- A reason string when the policy (enforce) forbids this MX host; testing reports and allows.
function Plan:refuses(h, address)
  if not self:strict() or M.matches(self.st.policy, h.host) then return nil end
  local why = ("MX host %s is not in the MTA-STS policy of %s"):format(h.host, self.st.domain)
  self:_fail(h, address, "validation-failure", why)
  if self.st.mode == "enforce" then return why end
  return nil
end

-- Sets the connection options a strict policy asks for: STARTTLS required, the certificate
-- verified against the MX host's name (smtp.send's checks).
function Plan:tighten(copts, h)
  if not self:strict() then return false end
  copts.tls, copts.verify, copts.servername = "starttls", true, h.host
  copts.cafile = self.o.cafile
  return true
end

-- After smtp.connect under a tightened plan: records the outcome; under testing, a TLS failure
-- is reported and the host tried again as without a policy (`relaxed` options).
function Plan:after_connect(conn, err, h, address, smtp, relaxed)
  if not self:strict() then
    -- no policy (or mode none): the session is counted as one without a policy (RFC 8460 §4.4)
    if conn and self.report then
      local tls = conn:info().tls
      self.report:record { policy_type = "no-policy-found", policy_domain = self.st.domain, mx_host = h.host,
        receiving_ip = address, success = tls and true or nil,
        result_type = not tls and "starttls-not-supported" or nil }
    end
    return conn, err
  end
  if conn then
    self.verified = true
    if self.report then
      self.report:record { policy_type = "sts", policy_domain = self.st.domain, policy = self.st.policy,
        mx_host = h.host, receiving_ip = address, success = true }
    end
    return conn
  end
  if not (errors.is(err) and err.kind == "tls") then return nil, err end
  self:_fail(h, address, M.result_type(err), err.text)
  if self.st.mode == "testing" and relaxed then return smtp.connect(relaxed) end
  return nil, err
end

-- The fields added to each result of a domain that has a policy (or whose discovery failed): mta_sts = { mode=, id=, source=, verified=,
-- failures = { { result_type=, host=, address=, text= }... }, error = why discovery failed }.
function Plan:annotate(results, idx)
  local st = self.st
  if not st.policy and not st.failure then return end   -- no policy: results as without MTA-STS
  local f = { mode = st.mode or "none", id = st.id, source = st.source, verified = self.verified,
    failures = self.failures, error = st.failure and st.failure.text or nil }
  for _, i in ipairs(idx) do
    if results[i] then results[i].mta_sts = f end
  end
end

return M
