-- The C core loads on the interpreter under test and has the shape the Lua layer expects.
describe("smtp.core", function()
  it("loads and reports a version", function()
    local core = require "smtp.core"
    assert.is_table(core)
    assert.is_string(core._VERSION)
  end)
end)

describe("smtp.errors", function()
  local errors = require "smtp.errors"
  it("reads as one line with code, enhanced code and phase", function()
    local e = errors.new { kind = "rejected", code = 550, enhanced = "5.1.1", text = "no such\r\nuser", phase = "rcpt" }
    assert.equal("rejected (rcpt): 550 5.1.1 no such user", tostring(e))
    assert.is_false(e.temporary)
    assert.is_true(errors.new { kind = "closed", code = 421, text = "bye" }.temporary)
    assert.is_true(errors.is(e, "rejected"))
  end)
end)
