-- smtp.server: a minimal, strict SMTP (or LMTP) server over the C engine: one coroutine per connection in
-- smtp.loop, hooks that accept or reject, and message data streamed to on_message.
local core = require "smtp.core"
local errors = require "smtp.errors"
local check = require "smtp.check"
local observe = require "smtp.observe"
local cidr = require "smtp.cidr"

local M = {}

local now = core.now
local huge, min = math.huge, math.min

-- A public port's defaults. The per-client ones follow Postfix's anvil (one 60 s window per
-- client address) and leave loopback clients out, as Postfix leaves out $mynetworks.
local DEFAULTS = {
  max_message_size = 25 * 1024 * 1024, max_recipients = 100, timeout = 300,
  max_connections = 1000, max_line = 512, max_errors = 20,
  max_session_time = 1800, command_timeout = 120, data_timeout = 600, data_rate = 1024,
  max_commands = 50000, max_transactions = 1000,
  client_window = 60, max_client_connections = 20, max_client_rate = 60,
  max_client_messages = 300, max_client_recipients = 1000, max_clients = 10000,
  tarpit_after = 3, tarpit_delay = 1, tarpit_max = 30,
}

-- Option checks: name -> { lowest value, highest value, integer?, false allowed (= no limit)? }.
-- What the C engine takes must be a whole number it can hold.
local INT32, INT53 = 2147483647, 9007199254740992
local NUMERIC = {
  port = { 0, 65535, true }, max_message_size = { 0, INT53, true }, max_recipients = { 1, INT32, true },
  max_connections = { 1, huge, true }, max_line = { 64, 65536, true }, max_errors = { 1, INT32, true },
  timeout = { 0.001, huge }, backlog = { 1, INT32, true },
  max_session_time = { 0.001, huge, false, true }, command_timeout = { 0.001, huge, false, true },
  data_timeout = { 0.001, huge, false, true }, data_rate = { 1, huge },
  max_commands = { 1, INT32, true, true }, max_transactions = { 1, INT32, true, true },
  client_window = { 0.001, huge }, max_client_connections = { 1, huge, true, true },
  max_client_rate = { 1, huge, true, true }, max_client_messages = { 1, huge, true, true },
  max_client_recipients = { 1, huge, true, true }, max_clients = { 1, huge, true },
  tarpit_after = { 0, huge, true }, tarpit_delay = { 0, huge }, tarpit_max = { 0, huge },
}

local function transport() return require "smtp.transport.native" end

local function loop() return require "smtp.loop" end

local function argerr(msg) error("bad argument #1 to 'listen' (" .. msg .. ")", 3) end

local function check_opts(o)
  if type(o) ~= "table" then argerr("table expected, got " .. type(o)) end
  for _, k in ipairs { "on_mail", "on_rcpt", "on_message", "auth", "log", "transcript", "on_event",
    "on_connect", "on_helo", "on_auth", "on_rset", "on_close", "on_data", "on_starttls" } do
    if o[k] ~= nil and type(o[k]) ~= "function" then argerr("option '" .. k .. "': function expected") end
  end
  for k, r in pairs(NUMERIC) do
    local v = o[k]
    if v ~= nil and not (v == false and r[4]) then
      if type(v) ~= "number" then
        argerr("option '" .. k .. "': number expected" .. (r[4] and " or false" or "") .. ", got " .. type(v))
      end
      if v ~= v or v < r[1] or v > r[2] or (r[3] and v ~= huge and v % 1 ~= 0) then
        argerr(("option '%s': %s within %s..%s expected, got %s"):format(k, r[3] and "an integer" or "a number",
          ("%.17g"):format(r[1]), ("%.17g"):format(r[2]), tostring(v)))
      end
    end
  end
  if o.transcript_body ~= nil and type(o.transcript_body) ~= "boolean" then
    argerr("option 'transcript_body': boolean expected")
  end
  if o.received ~= nil and type(o.received) ~= "boolean" then argerr("option 'received': boolean expected") end
  if o.client_exempt ~= nil and o.client_exempt ~= false and type(o.client_exempt) ~= "function" then
    argerr("option 'client_exempt': function or false expected")
  end
  if o.tls ~= nil and (type(o.tls) ~= "table" or type(o.tls.cert) ~= "string" or type(o.tls.key) ~= "string") then
    argerr("option 'tls': { cert = path, key = path } expected")
  end
  for _, k in ipairs { "proxy_protocol", "xclient" } do
    local v = o[k]
    if v ~= nil and v ~= false then
      if type(v) ~= "table" then argerr("option '" .. k .. "': { trusted = { address, ... } } expected") end
      local m, why = cidr.list(v.trusted)
      if not m then argerr("option '" .. k .. ".trusted': " .. why) end
      if v.timeout ~= nil and (type(v.timeout) ~= "number" or not (v.timeout > 0)) then
        argerr("option '" .. k .. ".timeout': positive number expected")
      end
    end
  end
  if o.hostname ~= nil and (type(o.hostname) ~= "string" or o.hostname:find("[%c%s]")) then
    argerr("option 'hostname': a name without spaces expected")
  end
  if o.lmtp ~= nil and type(o.lmtp) ~= "boolean" then argerr("option 'lmtp': boolean expected") end
  if o.requiretls ~= nil and type(o.requiretls) ~= "boolean" then argerr("option 'requiretls': boolean expected") end
  if o.path ~= nil and (type(o.path) ~= "string" or o.path == "") then argerr("option 'path': socket path expected") end
  if o.path ~= nil and (o.host ~= nil or o.port ~= nil) then argerr("option 'path': give path or host and port, not both") end
end

local function str(v)
  local ok, s = pcall(tostring, v)
  return ok and s or "?"
end

-- A hook's answer: true | false, code, text (text may start with an enhanced code) |
-- false, code, enhanced, text. What cannot go on the wire as it is (a code out of range, an
-- enhanced code that is not class.subject.detail of 1 to 3 digits each, or whose class is not the
-- reply's) is replaced by the default and logged: the client always gets a well-formed reply.
local function verdict(srv, default_code, default_enh, ok, code, a, b)
  if ok then return true end
  local c = tonumber(code)
  if c == nil or c < 400 or c > 599 or c % 1 ~= 0 then
    if code ~= nil then srv:_log("hook returned an invalid reply code: " .. str(code)) end
    c = default_code
  end
  local enh, text
  if b ~= nil then
    enh, text = a, b
  elseif type(a) == "string" then
    enh, text = a:match("^(%d+%.%d+%.%d+)%s+(.*)$")
    if not enh then text = a end
  else
    text = a
  end
  if enh ~= nil then
    local class = type(enh) == "string" and enh:match("^([245])%.%d%d?%d?%.%d%d?%d?$")
    if class ~= tostring(c):sub(1, 1) then
      srv:_log("hook returned an invalid enhanced status code: " .. str(enh))
      enh = nil
    end
  end
  if not enh then
    enh = (c >= 500 and "5" or "4") .. default_enh:sub(2)
  end
  if text ~= nil and type(text) ~= "string" and type(text) ~= "number" then
    srv:_log("hook returned a reply text that is not a string: " .. type(text))
    text = nil
  end
  text = text and tostring(text):gsub("[%c]", " ") or nil
  if text then text = text:sub(1, 400) end
  return false, c, enh, text
end

-- Per-client limits -------------------------------------------------------------------------

-- The key a client's counts are kept under: its IPv4 address, or the /64 network of an IPv6
-- one (one host usually holds a whole /64, so counting single IPv6 addresses would count nothing).
local function client_key(ip)
  if not ip:find(":", 1, true) then return ip end
  local v4 = ip:match("^::[fF][fF][fF][fF]:(%d+%.%d+%.%d+%.%d+)$")
  if v4 then return v4 end
  ip = ip:gsub("%%.*$", "")
  local left, right = ip:match("^(.-)::(.*)$")
  local groups = {}
  local function add(part)
    for g in part:gmatch("[^:]+") do groups[#groups + 1] = g end
  end
  if left then
    add(left)
    local nr = 0
    for _ in right:gmatch("[^:]+") do nr = nr + 1 end
    for _ = 1, 8 - #groups - nr do groups[#groups + 1] = "0" end
    add(right)
  else
    add(ip)
  end
  local k = {}
  for i = 1, 4 do k[i] = ("%x"):format(tonumber(groups[i] or "0", 16) or 0) end
  return table.concat(k, ":") .. "::/64"
end

M._client_key = client_key -- for the specs

local function default_exempt(ip) return check.is_loopback(ip) end

-- Makes room in the client table: entries whose window has passed hold nothing worth keeping;
-- when that is not enough, the oldest half of the idle ones go. An entry with a live connection
-- stays, so the table holds at most max_clients + max_connections entries; halving keeps the cost
-- per new address amortized.
local function evict(srv, t)
  local window = srv.opts.client_window
  local idle = {}
  for k, e in pairs(srv.clients) do
    if e.n == 0 then
      if t - e.t >= window then
        srv.clients[k] = nil
        srv.nclients = srv.nclients - 1
        srv.counters.clients_evicted = srv.counters.clients_evicted + 1
      else
        idle[#idle + 1] = k
      end
    end
  end
  if srv.nclients < srv.opts.max_clients then return end
  table.sort(idle, function(a, b) return srv.clients[a].seen < srv.clients[b].seen end)
  for i = 1, math.max(1, math.floor(#idle / 2)) do
    if idle[i] then
      srv.clients[idle[i]] = nil
      srv.nclients = srv.nclients - 1
      srv.counters.clients_evicted = srv.counters.clients_evicted + 1
    end
  end
end

-- The client's counts, their window restarted when it has passed.
local function client_entry(srv, ip, t)
  local key = client_key(ip)
  local e = srv.clients[key]
  if not e then
    if srv.nclients >= srv.opts.max_clients then evict(srv, t) end
    e = { n = 0, t = t, c = 0, m = 0, r = 0, seen = t }
    srv.clients[key] = e
    srv.nclients = srv.nclients + 1
  elseif t - e.t >= srv.opts.client_window then
    e.t, e.c, e.m, e.r = t, 0, 0, 0
  end
  e.seen = t
  return e
end

-- One more of `field` (m: messages, r: recipients) for the client; true when over `max`.
local function client_over(srv, e, field, max)
  local t = now()
  if t - e.t >= srv.opts.client_window then e.t, e.c, e.m, e.r = t, 0, 0, 0 end
  e.seen = t
  local v = e[field] + 1
  e[field] = v
  return v > max
end

local function count(srv, name)
  local c = srv.counters
  c[name] = (c[name] or 0) + 1
  if srv.opts.on_event then observe.event(srv.opts.on_event, "limit", nil, { name = name }) end
end

-- What an engine-enforced limit that closed a session is counted as.
local ENGINE_LIMIT = { errors = "max_errors", commands = "max_commands", transactions = "max_transactions",
  line = "line_length" }

-- The 421 4.4.2 of each deadline.
local EXPIRED = {
  idle_timeout = "Idle timeout, closing connection",
  session_time = "Session time limit reached, closing connection",
  command_time = "Command not completed in time, closing connection",
  data_time = "Message data not received in time, closing connection",
}

-- Transcript and events (smtp.observe): called only when someone listens --------------------

-- The client's lines the engine read since the last call, then the replies about to go out.
-- The session of each engine being traced: flush() finds it here, so no closure of an idle
-- session holds a reference more than before (each would be a slot in every session).
local traced = setmetatable({}, { __mode = "k" })

local function trace(o, eng, out)
  local session = traced[eng]
  if not session then return end
  local fn, id = o.transcript, session.id
  local list = eng:trace_take()
  if list then observe.records(fn, id, list, "recv", session) end
  if out then observe.recv(fn, id, session, out, "send") end
end

local function open_session(srv, session, eng)
  local o = srv.opts
  -- given only when someone listens: one field more would grow every idle session's table
  session.id = observe.next_id()
  if o.transcript then
    if type(eng) == "userdata" then
      eng:trace(o.transcript_body and 2 or 1)
      traced[eng] = session
    end
    observe.line(o.transcript, session.id, "info", ("connection from [%s]:%s"):format(tostring(session.address),
      tostring(session.port)))
  end
  if o.on_event then
    observe.event(o.on_event, "session_open", session.id, { address = session.address, port = session.port })
  end
end

local function close_session(srv, session, eng, err)
  local o = srv.opts
  local limit
  if type(eng) == "userdata" then
    local _, _, _, l = eng:usage()
    limit = l and ENGINE_LIMIT[l]
    if o.transcript then trace(o, eng, nil) end
  end
  if o.transcript then observe.line(o.transcript, session.id, "info", "connection closed") end
  if o.on_event then
    observe.event(o.on_event, "session_close", session.id, { address = session.address, port = session.port,
      limit = limit, error = err and str(err) or nil })
  end
end

-- A session's wait timed out: 421 4.4.2 and the end. `cap` was the earliest deadline other than
-- the idle timeout (rec.t_end, the message's or the command line's). True when the reply went out
-- (the session then lingers before closing: a byte the client dripped meanwhile must not turn
-- the close into a reset that destroys the 421).
local function expire(srv, rec, cap)
  local why = "idle_timeout"
  if now() >= cap then
    why = cap == rec.t_end and "session_time" or rec.msg_t and "data_time" or "command_time"
  end
  count(srv, why)
  local eng = rec.eng
  eng:shutdown(421, "4.4.2", EXPIRED[why])
  local out = eng:output()
  if srv.opts.transcript then trace(srv.opts, eng, out) end
  return not out or rec.conn:write(out, min(srv.opts.timeout, 5)) ~= nil
end

-- The timeout, or less when the session's end comes first.
local function left(rec, timeout) return min(timeout, rec.t_end - now()) end

local proxied

-- Whether MAIL, RCPT, DATA and STARTTLS wait for a decision in a session: their hook is set and
-- its gate (o._gate, smtp.faults' rules) says it may have something to decide, or a per-client
-- limit counts them. A hook that has nothing to decide costs no round through Lua per command.
local function hook_flags(o, cl)
  local g = o._gate
  local function on(hook, at) return o[hook] ~= nil and (g == nil or g.has(at)) end
  return on("on_mail", "mail") or (cl and o.max_client_messages and true) or false,
    on("on_rcpt", "rcpt") or (cl and o.max_client_recipients and true) or false,
    on("on_data", "data"), on("on_starttls", "starttls")
end

-- The gate's rules changed: every live session's engine asks for the decisions it now needs.
local function regate(srv)
  local o = srv.opts
  for rec in pairs(srv.sessions) do
    if type(rec.eng) == "userdata" then rec.eng:hooks(hook_flags(o, rec.cl)) end
  end
end

-- The session's engine, or why it could not be made (a string). Behind a proxy it is fed what
-- the client sent after the PROXY header (nothing, unless it did not wait for the greeting).
local function new_engine(srv, cl, ip, conn)
  local o = srv.opts
  local hmail, hrcpt, hdata, hstarttls = hook_flags(o, cl)
  local xc = srv.xclient_trusted
  if xc then xc = xc(ip) and 2 or 1 end
  local ok, eng = pcall(core.server_engine, {
    hostname = srv.hostname, max_line = o.max_line, max_message_size = o.max_message_size,
    max_recipients = o.max_recipients, max_errors = o.max_errors,
    max_commands = o.max_commands or nil, max_transactions = o.max_transactions or nil,
    tls = srv.tls_ctx ~= nil and not srv.implicit, tls_active = srv.implicit,
    auth = o.auth ~= nil, auth_plaintext = srv.auth_plaintext, require_auth = o.require_auth,
    normalize = o.normalize_newlines, hook_mail = hmail, hook_rcpt = hrcpt, lmtp = o.lmtp,
    hook_helo = o.on_helo ~= nil, hook_rset = o.on_rset ~= nil, xclient = xc,
    requiretls = o.requiretls == true,
    hook_data = hdata, hook_starttls = hstarttls,
  })
  if not ok then return str(eng) end
  local p = srv.proxy_trusted and proxied[conn]
  if p and p.rest and eng:feed(p.rest) < #p.rest then eng:shutdown(421, "4.7.0", "Too much input") end
  return eng
end

-- A session the engine closed: which of its limits did it, if one did.
local function count_engine_limit(srv, eng)
  local _, _, _, limit = eng:usage()
  if limit then count(srv, ENGINE_LIMIT[limit]) end
end

-- After a refusal that counted as an error: past tarpit_after errors the reply waits
-- tarpit_delay * 2^(n - 1) seconds (at most tarpit_max) for the n-th error beyond, so guessing
-- passwords or harvesting addresses gets slower. Other sessions run on meanwhile (a loop sleep).
-- True when it waited.
local function tarpit(srv, eng, session_end)
  local o = srv.opts
  local _, errs = eng:usage()
  local k = errs - o.tarpit_after
  if k <= 0 or o.tarpit_delay <= 0 then return false end
  local d = min(o.tarpit_max, o.tarpit_delay * 2 ^ (k - 1), session_end - now())
  if d <= 0 then return false end
  count(srv, "tarpit")
  -- in slices, so srv:close() ends a session asleep here within one slice, not tarpit_max later
  local t_end = now() + d
  repeat
    loop().sleep(min(0.5, t_end - now()))
  until srv.closing or now() >= t_end
  return true
end

-- Front door: PROXY protocol, the connect/HELO/AUTH/RSET/close hooks, XCLIENT, facts --------
-- Everything here runs only when configured (o._front: a front-door hook or `received`), so a
-- server without them pays nothing per message.

-- The bytes a PROXY header left behind and the addresses it named, from the accept side to the
-- session (a field of the session's own would cost every idle session).
proxied = setmetatable({}, { __mode = "k" })

-- The session's facts for hooks and the Received header.
local function facts(session, eng)
  session.helo, session.user = eng:helo(), eng:user()
  session.esmtp = eng:helo_kind() == 2
  local commands, errs, _, _, tx = eng:usage()
  session.commands, session.errors, session.transactions = commands, errs, tx
end

local function open_front(srv, session, conn)
  local p = proxied[conn]
  if p and p.local_address then
    session.local_address, session.local_port = p.local_address, p.local_port
  else
    session.local_address, session.local_port = conn:local_address()
  end
  if p then session.proxied = p.proxied end
  session.messages, session.recipients, session.commands, session.errors = 0, 0, 0, 0
end

-- Reads a PROXY protocol header (v1 or v2) from a trusted peer within proxy_protocol.timeout:
-- its facts and the bytes after it, or nil, why.
local function read_proxy(srv, conn)
  local t_end = now() + srv.proxy_timeout
  local buf = ""
  while true do
    local left = t_end - now()
    if left <= 0 then return nil, "no PROXY header in time" end
    local chunk, err = conn:read(left, 65552 - #buf)
    if not chunk then return nil, "PROXY header not received: " .. str(err) end
    buf = buf .. chunk
    local n, h = core.proxy_parse(buf)
    if not n then return nil, h end
    if n > 0 then return h, buf:sub(n + 1) end
    if #buf >= 65552 then return nil, "PROXY header too long" end
  end
end

-- The refusals of the per-client limits at connection time.
local CLIENT_REFUSAL = {
  client_rate = "421 4.7.0 Connection rate limit exceeded for your address, try again later\r\n",
  client_connections = "421 4.7.0 Too many connections from your address, try again later\r\n",
}

-- The per-client limits for a new connection from ip: the client's entry (nil when exempt, its
-- open count already raised), or false and the name of the limit that refuses it.
local function admit(srv, ip)
  local o = srv.opts
  local exempt = srv.exempt
  local cl
  local xok, yes = true, false
  if exempt then xok, yes = pcall(exempt, ip) end
  if not xok then srv:_log("client_exempt raised: " .. str(yes)) end
  if not (xok and yes) then
    cl = client_entry(srv, ip, now())
    cl.c = cl.c + 1   -- every attempt counts toward the rate, refused ones too
  end
  if cl and o.max_client_connections and cl.n >= o.max_client_connections then
    return false, "client_connections"
  elseif cl and o.max_client_rate and cl.c > o.max_client_rate then
    return false, "client_rate"
  end
  if cl then cl.n = cl.n + 1 end
  return cl
end

-- Behind a proxy: the header first, then the real client's address goes through the per-client
-- limits. Returns the client's address, port and entry, or nil when the session must end (the
-- connection is left to close: an untrusted or broken peer gets no reply, a limited client its
-- 421).
local function front_proxy(srv, conn, ip, port)
  if not srv.proxy_trusted(ip) then
    count(srv, "proxy_refused")
    srv:_log(("PROXY protocol: %s is not a trusted proxy, connection closed"):format(str(ip)))
    return nil
  end
  local h, rest = read_proxy(srv, conn)
  if srv.closing then return nil end -- srv:close() came while the header was awaited
  if not h then
    count(srv, "proxy_refused")
    srv:_log(("PROXY protocol from %s: %s, connection closed"):format(str(ip), rest))
    return nil
  end
  local p = { rest = rest ~= "" and rest or nil, proxied = { address = ip, port = port, version = h.version } }
  if h.family ~= 0 then
    ip, port = h.src, h.sport
    p.local_address, p.local_port = h.dst, h.dport
  end
  proxied[conn] = p
  local cl, refuse = admit(srv, ip)
  if cl == false then
    count(srv, refuse)
    conn:write(CLIENT_REFUSAL[refuse], 5)
    return nil
  end
  return ip, port, cl or nil
end

-- on_connect: true to go on; a refusal replaces the greeting and ends the session.
local function connect_hook(srv, session, eng)
  facts(session, eng)
  local ok, r1, r2, r3, r4 = pcall(srv.opts.on_connect, session)
  local yes, code, enh, text
  if not ok then
    srv:_log("on_connect raised: " .. str(r1))
    yes, code, enh, text = false, 421, "4.3.0", "Temporary server error, try again later"
  else
    yes, code, enh, text = verdict(srv, 554, "5.7.1", r1, r2, r3, r4)
  end
  if yes then return true end
  count(srv, "connect_refused")
  eng:output() -- the 220 never goes out
  eng:shutdown(code, enh, text or "Service unavailable")
  return false
end

-- After the credentials were checked (`yes`): on_auth hears the outcome and may turn a success
-- into a refusal. Decides the engine's AUTH; returns the final outcome.
local function auth_hook(srv, session, eng, yes, mech, user)
  facts(session, eng)
  local ok, r1, r2, r3, r4 = pcall(srv.opts.on_auth, session, { ok = yes, mechanism = mech, user = user })
  if not ok then
    srv:_log("on_auth raised: " .. str(r1))
    if yes then
      eng:decide(false, 454, "4.7.0", "Temporary authentication failure")
      return false
    end
  elseif yes then
    local code, enh, text
    yes, code, enh, text = verdict(srv, 535, "5.7.8", r1, r2, r3, r4)
    eng:decide(yes, code, enh, text)
    if yes then session.auth_mechanism = mech end
    return yes
  end
  eng:decide(false)
  return false
end

local function notify(srv, name, session, eng)
  facts(session, eng)
  local ok, err = pcall(srv.opts[name], session)
  if not ok then srv:_log(name .. " raised: " .. str(err)) end
end

-- XCLIENT's values, checked as Postfix checks them; [UNAVAILABLE] and [TEMPUNAVAIL] stand for
-- "not known" anywhere.
local function unknown(v) return v == "[UNAVAILABLE]" or v == "[TEMPUNAVAIL]" end
local function xc_addr(v)
  if unknown(v) then return false end
  local a = v:match("^[Ii][Pp][Vv]6:(.*)$") or v
  return cidr.bytes(a) and a or nil
end
local function xc_port(v)
  if unknown(v) then return false end
  local n = v:match("^%d+$") and tonumber(v)
  return n and n <= 65535 and n or nil
end
local XC_CHECK = {
  ADDR = xc_addr, DESTADDR = xc_addr, PORT = xc_port, DESTPORT = xc_port,
  NAME = function(v) if unknown(v) then return false end return v:match("^[%w%.%-_]+$") end,
  REVERSE_NAME = function(v) if unknown(v) then return false end return v:match("^[%w%.%-_]+$") end,
  PROTO = function(v)
    if unknown(v) then return false end
    v = v:upper()
    return (v == "SMTP" or v == "ESMTP") and v or nil
  end,
  HELO = function(v) if unknown(v) then return false end return v end,
  LOGIN = function(v) if unknown(v) then return false end return v end,
}
local XC_FIELD = { ADDR = "address", PORT = "port", NAME = "name", REVERSE_NAME = "reverse_name",
  DESTADDR = "local_address",
  DESTPORT = "local_port" }

-- XCLIENT from a trusted peer: the values checked, then on_connect judges the new client as a
-- new connection (a refusal is the reply to XCLIENT; the peer's session goes on). Accepted, the
-- session takes the client's facts and starts over.
local function xclient(srv, session, eng, t)
  local new = {}
  for k, v in pairs(t) do
    local val = XC_CHECK[k](v)
    if val == nil then
      eng:decide(false, 501, "5.5.4", ("Bad XCLIENT %s syntax: %s"):format(k, v:sub(1, 100)))
      return
    end
    new[k] = val
  end
  local old = {}
  for k, f in pairs(XC_FIELD) do
    old[f] = session[f]
    if new[k] ~= nil then session[f] = new[k] or nil end
  end
  if srv.opts.on_connect then
    facts(session, eng)
    local ok, r1, r2, r3, r4 = pcall(srv.opts.on_connect, session)
    local yes, code, enh, text = true, nil, nil, nil
    if not ok then
      srv:_log("on_connect raised: " .. str(r1))
      yes, code, enh, text = false, 451, "4.3.0", "Temporary server error, try again later"
    else
      yes, code, enh, text = verdict(srv, 554, "5.7.1", r1, r2, r3, r4)
    end
    if not yes then
      for _, f in pairs(XC_FIELD) do session[f] = old[f] end
      count(srv, "connect_refused")
      eng:decide(false, code, enh, text)
      return
    end
  end
  session.xclient = t
  session.auth_mechanism = nil
  eng:decide(true)
end

-- session:received(envelope [, opts]) -> "Received: ...\r\n" for the message being received
-- (server.listen with `received = true`); opts: id (default a random queue id), time (epoch).
local function received_header(session, envelope, opts)
  opts = opts or {}
  local srv = session.server
  local t = session.tls and { version = session.tls_version, cipher = session.tls_cipher, bits = session.tls_bits }
  local id = opts.id
  if not id then id = core.random(5):gsub(".", function(c) return ("%02X"):format(c:byte()) end) end
  local to = envelope and envelope.to
  return require("smtp.received").header {
    helo = session.helo, name = session.name, address = session.address, tls = t, user = session.user,
    esmtp = session.esmtp, lmtp = srv.opts.lmtp, by = srv.hostname, id = id, rcpt = to and #to == 1 and to[1] or nil,
    time = opts.time,
  }
end

-- An EHLO reply (the tail of `out`, from its "250-<hostname>" line) with on_helo's changes:
-- `hide`, extension keywords left out; `advertise`, lines added before the last. For tests
-- (smtp.faults): a client that never sees STARTTLS, AUTH, CHUNKING, ... or sees more.
local function ehlo_edit(out, edit)
  local lines = {}
  for line in out:gmatch("([^\r\n]*)\r\n") do lines[#lines + 1] = line end
  local last = #lines
  if last == 0 or not lines[last]:match("^250 ") then return out end
  local first = last
  while first > 1 and lines[first - 1]:match("^250%-") do first = first - 1 end
  local hide = {}
  for _, k in ipairs(type(edit.hide) == "table" and edit.hide or {}) do hide[tostring(k):upper()] = true end
  local kept = { lines[first]:sub(5) }
  for i = first + 1, last do
    local ext = lines[i]:sub(5)
    if not hide[(ext:match("^(%S+)") or ""):upper()] then kept[#kept + 1] = ext end
  end
  for _, v in ipairs(type(edit.advertise) == "table" and edit.advertise or {}) do
    kept[#kept + 1] = (tostring(v):gsub("%c", " "))
  end
  local r = {}
  for i = 1, first - 1 do r[i] = lines[i] .. "\r\n" end
  for i, k in ipairs(kept) do r[#r + 1] = (i < #kept and "250-" or "250 ") .. k .. "\r\n" end
  return table.concat(r)
end

-- Session -----------------------------------------------------------------------------------

local Session = { __name = "smtp.server.session" }
Session.__index = Session
Session.received = received_header
-- session:drop(): closes the connection at once, without a reply (smtp.faults drops a client
-- at a chosen step); what the hook returns then changes nothing, and the session ends.
function Session:drop()
  local srv = self.server
  for rec in pairs(srv.sessions) do
    if rec.session == self then
      -- the engine takes nothing more the client pipelined; its last reply is never written
      rec.eng:shutdown(421, "4.3.2", "Connection dropped")
      rec.conn:close()
      return true
    end
  end
  return false
end
function Session:__tostring()
  return ("smtp.server.session (%s port %s)"):format(tostring(self.address), tostring(self.port))
end

local function closed_err(text)
  return errors.new { kind = "closed", text = text or "connection closed by client", temporary = true }
end

-- After the server's last reply (421 after a limit or a deadline, 221, shutting down) the client
-- may still have bytes in flight: pipelined commands, a dripped byte. Closing with unread input
-- makes the kernel answer with a reset, and a reset can destroy the reply before the client
-- reads it. So the sending side closes first and what arrives is read and dropped until the
-- client closes, for at most LINGER_TIME seconds and LINGER_BYTES bytes.
local LINGER_TIME, LINGER_BYTES = 2, 65536
local function linger(conn)
  if not conn.shutdown or not conn:shutdown() then return end
  local got, t_end = 0, now() + LINGER_TIME
  while got < LINGER_BYTES do
    local left = t_end - now()
    if left <= 0 then return end
    local chunk = conn:read(left, 16384)
    if not chunk or chunk == "" then return end
    got = got + #chunk
  end
end

-- Runs one connection to the end. Everything the world does to it ends the session quietly.
-- `cl` is the client's entry in the per-client table, nil for an exempt client.
local function run_session(srv, conn, ip, port, cl)
  local o = srv.opts  -- o.timeout has no local: one more would be a slot in each idle session's stack
  local eng = new_engine(srv, cl, ip, conn)
  local session = setmetatable({ address = ip, port = port, server = srv, tls = srv.implicit }, Session)
  if o._front then open_front(srv, session, conn) end
  -- Deadlines besides the idle timeout live in `rec` (a local more in every session's stack
  -- frame would cost more than its field): the session's end (t_end); while the engine holds part
  -- of a command line, the time it was first seen partial (cmd_t) and the command count then
  -- (cmd_n, a new count means a new line); the current message's start (msg_t) and bytes so far
  -- (bytes): its data may take data_timeout plus one second per data_rate bytes.
  local rec = { conn = conn, eng = eng, session = session, idle = false, full = false,
    t_end = now() + (o.max_session_time or huge), cap = 0, cmd_t = false, cmd_n = 0, msg_t = false,
    bytes = 0, cl = cl or false }
  srv.sessions[rec] = true
  local dead = false       -- the connection is gone (closed, reset, timed out)
  local stash              -- an event the reader pulled that belongs to the main loop
  srv.counters.sessions = srv.counters.sessions + 1
  if o.transcript or o.on_event then open_session(srv, session, eng) end

  local function flush()
    local out = eng:output()
    if o._trace then o._trace(o, eng, out) end
    if out and not dead then
      local ok = conn:write_idle(out, o.timeout)
      if not ok then dead = true end
    end
    return not dead
  end

  -- Reads more client bytes into the engine; false when the session must end.
  local function fill()
    if not flush() then return false end
    if eng:closed() then return false end
    if srv.closing then
      eng:shutdown(421, "4.3.2", "Service shutting down")
      flush()
      return false
    end
    -- The wait ends at the idle timeout, or at rec.cap when that comes first: a client that
    -- drips a byte per timeout period is not kept by the idle timer. Working out the cap takes
    -- no clock reading (the hot path pays a few comparisons); only a command line left partial
    -- does. It goes through `rec`, and `partial` (reused for the deadlines) lives in a block: a
    -- local still alive at the read would cost each idle session a slot, and on LuaJIT a
    -- doubled stack (1.3 KB).
    local space
    do
      local partial
      space, partial = eng:space()
      if space == 0 then return true end
      local cap = rec.t_end
      if rec.msg_t then
        partial = rec.msg_t + (o.data_timeout or huge) + rec.bytes / o.data_rate
        if partial < cap then cap = partial end
      elseif partial then
        partial = eng:usage()
        if not rec.cmd_t or partial ~= rec.cmd_n then rec.cmd_t, rec.cmd_n = now(), partial end
        partial = rec.cmd_t + (o.command_timeout or huge)
        if partial < cap then cap = partial end
      else
        rec.cmd_t = false
      end
      rec.cap = cap
    end
    -- The transport's read_idle leaves the connection open on a timeout, so 421 can still go out.
    rec.idle = true
    -- the bytes go straight into the engine: `got` is their count
    local got, err = conn:read_idle(o.timeout, space, rec.full, rec.cap, eng)
    rec.idle = false
    rec.full = got ~= nil and got >= space
    if not got then
      dead = err.kind ~= "timeout" or not expire(srv, rec, rec.cap)
      return false
    end
    if rec.msg_t then rec.bytes = rec.bytes + got end
    return true
  end

  -- chosen once per session: the per-message path asks nothing more than before the front door
  local refresh = o._front and function() facts(session, eng) end or function()
    session.helo = eng:helo()
    session.user = eng:user()
  end

  -- The message being read: its state lives here, not in per-message closures, so a message
  -- costs one reader table. `cur` is that reader; a reader kept past its message reads nothing.
  local cur, buf, ended, endcode, endtext, rerr

  -- Next data chunk of the current message from the engine, or nil at its end; with `skip`
  -- (the hook read no further) true instead of each chunk, which is never made into a string.
  local function pull(skip)
    while not ended do
      local kind, a, b = eng:next(skip)
      if kind == "data" then return a end
      if kind == "end" then
        ended, endcode, endtext = true, a, b
        return nil
      end
      if kind then -- the message was cut off by something else
        stash = { kind, a, b }
        ended, endcode, endtext = true, 451, "Transaction aborted"
        return nil
      end
      if a == "write" then
        if not flush() then
          ended = true
          rerr = closed_err()
          return nil
        end
      elseif not fill() then
        ended = true
        rerr = closed_err()
        return nil
      end
    end
  end

  local function read(reader, n)
    if n ~= nil and (type(n) ~= "number" or n < 1) then
      error("bad argument #1 to 'read' (positive number expected)", 2)
    end
    if reader ~= cur then return nil end
    if not buf then
      if ended then
        if rerr then return nil, rerr end
        if endcode then
          return nil, errors.new { kind = "rejected", code = endcode, text = endtext }
        end
        return nil
      end
      buf = pull()
      if not buf then return read(reader, n) end
    end
    local s = buf
    if n and #s > n then
      buf = s:sub(n + 1)
      s = s:sub(1, n)
    else
      buf = nil
    end
    return s
  end
  local reader_mt = { __name = "smtp.server.reader", __index = {
    read = read,
    chunks = function(self)
      return function()
        local s = read(self, 65536)
        return s
      end
    end,
  } }

  -- on_message with a reader that pulls from the connection as the hook reads.
  local function message()
    buf, ended, endcode, endtext, rerr = nil, false, nil, nil, nil
    rec.msg_t, rec.bytes = now(), 0
    local ok, r1, r2, r3, r4
    if o.on_message then
      local envelope = eng:envelope()
      cur = setmetatable({}, reader_mt)
      refresh()
      ok, r1, r2, r3, r4 = pcall(o.on_message, session, envelope, cur)
      cur = nil
    else
      ok, r1 = true, true
    end
    -- whatever the hook left: take the whole message in before replying
    buf = nil
    while not ended do pull(true) end
    rec.msg_t = false
    if rerr or dead then return false end
    if endcode then return true end -- the engine refused it and replied already
    -- the envelope is gone once decided
    -- (the session's facts need only the count: no envelope table is built for them)
    local env = o._env and (o.on_event and eng:envelope() or eng:rcpt_count())
    local yes, code
    if o.lmtp then
      yes, code = srv:_lmtp_decide(eng, ok, r1, r2, r3, r4)
    elseif not ok then
      srv:_log("on_message raised: " .. str(r1))
      yes, code = false, 451
      eng:decide(false, 451, "4.3.0", "Error processing message, try again later")
    else
      local enh, text
      yes, code, enh, text = verdict(srv, 554, "5.6.0", r1, r2, r3, r4)
      eng:decide(yes, code, enh, text)
    end
    local c = srv.counters
    if yes then c.messages = c.messages + 1 else c.messages_refused = c.messages_refused + 1 end
    if env then srv:_message_done(session, yes, code, env, rec.bytes) end
    return true
  end

  local function hook(fn, default_code, default_enh, ...)
    refresh()
    local ok, r1, r2, r3, r4 = pcall(fn, session, ...)
    if not ok then
      srv:_log("hook raised: " .. str(r1))
      eng:decide(false, 451, "4.3.0", "Temporary error, try again later")
    else
      local yes, code, enh, text = verdict(srv, default_code, default_enh, r1, r2, r3, r4)
      eng:decide(yes, code, enh, text)
      -- the wait counts against no deadline of the client's next command
      if not yes and tarpit(srv, eng, rec.t_end) then rec.cmd_t = false end
      return yes and r2   -- on_helo's changes to the EHLO reply
    end
  end

  local ok, err = type(eng) == "userdata" and pcall(function()
    if srv.implicit then
      local tok, terr = conn:tls_accept(srv.tls_ctx, left(rec, o.timeout))
      if not srv:_tls_done(session, conn, tok, terr) then return end
      rec.full = true   -- read first: the handshake may have read ahead into the client's data
    end
    if o.on_connect then srv:_connect_hook(session, eng) end
    while true do
      local kind, a, b, c
      if stash then
        kind, a, b = stash[1], stash[2], stash[3]
        stash = nil
      else
        kind, a, b, c = eng:next()
      end
      if not kind then
        if a == "write" then -- replies piled up: out they go before more input is taken
          if not flush() then break end
        elseif not fill() then
          break
        end
      elseif kind == "mail" then
        -- the client's messages in this window, then the hook
        if cl and o.max_client_messages and client_over(srv, cl, "m", o.max_client_messages) then
          count(srv, "client_messages")
          eng:decide(false, 451, "4.7.1", "Too much mail from your address, try again later")
          if tarpit(srv, eng, rec.t_end) then rec.cmd_t = false end
        elseif o.on_mail then
          hook(o.on_mail, 550, "5.7.1", a, b)
        else
          eng:decide(true)
        end
      elseif kind == "rcpt" then
        if cl and o.max_client_recipients and client_over(srv, cl, "r", o.max_client_recipients) then
          count(srv, "client_recipients")
          eng:decide(false, 452, "4.5.3", "Too many recipients from your address, try again later")
        elseif o.on_rcpt then
          hook(o.on_rcpt, 550, "5.1.1", a, b)
        else
          eng:decide(true)
        end
      elseif kind == "helo" then
        local edit = hook(o.on_helo, 550, "5.7.1", a, b)
        -- the EHLO reply is the tail of what waits to be written: edited, then written here
        if type(edit) == "table" and b ~= "HELO" then
          local out = eng:output()
          if out then
            out = ehlo_edit(out, edit)
            if o._trace then o._trace(o, eng, out) end
            if not dead and not conn:write(out, o.timeout) then dead = true end
          end
        end
      elseif kind == "data_command" then
        hook(o.on_data, 554, "5.7.1", eng:envelope())
      elseif kind == "starttls_command" then
        hook(o.on_starttls, 454, "4.7.0")
      elseif kind == "rset" then
        srv:_notify("on_rset", session, eng)
      elseif kind == "xclient" then
        srv:_xclient(session, eng, a)
      elseif kind == "begin" then
        if not message() then break end
      elseif kind == "end" then
        -- a BDAT message aborted before any data was read: nothing to do
        if not a then
          eng:decide(true)
          if o.lmtp then while eng:lmtp_due() > 0 do eng:decide(true) end end
        end
      elseif kind == "auth" then
        refresh()
        local pok, res = pcall(o.auth, session, a, b, c)
        c = nil
        if not pok then
          srv:_log("auth callback raised: " .. str(res))
          eng:decide(false, 454, "4.7.0", "Temporary authentication failure")
        elseif o.on_auth then
          res = srv:_auth_hook(session, eng, res == true, a, b)
        else
          eng:decide(res == true)
        end
        srv:_auth_done(session, pok and res == true, a, b)
        a, b = nil, nil
        if pok and res ~= true and tarpit(srv, eng, rec.t_end) then rec.cmd_t = false end
      elseif kind == "starttls" then
        if not flush() then break end
        local tok, terr = conn:tls_accept(srv.tls_ctx, left(rec, o.timeout))
        if not srv:_tls_done(session, conn, tok, terr) then break end
        session.tls = true
        rec.full = true   -- read first: the handshake may have read ahead into the client's data
      elseif kind == "close" then
        count_engine_limit(srv, eng)
        flush()
        break
      end
    end
  end)
  -- whatever happened, the server's and the client's connection counts go down
  if type(eng) ~= "userdata" then
    srv:_log("session error: " .. eng)
    conn:write("421 4.3.0 Temporary server error, closing connection\r\n", 5)
  elseif not ok then
    srv:_log("session error: " .. str(err))
  end
  if o.on_close and type(eng) == "userdata" then srv:_notify("on_close", session, eng) end
  srv.sessions[rec] = nil
  srv.active = srv.active - 1
  if o.transcript or o.on_event then close_session(srv, session, eng, not ok and err or nil) end
  if cl then
    cl.n = cl.n - 1
    cl.seen = now()
  end
  if not dead then linger(conn) end
  conn:close()
end

-- Behind a proxy: its header first (front_proxy), then the session as any other.
local function proxied_session(srv, conn, ip, port)
  local cl
  ip, port, cl = front_proxy(srv, conn, ip, port)
  if not ip then
    srv.active = srv.active - 1
    conn:close()
    return
  end
  return run_session(srv, conn, ip, port, cl)
end

-- Server ------------------------------------------------------------------------------------

local Server = { __name = "smtp.server" }
Server.__index = Server

-- What sessions report through the server (methods: a session's closures reach them through
-- `srv`, which they hold already, so no closure grows). --------------------------------------

-- After a TLS handshake (conn:tls_accept's results): counted and told; returns ok.
function Server:_tls_done(session, conn, ok, err)
  local srv = self
  local c = srv.counters
  if ok then c.tls = c.tls + 1 else c.tls_failures = c.tls_failures + 1 end
  local o = srv.opts
  if ok and o._front then
    local i = conn:info()
    session.tls_version, session.tls_cipher, session.tls_bits = i.version, i.cipher, i.bits
    session.peer_subject, session.verify_result = i.peer_subject, i.verify_result
  end
  if not (o.transcript or o.on_event) then return ok end
  local t
  if ok then
    t = observe.tls_fields(conn:info(), false)
    t.verify_result = nil   -- no client certificate is asked for
  else
    t = { error = type(err) == "table" and err.text or str(err) }
  end
  t.ok = ok and true or false
  if o.transcript then
    observe.line(o.transcript, session.id, "tls", ok and observe.tls_line(t) or ("TLS handshake failed: " .. t.error))
  end
  if o.on_event then observe.event(o.on_event, "tls", session.id, t) end
  return ok
end

function Server:_auth_done(session, yes, mech, user)
  local srv = self
  local c = srv.counters
  if yes then c.auth = c.auth + 1 else c.auth_failures = c.auth_failures + 1 end
  if srv.opts.on_event then
    observe.event(srv.opts.on_event, "auth", session.id, { ok = yes, mechanism = mech, user = user })
  end
end

-- LMTP (RFC 2033): the end of a message is answered once per accepted recipient, in order.
-- on_message's answer is one verdict for all (true, or false, code, ...), or a table of them
-- keyed by the recipient's index in envelope.to or by its address: true, false, or
-- { false, code, text } / { false, code, enhanced, text }. A recipient the table leaves out gets
-- 451 4.3.0 (logged): no message is taken or lost by omission. -> whether any recipient took it,
-- and the first refusal's code.
function Server:_lmtp_decide(eng, ok, r1, r2, r3, r4)
  local env = eng:envelope()
  local to = env and env.to or {}
  local n = eng:lmtp_due()
  local any, first_code = false, nil
  for i = 1, n do
    local yes, code, enh, text
    if not ok then
      if i == 1 then self:_log("on_message raised: " .. str(r1)) end
      yes, code, enh, text = false, 451, "4.3.0", "Error processing message, try again later"
    elseif type(r1) == "table" then
      local v = r1[i]
      if v == nil then v = r1[to[i]] end
      if v == nil then
        self:_log("on_message gave no reply for recipient " .. i .. " (" .. str(to[i]) .. ")")
        yes, code, enh, text = false, 451, "4.3.0", "No reply for this recipient, try again later"
      elseif type(v) == "table" then
        yes, code, enh, text = verdict(self, 554, "5.6.0", v[1], v[2], v[3], v[4])
      else
        yes, code, enh, text = verdict(self, 554, "5.6.0", v)
      end
    else
      yes, code, enh, text = verdict(self, 554, "5.6.0", r1, r2, r3, r4)
    end
    eng:decide(yes, code, enh, text)
    if yes then any = true elseif not first_code then first_code = code end
  end
  return any, first_code
end

-- A message decided (`env` is its envelope, or without on_event its number of recipients):
-- counted in the session's facts, told to on_event.
function Server:_message_done(session, yes, code, env, bytes)
  local o = self.opts
  if o._front and yes then
    session.messages = session.messages + 1
    session.recipients = session.recipients + (type(env) == "table" and #env.to or env)
  end
  if o.on_event then
    observe.event(o.on_event, "message", session.id, { ok = yes, code = yes and 250 or code,
      from = env.from, recipients = env.to and #env.to, bytes = bytes })
  end
end

-- The front door's steps, as methods: a session's closures reach them through `srv`, so none
-- of them holds one more upvalue per session.
Server._connect_hook, Server._auth_hook, Server._notify, Server._xclient = connect_hook, auth_hook, notify, xclient
Server._regate = regate

function Server:_log(msg)
  if self.opts.log then pcall(self.opts.log, msg) end
end

-- srv:stats() -> a copy of srv.counters with the current `active` sessions and `clients` tracked.
function Server:stats()
  local t = {}
  for k, v in pairs(self.counters) do t[k] = v end
  t.active, t.clients = self.active, self.nclients
  return t
end

function Server:__tostring()
  return ("smtp.server (%s port %d%s)"):format(self.host, self.port, self.closed and ", closed" or "")
end

local function accept_loop(srv)
  local l = srv.listener
  local o = srv.opts
  while not srv.closed do
    local conn, ip, port = l:accept()
    if not conn then
      if srv.closed then break end
      loop().sleep(0.05) -- EMFILE and friends: do not spin
    elseif srv.active >= o.max_connections then
      count(srv, "max_connections")
      conn:write("421 4.3.2 Too many connections, try again later\r\n", 5)
      conn:close()
    elseif srv.proxy_trusted then
      -- the real client is known once its proxy's header is read: the session admits it
      srv.active = srv.active + 1
      loop().spawn(proxied_session, srv, conn, ip, port)
    else
      local cl, refuse = admit(srv, ip)
      if cl == false then
        count(srv, refuse)
        conn:write(CLIENT_REFUSAL[refuse], 5)
        conn:close()
      else
        srv.active = srv.active + 1
        loop().spawn(run_session, srv, conn, ip, port, cl)
      end
    end
  end
end

-- srv:serve(): inside smtp.loop it starts accepting as one more task and returns at once;
-- outside, it runs the loop until srv:close().
function Server:serve()
  if self.serving then return true end
  self.serving = true
  local lp = loop()
  lp.spawn(accept_loop, self)
  if not lp.current() then lp.run() end
  return true
end

-- srv:close(): stops accepting; sessions end with 421 at their next wait.
function Server:close()
  if self.closed then return true end
  self.closed, self.closing = true, true
  self.listener:close()
  for rec in pairs(self.sessions) do
    if rec.idle then
      -- waiting for the client: answer 421 now and close, which wakes the session's task
      rec.eng:shutdown(421, "4.3.2", "Service shutting down")
      local out = rec.eng:output()
      if self.opts.transcript then trace(self.opts, rec.eng, out) end
      if out then rec.conn:write(out, 1) end
      rec.conn:close()
    end
  end
  return true
end

-- Every limit's counter, so srv.counters lists them all from the start.
local COUNTERS = { "max_connections", "client_connections", "client_rate", "client_messages",
  "client_recipients", "idle_timeout", "session_time", "command_time", "data_time", "max_errors",
  "max_commands", "max_transactions", "line_length", "tarpit", "clients_evicted",
  -- the front door: connections closed for a missing or bad PROXY header or an untrusted peer,
  -- and clients refused by on_connect
  "proxy_refused", "connect_refused",
  -- not limits: sessions opened, messages accepted and refused, AUTH and TLS outcomes
  "sessions", "messages", "messages_refused", "auth", "auth_failures", "tls", "tls_failures" }

local function new_counters()
  local c = {}
  for _, k in ipairs(COUNTERS) do c[k] = 0 end
  return c
end

function M.listen(opts)
  check_opts(opts)
  local o = {}
  for k, v in pairs(DEFAULTS) do o[k] = v end
  for k, v in pairs(opts) do o[k] = v end
  -- reached through `o`, which every session's flush() holds already
  o._trace = o.transcript and trace or nil
  local t = transport()
  local host = o.host or "127.0.0.1"
  local tls_ctx
  if o.tls then
    local err
    tls_ctx, err = t.tls_server_context { cert = o.tls.cert, key = o.tls.key,
      ticket_rotation = o.tls.ticket_rotation }
    if not tls_ctx then
      return nil, errors.new { kind = "tls", text = "server certificate: " .. tostring(err and err.text), temporary = false }
    end
  end
  local l, err = t.listen { host = host, port = o.port or 0, backlog = o.backlog or 512, path = o.path }
  if not l then return nil, err end
  local auth_plaintext = o.auth_plaintext
  if auth_plaintext == nil then auth_plaintext = o.path ~= nil or check.is_loopback(host) end
  local exempt = o.client_exempt
  if exempt == nil then exempt = default_exempt end
  -- a Unix socket's clients are local, and all look alike ("unix"): no per-client counts
  if not (o.max_client_connections or o.max_client_rate or o.max_client_messages
    or o.max_client_recipients) or o.path then
    exempt = function() return true end
  end
  o._front = (o.on_connect or o.on_helo or o.on_auth or o.on_rset or o.on_close or o.received
    or o.on_data or o.on_starttls) and true or nil
  -- the envelope is read once decided only for someone who uses it
  o._env = (o.on_event or o._front) and true or nil
  local pp, xc = o.proxy_protocol or nil, o.xclient or nil
  local srv = setmetatable({
    opts = o, listener = l, host = l.host or host, port = l.port,
    hostname = o.hostname or "localhost", tls_ctx = tls_ctx, implicit = (o.tls and o.tls.implicit) == true,
    auth_plaintext = auth_plaintext, sessions = {}, active = 0,
    clients = {}, nclients = 0, counters = new_counters(), exempt = exempt,
    proxy_trusted = pp and cidr.list(pp.trusted), proxy_timeout = pp and pp.timeout or 5,
    xclient_trusted = xc and cidr.list(xc.trusted),
  }, Server)
  if o._gate then o._gate.watch(srv) end
  return srv
end

return M
