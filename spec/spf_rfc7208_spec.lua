-- smtp.spf through the RFC 7208 conformance suite (spec/support/rfc7208-tests.yml, the openspf
-- suite release 2014.04 that pyspf ships), each scenario's zone served by a table resolver given
-- as opts.dns. Every test must give one of the results the suite allows and, where the suite
-- names one, the same explanation.
local ok_yaml = pcall(require, "lyaml")
if not ok_yaml then
  error("missing peer: lyaml (install the Debian package lua-yaml; `make deps` does)")
end
local helper = require "helper"
local suite = require "support.spf_suite"
local spf = require "smtp.spf"

-- Where we differ from the suite on purpose: test name -> how our answer relates to the suite's.
local DIFFERS = {
  -- The suite wants %{ir} of CAFE:BABE::1 in upper case ("E.B.A.B.E.F.A.C", as pyspf writes it);
  -- RFC 7208 7.4's own example expands 2001:db8::cb01 in lower case ("1.0.b.c...8.b.d.0.1.0.0.2").
  -- We follow the RFC's example; only the case of the hex digits differs.
  ["v-macro-ip6"] = function(want, got) return got == want:lower() and got ~= want end,
}

describe("smtp.spf and the RFC 7208 test suite", function()
  local cases = suite.load(helper.root .. "/spec/support/rfc7208-tests.yml")

  it("has every scenario of the suite", function()
    assert.equal(203, #cases)
  end)

  for _, c in ipairs(cases) do
    it(("%s (%s, RFC 7208 %s)"):format(c.name, c.scenario, tostring(c.spec)), function()
      local r = assert(spf.check(c.host, c.mailfrom, c.helo,
        { dns = c.dns, default_explanation = "DEFAULT", now = 0 }))
      local allowed = {}
      for _, w in ipairs(c.results) do allowed[w] = true end
      assert.is_true(allowed[r.result], ("got %s (%s), want %s"):format(r.result, tostring(r.reason),
        table.concat(c.results, " or ")))
      if c.explanation then
        if DIFFERS[c.name] then
          assert.is_true(DIFFERS[c.name](c.explanation, r.explanation), r.explanation)
        else
          assert.equal(c.explanation, r.explanation)
        end
      end
    end)
  end
end)
