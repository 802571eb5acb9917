-- A local address to send from (`bind`, `--source`): the server sees the connection come from
-- that address (and port, when one is given) for smtp.send, smtp.connect, smtp.deliver, the
-- transport and the command line; an address this host does not hold, or of the other family,
-- fails clearly before anything is sent.
local helper = require "helper"
local smtp = require "smtp"
local server = require "smtp.server"
local loop = require "smtp.loop"
local native = require "smtp.transport.native"

local MSG = "From: a@example.com\r\nTo: b@example.org\r\nSubject: bind\r\n\r\nx\r\n"

-- Runs fn(srv, seen) in a loop task beside a server on `host` that records each message's
-- client address and port in `seen`.
local function with_server(host, fn)
  local seen = {}
  local srv = assert(server.listen { host = host, port = 0,
    on_message = function(session, _, reader)
      for _ in reader:chunks() do end
      seen[#seen + 1] = { address = session.address, port = session.port }
      return true
    end })
  local failure
  loop.spawn(function()
    srv:serve()
    local ok, e = pcall(fn, srv, seen)
    if not ok then failure = e end
    srv:close()
  end)
  loop.run()
  if failure then error(failure, 0) end
  return seen
end

local function send(srv, t)
  local o = { server = "127.0.0.1", port = srv.port, tls = "none", timeout = 10,
    from = "a@example.com", to = "b@example.org", message = MSG }
  for k, v in pairs(t) do o[k] = v end
  return smtp.send(o)
end

describe("bind: a local address to send from", function()
  it("smtp.send, smtp.connect and the URL's ?bind= send from 127.0.0.2", function()
    local seen = with_server("127.0.0.1", function(srv)
      assert(send(srv, { bind = "127.0.0.2" }))
      assert(send(srv, { url = ("smtp://127.0.0.1:%d?tls=none&bind=127.0.0.3"):format(srv.port) }))
      local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none", bind = "127.0.0.4" })
      assert(conn:send { from = "a@example.com", to = "b@example.org", message = MSG })
      conn:close()
      assert(send(srv, {}))
    end)
    assert.equal("127.0.0.2", seen[1].address)
    assert.equal("127.0.0.3", seen[2].address)
    assert.equal("127.0.0.4", seen[3].address)
    assert.equal("127.0.0.1", seen[4].address)
  end)

  it("binds a port when one is given, and IPv6 in brackets", function()
    local port = helper.free_port("127.0.0.2")
    local seen = with_server("127.0.0.1", function(srv)
      assert(send(srv, { bind = "127.0.0.2:" .. port }))
    end)
    assert.same({ address = "127.0.0.2", port = port }, seen[1])
    seen = with_server("::1", function(srv)
      assert(send(srv, { server = "::1", bind = "[::1]" }))
    end)
    assert.equal("::1", seen[1].address)
  end)

  it("the transport: s:info() and the socket's local address", function()
    with_server("127.0.0.1", function(srv)
      local s = assert(native.connect { host = "127.0.0.1", port = srv.port, timeout = 5, bind = "127.0.0.5" })
      assert.equal("127.0.0.5", (s.sock:local_addr()))
      s:close()
    end)
  end)

  it("smtp.deliver sends from it", function()
    local seen = with_server("127.0.0.1", function(srv)
      local res = assert(smtp.deliver { message = MSG, from = "a@example.com", to = { "b@[127.0.0.1]" },
        port = srv.port, tls = "none", destinations = "any", bind = "127.0.0.6", timeout = 10 })
      assert.equal("sent", res[1].status)
    end)
    assert.equal("127.0.0.6", seen[1].address)
  end)

  it("fails clearly for an address this host does not hold, or of the other family", function()
    with_server("127.0.0.1", function(srv)
      local res, err = send(srv, { bind = "192.0.2.9" })
      assert.is_nil(res)
      assert.equal("connect", err.kind)
      assert.equal("connect", err.phase)
      assert.is_false(err.temporary)
      assert.truthy(err.text:find("bind 192.0.2.9: Cannot assign requested address", 1, true), err.text)
      res, err = send(srv, { bind = "::1" })
      assert.is_nil(res)
      assert.equal("connect", err.kind)
      assert.equal("127.0.0.1 has no IPv6 address to reach from bind address ::1", err.text)
      res, err = send(srv, { bind = "mail.example" })
      assert.is_nil(res)
      assert.equal("invalid", err.kind)
      assert.has_error(function() send(srv, { bind = 42 }) end, "bad argument #1 to 'send' (bind: string expected)")
    end)
  end)

  it("lua-smtp send --source", function()
    local bin = helper.root .. "/bin/lua-smtp"
    local seen = with_server("127.0.0.1", function(srv)
      local p = helper.spawn({ helper.lua, bin, "send", "--server", "127.0.0.1:" .. srv.port, "--tls", "none",
        "--from", "a@example.com", "--to", "b@example.org", "--subject", "s", "--source", "127.0.0.7" })
      local t0 = loop.now()
      while p:alive() and loop.now() - t0 < 20 do loop.sleep(0.05) end
      assert.truthy(p:output():find("sent: 250", 1, true), p:output())
    end)
    assert.equal("127.0.0.7", seen[1].address)
    local out = helper.sh(("%s %s send --server 127.0.0.1:25 --from a@example.com --to b@example.org --source nohost 2>&1; echo \"exit=$?\"")
      :format(helper.lua, helper.quote(bin)))
    assert.truthy(out:find("bad --source", 1, true), out)
    assert.truthy(out:find("exit=2", 1, true), out)
  end)
end)
