-- A private Dovecot LMTP server for the LMTP client specs: its own config, base_dir, state and log
-- in a temp dir, LMTP on a Unix socket there and on 127.0.0.1:PORT, users from a passwd-file
-- (each delivering to <tmp>/mail/<user>/Maildir as uid nobody), an unknown user refused at RCPT,
-- one user over a tiny quota (refused after the data, 552) and one whose home cannot be written
-- (a temporary failure after the data, 451). The master runs in the foreground under
-- helper.spawn (a `timeout` bound) and is stopped by that PID; /etc/dovecot is never read.
local helper = require "helper"

local M = {}

local DOVECOT = "/usr/sbin/dovecot"
M.LIFETIME = 150   -- seconds: the master is killed after this, whatever happens to the spec

local conf = [[
# a private test instance (spec/support/dovecot.lua)
protocols = lmtp
base_dir = {D}/run
state_dir = {D}/state
log_path = {D}/dovecot.log
ssl = no
listen = 127.0.0.1
first_valid_uid = 1
mail_location = maildir:~/Maildir
auth_username_format = %Ln
mail_plugins = quota
plugin {
  quota = maildir:User quota
}
passdb {
  driver = passwd-file
  args = {D}/users
}
userdb {
  driver = passwd-file
  args = {D}/users
}
service lmtp {
  unix_listener {D}/lmtp.sock {
    mode = 0666
  }
  inet_listener lmtp {
    address = 127.0.0.1
    port = {PORT}
  }
}
]]

-- Why Dovecot's LMTP server cannot run here, or nil.
local function unavailable()
  if not helper.read(DOVECOT) or not helper.read("/usr/lib/dovecot/lmtp") then
    return "missing peer: Dovecot's LMTP server (" .. DOVECOT .. ", /usr/lib/dovecot/lmtp; install the " ..
      "Debian packages dovecot-core dovecot-lmtpd)"
  end
  if not helper.sh("id -u"):match("^0%s") then return "a private Dovecot delivering as nobody needs root" end
  return nil
end

-- Starts the server. Returns the instance, or nil and the reason it could not start.
function M.start()
  local why = unavailable()
  if why then return nil, why end
  local d = helper.tmpdir()
  local dv = { dir = d, socket = d .. "/lmtp.sock", port = helper.free_port(), log_path = d .. "/dovecot.log" }
  local q = helper.quote
  -- mail is written as nobody; "locked" is a home nobody cannot create its Maildir in
  helper.sh("chmod 755 " .. q(d) .. " && mkdir -p " .. q(d .. "/run") .. " " .. q(d .. "/state") .. " " ..
    q(d .. "/mail") .. " " .. q(d .. "/locked") .. " && chown nobody " .. q(d .. "/mail") ..
    " && chmod 700 " .. q(d .. "/locked"))
  local users = {}
  for _, u in ipairs { "alice", "bob", "carol" } do
    users[#users + 1] = ("%s:{PLAIN}x:65534:65534::%s/mail/%s::"):format(u, d, u)
  end
  -- over quota: every message is over 10 bytes of storage
  users[#users + 1] = ("full:{PLAIN}x:65534:65534::%s/mail/full::userdb_quota_rule=*:storage=10B"):format(d)
  users[#users + 1] = ("stuck:{PLAIN}x:65534:65534::%s/locked/stuck::"):format(d)
  helper.write(d .. "/users", table.concat(users, "\n") .. "\n")
  helper.write(d .. "/dovecot.conf", (conf:gsub("{(%u+)}", { D = d, PORT = tostring(dv.port) })))
  dv.proc = helper.spawn({ DOVECOT, "-c", d .. "/dovecot.conf", "-F" },
    { limit = M.LIFETIME, log = d .. "/master.out" })
  function dv.stop()
    dv.proc:stop()
  end
  local up = helper.wait_port("127.0.0.1", dv.port, 15)
  for _ = 1, 100 do
    if helper.sh("test -S " .. q(dv.socket) .. " && echo yes"):match("yes") then break end
    helper.sleep(0.05)
  end
  if not up then
    local out = dv.proc:output() .. (helper.read(dv.log_path) or "")
    dv.stop()
    return nil, "Dovecot did not listen: " .. out
  end
  dv.version = helper.sh(DOVECOT .. " --version"):match("^(%S+)")

  -- The messages delivered to `user`'s Maildir (new/), oldest first (by modification time, which
  -- ls sorts in nanoseconds: Dovecot's file names do not sort by time within a second).
  function dv.maildir(user)
    local dir = d .. "/mail/" .. user .. "/Maildir/new"
    local names = {}
    for name in helper.sh("ls -tr " .. q(dir) .. " 2>/dev/null"):gmatch("[^\n]+") do names[#names + 1] = name end
    local out = {}
    for i, name in ipairs(names) do out[i] = helper.read(dir .. "/" .. name) end
    return out
  end
  function dv.log() return helper.read(dv.log_path) or "" end
  return dv
end

-- A delivered file split into the header fields Dovecot put in front (Return-Path, Delivered-To,
-- Received) and the rest, which must be the message as sent with LF line ends (Maildir's).
function M.split_delivered(data)
  local i = 1
  while true do
    local line = data:match("^[^\n]*\n", i)
    if not line then break end
    local name = line:match("^([%w-]+):")
    local cont = line:match("^[ \t]")
    if not cont and name ~= "Return-Path" and name ~= "Delivered-To" and name ~= "Received" then break end
    i = i + #line
  end
  return data:sub(1, i - 1), data:sub(i)
end

return M
