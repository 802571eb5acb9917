-- Request handlers run inside the spec's nginx (required from content_by_lua_block): they drive
-- smtp.transport.ngx and smtp.send against the spec's SMTP peers and print what happened.
local M = {}

local ngx = rawget(_G, "ngx")

local function arg(name) return ngx.var["arg_" .. name] end

-- Reads one whole SMTP reply (all lines up to "NNN text\r\n") through the transport.
local function reply(s, buf)
  buf = buf or { data = "" }
  while true do
    local from = 1
    while true do
      local e = buf.data:find("\r\n", from, true)
      if not e then break end
      local line = buf.data:sub(from, e - 1)
      if line:match("^%d%d%d ") or line:match("^%d%d%d$") then
        local r = buf.data:sub(1, e + 1)
        buf.data = buf.data:sub(e + 2)
        return r
      end
      from = e + 2
    end
    local chunk, err = s:read(5, 4096)
    if not chunk then return nil, err end
    buf.data = buf.data .. chunk
  end
end

local function fail(what, err)
  ngx.status = 500
  ngx.say(what, ": ", tostring(err))
  return ngx.exit(500)
end

-- /transport?port=N&servername=localhost: a whole session by hand over the cosocket transport:
-- greeting, EHLO, STARTTLS, TLS handshake, EHLO, one message, QUIT. servername=none gives none
-- (the host connected to is checked); servername= (empty) passes "".
-- &implicit=1: TLS before the greeting, no STARTTLS; &host=H: connect to H (default 127.0.0.1).
function M.transport()
  local t = require("smtp.transport").get()
  local s, err = t.connect { host = arg("host") or "127.0.0.1", port = tonumber(arg("port")), timeout = 5 }
  if not s then return fail("connect", err) end
  if arg("implicit") == "1" then
    local ok, terr = s:starttls { servername = "localhost", timeout = 5 }
    if not ok then return fail("starttls", terr) end
    local out, buf = {}, { data = "" }
    for _, cmd in ipairs { false, "EHLO client.test\r\n", "QUIT\r\n" } do
      if cmd then assert(s:write(cmd, 5)) end
      local r, rerr = reply(s, buf)
      if not r then return fail("read", rerr) end
      out[#out + 1] = r
    end
    out[#out + 1] = "TLS " .. tostring(s:info().version) .. " " .. s:info().address .. "\r\n"
    s:close()
    return ngx.print(table.concat(out))
  end
  local out = {}
  local buf = { data = "" }
  local function step(cmd)
    if cmd then
      local ok, werr = s:write(cmd, 5)
      if not ok then return fail("write", werr) end
    end
    local r, rerr = reply(s, buf)
    if not r then return fail("read", rerr) end
    out[#out + 1] = r
    return r
  end
  step(nil)
  step("EHLO client.test\r\n")
  step("STARTTLS\r\n")
  local ok
  local servername = arg("servername") or "localhost"
  if servername == "none" then servername = nil end
  ok, err = s:starttls { servername = servername, verify = arg("verify") ~= "0", timeout = 5 }
  if not ok then return fail("starttls", err) end
  out[#out + 1] = "TLS " .. tostring(s:info().version) .. " " .. tostring(s:info().cipher) .. "\r\n"
  step("EHLO client.test\r\n")
  step("MAIL FROM:<a@client.test>\r\n")
  step("RCPT TO:<b@smtpd.test>\r\n")
  step("DATA\r\n")
  step("Subject: by hand\r\n\r\nline one\r\n..dot line\r\n.\r\n")
  step("QUIT\r\n")
  s:close()
  ngx.print(table.concat(out))
end

-- /slow?port=N: waits for the greeting of a server that takes its time.
function M.slow()
  local t = require("smtp.transport").get()
  local s, err = t.connect { host = "127.0.0.1", port = tonumber(arg("port")), timeout = 10 }
  if not s then return fail("connect", err) end
  local r
  r, err = reply(s)
  if not r then return fail("read", err) end
  s:close()
  ngx.print(r)
end

-- Pooled connections found stale in this worker (closed after a failed RSET check).
local stale = 0

-- /pooled?port=N[&host=H&ns=127.0.0.1:P]: one message per request over a pooled session, by hand, the way smtp.send
-- uses the transport (docs/INTERNALS.md): connect{pool} until a reused connection with stored state
-- answers RSET with 250 or a fresh one comes (at most pool_size + 1 tries, then one without the
-- pool), a full greeting/EHLO/STARTTLS only on a fresh one, MAIL/RCPT/DATA, then keepalive with
-- the learned state.
function M.pooled()
  local t = require "smtp.transport.ngx"
  local port = tonumber(arg("port"))
  local key = t.pool_key { server = arg("host") or "localhost", port = port, tls = "starttls", servername = "localhost" }
  local buf
  local function step(s, cmd, want)
    if cmd then
      local ok, werr = s:write(cmd, 5)
      if not ok then return nil, werr end
    end
    local r, rerr = reply(s, buf)
    if not r then return nil, rerr end
    if want and r:sub(1, 3) ~= want then return nil, r end
    return r
  end
  local ns = arg("ns") and { arg("ns") } or nil
  local copts = { host = arg("host") or "127.0.0.1", port = port, timeout = 5, pool = key, pool_size = 4,
    nameservers = ns }
  local s, state, err
  for _ = 1, copts.pool_size + 1 do
    s, err = t.connect(copts)
    if not s then return fail("connect", err) end
    if s:reused() == 0 then break end
    state = s:state()
    buf = { data = "" }
    if state ~= nil and step(s, "RSET\r\n", "250") then break end
    s:close()
    s, state = nil, nil
    stale = stale + 1
  end
  if not s then
    -- Every try found a stale one (the pool was refilled meanwhile): one without the pool.
    copts.pool = nil
    s, err = t.connect(copts)
    if not s then return fail("connect", err) end
  end
  local fresh = state == nil
  if fresh then
    buf = { data = "" }
    local ok, err = step(s, nil, "220")
    if ok then ok, err = step(s, "EHLO client.test\r\n", "250") end
    if ok then ok, err = step(s, "STARTTLS\r\n", "220") end
    if ok then ok, err = s:starttls { servername = "localhost", timeout = 5 } end
    if ok then ok, err = step(s, "EHLO client.test\r\n", "250") end
    if not ok then s:close(); return fail("session", err) end
    state = { extensions = ok }
  end
  local n = arg("n") or "0"
  local ok, err = step(s, "MAIL FROM:<a@client.test>\r\n", "250")
  if ok then ok, err = step(s, "RCPT TO:<b@smtpd.test>\r\n", "250") end
  if ok then ok, err = step(s, "DATA\r\n", "354") end
  if ok then ok, err = step(s, "Subject: pooled " .. n .. "\r\n\r\nbody " .. n .. "\r\n.\r\n", "250") end
  if not ok then s:close(); return fail("transaction", err) end
  local info = s:info()
  local kept, kerr = s:keepalive(30, 4, state)
  ngx.say(fresh and "fresh" or "reused", " ", info.reused, " ", tostring(info.version), " ",
    kept and "kept" or tostring(kerr), " ", state.extensions:match("AUTH[^\r]*") or "-", " stale=", stale)
end

-- /contract?smtp=N&slow=M&closed=P: the transport contract checks (spec/support/transport_contract.lua)
-- against the cosocket transport, one line each; certificates come from lua_ssl_trusted_certificate.
function M.contract()
  local lines = require("support.transport_contract").run(require "smtp.transport.ngx", {
    smtp = tonumber(arg("smtp")), slow = tonumber(arg("slow")), closed = tonumber(arg("closed")),
    core = require "smtp.core", tls = { servername = "localhost", timeout = 5 },
  })
  ngx.print(table.concat(lines, "\n"), "\n")
end

-- /dns?ns=127.0.0.1:P&name=N&type=MX|A|AAAA|TXT|PTR|resolve: what ngx_dns answers, one line per record.
function M.dns()
  local d = require("smtp.transport").dns()
  local opts = { nameservers = { arg("ns") }, timeout = 3 }
  local typ = arg("type")
  local res, err
  if typ == "resolve" then res, err = d.resolve(arg("name"), opts) else res, err = d.query(arg("name"), typ, opts) end
  if not res then
    ngx.say("error ", err.kind, " ", tostring(err.rcode), " ", tostring(err.temporary))
    return
  end
  for _, r in ipairs(res) do
    if type(r) == "table" then ngx.say(r.host, " ", r.preference) else ngx.say(r) end
  end
  ngx.say("null=", tostring(res.null), " dropped=", tostring(res.dropped))
end

-- /errors?port=N&closed=M: the error values of the transport, one per line: a read timeout
-- against a server slow to greet (N), a refused connection (M), a cafile, misuse.
function M.errors()
  local t = require "smtp.transport.ngx"
  local function line(...) ngx.say(table.concat({ ... }, " | ")) end
  local s = assert(t.connect { host = "127.0.0.1", port = tonumber(arg("port")), timeout = 5 })
  local data, err = s:read(0.2)
  line("read", tostring(data), tostring(err), tostring(s.closed))
  data, err = s:write("NOOP\r\n")
  line("write after timeout", tostring(data), tostring(err))
  s, err = t.connect { host = "127.0.0.1", port = tonumber(arg("closed")), timeout = 2 }
  line("refused", tostring(s), tostring(err))
  s = assert(t.connect { host = "127.0.0.1", port = tonumber(arg("port")), timeout = 5 })
  local ok
  ok, err = s:starttls { cafile = "/etc/ssl/certs/ca-certificates.crt" }
  line("cafile", tostring(ok), tostring(err))
  s:close()
  ok, err = pcall(t.connect, { host = "127.0.0.1", port = "25" })
  line("misuse", tostring(ok), tostring(err))
  s, err = t.connect { host = "127.0.0.1", port = 0 }
  line("bad port", tostring(s), tostring(err))
  s, err = t.connect { host = "no-such-host.invalid", port = 25, timeout = 2, nameservers = { "127.0.0.1:" .. arg("closed") } }
  line("dns", tostring(s), tostring(err and err.kind), tostring(err and err.rcode))
end

-- The raw message smtp.send carries in the specs: dot lines, an 8-bit body, CRLF line ends.
M.RAW = "From: a@client.test\r\nTo: b@smtpd.test\r\nSubject: raw\r\n\r\n.leading dot\r\n..two\r\n"
  .. "caf\195\169\r\n.\r\nlast line\r\n"

-- /send?port=N[&tls=none][&pool=0][&n=K][&server=H][&servername=S][&bind=A][&proxy=U]: one smtp.send of M.RAW to
-- localhost:N (or H:N; or /send?url=U alone, an lmtp:///path say); prints
-- accepted, the final reply, TLS and how often the pooled session was used before.
function M.send()
  local smtp = require "smtp"
  local n = arg("n")
  local pool                 -- default: pooled inside nginx
  if arg("pool") == "0" then pool = false end
  -- &transcript=1: the session's transcript follows the result line, one "dir line" each
  local lines = arg("transcript") and {} or nil
  local url = arg("url") and ngx.unescape_uri(arg("url"))
  local res, err = smtp.send {
    url = url,
    server = not url and (arg("server") or "localhost") or nil, servername = arg("servername"), port = tonumber(arg("port")),
    tls = not url and (arg("tls") or "starttls") or nil,
    message = n and M.RAW:gsub("Subject: raw", "Subject: raw " .. n) or M.RAW,
    from = "a@client.test", to = { "b@smtpd.test" },
    pool = pool, bind = arg("bind"), proxy = arg("proxy"),
    timeout = { connect = 5, greeting = 10, ehlo = 5, tls = 5, mail = 5, rcpt = 5, data = 5, data_end = 5 },
    transcript = lines and function(ev) lines[#lines + 1] = ev.dir .. " " .. ev.line end or nil,
  }
  if not res then return fail("send", err) end
  ngx.say(table.concat(res.accepted, ","), " ", res.reply.code, " ", tostring(res.reply.enhanced), " ", res.reply.text,
    " tls=", tostring(res.server.tls), " reused=", tostring(res.server.reused))
  if lines then ngx.say(table.concat(lines, "\n")) end
end

-- /idna?port=N: smtp.send inside nginx from and to addresses under an international domain (the
-- IDNA binding is in the C core, which nginx loads for the engines): accepted, reply, A-label.
function M.idna()
  local smtp = require "smtp"
  local res, err = smtp.send {
    server = "localhost", port = tonumber(arg("port")), message = M.RAW, pool = false,
    from = "a@bücher.test", to = { "b@Bücher.test" }, timeout = 5,
  }
  if not res then return fail("send", err) end
  ngx.say(table.concat(res.accepted, ","), " ", res.reply.code, " ", require("smtp.core").idna_to_ascii("bücher.test"))
end

-- /glue?port=N: whether smtp.send inside nginx goes through the cosocket transport (the native
-- one is never loaded) and whether it pools (its result says how often the session was reused).
function M.glue()
  local smtp = require "smtp"
  local res, err = smtp.send {
    server = "localhost", port = tonumber(arg("port")), message = M.RAW,
    from = "a@client.test", to = { "b@smtpd.test" }, timeout = 5,
  }
  ngx.say("sent=", tostring(res ~= nil), " cosockets=", tostring(package.loaded["smtp.transport.native"] == nil),
    " pools=", tostring(res ~= nil and type(res.server.reused) == "number" and
      require("smtp.transport").get().pooling == true), " err=", tostring(err))
end

-- log_by_lua: smtp.send where nginx has no cosockets; the error goes to the error log.
function M.send_in_log_phase()
  local res, err = require("smtp").send {
    server = "localhost", port = 25, message = M.RAW, from = "a@client.test", to = { "b@smtpd.test" },
  }
  ngx.log(ngx.ERR, "SENDLOG ", tostring(res), " ", tostring(err), " kind=", err and err.kind)
end

-- /mx?ns=127.0.0.1:P&domain=D: smtp.mx.lookup inside nginx; says which resolver module ran.
function M.mx()
  local mx = require "smtp.mx"
  local res, err = mx.lookup(arg("domain"), { nameservers = { arg("ns") }, timeout = 3,
    random = function() return 1 end })
  if not res then
    ngx.say("error ", err.kind, " ", tostring(err.rcode), " ", tostring(err.temporary), " ", tostring(err.enhanced))
  else
    for _, h in ipairs(res) do
      ngx.say(h.host, " ", h.preference, " ", table.concat(h.addresses, ","), h.implicit and " implicit" or "")
    end
  end
  ngx.say("native smtp.dns loaded: ", tostring(package.loaded["smtp.dns"] ~= nil))
end

-- /deliver?ns=127.0.0.1:P&port=N&to=addr[,addr...][&destinations=D]: smtp.deliver inside nginx (MX
-- lookup over cosockets, then the MX host on port N); one line per recipient, and which
-- resolver/transport modules ran. The test MX hosts are on loopback: destinations "any" unless given.
function M.deliver()
  local smtp = require "smtp"
  local to = {}
  for a in ngx.unescape_uri(arg("to")):gmatch("[^,]+") do to[#to + 1] = a end
  local results, err = smtp.deliver {
    message = M.RAW, from = "a@client.test", to = to, helo = "client.test",
    nameservers = { arg("ns") }, port = tonumber(arg("port")), timeout = 5,
    destinations = arg("destinations") or "any",
  }
  if not results then return fail("deliver", err) end
  for _, r in ipairs(results) do
    ngx.say(r.recipient, " ", r.status, " ", tostring(r.code), " ", tostring(r.host), " ", tostring(r.address))
  end
  ngx.say("native smtp.dns loaded: ", tostring(package.loaded["smtp.dns"] ~= nil),
    ", native transport loaded: ", tostring(package.loaded["smtp.transport.native"] ~= nil))
end

-- /phase: what the transport says in this phase (used from log_by_lua, header_filter, ...).
function M.phase_error()
  local t = require("smtp.transport").get()
  local s, err = t.connect { host = "127.0.0.1", port = 25, timeout = 1 }
  return s, err
end

return M
