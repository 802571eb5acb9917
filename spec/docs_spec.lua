-- Every ```lua block of README.md and docs/reference.md runs as it is, on this interpreter,
-- against a live smtp.server on loopback (spec/support/docs_sink.lua) with the conventions of
-- spec/support/docs_preamble.lua (documented in docs/reference.md, "How the examples run").
-- A block that needs the internet or nginx says `-- doc:skip` and is only compiled.
local helper = require "helper"
local N = require "support.newcomer"
local q = helper.quote

if not pcall(require, "smtp.transport.native") then
  describe("documentation blocks", function() pending("needs smtp.transport.native") end)
  return
end

local load_ = loadstring or load

describe("documentation blocks", function()
  local m, sink, port, mail
  setup(function()
    m = N.material()
    sink, port, mail = N.sink(m)
  end)
  teardown(function() if sink then sink:stop() end end)

  for _, file in ipairs { "README.md", "docs/reference.md" } do
    local blocks = N.lua_blocks(helper.root .. "/" .. file)
    it(file .. " has Lua examples", function()
      assert.is_true(#blocks >= (file == "README.md" and 7 or 12))
    end)
    for _, b in ipairs(blocks) do
      local name = ("%s:%d"):format(file, b.line)
      if b.code:find("-- doc:skip", 1, true) then
        it(name .. " compiles (doc:skip: needs the internet or nginx)", function()
          local fn, err = load_(b.code, "=" .. name)
          assert(fn, err)
        end)
      else
        it(name .. " runs against the sink", function()
          local path = m.dir .. "/block.lua"
          helper.write(path, b.code)
          local out, rc = N.run("cd " .. q(m.dir) .. " && " .. N.env {
              DOCS_PORT = tostring(port), DOCS_DKIM_KEY = m.dkim, SSL_CERT_FILE = m.ca,
              SMTP_PASSWORD = "secret" } ..
            "timeout 60 " .. helper.lua .. " -e " .. q("dofile(" .. ("%q"):format(helper.root ..
              "/spec/support/docs_preamble.lua") .. ")") .. " block.lua")
          assert(rc == 0, name .. " failed (exit " .. tostring(rc) .. "):\n" .. out)
        end)
      end
    end
  end

  it("the blocks delivered their mail to the sink", function()
    -- run last: the sending blocks of README.md and docs/reference.md together store at least this
    assert.is_true(N.count(mail) >= 14, "the sink stored " .. N.count(mail) .. " messages")
  end)
end)
