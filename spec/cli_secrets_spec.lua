-- The command line keeps passwords out of the process's arguments: `lua-smtp sink --auth-env VAR`
-- and `--auth-file FILE`, `lua-smtp send --password-env VAR` and `--password-file FILE`. Each
-- runs as a real process; its /proc/<pid>/cmdline (what ps and every local user see) names the
-- option but not the secret, and AUTH still works with it (swaks against the sink; the sender
-- against a scripted server that records the AUTH PLAIN response it got).
local helper = require "helper"

if not pcall(require, "smtp.transport.native") then
  describe("command line secrets", function() pending("needs smtp.transport.native") end)
  return
end

local BIN = helper.root .. "/bin/lua-smtp"
local SECRET = "s3cret-Pa55-in-no-argv"

-- The argument strings of pid and of its descendants (helper.spawn starts `timeout`, which
-- starts our interpreter).
local function cmdlines(pid)
  local out = {}
  local function walk(p)
    local c = helper.read("/proc/" .. p .. "/cmdline")
    if c then out[#out + 1] = c:gsub("%z", " ") end
    local kids = helper.read("/proc/" .. p .. "/task/" .. p .. "/children") or ""
    for k in kids:gmatch("%d+") do walk(k) end
  end
  walk(pid)
  return out
end

local function assert_hidden(pid, option)
  -- the process tree appears as `timeout` forks and the interpreter starts: wait for it (a busy
  -- machine may take a while), then look
  local all = ""
  for _ = 1, 200 do
    all = table.concat(cmdlines(pid), "\n")
    if all:find(BIN, 1, true) and all:find(option, 1, true) then break end
    helper.sleep(0.05)
  end
  -- the interpreter itself is among them, with the option that names where the secret is
  assert.truthy(all:find(option, 1, true), all)
  assert.truthy(all:find(BIN, 1, true), all)
  assert.is_nil(all:find(SECRET, 1, true), all)
end

describe("command line secrets", function()
  local procs = {}
  after_each(function()
    for _, p in ipairs(procs) do p:stop() end
    procs = {}
  end)

  for _, how in ipairs({ "env", "file" }) do
    it("sink --auth-" .. how .. ": the password is not in its arguments and AUTH works (swaks)", function()
      local port = helper.free_port()
      local dir = helper.tmpdir()
      local argv = { helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port, "--maildir", dir .. "/md" }
      local env = {}
      if how == "env" then
        argv[#argv + 1] = "--auth-env"; argv[#argv + 1] = "SINK_AUTH"
        env.SINK_AUTH = "user:" .. SECRET
      else
        helper.write(dir .. "/auth", "user:" .. SECRET .. "\n")
        argv[#argv + 1] = "--auth-file"; argv[#argv + 1] = dir .. "/auth"
      end
      local p = helper.spawn(argv, { limit = 120, env = env })
      procs[#procs + 1] = p
      assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
      assert_hidden(p.pid, "--auth-" .. how)
      local function swaks(pass)
        local a = { "swaks", "--server", "127.0.0.1", "--port", tostring(port), "--from", "a@x.test",
                    "--to", "b@y.test", "-a", "PLAIN", "-au", "user", "-ap", pass }
        helper.need_argv(a)
        local q = {}
        for i, x in ipairs(a) do q[i] = helper.quote(x) end
        return (helper.sh(table.concat(q, " ") .. " 2>&1"))
      end
      assert.matches("535 5%.7%.8", swaks("wrong"))
      local out = swaks(SECRET)
      assert.matches("235 2%.7%.0", out)
      assert.matches("250 2%.0%.0 Ok: queued", out)
    end)
  end

  it("sink refuses --auth-env naming an unset variable and two --auth options (exit 2)", function()
    local out = helper.sh("env -u NO_SUCH_VAR_X " .. helper.lua .. " " .. BIN ..
      " sink --auth-env NO_SUCH_VAR_X 2>&1; echo EXIT:$?")
    assert.matches("%-%-auth%-env: NO_SUCH_VAR_X is not set", out)
    assert.matches("EXIT:2", out)
    out = helper.sh(helper.lua .. " " .. BIN .. " sink --auth u:p --auth-file /nonexistent 2>&1; echo EXIT:$?")
    assert.matches("give one of %-%-auth, %-%-auth%-env, %-%-auth%-file", out)
    assert.matches("EXIT:2", out)
  end)

  -- A server that accepts one session but greets only once `go` exists (so the sender is
  -- certainly running while its arguments are read), offers AUTH PLAIN and writes the decoded
  -- response to `creds`.
  local SERVER = [[
import base64, os, socket, sys, time
portfile, go, creds = sys.argv[1:4]
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('127.0.0.1', 0))
l.listen(1)
open(portfile + '.tmp', 'w').write(str(l.getsockname()[1]))
os.rename(portfile + '.tmp', portfile)
c, _ = l.accept()
while not os.path.exists(go):
    time.sleep(0.05)
f = c.makefile('rb')
def say(s):
    c.sendall(s.encode() + b'\r\n')
say('220 fake.test ESMTP')
while True:
    line = f.readline()
    if not line:
        break
    cmd = line.decode().rstrip('\r\n')
    u = cmd.upper()
    if u.startswith('EHLO'):
        say('250-fake.test'); say('250 AUTH PLAIN')
    elif u.startswith('AUTH PLAIN'):
        parts = cmd.split(' ')
        if len(parts) > 2:
            resp = parts[2]
        else:
            say('334 '); resp = f.readline().decode().strip()
        open(creds, 'wb').write(base64.b64decode(resp))
        say('235 2.7.0 ok')
    elif u == 'DATA':
        say('354 go on')
        while f.readline() not in (b'.\r\n', b''):
            pass
        say('250 2.0.0 queued')
    elif u == 'QUIT':
        say('221 2.0.0 bye'); break
    else:
        say('250 2.0.0 ok')
c.close()
]]

  for _, how in ipairs({ "env", "file" }) do
    it("send --password-" .. how .. ": the password is not in its arguments and AUTH PLAIN carries it", function()
      local dir = helper.tmpdir()
      local srv = helper.spawn({ helper.python, "-c", SERVER, dir .. "/port", dir .. "/go", dir .. "/creds" },
        { limit = 120 })
      procs[#procs + 1] = srv
      for _ = 1, 100 do
        if helper.read(dir .. "/port") then break end
        helper.sleep(0.1)
      end
      local port = assert(helper.read(dir .. "/port"), srv:output())
      local argv = { helper.lua, BIN, "send", "--server", "127.0.0.1:" .. port, "--tls", "none",
                     "--user", "alice", "--from", "a@x.test", "--to", "b@y.test", "--subject", "s",
                     "--body", "hello", "--timeout", "60" }
      local env = {}
      if how == "env" then
        argv[#argv + 1] = "--password-env"; argv[#argv + 1] = "SEND_PASSWORD"
        env.SEND_PASSWORD = SECRET
      else
        helper.write(dir .. "/pw", SECRET .. "\r\n")
        argv[#argv + 1] = "--password-file"; argv[#argv + 1] = dir .. "/pw"
      end
      local p = helper.spawn(argv, { limit = 120, env = env })
      procs[#procs + 1] = p
      -- the sender is connected and waits for the greeting: read its arguments now
      assert.is_true(p:alive())
      assert_hidden(p.pid, "--password-" .. how)
      helper.write(dir .. "/go", "")
      for _ = 1, 300 do
        if not p:alive() then break end
        helper.sleep(0.1)
      end
      assert.is_false(p:alive(), p:output())
      assert.equal("\0alice\0" .. SECRET, helper.read(dir .. "/creds"), p:output())
    end)
  end

  it("send refuses two password options and an unset --password-env (exit 2)", function()
    local base = helper.lua .. " " .. BIN .. " send --server 127.0.0.1:1 --user u --from a@x.test --to b@y.test "
    local out = helper.sh(base .. "--password p --password-env X 2>&1; echo EXIT:$?")
    assert.matches("give one of %-%-password, %-%-password%-env, %-%-password%-file", out)
    assert.matches("EXIT:2", out)
    out = helper.sh("env -u NO_SUCH_VAR_X " .. base .. "--password-env NO_SUCH_VAR_X 2>&1; echo EXIT:$?")
    assert.matches("%-%-password%-env: NO_SUCH_VAR_X is not set", out)
    assert.matches("EXIT:2", out)
    out = helper.sh(base .. "--password-file /nonexistent 2>&1; echo EXIT:$?")
    assert.matches("%-%-password%-file: cannot read /nonexistent", out)
    assert.matches("EXIT:2", out)
  end)
end)
