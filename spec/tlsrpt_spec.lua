-- smtp.tlsrpt: outcomes aggregated into the RFC 8460 JSON report, checked by Python's json and
-- spec/support/tlsrpt_check.py (every field of §4.4 with its type, counts adding up).
local helper = require "helper"
local tlsrpt = require "smtp.tlsrpt"
local mtasts = require "smtp.mtasts"

local function check(json)
  local dir = helper.tmpdir()
  helper.write(dir .. "/r.json", json)
  local p = io.popen(helper.python .. " " .. helper.quote(helper.root .. "/spec/support/tlsrpt_check.py") ..
    " < " .. helper.quote(dir .. "/r.json") .. " 2>&1")
  local out = p:read("*a")
  p:close()
  return out
end

local function decode(json)
  -- Python re-encodes with sorted keys: a stable form to compare against
  local dir = helper.tmpdir()
  helper.write(dir .. "/r.json", json)
  local p = io.popen(helper.python .. " -c 'import json,sys; print(json.dumps(json.load(sys.stdin), sort_keys=True))' < "
    .. helper.quote(dir .. "/r.json"))
  local out = p:read("*a")
  p:close()
  return out
end

describe("smtp.tlsrpt", function()
  local pol = assert(mtasts.parse("version: STSv1\nmode: testing\nmx: *.mail.example\nmax_age: 86400\n"))

  it("writes a report of the RFC's shape", function()
    local r = tlsrpt.new { organization_name = "Example Sender", contact_info = "tls@sender.test",
      report_id = "2026-12-05T00:00:00Z_example.test" }
    for _ = 1, 3 do
      r:record { policy_type = "sts", policy_domain = "example.test", policy = pol, mx_host = "a.mail.example",
        receiving_ip = "192.0.2.1", success = true }
    end
    r:record { policy_type = "sts", policy_domain = "example.test", policy = pol, mx_host = "b.mail.example",
      receiving_ip = "192.0.2.2", result_type = "certificate-expired", failure_reason = "certificate has expired" }
    r:record { policy_type = "sts", policy_domain = "example.test", policy = pol, mx_host = "b.mail.example",
      receiving_ip = "192.0.2.2", result_type = "certificate-expired", failure_reason = "certificate has expired" }
    r:record { policy_type = "sts", policy_domain = "broken.test", result_type = "sts-policy-fetch-error",
      failure_reason = "HTTP 404" }
    r:record { policy_type = "no-policy-found", policy_domain = "plain.test", mx_host = "mx.plain.test", success = true }
    r:record { policy_type = "tlsa", policy_domain = "dane.test", policy_string = { "3 1 1 AABB" },
      mx_host = "mx.dane.test", result_type = "tlsa-invalid" }
    local json = r:report(1764892800, 1764979199)
    assert.equal("ok\n", check(json))
    local d = decode(json)
    assert.truthy(d:find('"date-range": {"end-datetime": "2025-12-05T23:59:59Z", "start-datetime": "2025-12-05T00:00:00Z"}', 1, true))
    assert.truthy(d:find('"summary": {"total-failure-session-count": 2, "total-successful-session-count": 3}', 1, true))
    assert.truthy(d:find('"failed-session-count": 2', 1, true))
    assert.truthy(d:find('"policy-string": ["version: STSv1", "mode: testing", "mx: *.mail.example", "max_age: 86400"]', 1, true))
    assert.truthy(d:find('"mx-host": ["*.mail.example"]', 1, true))
    assert.truthy(d:find('"policy-type": "no-policy-found"', 1, true))
    r:reset()
    assert.equal("ok\n", check(r:report("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z")))
  end)

  it("escapes what JSON needs escaped", function()
    local r = tlsrpt.new { organization_name = 'Quote " and \\ and \1', contact_info = "x@y.test", report_id = "1" }
    r:record { policy_domain = "a.test", result_type = "validation-failure", failure_reason = "line\nbreak" }
    local json = r:report(0, 1)
    assert.equal("ok\n", check(json))
    assert.truthy(json:find('"Quote \\" and \\\\ and \\u0001"', 1, true))
  end)

  it("raises on misuse", function()
    assert.has_error(function() tlsrpt.new {} end, "bad argument #1 to 'new' (organization_name: non-empty string expected)")
    local r = tlsrpt.new { organization_name = "o", contact_info = "c", report_id = "i" }
    assert.has_error(function() r:record { policy_domain = "a.test", result_type = "oops" } end)
    assert.has_error(function() r:record { policy_type = "dane", policy_domain = "a.test", success = true } end)
    assert.has_error(function() r:report({}, 1) end)
  end)
end)
