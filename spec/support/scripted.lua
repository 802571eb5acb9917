-- A scripted in-memory transport for driver specs: a small RFC 5321/2920/3030 server model behind a
-- socket object with the transport contract, faults injected by rules, no sockets and no sleeping.
--
--   local srv = scripted.new { pipelining = true, chunking = false, faults = {
--     { cmd = "RCPT", arg = "x@b.test", reply = "550 5.1.1 nope" },   -- this RCPT is refused
--     { cmd = "DATA", nth = 2, action = "drop" },                       -- the 2nd DATA: connection gone
--     { cmd = ".", from = "s3@a.test", action = "421" },                -- end of s3's data: 421, closed
--     { cmd = "MAIL", action = "timeout" },                             -- the server stops answering
--   } }
--   smtp.connect { server = "127.0.0.1", tls = "none", transport = srv }
--
-- A rule matches a command verb (MAIL, RCPT, DATA, BDAT, RSET, NOOP, ...) or "." (the end of a DATA
-- body, and the end of a BDAT LAST chunk); `from` limits it to the transaction of that sender (for
-- MAIL: its own address), `arg` to that RCPT address, `nth` to the nth match (default 1). Each rule
-- fires once. After a drop, a 421 or a timeout the model keeps parsing what the client still writes
-- (marked `shadow` in the command log) without answering it. After a drop or 421, writes still
-- succeed until a read has reported `closed` (as a TCP write into a closed peer first does), then fail.
-- A refused BDAT (LAST included) leaves the transaction failed until RSET: further BDATs are
-- discarded with 503 and MAIL is answered 503 (RFC 3030: RSET is due after a failed BDAT).
--
-- Records: srv.wire (every byte the client wrote, in order), srv.commands ({ verb, arg, line,
-- from, shadow, payload } per command; payload = the first 512 bytes of a DATA body or BDAT chunk),
-- srv.stored ({ from, rcpts, body } per accepted message), srv.faults (the rules, `fired` set on
-- those that happened) and srv.violations (protocol mistakes the
-- client made that a real server could not tell it about: nested MAIL, BDAT after a refused one
-- beyond what was in flight, waiting for a reply that nothing will send).
local errors = require "smtp.errors"

local M = {}

local function closed_err(text) return errors.new { kind = "closed", text = text, temporary = true } end
local function timeout_err(text) return errors.new { kind = "timeout", text = text, temporary = true } end

function M.new(script)
  script = script or {}
  local faults = script.faults or {}
  local srv = { wire = {}, commands = {}, stored = {}, violations = {}, connections = 0, faults = faults }
  for _, f in ipairs(faults) do f.seen = 0 end

  -- one connection's server state
  local st

  local function reply(s) if not st.shadow then st.out[#st.out + 1] = s .. "\r\n" end end
  -- once the conversation is over (shadow parsing) the client cannot be faulted for its state
  local function violation(s) if not st.shadow then srv.violations[#srv.violations + 1] = s end end

  local function fault(verb, from, arg)
    if st.shadow then return nil end
    for _, f in ipairs(faults) do
      if not f.fired and f.cmd == verb and (f.from == nil or f.from == from) and
        (f.arg == nil or f.arg == arg) then
        f.seen = f.seen + 1
        if f.seen == (f.nth or 1) then f.fired = true; return f end
      end
    end
  end

  -- drop / 421 / timeout: true when the fault ended the conversation
  local function act(f)
    if f.action == "drop" then st.gone, st.shadow = "closed", true
    elseif f.action == "421" then reply("421 4.4.2 scripted: closing"); st.gone, st.shadow = "closed", true
    elseif f.action == "timeout" then st.gone, st.shadow = "timeout", true
    else return false end
    return true
  end

  local function log(verb, arg, line)
    local c = { verb = verb, arg = arg, line = line, from = st.tx and st.tx.from, shadow = st.shadow }
    srv.commands[#srv.commands + 1] = c
    return c
  end

  local function store(tx)
    if not st.shadow then
      srv.stored[#srv.stored + 1] = { from = tx.from, rcpts = tx.rcpts, body = table.concat(tx.parts) }
    end
  end

  -- The end of a message (after DATA's body or the BDAT LAST chunk): stored, unless a "." rule says
  -- otherwise. A refused end of DATA clears the transaction (RFC 5321 §4.1.1.4); a refused BDAT
  -- leaves it failed until RSET (RFC 3030 §2: "A RSET command MUST be issued").
  local function end_of_data(bdat)
    local tx = st.tx
    local f = fault(".", tx.from)
    if f and act(f) then st.tx = nil; return end
    if f then
      reply(f.reply)
      if bdat then tx.state, tx.after_failed = "failed", 0 else st.tx = nil end
      return
    end
    store(tx)
    st.tx = nil
    reply("250 2.0.0 scripted: queued")
  end

  local function ehlo_reply()
    local lines = { "scripted.test" }
    if script.pipelining then lines[#lines + 1] = "PIPELINING" end
    if script.chunking then lines[#lines + 1] = "CHUNKING" end
    lines[#lines + 1] = "8BITMIME"; lines[#lines + 1] = "SIZE 10000000"
    lines[#lines + 1] = "ENHANCEDSTATUSCODES"
    for i = 1, #lines - 1 do lines[i] = "250-" .. lines[i] end
    lines[#lines] = "250 " .. lines[#lines]
    reply(table.concat(lines, "\r\n"))
  end

  local function command(line)
    local verb, rest = line:match("^(%S*)%s?(.*)$")
    verb = verb:upper()
    local addr = rest:match("^[Ff][Rr][Oo][Mm]:<([^>]*)>") or rest:match("^[Tt][Oo]:<([^>]*)>")
    local tx = st.tx
    local c = log(verb, addr or rest, line)
    if verb == "MAIL" then c.from = addr end
    local f = verb ~= "BDAT" and fault(verb, verb == "MAIL" and addr or (tx and tx.from), addr)
    if f and act(f) then return end
    if verb == "EHLO" or verb == "HELO" then
      st.tx, st.helo = nil, true
      if verb == "EHLO" then ehlo_reply() else reply("250 scripted.test") end
    elseif verb == "MAIL" then
      if f then return reply(f.reply) end
      if not st.helo then return reply("503 5.5.1 scripted: EHLO first") end
      if tx then
        violation(("MAIL FROM:<%s> while the transaction of <%s> was open (no RSET)"):format(addr, tx.from))
        return reply("503 5.5.1 scripted: nested MAIL")
      end
      st.tx = { from = addr, rcpts = {}, parts = {}, state = "envelope" }
      reply("250 2.1.0 scripted: sender ok")
    elseif verb == "RCPT" then
      if not tx then return reply("503 5.5.1 scripted: MAIL first") end
      if f then return reply(f.reply) end
      if tx.state ~= "envelope" then return reply("503 5.5.1 scripted: RCPT after the data began") end
      tx.rcpts[#tx.rcpts + 1] = addr
      reply("250 2.1.5 scripted: recipient ok")
    elseif verb == "DATA" then
      if not tx then return reply("503 5.5.1 scripted: MAIL first") end
      if f then return reply(f.reply) end
      if tx.state ~= "envelope" then return reply("503 5.5.1 scripted: DATA after BDAT") end
      if #tx.rcpts == 0 and not st.shadow then return reply("554 5.5.1 scripted: no valid recipients") end
      reply("354 scripted: go ahead")
      st.mode, st.body, st.cmd = "data", {}, c
    elseif verb == "BDAT" then
      local n, last = rest:match("^(%d+)%s*(.-)%s*$")
      n = tonumber(n)
      if not n or (last ~= "" and last:upper() ~= "LAST") then
        reply("501 5.5.4 scripted: BDAT syntax")
        return
      end
      -- the chunk's bytes follow whatever the answer is: read them, then answer
      local refusal
      f = fault("BDAT", tx and tx.from)
      if f and act(f) then refusal = "shadow" end
      if not tx then refusal = refusal or "503 5.5.1 scripted: MAIL first"
      elseif tx.state == "failed" then
        tx.after_failed = tx.after_failed + 1
        if tx.after_failed > (script.pipelining and 1 or 0) then
          violation(("BDAT for <%s> after its refused BDAT, beyond the chunk in flight"):format(tx.from))
        end
        refusal = refusal or "503 5.5.1 scripted: chunk discarded after a failed BDAT"
      elseif #tx.rcpts == 0 and not st.shadow then refusal = refusal or "554 5.5.1 scripted: no valid recipients"
      end
      st.mode, st.left, st.last, st.cmd, st.chunk = "bdat", n, last ~= "", c, {}
      st.refusal = refusal or (f and f.reply)
    elseif verb == "RSET" then
      st.tx = nil
      reply("250 2.0.0 scripted: reset")
    elseif verb == "NOOP" then
      reply("250 2.0.0 scripted: ok")
    elseif verb == "QUIT" then
      reply("221 2.0.0 scripted: bye")
      st.gone, st.shadow = "closed", true
    else
      reply("500 5.5.2 scripted: unknown command")
    end
  end

  local function bdat_done()
    local tx, refusal = st.tx, st.refusal
    local data = table.concat(st.chunk)
    st.cmd.payload = data:sub(1, 512)
    st.mode = "line"
    if refusal then
      if refusal ~= "shadow" then reply(refusal) end
      if tx and tx.state ~= "failed" then tx.state, tx.after_failed = "failed", 0 end
      return
    end
    tx.state = "bdat"
    tx.parts[#tx.parts + 1] = data
    if st.last then end_of_data(true) else reply(("250 2.0.0 scripted: %d octets"):format(#data)) end
  end

  -- Client bytes, in the order written: commands, DATA bodies (dot-unstuffed), BDAT chunks.
  local function feed(data)
    local buf = st.buf .. data
    local pos, n = 1, #buf
    while pos <= n do
      if st.mode == "bdat" then
        local take = math.min(st.left, n - pos + 1)
        st.chunk[#st.chunk + 1] = buf:sub(pos, pos + take - 1)
        pos, st.left = pos + take, st.left - take
        if st.left == 0 then bdat_done() end
      else
        local e = buf:find("\r\n", pos, true)
        if not e then break end
        local line = buf:sub(pos, e - 1)
        pos = e + 2
        if st.mode == "data" then
          if line == "." then
            st.mode = "line"
            local tx = st.tx
            tx.parts[1] = table.concat(st.body)
            st.cmd.payload = tx.parts[1]:sub(1, 512)
            end_of_data(false)
          else
            if line:sub(1, 1) == "." then line = line:sub(2) end
            st.body[#st.body + 1] = line .. "\r\n"
          end
        else
          command(line)
        end
      end
    end
    st.buf = buf:sub(pos)
  end

  -- The socket the client gets.
  local Sock = {}
  Sock.__index = Sock

  function Sock:write(data, _)
    if self.closed then return nil, closed_err("scripted: socket closed by the client") end
    if st.gone == "closed" and #st.out == 0 and st.told then
      return nil, closed_err("scripted: connection reset by peer")
    end
    srv.wire[#srv.wire + 1] = data
    feed(data)
    return true
  end

  function Sock:write_engine(e, timeout) return self:write(e:take(), timeout) end

  function Sock:read(_, max)
    if self.closed then return nil, closed_err("scripted: socket closed by the client") end
    if #st.out > 0 then
      local s = table.concat(st.out)
      max = max or 65536
      st.out = #s > max and { s:sub(max + 1) } or {}
      return s:sub(1, max)
    end
    if st.gone == "closed" then st.told = true; return nil, closed_err("scripted: connection closed by peer") end
    if st.gone == "timeout" then return nil, timeout_err("scripted: the server stopped answering") end
    -- a live server with nothing to say: a real client would wait for its whole timeout here
    violation("the client waited for a reply with none due (after: " ..
      tostring(srv.commands[#srv.commands] and srv.commands[#srv.commands].line) .. ")")
    return nil, timeout_err("scripted: no reply is due")
  end

  function Sock:starttls() return nil, errors.new { kind = "tls", text = "scripted: no TLS", temporary = false } end
  function Sock:info() return { address = "127.0.0.1", port = self.port, tls = false } end
  function Sock:close() self.closed = true; srv.closed = (srv.closed or 0) + 1 end
  function Sock:pollfd() return nil end
  function Sock:events() return nil end
  function Sock:timeout() return nil end

  function srv.connect(opts)
    srv.connections = srv.connections + 1
    st = { buf = "", out = {}, mode = "line" }
    reply("220 scripted.test ESMTP")
    return setmetatable({ port = opts.port }, Sock)
  end

  -- the client bytes as one string
  function srv.wire_text() return table.concat(srv.wire) end

  return srv
end

return M
