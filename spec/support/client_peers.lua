-- Peers for the client specs: aiosmtpd (STARTTLS, implicit TLS, AUTH through an authenticator, a
-- recording handler that rejects some recipients, SMTPUTF8), Postfix's smtp-sink, and a scripted
-- fake server for misbehaviour no real peer shows. Each is started with helper.spawn on free
-- loopback ports and records what it received in files the specs read back.
local helper = require "helper"
local core = require "smtp.core"

local M = {}

local aiosmtpd_py = [[
import asyncio, json, ssl, sys, time, base64
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword, SMTP
port, tls_port, cert, key, record = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
smtputf8 = sys.argv[6:7] != ['no-smtputf8']

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b'user' and auth_data.password == b'secret pass'
    with open(record + '.auth', 'a') as f:
        f.write(json.dumps({'mechanism': mechanism, 'ok': ok}) + '\n')
    return AuthResult(success=ok, handled=False)

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith('reject'):
            return '550 5.1.1 no such user here'
        if address.startswith('later'):
            return '450 4.2.1 try again later'
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return '250 2.1.5 OK'
    async def handle_DATA(self, server, session, envelope):
        with open(record, 'a') as f:
            f.write(json.dumps({
                'from': envelope.mail_from, 'to': envelope.rcpt_tos,
                'mail_options': envelope.mail_options, 'rcpt_options': envelope.rcpt_options,
                'data': base64.b64encode(envelope.original_content).decode(),
                'tls': session.ssl is not None or server.transport.get_extra_info('sslcontext') is not None, 'auth': bool(session.authenticated),
            }) + '\n')
        return '250 2.0.0 OK queued as X1'

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
common = dict(authenticator=authenticator, enable_SMTPUTF8=smtputf8, server_hostname='aiosmtpd.test')
a = Controller(Handler(), hostname='127.0.0.1', port=port, tls_context=ctx, **common)
a.start()
ictx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ictx.load_cert_chain(cert, key)
b = Controller(Handler(), hostname='127.0.0.1', port=tls_port, ssl_context=ictx,
               auth_require_tls=False, **common)
b.start()
while True:
    time.sleep(3600)
]]

-- Reads the recording file through python, as a Lua chunk returning a list.
local function records(path)
  local out = helper.sh(helper.python .. " -c " .. helper.quote([[
import json, sys, base64
def lua(v):
    if isinstance(v, bool): return 'true' if v else 'false'
    if v is None: return 'nil'
    if isinstance(v, (int, float)): return repr(v)
    if isinstance(v, str): v = v.encode()
    if isinstance(v, bytes): return '"' + ''.join('\\%d' % c for c in v) + '"'
    if isinstance(v, list): return '{' + ','.join(lua(x) for x in v) + '}'
    if isinstance(v, dict): return '{' + ','.join('[' + lua(k) + ']=' + lua(x) for k, x in v.items()) + '}'
try:
    lines = open(sys.argv[1]).read().splitlines()
except FileNotFoundError:
    lines = []
recs = []
for l in lines:
    r = json.loads(l)
    if 'data' in r: r['data'] = base64.b64decode(r['data'])
    recs.append(r)
print('return ' + lua(recs))
]]) .. " " .. helper.quote(path))
  return assert((loadstring or load)(out))()
end
M.records = records

-- aiosmtpd with STARTTLS on `port` and implicit TLS on `tls_port`; AUTH user "user", password
-- "secret pass"; recipients starting with "reject" get 550 5.1.1, "later" 450 4.2.1.
-- `opts.smtputf8 = false`: a server that does not offer SMTPUTF8 (and refuses non-ASCII paths).
function M.aiosmtpd(opts)
  helper.need("aiosmtpd")
  local c = helper.certs()
  local dir = helper.tmpdir()
  local port, tls_port = helper.free_port(), helper.free_port()
  helper.write(dir .. "/peer.py", aiosmtpd_py)
  local record = dir .. "/messages.jsonl"
  local p = helper.spawn({ helper.python, dir .. "/peer.py", tostring(port), tostring(tls_port),
    c.server, c.server_key, record, (opts and opts.smtputf8 == false) and "no-smtputf8" or "smtputf8" },
    { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 15), "aiosmtpd did not start: " .. p:output())
  assert(helper.wait_port("127.0.0.1", tls_port, 15), "aiosmtpd (TLS) did not start: " .. p:output())
  return {
    proc = p, port = port, tls_port = tls_port, ca = c.ca,
    messages = function() return records(record) end,
    auths = function() return records(record .. ".auth") end,
    stop = function() p:stop() end,
  }
end

-- Postfix smtp-sink (`-c` counts messages on its stdout when it exits).
function M.sink(extra)
  helper.need("smtp-sink")
  local port = helper.free_port()
  local argv = { "/usr/sbin/smtp-sink", "-u", "nobody" }
  for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = "127.0.0.1:" .. port
  argv[#argv + 1] = "128"
  local p = helper.spawn(argv, { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 10), "smtp-sink did not start: " .. p:output())
  return { proc = p, port = port, stop = function() p:stop() end }
end

local fake_py = [[
import select, socket, ssl, sys, json, time, threading
port, script, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(('127.0.0.1', port)); ls.listen(16)
def record(b, path=log):
    with open(path, 'ab') as f: f.write(b)
def serve(c):
    buf = b''
    steps = json.load(open(script))
    def fill():
        nonlocal buf
        d = c.recv(65536)
        if not d: raise EOFError
        record(d); buf += d
    try:
        record(b'#CONNECT\n')
        for st in steps:
            op = st[0]
            if op == 'send': c.sendall(st[1].encode('latin-1'))
            elif op == 'sendbig': c.sendall(st[1].encode('latin-1') * st[2])
            elif op == 'line':
                while b'\n' not in buf: fill()
                buf = buf[buf.index(b'\n') + 1:]
            elif op == 'data':
                while b'\r\n.\r\n' not in buf: fill()
                buf = buf[buf.index(b'\r\n.\r\n') + 5:]
            elif op == 'bytes':
                while len(buf) < st[1]: fill()
                buf = buf[st[1]:]
            elif op == 'bdat':
                while b'\n' not in buf: fill()
                n = int(buf[:buf.index(b'\n')].split()[1])
                buf = buf[buf.index(b'\n') + 1:]
                while len(buf) < n: fill()
                buf = buf[n:]
            elif op == 'sleep':
                # reads (and records) while it sleeps: a client that leaves ends the connection now
                end = time.time() + st[1]
                while time.time() < end:
                    if select.select([c], [], [], max(0, end - time.time()))[0]: fill()
            elif op == 'close': c.close(); return
        while True: fill()
    except (EOFError, OSError):
        pass
    finally:
        try: c.close()
        except OSError: pass
        # one byte per connection ended: f.received() waits for every accepted one
        record(b'.', log + '.closed')
while True:
    c, _ = ls.accept()
    record(b'.', log + '.accepted')
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]

local function json_string(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(ch) return ("\\u%04x"):format(ch:byte()) end) .. '"'
end

local function encode_steps(steps)
  local parts = {}
  for i, st in ipairs(steps) do
    local enc = {}
    for j, v in ipairs(st) do enc[j] = type(v) == "string" and json_string(v) or tostring(v) end
    parts[i] = "[" .. table.concat(enc, ",") .. "]"
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

-- A scripted server. steps: { {"send", "220 hi\r\n"}, {"line"}, {"data"}, {"bytes", n}, {"bdat"} (a
-- "BDAT n" line and its n bytes),
-- {"sleep", 2}, {"sendbig", "250-x\r\n", 1000}, {"close"} }; after the steps it reads until the
-- client closes. The steps are read again at each connection: f.script(steps) changes them for
-- the next one and clears what was received. f.received() is every byte it got, each connection
-- starting with "#CONNECT\n", once every connection it accepted has ended (it waits, up to 10 s,
-- instead of guessing how long the server needs to write down the last bytes); f.received(n)
-- also waits for n connections to have been accepted. One process serves a whole spec file
-- (starting one is slow).
function M.fake(steps)
  local dir = helper.tmpdir()
  helper.write(dir .. "/steps.json", encode_steps(steps or {}))
  helper.write(dir .. "/fake.py", fake_py)
  local port = helper.free_port()
  local p = helper.spawn({ helper.python, dir .. "/fake.py", tostring(port), dir .. "/steps.json",
    dir .. "/received" }, { limit = 600 })
  assert(helper.wait_port("127.0.0.1", port, 10), "fake server did not start: " .. p:output())
  local f = { proc = p, port = port }
  local log = dir .. "/received"
  local function count(path) return #(helper.read(path) or "") end
  -- Waits (10 s at most) until n connections were accepted and every accepted one has ended.
  local function settle(n)
    local t0 = core.now()
    while core.now() - t0 < 10 do
      local a = count(log .. ".accepted")
      if a >= (n or 0) and count(log .. ".closed") >= a then return true end
      core.wait(-1, "r", 0.02)
    end
    return false
  end
  function f.script(st)
    -- the last spec's connections end first: their late bytes would land in this spec's record
    settle()
    helper.write(dir .. "/steps.json", encode_steps(st))
    local open = math.max(0, count(log .. ".accepted") - count(log .. ".closed"))
    helper.write(log .. ".accepted", ("."):rep(open))
    helper.write(log .. ".closed", "")
    helper.write(log, "")
  end
  function f.received(n)
    settle(n)
    return helper.read(log) or ""
  end
  function f.stop() p:stop() end
  -- wait_port connected once: forget that connection
  helper.sleep(0.1)
  f.script(steps or {})
  return f
end

return M
