-- Misuse (a wrong type where the API wants another) raises Lua's standard
-- "bad argument #n to 'f' (...)" in every public module; what the world does returns nil, err.
local smtp = require "smtp"
local message = require "smtp.message"
local dkim = require "smtp.dkim"
local mx = require "smtp.mx"
local server = require "smtp.server"
local native = require "smtp.transport.native"

describe("misuse", function()
  local cases = {
    { "smtp.send", function() smtp.send(42) end, "#1 to 'send'" },
    -- a string is a URL (kind "invalid" when it is not one): a number is misuse
    { "smtp.connect", function() smtp.connect(42) end, "#1 to 'connect'" },
    { "smtp.send url", function() smtp.send { url = 42, message = "m" } end, "#1 to 'send'" },
    { "smtp.send proxy", function() smtp.send { server = "x.test", proxy = 42, message = "m" } end, "#1 to 'send'" },
    { "transport connect bind", function() native.connect { host = "127.0.0.1", port = 25, bind = 42 } end, "#1 to 'connect'" },
    { "smtp.send tls", function() smtp.send { server = "x.test", tls = "maybe", message = "m" } end, "#1 to 'send'" },
    { "smtp.deliver", function() smtp.deliver(42) end, "#1 to 'deliver'" },
    { "smtp.deliver tls", function() smtp.deliver { message = "m", to = { "a@b.test" }, tls = "x" } end, "#1 to 'deliver'" },
    { "smtp.deliver destinations", function() smtp.deliver { message = "m", to = { "a@b.test" }, destinations = "local" } end, "#1 to 'deliver'" },
    { "smtp.send verify_name", function() smtp.send { server = "x.test", verify_name = "no", message = "m" } end, "#1 to 'send'" },
    { "message.new", function() message.new(42) end, "#1 to 'new'" },
    { "dkim.sign", function() dkim.sign(42, {}) end, "#1 to 'sign'" },
    { "dkim.sign opts", function() dkim.sign("m", 42) end, "#2 to 'sign'" },
    { "dkim.signer", function() dkim.signer(42) end, "#1 to 'signer'" },
    { "mx.lookup", function() mx.lookup(nil) end, "#1 to 'lookup'" },
    { "mx.lookup opts", function() mx.lookup("example.org", 42) end, "#2 to 'lookup'" },
    { "server.listen", function() server.listen(42) end, "#1 to 'listen'" },
    { "transport connect", function() native.connect { host = "127.0.0.1", port = "x" } end, "#1 to 'connect'" },
  }
  for _, c in ipairs(cases) do
    it(c[1] .. " raises bad argument " .. c[3], function()
      local ok, msg = pcall(c[2])
      assert.is_false(ok)
      assert.matches("bad argument " .. c[3]:gsub("[%(%)%.%-]", "%%%0") .. " %(", tostring(msg))
    end)
  end
end)
