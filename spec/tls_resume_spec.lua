-- TLS session resumption: the client resumes with the server (name and port) a session came
-- from and never with another, the server's ticket keys keep resumption across one rotation
-- and not two, transcripts say so, and released record buffers carry big writes after idling.
local helper = require "helper"
local native = require "smtp.transport.native"
local loop = require "smtp.loop"
local smtp = require "smtp"
local server = require "smtp.server"

local certs = helper.certs()

-- One client connection to `port` with starttls options copts, inside a loop coroutine: the
-- client's info() after a round trip.
local function client(port, copts)
  local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
  assert(s:starttls(copts))
  assert(s:write("ping\r\n", 5))
  assert.equal("ping\r\n", s:read(5))
  local info = s:info()
  s:close()
  return info
end

-- An echo server on a new port with server context sctx, for `count` connections.
local function echo(sctx, count)
  local l = assert(native.listen { host = "127.0.0.1", port = 0 })
  local resumed = {}
  loop.spawn(function()
    for _ = 1, count do
      local c = assert(l:accept(5))
      loop.spawn(function()
        assert(c:tls_accept(sctx, 5))
        resumed[#resumed + 1] = c:info().resumed
        while true do
          local d = c:read(5)
          if not d then break end
          assert(c:write(d, 5))
        end
        c:close()
      end)
    end
    l:close()
  end)
  return l.port, resumed
end

-- Runs `count` client connections one after another against one echo server; returns their infos.
local function sequence(sctx, copts, count, between)
  local port, resumed = echo(sctx, count)
  local infos = {}
  loop.spawn(function()
    for i = 1, count do
      if between and between[i] then between[i]() end
      infos[i] = client(port, copts)
    end
  end)
  loop.run()
  return infos, resumed
end

describe("TLS session resumption", function()
  local cctx
  before_each(function()
    cctx = assert(native.tls_client_context { cafile = certs.ca })
    cctx:forget_sessions()
  end)

  it("the second connection to the same server resumes; both ends say so", function()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local infos, resumed = sequence(sctx, { ctx = cctx, servername = "localhost" }, 3)
    assert.same({ false, true, true }, { infos[1].resumed, infos[2].resumed, infos[3].resumed })
    assert.same({ false, true, true }, resumed)
    -- the resumed session still names the certificate it was made with
    assert.equal(infos[1].peer_subject, infos[2].peer_subject)
    assert.equal("ok", infos[2].verify_result)
  end)

  it("TLS 1.2 sessions resume too", function()
    local c12 = assert(native.tls_client_context { cafile = certs.ca, max_version = "TLSv1.2" })
    c12:forget_sessions()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local infos = sequence(sctx, { ctx = c12, servername = "localhost" }, 2)
    assert.equal("TLSv1.2", infos[2].version)
    assert.same({ false, true }, { infos[1].resumed, infos[2].resumed })
  end)

  it("never crosses to another port or another name, even when that server would accept it", function()
    -- one server context behind two ports: its tickets open on both
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local p1 = echo(sctx, 3)
    local p2 = echo(sctx, 1)
    local got = {}
    loop.spawn(function()
      local function one(port, name) return client(port, { ctx = cctx, servername = name }) end
      got[1] = one(p1, "localhost").resumed
      got[2] = one(p2, "localhost").resumed     -- another port
      got[3] = one(p1, "127.0.0.1").resumed     -- another name for the same server
      got[4] = one(p1, "localhost").resumed     -- the first one again
    end)
    loop.run()
    assert.same({ false, false, false, true }, got)
  end)

  it("session_cache = false neither offers nor keeps sessions", function()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local infos = sequence(sctx, { ctx = cctx, servername = "localhost", session_cache = false }, 2)
    assert.same({ false, false }, { infos[1].resumed, infos[2].resumed })
  end)

  it("a ticket outlives one key rotation and not two", function()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key,
      ticket_rotation = 0 })
    local rotate = function() assert(sctx:rotate_ticket_key()) end
    local infos = sequence(sctx, { ctx = cctx, servername = "localhost" }, 4,
      { [2] = rotate, [4] = function() rotate(); rotate() end })
    -- 1 full; 2 after one rotation resumes (and gets a ticket under the new key); 3 resumes;
    -- 4 after two more rotations does not
    assert.same({ false, true, true, false }, { infos[1].resumed, infos[2].resumed, infos[3].resumed,
      infos[4].resumed })
  end)

  it("released record buffers: 300 KB each way after an idle spell", function()
    local sctx = assert(native.tls_server_context { cert = certs.server, key = certs.server_key })
    local port = echo(sctx, 1)
    local big = ("0123456789abcdef"):rep(300 * 64)
    local back
    loop.spawn(function()
      local s = assert(native.connect { host = "127.0.0.1", port = port, timeout = 5 })
      assert(s:starttls { ctx = cctx, servername = "localhost" })
      assert(s:write("x", 5)); assert.equal("x", s:read(5))
      loop.sleep(0.05)
      local got, n = {}, 0
      loop.spawn(function() assert(s:write(big, 10)) end)
      while n < #big do
        local d = assert(s:read(10))
        got[#got + 1] = d
        n = n + #d
      end
      back = table.concat(got)
      s:close()
    end)
    loop.run()
    assert.equal(#big, #back)
    assert.truthy(back == big)
  end)

  it("smtp.send resumes with smtp.server; both transcripts show it", function()
    local stext = {}
    local srv = assert(server.listen { port = 0, hostname = "mx.test",
      tls = { cert = certs.server, key = certs.server_key },
      transcript = function(l) if l.dir == "tls" then stext[#stext + 1] = l.line end end,
      on_message = function(_, _, reader) for _ in reader:chunks() do end return true end })
    local ctext, results = {}, {}
    loop.spawn(function()
      srv:serve()
      for i = 1, 3 do
        results[i] = { smtp.send { server = "127.0.0.1", port = srv.port, cafile = certs.ca,
          from = "a@example.com", to = "b@example.org", message = "Subject: r\r\n\r\nhi\r\n", timeout = 10,
          session_cache = i ~= 3,
          transcript = function(l) if l.dir == "tls" then ctext[i] = l.line end end } }
      end
      srv:close()
    end)
    loop.run()
    for i = 1, 3 do assert(results[i][1], tostring(results[i][2])) end
    assert.is_nil(ctext[1]:find("resumed"), ctext[1])
    assert.truthy(ctext[2]:find("^TLS TLSv1%.3, [%w_]+, resumed, "), ctext[2])
    assert.is_nil(ctext[3]:find("resumed"), ctext[3])
    assert.equal(3, #stext)
    assert.is_nil(stext[1]:find("resumed"), stext[1])
    assert.truthy(stext[2]:find(", resumed"), stext[2])
    assert.is_nil(stext[3]:find("resumed"), stext[3])
  end)
end)
