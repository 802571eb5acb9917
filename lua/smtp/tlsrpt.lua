-- smtp.tlsrpt: SMTP TLS reporting (RFC 8460). Collects the TLS outcome of each delivery session
-- (smtp.deliver records them when given `tlsrpt = r`) and writes the aggregate report in the
-- RFC's JSON format. Sending the report (by mail or HTTPS to the domain's rua) is the caller's.
local M = {}

local Report = {}
Report.__index = Report

-- The result types of RFC 8460 §4.3 (negotiation, policy and DANE failures).
M.RESULT_TYPES = {
  ["starttls-not-supported"] = true, ["certificate-host-mismatch"] = true,
  ["certificate-expired"] = true, ["certificate-not-trusted"] = true, ["validation-failure"] = true,
  ["tlsa-invalid"] = true, ["dnssec-invalid"] = true, ["dane-required"] = true,
  ["sts-policy-fetch-error"] = true, ["sts-policy-invalid"] = true, ["sts-webpki-invalid"] = true,
}
local POLICY_TYPES = { sts = true, tlsa = true, ["no-policy-found"] = true }

local function strcheck(v, fname, what)
  if type(v) ~= "string" or v == "" then
    error(("bad argument #1 to '%s' (%s: non-empty string expected)"):format(fname, what), 3)
  end
end

-- tlsrpt.new{ organization_name=, contact_info=, report_id= } -> report collector
function M.new(o)
  if type(o) ~= "table" then error("bad argument #1 to 'new' (table expected)", 2) end
  strcheck(o.organization_name, "new", "organization_name")
  strcheck(o.contact_info, "new", "contact_info")
  strcheck(o.report_id, "new", "report_id")
  return setmetatable({ org = o.organization_name, contact = o.contact_info, id = o.report_id,
    policies = {}, order = {} }, Report)
end

-- The policy's lines as the report's policy-string: an STS policy's fields (from its text), or
-- a list the caller gives (TLSA records).
local function policy_strings(o)
  if type(o.policy_string) == "table" then return o.policy_string end
  local p = o.policy
  if type(p) ~= "table" then return nil end
  if p.text then
    local out = {}
    for line in (p.text:gsub("\r\n", "\n") .. "\n"):gmatch("([^\n]*)\n") do
      if line ~= "" then out[#out + 1] = line end
    end
    return out
  end
  return nil
end

-- r:record{ policy_type = "sts"|"tlsa"|"no-policy-found", policy_domain=, policy= (smtp.mtasts
-- policy) or policy_string = {...}, mx_host=, receiving_ip=, sending_ip=, helo=,
-- success = true | result_type=, failure_reason= } -> true
function Report:record(o)
  if getmetatable(self) ~= Report then error("bad argument #1 to 'record' (tlsrpt report expected)", 2) end
  if type(o) ~= "table" then error("bad argument #2 to 'record' (table expected)", 2) end
  local ptype = o.policy_type or "no-policy-found"
  if not POLICY_TYPES[ptype] then error("bad argument #2 to 'record' (policy_type: sts, tlsa or no-policy-found expected)", 2) end
  strcheck(o.policy_domain, "record", "policy_domain")
  if not o.success and not M.RESULT_TYPES[o.result_type] then
    error("bad argument #2 to 'record' (result_type: an RFC 8460 result type expected, got " .. tostring(o.result_type) .. ")", 2)
  end
  local strings = policy_strings(o)
  local key = ptype .. "\0" .. o.policy_domain:lower() .. "\0" .. table.concat(strings or {}, "\n")
  local e = self.policies[key]
  if not e then
    local mx
    if ptype == "sts" and type(o.policy) == "table" then mx = o.policy.mx end
    e = { ptype = ptype, domain = o.policy_domain:lower(), strings = strings, mx = mx,
          ok = 0, failed = 0, details = {}, dorder = {} }
    self.policies[key] = e
    self.order[#self.order + 1] = key
  end
  if o.success then
    e.ok = e.ok + 1
    return true
  end
  e.failed = e.failed + 1
  local dkey = table.concat({ o.result_type, o.sending_ip or "", o.receiving_ip or "", o.mx_host or "",
    o.helo or "", o.failure_reason or "" }, "\0")
  local d = e.details[dkey]
  if not d then
    d = { result_type = o.result_type, sending_ip = o.sending_ip, receiving_ip = o.receiving_ip,
          mx_host = o.mx_host, helo = o.helo, reason = o.failure_reason, n = 0 }
    e.details[dkey] = d
    e.dorder[#e.dorder + 1] = dkey
  end
  d.n = d.n + 1
  return true
end

-- JSON through smtp.json; objects keep RFC 8460's order (json.object), lists are arrays even
-- when empty.
local json = require "smtp.json"
local obj = json.object
local function list(t) return t and setmetatable(t, json.ARRAY) end

-- RFC 3339 date-time in UTC from seconds since the epoch (or a string given as is).
local function datetime(t, what)
  if type(t) == "string" then return t end
  if type(t) ~= "number" then
    error(("bad argument #%d to 'report' (number or string expected)"):format(what), 3)
  end
  return os.date("!%Y-%m-%dT%H:%M:%SZ", math.floor(t))
end

-- r:report(start, stop) -> the JSON report (a string) for the sessions recorded; start and stop
-- are seconds since the epoch (or RFC 3339 strings) bounding the reporting period.
function Report:report(start, stop)
  if getmetatable(self) ~= Report then error("bad argument #1 to 'report' (tlsrpt report expected)", 2) end
  local policies = {}
  for _, key in ipairs(self.order) do
    local e = self.policies[key]
    local details = {}
    for _, dk in ipairs(e.dorder) do
      local d = e.details[dk]
      details[#details + 1] = obj {
        { "result-type", d.result_type }, { "sending-mta-ip", d.sending_ip },
        { "receiving-mx-hostname", d.mx_host }, { "receiving-mx-helo", d.helo },
        { "receiving-ip", d.receiving_ip }, { "failed-session-count", d.n },
        { "failure-reason-code", d.reason },
      }
    end
    policies[#policies + 1] = obj {
      { "policy", obj {
        { "policy-type", e.ptype }, { "policy-string", list(e.strings) }, { "policy-domain", e.domain },
        { "mx-host", list(e.mx) },
      } },
      { "summary", obj { { "total-successful-session-count", e.ok }, { "total-failure-session-count", e.failed } } },
      { "failure-details", #details > 0 and details or nil },
    }
  end
  local doc = obj {
    { "organization-name", self.org },
    { "date-range", obj { { "start-datetime", datetime(start, 2) }, { "end-datetime", datetime(stop, 3) } } },
    { "contact-info", self.contact },
    { "report-id", self.id },
    { "policies", list(policies) },
  }
  return json.encode(doc)
end

-- r:reset(): forgets every recorded session (after a report was written for them).
function Report:reset()
  self.policies, self.order = {}, {}
end

return M
