-- smtp.server's limits for a public port (issue 15): per-client connections, rate, messages and
-- recipients; session, command and data deadlines against slow-drip clients; command and
-- transaction caps; hook and AUTH refusals counted as errors and tarpitted; hook replies that
-- cannot go on the wire replaced. Real clients (Python smtplib, swaks) where they can say it, a
-- raw socket client for dripping and for many source addresses. Limits are small and windows
-- wide, so the machine's load never decides.
local helper = require "helper"
local peers = require "support.server_peers"
local server = require "smtp.server"

if not pcall(require, "smtp.transport.native") then
  describe("smtp.server limits", function() pending("needs smtp.transport.native") end)
  return
end

-- A server counting messages; `client_exempt = false` so that 127.0.0.1 is a limited client.
local function start(opts)
  local got = { msgs = 0, log = {} }
  local o = {
    port = 0, hostname = "mx.test", timeout = 20, client_exempt = false,
    log = function(s) got.log[#got.log + 1] = s end,
    on_message = function(_, _, reader)
      while true do
        local chunk, err = reader:read(65536)
        if err then return false end
        if not chunk then break end
      end
      got.msgs = got.msgs + 1
      return true
    end,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  return assert(server.listen(o)), got
end

-- Runs a Python script (argv[1] = the server's port) while the server serves.
local function py(srv, code, limit)
  local dir = helper.tmpdir()
  helper.write(dir .. "/c.py", code)
  local out, status = peers.run(srv, { helper.python, dir .. "/c.py", tostring(srv.port) }, limit or 60)
  assert.equal(0, status, out)
  return out
end

local SMTPLIB = [[
import smtplib, socket, sys, time
port = int(sys.argv[1])
def conn():
    s = smtplib.SMTP('127.0.0.1', port, local_hostname='client.test', timeout=30)
    s.ehlo()
    return s
def code(f, *a):
    try:
        r = f(*a)
        if isinstance(r, tuple):
            return r[0] if r[0] < 400 else '%d %s' % (r[0], r[1].decode())
        return r
    except smtplib.SMTPResponseException as e:
        return '%d %s' % (e.smtp_code, e.smtp_error.decode())
    except smtplib.SMTPRecipientsRefused as e:
        return 'refused ' + ' '.join('%d %s' % (v[0], v[1].decode()) for v in e.recipients.values())
    except smtplib.SMTPServerDisconnected:
        return 'disconnected'
MSG = b'Subject: t\r\n\r\nhello\r\n'
]]

describe("smtp.server per-client limits", function()
  it("concurrent connections per client: the one over the limit gets 421 4.7.0 (smtplib)", function()
    local srv = start { max_client_connections = 2 }
    local out = py(srv, SMTPLIB .. [[
a, b = conn(), conn()
try:
    conn()
    print('third: connected')
except smtplib.SMTPConnectError as e:
    print('third: %d %s' % (e.smtp_code, e.smtp_error.decode()))
a.quit(); b.quit()
print('after:', conn().noop()[0])
]])
    assert.matches("third: 421 4%.7%.0 Too many connections from your address", out)
    assert.matches("after: 250", out)
    assert.equal(1, srv.counters.client_connections)
    assert.equal(0, srv.active)
  end)

  it("connection rate per client: the 4th in the window gets 421 4.7.0 (smtplib)", function()
    local srv = start { max_client_rate = 3, client_window = 600 }
    local out = py(srv, SMTPLIB .. [[
for i in range(4):
    try:
        s = conn(); s.quit(); print(i, 'ok')
    except smtplib.SMTPConnectError as e:
        print(i, '%d %s' % (e.smtp_code, e.smtp_error.decode()))
]])
    assert.matches("0 ok\n1 ok\n2 ok\n3 421 4%.7%.0 Connection rate limit exceeded for your address", out)
    assert.equal(1, srv.counters.client_rate)
    local st = srv:stats()
    assert.equal(1, st.client_rate)
    assert.equal(1, st.clients)
    assert.equal(0, st.active)
  end)

  it("messages per window: MAIL past the limit gets 451 4.7.1, even on a new connection (smtplib)", function()
    local srv, got = start { max_client_messages = 2, client_window = 600 }
    local out = py(srv, SMTPLIB .. [[
s = conn()
for i in range(3):
    print('msg', i, code(s.sendmail, 'a@x.test', ['b@y.test'], MSG) or 'sent')
s.quit()
s = conn()
print('again', code(s.sendmail, 'a@x.test', ['b@y.test'], MSG) or 'sent')
]])
    assert.matches("msg 0 sent\nmsg 1 sent\nmsg 2 451 4%.7%.1 Too much mail from your address", out)
    assert.matches("again 451 4%.7%.1", out)
    assert.equal(2, got.msgs)
    assert.equal(2, srv.counters.client_messages)
  end)

  it("recipients per window: past the limit 452 4.5.3, the accepted ones get the message (smtplib)", function()
    local srv, got = start { max_client_recipients = 3, client_window = 600 }
    local out = py(srv, SMTPLIB .. [[
s = conn()
refused = s.sendmail('a@x.test', ['r%d@y.test' % i for i in range(5)], MSG)
print('refused', sorted(refused), set(v[0] for v in refused.values()))
print('next', code(s.sendmail, 'a@x.test', ['z@y.test'], MSG))
print('noop', s.noop()[0])
]])
    assert.matches("refused %['r3@y.test', 'r4@y.test'%] {452}", out)
    assert.matches("next refused 452 4%.5%.3 Too many recipients from your address", out)
    assert.matches("noop 250", out) -- 452 is not an error: the session goes on
    assert.equal(1, got.msgs)
    assert.equal(3, srv.counters.client_recipients)
  end)

  it("loopback clients are exempt by default", function()
    local srv = assert(server.listen { port = 0, max_client_rate = 1, max_client_connections = 1 })
    local out = py(srv, SMTPLIB .. [[
a, b, c = conn(), conn(), conn()
print('three', a.noop()[0], b.noop()[0], c.noop()[0])
]])
    assert.matches("three 250 250 250", out)
    assert.equal(0, srv:stats().clients)
  end)

  it("keys IPv6 clients by their /64 and IPv4-mapped ones by the IPv4 address", function()
    local key = server._client_key
    assert.equal(key("2001:db8:1:2::1"), key("2001:DB8:1:2:ffff:ffff:ffff:fffe"))
    assert.equal(key("2001:db8:1:2::1"), key("2001:0db8:0001:0002:0:0:0:9%eth0"))
    assert.not_equal(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"))
    assert.equal("2001:db8:1:2::/64", key("2001:db8:1:2:aaaa::1"))
    assert.equal("0:0:0:0::/64", key("::1"))
    assert.equal("192.0.2.7", key("::ffff:192.0.2.7"))
    assert.equal("192.0.2.7", key("192.0.2.7"))
  end)

  it("the per-client table stays bounded when clients come from many addresses", function()
    local srv = start { max_clients = 5, max_client_rate = 100 }
    local out = py(srv, [[
import socket, sys
port = int(sys.argv[1])
greeted = 0
for i in range(2, 42):
    s = socket.socket()
    s.bind(('127.0.0.%d' % i, 0))
    s.connect(('127.0.0.1', port))
    f = s.makefile('rb')
    if f.readline().startswith(b'220 '): greeted += 1
    s.sendall(b'QUIT\r\n'); f.readline(); s.close()
print('greeted', greeted)
]])
    assert.matches("greeted 40", out)
    local st = srv:stats()
    assert.is_true(st.clients <= 5, tostring(st.clients))
    assert.is_true(st.clients_evicted >= 35, tostring(st.clients_evicted))
    assert.equal(0, st.active)
  end)
end)

describe("smtp.server session limits", function()
  it("a session past max_session_time gets 421 4.4.2 though it keeps busy (smtplib NOOPs)", function()
    local srv = start { max_session_time = 2, timeout = 30 }
    local out = py(srv, SMTPLIB .. [[
s = conn()
t0 = time.time()
while time.time() - t0 < 20:
    r = code(s.noop)
    if r != 250:
        print('after %.1f: %s' % (time.time() - t0, r)); break
    time.sleep(0.2)
else:
    print('still open')
]])
    local t, reply = out:match("after ([%d.]+): ([^\n]*)")
    assert.is_truthy(t, out)
    assert.matches("421 4%.4%.2 Session time limit", reply)
    assert.is_true(tonumber(t) >= 1.5 and tonumber(t) < 15, t)
    assert.equal(1, srv.counters.session_time)
    assert.equal(0, srv.active)
  end)

  -- A raw client: sends `first`, then one byte of `drip` every 0.5 s (well inside the idle timeout)
  -- and reports what the server said and when.
  local DRIP = [[
import socket, sys, time
port = int(sys.argv[1])
def drip(first, drip, label):
    s = socket.create_connection(('127.0.0.1', port), 10)
    s.settimeout(0.5)
    buf = b''
    t0 = time.time()
    s.sendall(first)
    i = 0
    while time.time() - t0 < 25:
        try:
            d = s.recv(4096)
            if not d: break
            buf += d
            continue
        except socket.timeout:
            pass
        try:
            s.sendall(drip[i % len(drip):i % len(drip) + 1]); i += 1
        except OSError:
            break
    last = buf.decode('latin-1').rstrip('\r\n').split('\r\n')[-1]
    print('%s %.1f %s' % (label, time.time() - t0, last))
]]

  it("slow drip: a command line must be complete within command_timeout (421 4.4.2)", function()
    local srv = start { command_timeout = 2, timeout = 5 }
    local out = py(srv, DRIP .. [[
drip(b'EHLO ', b'abcdefghijklmnopqrstuvwxyz', 'cmd')
drip(b'EHLO c\r\nNOOP ' + b'x' * 600, b'y', 'long')
drip(b'EHLO c\r\nAUTH LOGIN\r\n', b'dXNlcg==', 'auth')
]])
    for _, label in ipairs { "cmd", "long", "auth" } do
      local t, last = out:match(label .. " ([%d.]+) ([^\n]*)")
      assert.is_truthy(t, out)
      assert.equal("421 4.4.2 Command not completed in time, closing connection", last)
      assert.is_true(tonumber(t) < 15, out)
    end
    assert.equal(3, srv.counters.command_time)
    assert.equal(0, srv.active)
  end)

  it("slow drip: a message's data must arrive within data_timeout (421 4.4.2)", function()
    local srv, got = start { data_timeout = 2, timeout = 5 }
    local out = py(srv, DRIP .. [[
drip(b'EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n', b'Subject: x\r\n', 'data')
]])
    local t, last = out:match("data ([%d.]+) ([^\n]*)")
    assert.is_truthy(t, out)
    assert.equal("421 4.4.2 Message data not received in time, closing connection", last)
    assert.is_true(tonumber(t) < 15, out)
    assert.equal(0, got.msgs)
    assert.equal(1, srv.counters.data_time)
    assert.equal(0, srv.active)
  end)

  it("max_commands: the command past it gets 421 4.7.0 (smtplib)", function()
    local srv = start { max_commands = 5 }
    local out = py(srv, SMTPLIB .. [[
s = conn()
print([code(s.noop) for i in range(6)])
]])
    -- EHLO and four NOOPs
    assert.matches("%[250, 250, 250, 250, '421 4%.7%.0 Too many commands in one session, closing connection', 'disconnected'%]", out)
    assert.equal(1, srv.counters.max_commands)
  end)

  it("max_transactions: the MAIL past it gets 421 4.7.0 (smtplib)", function()
    local srv, got = start { max_transactions = 2 }
    local out = py(srv, SMTPLIB .. [[
s = conn()
for i in range(3):
    print('msg', i, code(s.sendmail, 'a@x.test', ['b@y.test'], MSG) or 'sent')
s = conn()
print('new session', code(s.sendmail, 'a@x.test', ['b@y.test'], MSG) or 'sent')
]])
    assert.matches("msg 0 sent\nmsg 1 sent\nmsg 2 421 4%.7%.0 Too many transactions in one session", out)
    assert.matches("new session sent", out)
    assert.equal(3, got.msgs)
    assert.equal(1, srv.counters.max_transactions)
  end)
end)

describe("smtp.server refusals and the tarpit", function()
  it("on_rcpt refusals count toward max_errors: 421 4.7.0 after the limit (smtplib)", function()
    local srv = start { max_errors = 3, tarpit_delay = 0,
      on_rcpt = function() return false, 550, "5.1.1 no such user" end }
    local out = py(srv, SMTPLIB .. [[
s = conn()
s.mail('a@x.test')
print([code(s.rcpt, 'r%d@y.test' % i) for i in range(5)])
]])
    assert.matches("%['550 5%.1%.1 no such user', '550 5%.1%.1 no such user', '550 5%.1%.1 no such user', "
      .. "'421 4%.7%.0 Too many errors, closing connection', 'disconnected'%]", out)
    assert.equal(1, srv.counters.max_errors)
    assert.equal(0, srv.active)
  end)

  it("tarpit: refused RCPTs get slower replies while other sessions go on at full speed (smtplib)", function()
    local srv = start { max_errors = 20, tarpit_after = 1, tarpit_delay = 0.4, tarpit_max = 10,
      on_rcpt = function(_, rcpt)
        if rcpt:match("^bad") then return false, 550, "5.1.1 no such user" end
        return true
      end }
    local out = py(srv, SMTPLIB .. [[
import threading
other = []
def noops(stop):
    s = conn()
    while not stop.is_set():
        t = time.time(); s.noop(); other.append(time.time() - t); time.sleep(0.05)
stop = threading.Event()
th = threading.Thread(target=noops, args=(stop,)); th.start()
s = conn()
s.mail('a@x.test')
for i in range(5):
    t = time.time(); r = code(s.rcpt, 'bad%d@y.test' % i)
    print('rcpt %d %s %.2f' % (i, str(r)[:3], time.time() - t))
t = time.time(); r = code(s.rcpt, 'good@y.test')
print('good %s %.2f' % (str(r)[:3], time.time() - t))
stop.set(); th.join()
print('other max %.2f n %d' % (max(other), len(other)))
]])
    local d = {}
    for i, c, t in out:gmatch("rcpt (%d) (%d+) ([%d.]+)") do
      assert.equal("550", c)
      d[tonumber(i)] = tonumber(t)
    end
    -- lower bounds are what the tarpit guarantees; upper bounds are far from them (load-proof)
    assert.is_true(d[2] >= 0.8 * 0.95, out)    -- 3rd: 0.4 * 2^1
    assert.is_true(d[4] >= 3.2 * 0.95, out)    -- 5th: 0.4 * 2^3
    assert.is_true(d[0] < d[2] and d[2] < d[4], out)
    assert.matches("good 250", out)             -- an accepted one is not delayed
    assert.is_true(tonumber(out:match("good 250 ([%d.]+)")) < 2, out)
    local omax, n = out:match("other max ([%d.]+) n (%d+)")
    assert.is_true(tonumber(omax) < 2.5, out)   -- never held up by the 3.2 s wait: the loop ran on
    assert.is_true(tonumber(n) > 10, out)
    assert.is_true(srv.counters.tarpit >= 4)
  end)

  it("tarpit: failed AUTH attempts get slower; the wait does not count against the idle timer", function()
    local srv = start { timeout = 2, tarpit_after = 1, tarpit_delay = 1.2, tarpit_max = 3,
      auth = function(_, _, user, secret) return user == "u" and secret == "right" end }
    local out = py(srv, SMTPLIB .. [[
s = conn()
s.esmtp_features['auth'] = 'PLAIN'   # one AUTH per login() (smtplib tries each mechanism)
for i in range(4):
    t = time.time(); r = code(s.login, 'u', 'wrong%d' % i)
    print('auth %d %s %.2f' % (i, str(r)[:3], time.time() - t))
t = time.time(); r = code(s.login, 'u', 'right')
print('right %s %.2f' % (r, time.time() - t))
]])
    local d = {}
    for i, c, t in out:gmatch("auth (%d) (%d+) ([%d.]+)") do
      assert.equal("535", c)
      d[tonumber(i)] = tonumber(t)
    end
    assert.is_true(d[0] < d[2], out)
    assert.is_true(d[2] >= 2.4 * 0.95, out)   -- longer than the 2 s idle timeout, yet no 421
    assert.is_true(d[3] >= 3 * 0.95, out)     -- tarpit_max
    assert.matches("right 235 ", out)
  end)

  it("srv:close() ends a session asleep in the tarpit at once, with 421, not when the wait is over", function()
    local loop = require "smtp.loop"
    local srv = start { tarpit_after = 0, tarpit_delay = 60, tarpit_max = 60,
      on_rcpt = function() return false, 550, "5.1.1", "no such user" end }
    local dir = helper.tmpdir()
    helper.write(dir .. "/c.py", [[
import socket, sys, time
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10)
s.settimeout(90)
s.sendall(b'EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n')
buf = b''
while True:
    d = s.recv(4096)
    if not d: break
    buf += d
print(buf.decode().replace('\r\n', '|'))
]])
    local p = helper.spawn({ helper.python, dir .. "/c.py", tostring(srv.port) }, { limit = 120 })
    local closed_at
    loop.spawn(function()
      local t0 = loop.now()
      while srv.counters.tarpit < 1 and loop.now() - t0 < 30 do loop.sleep(0.05) end
      closed_at = loop.now()
      srv:close()
    end)
    srv:serve()
    local took = loop.now() - closed_at
    local t0 = loop.now()
    while p:alive() and loop.now() - t0 < 30 do loop.sleep(0.05) end
    local out = p:output()
    p:stop()
    assert.equal(1, srv.counters.tarpit)
    assert.is_true(took < 20, "the session outlived srv:close() by " .. took .. " s")  -- 60 s before
    assert.matches("550 5%.1%.1 no such user|421 4%.3%.2 Service shutting down|", out)
    assert.equal(0, srv.active)
  end)
end)

describe("smtp.server hook replies and options that cannot go on the wire", function()
  it("an out-of-range enhanced code from a hook is replaced and logged; the session goes on", function()
    local answers = {
      ["a@y.test"] = { false, 550, "5.12345678.1", "no" },
      ["b@y.test"] = { false, 550, "5.123456789.1 no" },
      ["c@y.test"] = { false, 550, "4.1.1", "wrong class" },
      ["d@y.test"] = { false, 550, "5.1.1 ", setmetatable({}, { __tostring = function() error("x") end }) },
      ["e@y.test"] = { false, 550, "5.1234.1", setmetatable({}, { __tostring = function() error("x") end }) },
      ["f@y.test"] = { false, 9999, "text" },
    }
    local srv, got = start { max_errors = 100, tarpit_delay = 0,
      on_rcpt = function(_, rcpt) return table.unpack(answers[rcpt] or { true }) end }
    local out = py(srv, SMTPLIB .. [[
s = conn()
s.mail('a@x.test')
for r in 'abcdef':
    c, m = s.rcpt(r + '@y.test')
    print(r, c, m.decode())
print('ok', s.rcpt('z@y.test')[0], s.noop()[0])
]])
    assert.matches("a 550 5%.1%.1 no\n", out)
    assert.matches("b 550 5%.1%.1 no\n", out)
    assert.matches("c 550 5%.1%.1 wrong class\n", out)
    assert.matches("d 550 5%.1%.1 ", out)
    assert.matches("e 550 5%.1%.1 ", out)
    assert.matches("f 550 5%.1%.1 text\n", out)
    assert.matches("ok 250 250", out)
    local log = table.concat(got.log, "\n")
    assert.matches("invalid enhanced status code: 5%.12345678%.1", log)
    assert.matches("invalid enhanced status code: 4%.1%.1", log)
    assert.matches("invalid reply code: 9999", log)
    assert.equal(0, srv.active)
  end)

  it("an enhanced code too long for the engine from on_mail or on_message still gets a reply", function()
    local srv, got = start { max_errors = 100, tarpit_delay = 0,
      on_mail = function(_, from)
        if from == "x@x.test" then return false, 553, "5.123456789.1", "bad sender" end
        return true
      end,
      on_message = function(_, _, reader)
        while reader:read() do end
        return false, 554, "5.7.123456", "bad message"
      end }
    local out = py(srv, SMTPLIB .. [[
s = conn()
print('mail', code(s.mail, 'x@x.test'))
print('msg', code(s.sendmail, 'a@x.test', ['b@y.test'], MSG))
print('noop', s.noop()[0])
]])
    assert.matches("mail 553 5%.7%.1 bad sender", out)
    assert.matches("msg 554 5%.6%.0 bad message", out)
    assert.matches("noop 250", out)
    assert.equal(2, #got.log)
    assert.equal(0, srv.active)
  end)

  it("max_line and the other limits outside their range are refused by server.listen", function()
    for _, o in ipairs {
      { max_line = 10 }, { max_line = 65537 }, { max_line = 100.5 }, { max_errors = 0 },
      { max_recipients = -1 }, { timeout = 0 }, { max_commands = 0 }, { max_transactions = 1.5 },
      { max_session_time = -1 }, { max_client_rate = "3" }, { tarpit_delay = -1 },
      { client_exempt = "127.0.0.1" }, { max_connections = 0 / 0 }, { max_message_size = math.huge },
    } do
      local k = next(o)
      local ok, err = pcall(server.listen, o)
      assert.is_false(ok, k)
      assert.matches("bad argument #1 to 'listen' %(option '" .. k .. "'", err)
    end
    -- false turns a limit off
    local srv = assert(server.listen { port = 0, max_session_time = false, max_client_rate = false,
      max_commands = false })
    srv:close()
  end)

  it("counters list every limit from the start", function()
    local srv = assert(server.listen { port = 0 })
    for _, k in ipairs { "max_connections", "client_connections", "client_rate", "client_messages",
      "client_recipients", "idle_timeout", "session_time", "command_time", "data_time", "max_errors",
      "max_commands", "max_transactions", "line_length", "tarpit", "clients_evicted" } do
      assert.equal(0, srv.counters[k], k)
    end
    srv:close()
  end)
end)
