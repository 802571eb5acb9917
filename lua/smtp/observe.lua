-- smtp.observe: what programs and people see of sessions: the transcript (every line sent and
-- received, credentials replaced by a marker, message bytes counted rather than copied),
-- structured events (on_event) and the process-wide counters of smtp.counters(). The client
-- session, smtp.deliver and smtp.server call in here only when a caller listens: each emission
-- sits behind one nil check, so nobody listening costs nothing.
local core = require "smtp.core"

local M = {}

local type, pairs, tostring, pcall = type, pairs, tostring, pcall
local now = core.now

-- What the transcript shows in place of AUTH payloads, passwords and tokens (the C engines
-- write it: the credentials never reach this module).
M.MARKER = "[redacted]"

-- Connection ids: one sequence for client and server connections of this process.
local last_id = 0
function M.next_id()
  last_id = last_id + 1
  return last_id
end

-- Process-wide counters of the client side (smtp.counters() hands out a copy). A few additions
-- per connection and per transaction: cheap enough to keep always.
local counters = {
  connections = 0, connect_failures = 0, tls = 0, tls_failures = 0, auth = 0, auth_failures = 0,
  transactions = 0, transactions_failed = 0, recipients_accepted = 0, recipients_rejected = 0,
  deliver_sent = 0, deliver_failed = 0, deliver_deferred = 0, retries = 0,
}
M.counters = counters

function M.snapshot()
  local t = {}
  for k, v in pairs(counters) do t[k] = v end
  return t
end

-- The observer options of smtp.send / smtp.connect / smtp.deliver / server.listen:
-- transcript = function(ev), transcript_body = boolean, on_event = function(ev). Raises the
-- standard "bad argument" for the public function `fname`.
function M.check(opts, fname, level)
  local function bad(k, what)
    error("bad argument #1 to '" .. fname .. "' (" .. k .. ": " .. what .. " expected)", (level or 2) + 1)
  end
  if opts.transcript ~= nil and type(opts.transcript) ~= "function" then bad("transcript", "function") end
  if opts.on_event ~= nil and type(opts.on_event) ~= "function" then bad("on_event", "function") end
  if opts.transcript_body ~= nil and type(opts.transcript_body) ~= "boolean" then
    bad("transcript_body", "boolean")
  end
end

-- A listener's error must not end the session it watches.
local function call(fn, ev)
  local ok, err = pcall(fn, ev)
  if not ok and M.on_error then M.on_error(err) end
end
M.call = call

-- Transcript ------------------------------------------------------------------------------

-- ev = { dir = "send"|"recv"|"tls"|"dns"|"info", line =, time =, conn = [, bytes =] }
function M.line(fn, conn, dir, line, bytes)
  call(fn, { dir = dir, line = line, time = now(), conn = conn, bytes = bytes })
end
local line = M.line

local function size_line(n)
  return ("[message data: %d bytes]"):format(n)
end
M.size_line = size_line

-- Received bytes as lines (CRLF or LF ends one; a partial line waits in holder.carry).
function M.recv(fn, conn, holder, data, dir)
  local carry = holder.carry
  if carry then data = carry .. data; holder.carry = nil end
  local pos = 1
  while true do
    local lf = data:find("\n", pos, true)
    if not lf then break end
    local e = lf - 1
    if e >= pos and data:byte(e) == 13 then e = e - 1 end
    line(fn, conn, dir or "recv", data:sub(pos, e))
    pos = lf + 1
  end
  if pos <= #data then holder.carry = data:sub(pos) end
end

-- Records from an engine's trace_take() (C): { kind, value, ... }. "body" bytes are split into
-- lines like received ones (holder.bcarry keeps a partial line).
function M.records(fn, conn, list, dir, holder)
  for i = 1, #list, 2 do
    local kind, v = list[i], list[i + 1]
    if kind == "size" then
      line(fn, conn, dir, size_line(v), v)
    elseif kind == "body" then
      local carry = holder.bcarry
      holder.bcarry = nil
      local h = { carry = carry }
      M.recv(fn, conn, h, v, dir)
      holder.bcarry = h.carry
    else
      line(fn, conn, dir, v)
    end
  end
end

-- A TLS handshake as a transcript line and an event table. `info` is the transport's info();
-- `verify` whether the certificate was required to check out.
function M.tls_fields(info, verify)
  local vr = info.verify_result
  return {
    version = info.version or (type(info.tls) == "string" and info.tls) or nil, cipher = info.cipher,
    bits = info.bits, peer_subject = info.peer_subject, peer_issuer = info.peer_issuer,
    verify_result = vr, verified = verify and (vr == nil or vr == "ok") or false,
    resumed = info.resumed or nil,
  }
end

function M.tls_line(t)
  local parts = { "TLS " .. tostring(t.version), tostring(t.cipher) }
  if t.resumed then parts[#parts + 1] = "resumed" end
  if t.peer_subject then parts[#parts + 1] = "peer " .. t.peer_subject end
  if t.verify_result then
    parts[#parts + 1] = "verify " .. t.verify_result .. (t.verified and "" or " (not enforced)")
  elseif t.verified then
    parts[#parts + 1] = "verified"
  end
  return table.concat(parts, ", ")
end

-- Events ----------------------------------------------------------------------------------

-- ev.type plus the given fields, time and conn.
function M.event(fn, typ, conn, fields)
  fields = fields or {}
  fields.type, fields.time, fields.conn = typ, now(), conn
  call(fn, fields)
end

return M
