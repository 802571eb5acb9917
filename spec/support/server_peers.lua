-- Peers for the server specs: runs a real client (swaks, smtplib, msmtp, curl, smtp-source, or a
-- scripted raw Python client) against an in-process smtp.server, and returns what it printed.
local helper = require "helper"

local M = {}

-- Runs argv (a list, or a shell string) while srv serves in smtp.loop; the loop ends when the
-- client exits (srv is then closed). Returns the client's output and its exit status.
function M.run(srv, argv, limit)
  local loop = require "smtp.loop"
  local cmd
  if type(argv) == "table" then
    helper.need_argv(argv)
    local parts = {}
    for i, a in ipairs(argv) do parts[i] = helper.quote(a) end
    cmd = table.concat(parts, " ")
  else
    cmd = argv
  end
  local p = helper.spawn({ "sh", "-c", cmd .. "; echo EXIT:$?" }, { limit = limit or 60 })
  -- The client is done once its EXIT line is in the log (p:alive() cannot tell under LuaJIT,
  -- whose io.popen close reports no exit status).
  local function done() return p:output():match("EXIT:%d+%s*$") ~= nil end
  loop.spawn(function()
    local t0 = loop.now()
    while not done() and loop.now() - t0 < (limit or 60) + 5 do loop.sleep(0.05) end
    srv:close()
  end)
  srv:serve()
  if not done() then p:stop() else p.stopped = true end
  local out = p:output()
  local code = tonumber(out:match("EXIT:(%d+)%s*$"))
  return out:gsub("EXIT:%d+%s*$", ""), code
end

-- A raw client scripted in steps, for misbehaviour no real client does:
--   { "send", bytes } { "recv", pattern } (read until the received text matches, 5 s max)
--   { "tls", cafile } (TLS handshake over the connection) { "sleep", s } { "close" }
--   { "eof" } (read until the server closes)
-- Prints everything received; the spec compares it exactly.
local raw_py = [[
import json, re, socket, ssl, sys, time
steps = json.load(open(sys.argv[1]))
s = socket.create_connection(('127.0.0.1', int(sys.argv[2])), 10)
buf = b''
def recv_until(pat, t=5.0):
    global buf
    end = time.time() + t
    while not re.search(pat.encode('latin-1'), buf, re.S):
        s.settimeout(max(0.01, end - time.time()))
        try:
            d = s.recv(65536)
        except (socket.timeout, ssl.SSLError, OSError):
            break
        if not d: break
        buf += d
for st in steps:
    op = st[0]
    if op == 'send':
        try: s.sendall(st[1].encode('latin-1'))
        except OSError: pass
    elif op == 'recv': recv_until(st[1])
    elif op == 'eof': recv_until('(?!x)x', st[1] if len(st) > 1 else 10.0)
    elif op == 'sleep': time.sleep(st[1])
    elif op == 'tls':
        ctx = ssl.create_default_context(cafile=st[1])
        s = ctx.wrap_socket(s, server_hostname='localhost')
        buf += b'<TLS>\r\n'
    elif op == 'close': s.close(); break
sys.stdout.write(buf.decode('latin-1'))
]]

local function json_str(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c)
    return ("\\u%04x"):format(c:byte())
  end) .. '"'
end

local function json(steps)
  local t = {}
  for i, st in ipairs(steps) do
    local parts = {}
    for j, v in ipairs(st) do
      parts[j] = type(v) == "string" and json_str(v) or tostring(v)
    end
    t[i] = "[" .. table.concat(parts, ",") .. "]"
  end
  return "[" .. table.concat(t, ",") .. "]"
end

function M.raw(srv, steps, limit)
  local dir = helper.tmpdir()
  helper.write(dir .. "/raw.py", raw_py)
  helper.write(dir .. "/steps.json", json(steps))
  local out = M.run(srv, { helper.python, dir .. "/raw.py", dir .. "/steps.json", tostring(srv.port) }, limit or 30)
  return out
end

-- Python smtplib: sends a file's bytes as a message (send_message when `parsed`).
M.smtplib_py = [[
import smtplib, ssl, sys, email, email.policy
port, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cafile = sys.argv[4] if len(sys.argv) > 4 else None
raw = open(path, 'rb').read()
with smtplib.SMTP('127.0.0.1', port, local_hostname='client.test', timeout=20) as s:
    s.ehlo()
    if cafile:
        s.starttls(context=ssl.create_default_context(cafile=cafile))
        s.ehlo()
        s.login('u', 'p')
    if mode == 'sendmail':
        s.sendmail('a@x.test', ['b@y.test', 'c@y.test'], raw)
    else:
        msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
        s.send_message(msg, from_addr='a@x.test', to_addrs=['b@y.test'])
print('sent')
]]

return M
