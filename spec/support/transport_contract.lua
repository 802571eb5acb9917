-- The transport contract of docs/INTERNALS.md as checks, without busted: spec/transport_contract_spec.lua
-- runs them against smtp.transport.native, the /contract handler inside nginx against
-- smtp.transport.ngx, so both answer the same misuse, errors and info() the same way.
local M = {}

-- Phase names an error may carry (docs/reference.md, smtp.errors); nil is fine too.
local PHASES = {
  connect = true, greeting = true, ehlo = true, tls = true, auth = true, mail = true, rcpt = true,
  data = true, data_block = true, data_end = true, quit = true,
}

-- M.run(t, peer) -> lines: "ok <check>" or "FAIL <check>: <why>", and one "info ..." line with
-- what s:info() said after STARTTLS. t is the transport module; peer = { smtp = port of an SMTP
-- server with STARTTLS for "localhost", slow = port of one that greets late, closed = a port
-- nothing listens on, tls = starttls options (servername, and cafile natively), core = smtp.core }.
function M.run(t, peer)
  local out = {}
  local function check(name, ok, why)
    out[#out + 1] = ok and ("ok " .. name) or ("FAIL " .. name .. ": " .. tostring(why))
    return ok
  end
  -- Every error value seen goes through here: the smtp.errors shape, only documented phases.
  local function err_ok(name, err, kind, phase)
    if type(err) ~= "table" or getmetatable(err) == nil then
      return check(name, false, "not an error value: " .. tostring(err))
    end
    if err.phase ~= nil and not PHASES[err.phase] then
      return check(name, false, "undocumented phase " .. tostring(err.phase) .. " in " .. tostring(err))
    end
    if err.kind ~= kind then return check(name, false, "kind " .. tostring(err.kind) .. ": " .. tostring(err)) end
    if err.phase ~= phase then
      return check(name, false, "phase " .. tostring(err.phase) .. " (want " .. tostring(phase) .. "): " .. tostring(err))
    end
    if type(tostring(err)) ~= "string" or type(err.temporary) ~= "boolean" then
      return check(name, false, "tostring/temporary")
    end
    return check(name, true)
  end
  local function raises(name, want, f, ...)
    local ok, msg = pcall(f, ...)
    msg = tostring(msg):gsub("^[^\n]-:%d+: ", "")
    return check(name, not ok and msg == want, ok and "did not raise" or msg)
  end
  -- One whole reply ("NNN text\r\n" after any "NNN-" lines) read through s:read.
  local function reply(s, buf)
    while true do
      local e = buf.data:find("\r\n", 1, true)
      while e do
        local line = buf.data:sub(1, e - 1)
        buf.data = buf.data:sub(e + 2)
        buf.got = (buf.got or "") .. line .. "\r\n"
        if line:match("^%d%d%d ") or line:match("^%d%d%d$") then
          local r = buf.got
          buf.got = nil
          return r
        end
        e = buf.data:find("\r\n", 1, true)
      end
      local chunk, err = s:read(5, 4096)
      if not chunk then return nil, err end
      buf.data = buf.data .. chunk
    end
  end

  check("pooling is a boolean", type(t.pooling) == "boolean", type(t.pooling))

  -- Misuse raises Lua's standard message, the same on every transport.
  local host = "127.0.0.1"
  raises("connect: not a table", "bad argument #1 to 'connect' (table expected, got string)", t.connect, "x")
  raises("connect: host", "bad argument #1 to 'connect' (option 'host': string expected, got number)",
    t.connect, { host = 1, port = 25 })
  raises("connect: no port", "bad argument #1 to 'connect' (option 'port' missing)", t.connect, { host = host })
  raises("connect: port type", "bad argument #1 to 'connect' (option 'port': number expected, got string)",
    t.connect, { host = host, port = "25" })
  raises("connect: timeout type", "bad argument #1 to 'connect' (option 'timeout': number expected, got string)",
    t.connect, { host = host, port = 25, timeout = "1" })
  raises("connect: nameservers type", "bad argument #1 to 'connect' (option 'nameservers': table expected, got string)",
    t.connect, { host = host, port = 25, nameservers = "127.0.0.1" })
  raises("connect: bind type", "bad argument #1 to 'connect' (option 'bind': string expected, got number)",
    t.connect, { host = host, port = 25, bind = 1 })
  raises("connect: proxy type", "bad argument #1 to 'connect' (option 'proxy': string expected, got boolean)",
    t.connect, { host = host, port = 25, proxy = true })

  -- Bad values are expected failures: kind invalid, phase connect, not temporary.
  for _, port in ipairs { 0, 65536, 1.5 } do
    local s, err = t.connect { host = host, port = port, timeout = 5 }
    if check("connect: port " .. port .. " fails", s == nil, s) then
      err_ok("connect: port " .. port .. " is invalid", err, "invalid", "connect")
    end
  end
  -- a bind address that is not an address, or that this host does not hold
  local s, err = t.connect { host = host, port = 25, bind = "not-an-address" }
  if check("connect: bad bind fails", s == nil, s) then err_ok("connect: bad bind is invalid", err, "invalid", "connect") end
  s, err = t.connect { host = host, port = peer.smtp, bind = "192.0.2.9", timeout = 5 }
  if check("connect: foreign bind fails", s == nil, s) then
    err_ok("connect: foreign bind", err, "connect", "connect")
    check("connect: foreign bind names it", tostring(err):find("192.0.2.9", 1, true) ~= nil, tostring(err))
  end
  s, err = t.connect { host = "", port = 25 }
  if check("connect: empty host fails", s == nil, s) then err_ok("connect: empty host is invalid", err, "invalid", "connect") end
  s, err = t.connect { host = host, port = peer.closed, timeout = 5 }
  if check("connect: refused fails", s == nil, s) then
    err_ok("connect: refused", err, "connect", "connect")
    check("connect: refused is temporary", err.temporary == true, err.temporary)
  end
  -- a Unix socket path instead of host and port
  raises("connect: path type", "bad argument #1 to 'connect' (option 'path': string expected, got number)",
    t.connect, { path = 1 })
  s, err = t.connect { path = "/nonexistent-lua-smtp/lmtp.sock", timeout = 5 }
  if check("connect: missing socket fails", s == nil, s) then err_ok("connect: missing socket", err, "connect", "connect") end
  s, err = t.connect { path = "" }
  if check("connect: empty path fails", s == nil, s) then err_ok("connect: empty path is invalid", err, "invalid", "connect") end
  s, err = t.connect { path = "/nonexistent-lua-smtp/lmtp.sock", bind = "127.0.0.1" }
  if check("connect: path with bind fails", s == nil, s) then err_ok("connect: path with bind is invalid", err, "invalid", "connect") end
  s, err = t.connect { host = "no-such-host.invalid", port = 25, timeout = 2,
    nameservers = { "127.0.0.1:" .. peer.closed } }
  if check("connect: DNS failure fails", s == nil, s) then err_ok("connect: DNS failure", err, "dns", "connect") end

  -- A session by hand: greeting, EHLO through write_engine, STARTTLS, QUIT.
  local core = peer.core
  s, err = t.connect { host = host, port = peer.smtp, timeout = 5 }
  if not check("connect", s ~= nil, err) then return out end
  check("reused() is 0 for a fresh connection", s:reused() == 0, s:reused())
  check("state() is nil for a fresh connection", s:state() == nil, s:state())
  local info = s:info()
  check("info before TLS", info.tls == false and info.address == host and info.port == peer.smtp
    and info.reused == 0 and info.version == nil,
    ("tls=%s address=%s port=%s reused=%s"):format(tostring(info.tls), tostring(info.address),
      tostring(info.port), tostring(info.reused)))
  local e = core.client_engine()
  raises("write: data", "bad argument #1 to 'write' (string expected, got number)", s.write, s, 1)
  raises("write: timeout", "bad argument #2 to 'write' (number expected, got string)", s.write, s, "x", "5")
  raises("read: timeout", "bad argument #1 to 'read' (number expected, got string)", s.read, s, "5")
  raises("read: max", "bad argument #2 to 'read' (positive number expected, got 0)", s.read, s, 5, 0)
  raises("write_engine: engine", "bad argument #1 to 'write_engine' (client engine expected, got string)",
    s.write_engine, s, "x")
  raises("write_engine: timeout", "bad argument #2 to 'write_engine' (number expected, got string)",
    s.write_engine, s, e, "5")
  raises("starttls: options", "bad argument #1 to 'starttls' (table expected, got string)", s.starttls, s, "x")
  raises("starttls: servername", "bad argument #1 to 'starttls' (option 'servername': string expected, got number)",
    s.starttls, s, { servername = 1 })
  raises("starttls: timeout", "bad argument #1 to 'starttls' (option 'timeout': number expected, got string)",
    s.starttls, s, { timeout = "1" })
  raises("starttls: verify", "bad argument #1 to 'starttls' (option 'verify': boolean expected, got string)",
    s.starttls, s, { verify = "no" })
  raises("bad self", "bad self to 'read' (connection expected)", s.read, {}, 1)

  local buf = { data = "" }
  local r = reply(s, buf)
  if not check("greeting", r and r:match("^220 "), r) then s:close(); return out end
  e:feed(r)
  e:reply()
  check("write_engine with nothing to send", s:write_engine(e, 5) == true)
  assert(e:ehlo("client.test"))
  local ok, werr = s:write_engine(e, 5)
  check("write_engine sends the engine's output", ok == true and e:outlen() == 0, werr)
  r, err = reply(s, buf)
  check("EHLO answered", r and r:match("^250") and r:find("STARTTLS", 1, true), r or err)
  assert(s:write("STARTTLS\r\n", 5))
  r = reply(s, buf)
  check("STARTTLS answered", r and r:match("^220 "), r)
  ok, err = s:starttls(peer.tls)
  if not check("starttls", ok == true, err) then return out end
  info = s:info()
  check("info after TLS", info.tls == "TLSv1.3" and info.version == "TLSv1.3" and type(info.cipher) == "string"
    and type(info.bits) == "number" and type(info.peer_subject) == "string" and type(info.peer_issuer) == "string",
    ("tls=%s version=%s cipher=%s bits=%s"):format(tostring(info.tls), tostring(info.version),
      tostring(info.cipher), tostring(info.bits)))
  out[#out + 1] = ("info tls=%s version=%s cipher=%s bits=%s peer_subject=%s peer_issuer=%s reused=%s"):format(
    tostring(info.tls), tostring(info.version), tostring(info.cipher), tostring(info.bits),
    tostring(info.peer_subject), tostring(info.peer_issuer), tostring(info.reused))
  raises("starttls twice", "starttls: TLS is already on for this connection", s.starttls, s, peer.tls)
  assert(s:write("QUIT\r\n", 5))
  r = reply(s, buf)
  check("QUIT answered", r and r:match("^221"), r)
  check("close", s:close() == true)
  check("close twice", s:close() == true)
  local d
  d, err = s:read(1)
  if check("read after close fails", d == nil, d) then err_ok("read after close", err, "closed", nil) end
  ok, err = s:write("x", 1)
  if check("write after close fails", ok == nil, ok) then err_ok("write after close", err, "closed", nil) end
  e = core.client_engine()
  e:feed("220 greeting\r\n")
  e:reply()
  assert(e:ehlo("client.test"))
  ok, err = s:write_engine(e, 1)
  if check("write_engine after close fails", ok == nil, ok) then err_ok("write_engine after close", err, "closed", nil) end
  ok, err = s:starttls(peer.tls)
  if check("starttls after close fails", ok == nil, ok) then err_ok("starttls after close", err, "closed", nil) end

  -- A certificate for another name: kind tls, phase tls, and the connection is gone.
  s = assert(t.connect { host = host, port = peer.smtp, timeout = 5 })
  buf = { data = "" }
  reply(s, buf)
  assert(s:write("EHLO client.test\r\n", 5)); reply(s, buf)
  assert(s:write("STARTTLS\r\n", 5)); reply(s, buf)
  local wrong = {}
  for k, v in pairs(peer.tls) do wrong[k] = v end
  wrong.servername = "wrong.example"
  ok, err = s:starttls(wrong)
  if check("starttls with the wrong name fails", ok == nil, ok) then
    err_ok("starttls with the wrong name", err, "tls", "tls")
    d, err = s:read(1)
    if check("read after a failed handshake fails", d == nil, d) then err_ok("read after a failed handshake", err, "closed", nil) end
  end
  s:close()

  -- A read timeout: kind timeout, no phase (the session knows it), and it closes the connection.
  s = assert(t.connect { host = host, port = peer.slow, timeout = 5 })
  d, err = s:read(0.2)
  if check("read timeout fails", d == nil, d) then
    err_ok("read timeout", err, "timeout", nil)
    check("read timeout is temporary", err.temporary == true)
    ok, err = s:write("NOOP\r\n", 1)
    if check("write after a timeout fails", ok == nil, ok) then err_ok("write after a timeout", err, "closed", nil) end
  end
  s:close()
  return out
end

return M
