-- Test utilities for the attack and fault specs: a scripted raw client (Python) that can count
-- replies and prove silence, a recording in-process smtp.server, and a process-memory probe.
local helper = require "helper"

local M = {}

-- Steps, run in order over one TCP connection to 127.0.0.1:port:
--   { "send", bytes }         write the bytes (errors ignored: the server may have closed)
--   { "replies", n [, t] }    read until n final reply lines ("ddd " at a line start) have
--                             arrived in total, t seconds at most (default 10)
--   { "quiet", t }            wait t seconds; append "<QUIET>\r\n" if nothing arrived, else "<EARLY>\r\n"
--   { "recv", pattern }       read until the buffer matches the regex (5 s)
--   { "tls", cafile }         TLS handshake over the connection (appends "<TLS>\r\n")
--   { "eof" [, t] }           read until the server closes (appends "<EOF>\r\n" when it did)
--   { "sleep", s } { "close" } { "noread_send", bytes, times } (sendall without ever reading)
-- Prints everything received.
local raw_py = [[
import json, re, socket, ssl, sys, time
steps = json.load(open(sys.argv[1]))
s = socket.create_connection(('127.0.0.1', int(sys.argv[2])), 10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b''
def finals():
    return len(re.findall(rb'(?m)^\d\d\d ', buf))
def read_until(cond, t):
    global buf
    end = time.time() + t
    while not cond():
        left = end - time.time()
        if left <= 0: return False
        s.settimeout(max(0.01, left))
        try:
            d = s.recv(65536)
        except socket.timeout:
            continue
        except (ssl.SSLError, OSError):
            return False
        if not d: return None
        buf += d
    return True
for st in steps:
    op = st[0]
    if op == 'send':
        try: s.sendall(st[1].encode('latin-1'))
        except OSError: pass
    elif op == 'noread_send':
        data = st[1].encode('latin-1') * st[2]
        s.settimeout(st[3] if len(st) > 3 else 10)
        try: s.sendall(data); buf += b'<SENT>\r\n'
        except (socket.timeout, OSError): buf += b'<BLOCKED>\r\n'
    elif op == 'replies':
        n = st[1]
        read_until(lambda: finals() >= n, st[2] if len(st) > 2 else 10.0)
    elif op == 'quiet':
        before = len(buf)
        read_until(lambda: len(buf) > before, st[1])
        buf += b'<QUIET>\r\n' if len(buf) == before else b'<EARLY>\r\n'
    elif op == 'recv':
        read_until(lambda: re.search(st[1].encode('latin-1'), buf, re.S), 5.0)
    elif op == 'eof':
        r = read_until(lambda: False, st[1] if len(st) > 1 else 10.0)
        if r is None: buf += b'<EOF>\r\n'
    elif op == 'sleep': time.sleep(st[1])
    elif op == 'tls':
        ctx = ssl.create_default_context(cafile=st[1])
        s = ctx.wrap_socket(s, server_hostname='localhost')
        buf += b'<TLS>\r\n'
    elif op == 'close': s.close(); break
sys.stdout.buffer.write(buf)
]]

local function json_str(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c) return ("\\u%04x"):format(c:byte()) end) .. '"'
end

function M.json(steps)
  local t = {}
  for i, st in ipairs(steps) do
    local parts = {}
    for j, v in ipairs(st) do parts[j] = type(v) == "string" and json_str(v) or tostring(v) end
    t[i] = "[" .. table.concat(parts, ",") .. "]"
  end
  return "[" .. table.concat(t, ",") .. "]"
end

-- Writes the raw client's files; returns the argv that runs it against `port`.
function M.raw_argv(steps, port)
  local dir = helper.tmpdir()
  helper.write(dir .. "/raw.py", raw_py)
  helper.write(dir .. "/steps.json", M.json(steps))
  return { helper.python, dir .. "/raw.py", dir .. "/steps.json", tostring(port) }
end

-- Runs the raw client against an in-process srv (served in smtp.loop until the client exits).
function M.raw(srv, steps, limit)
  local peers = require "support.server_peers"
  return (peers.run(srv, M.raw_argv(steps, srv.port), limit or 60))
end

-- An in-process smtp.server that records every message (envelope and data read in small pieces).
function M.recording(opts)
  local server = require "smtp.server"
  local got = { msgs = {} }
  local o = {
    port = 0, hostname = "mx.test", timeout = 10,
    on_message = function(_, env, reader)
      local data = helper.read_message(reader, 5)
      if not data then return false end
      got.msgs[#got.msgs + 1] = { env = env, data = data }
      return true
    end,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(server.listen(o)), got
end

-- Resident memory of a process in kB (VmRSS), or nil once it is gone.
function M.rss(pid)
  local s = helper.read("/proc/" .. pid .. "/status")
  return s and tonumber(s:match("VmRSS:%s*(%d+)"))
end

-- Number of final reply lines in a transcript.
function M.count_finals(out)
  local n = 0
  for _ in ("\n" .. out):gmatch("\n%d%d%d ") do n = n + 1 end
  return n
end

-- True when every CR is followed by LF and every LF follows a CR.
function M.only_crlf(s)
  return not s:find("\r[^\n]") and not s:find("\r$") and not s:find("[^\r]\n") and not s:find("^\n")
end

return M
