-- The TLS server's reading and its tickets, against peers that control their own records: the
-- server reads ahead, so whatever arrives together (the client's Finished and its first command,
-- pipelined commands each in its own record) must be answered without waiting for more; it
-- issues one session ticket per handshake, a fresh one on each resumption (openssl s_client),
-- and sends it with the first reply after the handshake.
local helper = require "helper"
local loop = require "smtp.loop"
local server = require "smtp.server"

local certs = helper.certs()

-- Python: the plaintext greeting, EHLO and STARTTLS, then a TLS handshake through memory BIOs
-- (`o` the TLS object, `inc`/`out` its BIOs, `s` the socket), which the clients below go on from.
local HANDSHAKE = [[
import socket, ssl, sys
port, ca = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(('127.0.0.1', port), 5)
s.settimeout(3)
buf = b''
def plain_reply():
    global buf
    while True:
        lines = buf.split(b'\r\n')
        for n, l in enumerate(lines[:-1]):
            if l[3:4] == b' ':
                buf = b'\r\n'.join(lines[n + 1:])
                return l[:3]
        buf += s.recv(65536)
plain_reply()
s.sendall(b'EHLO client.test\r\n'); plain_reply()
s.sendall(b'STARTTLS\r\n')
if plain_reply() != b'220': sys.exit('STARTTLS refused')
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
o = ssl.create_default_context(cafile=ca).wrap_bio(inc, out, server_hostname='localhost')
while True:
    try:
        o.do_handshake(); break
    except ssl.SSLWantReadError:
        d = out.read()
        if d: s.sendall(d)
        d = s.recv(65536)
        if not d: sys.exit('closed during the handshake')
        inc.write(d)
]]

-- A Python client doing STARTTLS through memory BIOs, so it decides what shares a segment.
-- Each wait for a reply gives up after 3 s and says what it still waited for.
local CLIENT = HANDSHAKE .. [[
tbuf = b''
def replies(n, what):
    global tbuf
    codes = []
    while len(codes) < n:
        lines = tbuf.split(b'\r\n')
        if len(lines) > 1:
            tbuf = b'\r\n'.join(lines[1:])
            if lines[0][3:4] == b' ': codes.append(lines[0][:3].decode())
            continue
        try:
            tbuf += o.read(65536); continue
        except ssl.SSLWantReadError:
            pass
        try:
            d = s.recv(65536)
        except socket.timeout:
            sys.exit('stalled %s: replies so far %r' % (what, codes))
        if not d: sys.exit('closed %s' % what)
        inc.write(d)
    print(what, ' '.join(codes))
def send(*cmds):
    for c in cmds: o.write(c)     # a record each
    s.sendall(out.read())         # one segment
send(b'EHLO client.test\r\n')     # rides with the client's Finished
replies(1, 'with-finished')
send(b'MAIL FROM:<a@example.com>\r\n', b'RCPT TO:<b@example.org>\r\n', b'DATA\r\n')
replies(3, 'pipelined')
send(b'Subject: x\r\n\r\nhi\r\n.\r\n', b'QUIT\r\n')
replies(2, 'end')
]]

-- The client's Finished goes alone; then nothing may come before the client's first command
-- (the ticket waits for the first reply: a bug sending it at once shows within microseconds,
-- the client listens for half a second), and the ticket has come once that reply is read.
local TICKET_CLIENT = HANDSHAKE .. [[
s.sendall(out.read())             # the Finished, alone
s.settimeout(0.5)
try:
    d = s.recv(65536)
    sys.exit('%d bytes came before the first command' % len(d))
except socket.timeout:
    pass
s.settimeout(3)
o.write(b'EHLO client.test\r\n'); s.sendall(out.read())
tbuf = b''
while not b'250 ' in tbuf:
    try:
        tbuf += o.read(65536); continue
    except ssl.SSLWantReadError:
        pass
    d = s.recv(65536)
    if not d: sys.exit('closed before the EHLO reply')
    inc.write(d)
print('reply', 'ticket' if o.session is not None and o.session.has_ticket else 'no ticket')
o.write(b'QUIT\r\n'); s.sendall(out.read())
]]

-- Runs smtp.server (STARTTLS) in this process while each command of the list runs, one after
-- another (one server object: one set of ticket keys); returns their outputs.
local function against_server(argvs_of)
  local srv = assert(server.listen { port = 0, hostname = "mx.test", timeout = 60,
    tls = { cert = certs.server, key = certs.server_key },
    on_message = function(_, _, reader) for _ in reader:chunks() do end return true end })
  local outs = {}
  loop.spawn(function()
    srv:serve()
    for i, argv in ipairs(argvs_of(srv.port)) do
      local p = helper.spawn(argv, { limit = 30 })
      local t0 = loop.now()
      while p:alive() and loop.now() - t0 < 30 do loop.sleep(0.02) end
      outs[i] = p:output()
    end
    srv:close()
  end)
  loop.run()
  return outs
end

-- One of the Python clients above against the server; what it printed.
local function run_python(script)
  helper.need("python3")
  local dir = helper.tmpdir()
  helper.write(dir .. "/client.py", script)
  return against_server(function(port)
    return { { helper.python, dir .. "/client.py", tostring(port), certs.ca } }
  end)[1]
end

describe("TLS server I/O", function()
  it("answers a command that came with the client's Finished, and pipelined records in one segment", function()
    assert.equal("with-finished 250\npipelined 250 250 354\nend 250 221\n", run_python(CLIENT))
  end)

  it("sends the TLS 1.3 session ticket with its first reply, not before the client speaks", function()
    assert.equal("reply ticket\n", run_python(TICKET_CLIENT))
  end)

  it("issues one session ticket per handshake and a fresh one on each resumption", function()
    helper.need("openssl")
    local sess = helper.quote(helper.tmpdir() .. "/sess")
    local outs = against_server(function(port)
      local function s_client(extra)
        return { "sh", "-c", ("printf 'QUIT\\n' | openssl s_client -starttls smtp -connect 127.0.0.1:%d " ..
          "-CAfile %s -servername localhost -ign_eof -crlf %s 2>&1"):format(port, helper.quote(certs.ca), extra) }
      end
      return { s_client("-sess_out " .. sess), s_client("-sess_in " .. sess .. " -sess_out " .. sess),
        s_client("-sess_in " .. sess) }
    end)
    local function tickets(out) return select(2, out:gsub("Post%-Handshake New Session Ticket arrived", "")) end
    for i, want in ipairs { "New, TLSv1.3", "Reused, TLSv1.3", "Reused, TLSv1.3" } do
      assert.truthy(outs[i]:find(want, 1, true), outs[i])
      assert.truthy(outs[i]:find("\n221 ", 1, true), outs[i])
      assert.equal(1, tickets(outs[i]), outs[i])
    end
  end)
end)
