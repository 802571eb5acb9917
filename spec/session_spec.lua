-- smtp.session: what happens to a session nobody closes, on Lua 5.4 and LuaJIT alike (LuaJIT
-- runs no __gc on tables, so a userdata sentinel releases it), and the error value's shape.
local helper = require "helper"
local peers = require "support.client_peers"

local smtp = require "smtp"
local errors = require "smtp.errors"

describe("a session dropped without close()", function()
  local sink
  setup(function() sink = peers.sink() end)
  teardown(function() if sink then sink.stop() end end)

  local function open()
    return assert(smtp.connect { server = "127.0.0.1", port = sink.port, tls = "none", helo = "client.test",
      timeout = 10 })
  end

  it("is closed when collected (its transport connection is released)", function()
    local conn = open()
    local t = conn.sock                 -- the transport connection, held without the session
    assert.truthy(t.sock)
    conn = nil                          -- luacheck: ignore (dropped on purpose)
    for _ = 1, 4 do collectgarbage("collect") end
    assert.is_nil(t.sock, "the transport connection is still open after the session was collected")
  end)

  it("is not released while it is still referenced", function()
    local conn = open()
    for _ = 1, 4 do collectgarbage("collect") end
    assert.truthy(conn.sock and conn.sock.sock)
    assert.truthy(conn:noop())
    conn:close()
    assert.is_nil(conn.sock)
  end)

  it("closed explicitly is not touched again by the collector", function()
    local conn = open()
    conn:close()
    conn = nil                          -- luacheck: ignore
    for _ = 1, 4 do collectgarbage("collect") end
  end)
end)

describe("errors", function()
  it("concatenate from either side and read like tostring()", function()
    local e = errors.new { kind = "closed", phase = "mail", code = 421, enhanced = "4.4.2", text = "bye" }
    assert.equal("send failed: closed (mail): 421 4.4.2 bye (temporary)", "send failed: " .. e)
    assert.equal(tostring(e) .. "!", e .. "!")
  end)

  it("misuse raises the standard bad argument message", function()
    local ok, msg = pcall(smtp.send, 42)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'send' %(options table expected%)", msg)
    ok, msg = pcall(smtp.connect, { server = "127.0.0.1", tls = "bogus" })
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'connect' %(tls: ", msg)
  end)
end)
