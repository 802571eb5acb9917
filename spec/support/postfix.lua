-- A private, real Postfix MTA for the client specs: its own config directory, queue and log in a
-- temp dir, every smtpd on 127.0.0.1 only, STARTTLS with the test CA's server certificate, the
-- strict settings of Postfix 3.9 (no unauthorized pipelining, no bare LF), a recipient access map
-- that rejects two addresses, and everything it accepts relayed to a recording aiosmtpd sink
-- (which also offers DSN, so Postfix passes NOTIFY/RET/ENVID/ORCPT on). Beside the main smtpd:
-- one with a 100000-byte message_size_limit, one with AUTH (Postfix's SASL speaking the Dovecot
-- protocol to a small password check), one that drops a client after two errors, one with a 1 s
-- idle timeout. The master runs in the foreground under helper.spawn (a `timeout` bound) with
-- its own `-e` exit time, and is stopped by the PID in its master.pid. The system's
-- /etc/postfix instance is never touched.
local helper = require "helper"

local M = {}

local MASTER = "/usr/lib/postfix/sbin/master"
local POSTFIX = "/usr/sbin/postfix"
M.LIFETIME = 150   -- seconds: the master exits by itself after this, whatever happens to the spec

-- The relay target: aiosmtpd that records each message with the raw MAIL and RCPT arguments
-- Postfix sent (DSN parameters included; aiosmtpd itself does not know them, so they are taken
-- out before its own parsing) and the data as received (after dot-unstuffing, CRLF kept) in a
-- file of its own. The record is one Lua table constructor per line (no decoding step).
local sink_py = [[
import asyncio, os, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
port, record = int(sys.argv[1]), sys.argv[2]
count = 0

def lua(v):
    if v is None: return 'nil'
    if isinstance(v, str): v = v.encode('utf-8', 'surrogateescape')
    if isinstance(v, bytes): return '"' + ''.join('\\%d' % c for c in v) + '"'
    if isinstance(v, list): return '{' + ','.join(lua(x) for x in v) + '}'
    return '{' + ','.join('[' + lua(k) + ']=' + lua(x) for k, x in v.items()) + '}'

DSN = ('RET=', 'ENVID=', 'NOTIFY=', 'ORCPT=')

def split(arg):
    # "FROM:<addr> P1 P2" -> ("FROM:<addr> P1-without-DSN", raw params)
    head, _, rest = arg.partition('>')
    keep = [p for p in rest.split() if not p.upper().startswith(DSN)]
    return head + '>' + ''.join(' ' + p for p in keep)

class DsnSMTP(SMTP):
    async def smtp_MAIL(self, arg):
        await super().smtp_MAIL(split(arg) if arg else arg)
        if self.envelope.mail_from is not None:
            self.envelope.x_mail = arg
            self.envelope.x_rcpts = []
    async def smtp_RCPT(self, arg):
        n = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(split(arg) if arg else arg)
        if len(self.envelope.rcpt_tos) > n:
            self.envelope.x_rcpts.append(arg)

class Handler:
    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ['250-DSN'] + responses[-1:]
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        path = '%s.%d.eml' % (record, count)
        with open(path, 'wb') as f:
            f.write(envelope.original_content)
        with open(record, 'a') as f:
            f.write(lua({
                'from': envelope.mail_from, 'to': envelope.rcpt_tos,
                'mail': getattr(envelope, 'x_mail', None), 'rcpts': getattr(envelope, 'x_rcpts', []),
                'file': path,
            }) + ',\n')
        return '250 2.0.0 OK recorded'

class C(Controller):
    def factory(self):
        return DsnSMTP(self.handler, **self.SMTP_kwargs)

c = C(Handler(), hostname='127.0.0.1', port=port, enable_SMTPUTF8=True,
      server_hostname='sink.test', data_size_limit=64 * 1024 * 1024)
c.start()
while True:
    time.sleep(3600)
]]

-- The password check behind Postfix's SASL: Postfix speaks the Dovecot auth protocol
-- (smtpd_sasl_type = dovecot) to this UNIX socket. It offers PLAIN and LOGIN, takes one user and
-- password, and records each attempt. The SMTP side of AUTH (the 334 exchange, 235/535 replies,
-- smtpd_tls_auth_only, the relay decision) is Postfix's own.
local auth_py = [[
import base64, os, socket, sys, threading
path, user, password, log = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode(), sys.argv[4]
if os.path.exists(path):
    os.unlink(path)
ls = socket.socket(socket.AF_UNIX)
ls.bind(path)
os.chmod(path, 0o666)
ls.listen(16)

def record(mech, name, ok):
    with open(log, 'a') as f:
        f.write('{mechanism="%s",user="%s",ok=%s},\n' % (mech, ''.join('\\%d' % c for c in name), 'true' if ok else 'false'))

def serve(c):
    r = c.makefile('rb')
    c.sendall(b'VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n'
              b'SPID\t%d\nCUID\t1\nCOOKIE\t%s\nDONE\n' % (os.getpid(), b'0' * 32))
    pending = {}
    def finish(rid, mech, name, secret):
        ok = name == user and secret == password
        record(mech, name, ok)
        c.sendall((b'OK\t%s\tuser=%s\n' if ok else b'FAIL\t%s\tuser=%s\n') % (rid, name))
    def step(rid, st, data):
        if st[0] == 'PLAIN':
            parts = data.split(b'\0')
            if len(parts) != 3:
                c.sendall(b'FAIL\t%s\n' % rid); return
            finish(rid, 'PLAIN', parts[1], parts[2])
        else:
            if data is not None:
                st[1].append(data)
            if len(st[1]) == 0:
                c.sendall(b'CONT\t%s\t%s\n' % (rid, base64.b64encode(b'Username:')))
            elif len(st[1]) == 1:
                c.sendall(b'CONT\t%s\t%s\n' % (rid, base64.b64encode(b'Password:')))
            else:
                finish(rid, 'LOGIN', st[1][0], st[1][1])
    try:
        for line in r:
            parts = line.rstrip(b'\n').split(b'\t')
            if parts[0] == b'AUTH':
                rid, mech = parts[1], parts[2].upper().decode()
                args = dict(p.split(b'=', 1) for p in parts[3:] if b'=' in p)
                resp = args.get(b'resp')
                st = [mech, list()]
                pending[rid] = st
                data = base64.b64decode(resp) if resp is not None else None
                if mech == 'PLAIN' and data is None:
                    c.sendall(b'CONT\t%s\t\n' % rid)
                elif mech in ('PLAIN', 'LOGIN'):
                    step(rid, st, data if data != b'' or mech == 'PLAIN' else None)
                else:
                    c.sendall(b'FAIL\t%s\n' % rid)
            elif parts[0] == b'CONT':
                rid = parts[1]
                data = base64.b64decode(parts[2]) if len(parts) > 2 else b''
                if rid in pending:
                    step(rid, pending[rid], data)
    except (OSError, ValueError):
        pass
    finally:
        c.close()

while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]

local main_cf = [[
# a private test instance (spec/support/postfix.lua); nothing here is shared with /etc/postfix
compatibility_level = 3.6
queue_directory = {D}/queue
data_directory = {D}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{SINK}
default_transport = smtp
relay_transport = smtp
smtp_host_lookup = native
smtp_tls_security_level = none
smtpd_tls_security_level = may
smtpd_tls_cert_file = {CERT}
smtpd_tls_key_file = {KEY}
smtpd_tls_loglevel = 1
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_sasl_type = dovecot
smtpd_sasl_path = {D}/auth.sock
smtpd_recipient_restrictions = check_recipient_access inline:{ {bad@example.org = REJECT}, {gone@example.org = 550 5.1.1 mailbox gone} }, permit
local_header_rewrite_clients =
# the strict settings of recent Postfix (3.9 defaults, backported): a client that pipelines
# where RFC 2920 forbids it is disconnected, a bare LF in the data is refused (loopback too)
smtpd_forbid_unauth_pipelining = yes
smtpd_forbid_bare_newline = reject
smtpd_forbid_bare_newline_exclusions =
disable_mime_output_conversion = yes
message_size_limit = 20000000
maillog_file = {D}/maillog
maillog_file_prefixes = {D}
biff = no
readme_directory = no
]]

-- Every service in the foreground of this master, none chrooted (a chroot would need copies of
-- /etc files in the queue directory).
local master_cf = [[
127.0.0.1:{PORT} inet n - n - - smtpd
127.0.0.1:{SMALL} inet n - n - - smtpd -o message_size_limit=100000
127.0.0.1:{AUTH} inet n - n - - smtpd -o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject_unauth_destination
127.0.0.1:{STRICT} inet n - n - - smtpd -o smtpd_hard_error_limit=2 -o smtpd_error_sleep_time=0
127.0.0.1:{IDLE} inet n - n - - smtpd -o smtpd_timeout=1s
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
]]

local function fill(t, vars)
  return (t:gsub("{(%u+)}", function(k) return assert(vars[k], k) end))
end

local function lines_in(path)
  local d = helper.read(path)
  if not d then return 0 end
  local _, n = d:gsub("\n", "")
  return n
end

-- Why a real Postfix cannot run here, or nil.
local function unavailable()
  if not helper.read(MASTER) then
    return "missing peer: Postfix's master (" .. MASTER .. "; install the Debian package postfix)"
  end
  if not helper.sh("id -u"):match("^0%s") then return "a private Postfix needs root (mail_owner = postfix)" end
  if not helper.sh("id -u postfix 2>/dev/null"):match("^%d") then return "no postfix user" end
  return nil
end

-- Starts the sink and the MTA. Returns the instance, or nil and the reason it could not start.
-- opts.main: settings for main.cf, each replacing the one of that name (another default_transport, say);
-- opts.master: lines appended to master.cf (a service those settings name).
function M.start(opts)
  opts = opts or {}
  local why = unavailable()
  if why then return nil, why end
  local c = helper.certs()
  local d = helper.tmpdir()
  -- the postfix user walks into the queue under this directory
  helper.sh("chmod 755 " .. helper.quote(d) .. " && mkdir -m 755 " .. helper.quote(d .. "/etc") ..
    " " .. helper.quote(d .. "/queue"))
  local pf = { dir = d, port = helper.free_port(), small_port = helper.free_port(), auth_port = helper.free_port(),
    strict_port = helper.free_port(), idle_port = helper.free_port(),
    sink_port = helper.free_port(), ca = c.ca, log_path = d .. "/maillog", record = d .. "/relayed.lua" }
  local vars = { D = d, SINK = tostring(pf.sink_port), CERT = c.server, KEY = c.server_key,
    PORT = tostring(pf.port), SMALL = tostring(pf.small_port), AUTH = tostring(pf.auth_port),
    STRICT = tostring(pf.strict_port), IDLE = tostring(pf.idle_port) }
  pf.user, pf.password = "user@postfix.test", "secret pass"
  local main = fill(main_cf, vars)
  for name in (opts.main or ""):gmatch("([%w_]+)%s*=[^\n]*") do
    main = main:gsub("\n" .. name .. " =[^\n]*", "")
  end
  helper.write(d .. "/etc/main.cf", main .. (opts.main or ""))
  helper.write(d .. "/etc/master.cf", fill(master_cf, vars) .. (opts.master or ""))
  helper.write(d .. "/sink.py", sink_py)
  helper.write(d .. "/auth.py", auth_py)

  pf.sink = helper.spawn({ helper.python, d .. "/sink.py", tostring(pf.sink_port), pf.record },
    { limit = M.LIFETIME + 30 })
  pf.auth = helper.spawn({ helper.python, d .. "/auth.py", d .. "/auth.sock", pf.user, pf.password,
    d .. "/auth.lua" }, { limit = M.LIFETIME + 30 })

  function pf.stop()
    -- the master by the PID it wrote (it takes its children down), then the sink
    local pid = tonumber((helper.read(d .. "/queue/pid/master.pid") or ""):match("%d+"))
    if pid and pf.master and not pf.master.stopped then
      helper.sh("kill -TERM " .. pid .. " 2>/dev/null")
      for _ = 1, 100 do
        if not helper.alive(pid) then break end
        helper.sleep(0.05)
      end
      helper.sh("kill -KILL " .. pid .. " 2>/dev/null")
    end
    if pf.master then pf.master:stop() end
    pf.sink:stop()
    pf.auth:stop()
    -- the queue and the relayed copies (megabytes); the config, maillog and records stay
    helper.sh("rm -rf " .. helper.quote(d .. "/queue") .. " " .. helper.quote(d .. "/data") ..
      " " .. helper.quote(d) .. "/relayed.lua.*.eml")
  end

  -- `postfix check` creates the queue's subdirectories with their owners and modes
  local out, ok, code = helper.sh(POSTFIX .. " -c " .. helper.quote(d .. "/etc") .. " check 2>&1")
  if not ok then
    pf.stop()
    -- postfix logs to the maillog file once it can; postconf says what it rejects in main.cf
    local conf = helper.sh("postconf -c " .. helper.quote(d .. "/etc") .. " -n 2>&1 >/dev/null")
    return nil, ("postfix check failed (status %s, config in %s): %s%s%s"):format(tostring(code),
      d .. "/etc", out, conf, helper.read(pf.log_path) or "")
  end
  -- -s: stays in the foreground of `timeout`; -e: exits by itself after LIFETIME seconds
  pf.master = helper.spawn({ MASTER, "-c", d .. "/etc", "-s", "-e", tostring(M.LIFETIME) },
    { limit = M.LIFETIME + 10, log = d .. "/master.out" })
  local up = helper.wait_port("127.0.0.1", pf.port, 15) and helper.wait_port("127.0.0.1", pf.small_port, 5) and
    helper.wait_port("127.0.0.1", pf.auth_port, 5) and helper.wait_port("127.0.0.1", pf.strict_port, 5) and
    helper.wait_port("127.0.0.1", pf.idle_port, 5)
  local sink_up = helper.wait_port("127.0.0.1", pf.sink_port, 15)
  if not (up and sink_up) then
    local why2 = (not up and "the Postfix master did not listen: " .. pf.master:output() ..
      (helper.read(pf.log_path) or "") or "") .. (not sink_up and "the sink did not start: " .. pf.sink:output() or "")
    pf.stop()
    return nil, why2
  end

  -- The log so far (a mark), the log after a mark, and waits on both logs and relayed mail.
  -- A mark is taken once every smtpd session so far has logged its end (the log is written
  -- asynchronously: a session a test has just closed may not be there yet), so the first session
  -- after a mark is the caller's.
  local function count(text, pat)
    local _, n = text:gsub(pat, "")
    return n
  end
  function pf.mark()
    local deadline = os.time() + 5
    while true do
      local text = helper.read(pf.log_path) or ""
      if count(text, "smtpd%[%d+%]: connect from ") <= count(text, "smtpd%[%d+%]: disconnect from ") or
        os.time() > deadline then
        return #text
      end
      helper.sleep(0.05)
    end
  end
  function pf.log(mark) return (helper.read(pf.log_path) or ""):sub((mark or 0) + 1) end
  -- Waits until the log after `mark` matches `pattern` (a Lua pattern); the log after the mark.
  function pf.wait_log(mark, pattern, timeout)
    local deadline = os.time() + (timeout or 10)
    repeat
      local l = pf.log(mark)
      if l:find(pattern) then return l end
      helper.sleep(0.05)
    until os.time() > deadline
    return nil, pf.log(mark)
  end
  -- smtpd's command counts for the first client session that ended after `mark`
  -- ("ehlo=2 starttls=1 mail=1 rcpt=1 bdat=1 quit=1 commands=7"), or nil and the log.
  function pf.session(mark, timeout)
    local pat = "smtpd%[%d+%]: disconnect from localhost%[127%.0%.0%.1%] (ehlo=[^\n]*)"
    local l, all = pf.wait_log(mark, pat, timeout)
    if not l then return nil, all end
    return l:match(pat)
  end
  -- the five connections of wait_port above end in the log before any test takes a mark
  pf.wait_log(0, ("commands=0/0.*"):rep(5), 5)
  -- The attempts the password check saw: { mechanism=, user=, ok= }.
  function pf.auths()
    local text = (helper.read(d .. "/auth.lua") or ""):match("^(.*\n)") or ""
    return assert((loadstring or load)("return {" .. text .. "}"))()
  end
  function pf.count() return lines_in(pf.record) end
  -- The relayed messages from the `first`th on: { from=, to=, mail=, rcpts=, data= }.
  function pf.relayed(first)
    -- whole lines only: the sink may be writing the next one
    local text = (helper.read(pf.record) or ""):match("^(.*\n)") or ""
    local all = assert((loadstring or load)("return {" .. text .. "}"))()
    local out = {}
    for i = first or 1, #all do
      local r = all[i]
      r.data = helper.read(r.file)
      out[#out + 1] = r
    end
    return out
  end
  -- Waits until the sink holds `n` messages (Postfix relays asynchronously); returns those
  -- after the first `skip`.
  function pf.wait_relayed(n, timeout, skip)
    local deadline = os.time() + (timeout or 20)
    while lines_in(pf.record) < n and os.time() <= deadline do helper.sleep(0.05) end
    return pf.relayed((skip or 0) + 1)
  end
  return pf
end

-- The queue ID in Postfix's "250 2.0.0 Ok: queued as ID".
function M.queue_id(text)
  return text and text:match("queued as (%w+)")
end

-- Splits a relayed message into Postfix's Received field (as one string with its folds and
-- CRLF) and the rest, which must be the bytes the client sent.
function M.split_received(data)
  if data:sub(1, 10) ~= "Received: " then return nil, data end
  local i = 1
  while true do
    local line = data:match("^[^\r\n]*\r\n", i)
    if not line or (i > 1 and not line:match("^[ \t]")) then break end
    i = i + #line
  end
  return data:sub(1, i - 1), data:sub(i)
end

return M
