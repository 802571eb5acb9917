-- make demo: starts `lua-smtp sink` on a free loopback port with STARTTLS and AUTH, composes a
-- message with a UTF-8 subject, text, HTML and an attachment, sends it through smtp.send with the
-- certificate verified against a CA made for the demo, shows what the sink stored, stops the sink.
local top = debug.getinfo(1, "S").source:gsub("^@", ""):match("^(.*)/examples/[^/]*$") or "."
local luav = jit and "luajit" or ("lua" .. _VERSION:match("%d+%.%d+"))
package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
package.cpath = top .. "/build/" .. luav .. "/?.so;" .. package.cpath

local smtp = require "smtp"
local message = require "smtp.message"
local native = require "smtp.transport.native"

local function sh(cmd)
  local p = assert(io.popen(cmd)); local out = p:read("a"); p:close(); return (out:gsub("%s+$", ""))
end
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local dir = sh("mktemp -d /tmp/lua-smtp-demo.XXXXXX")
assert(sh("bash " .. q(top .. "/scripts/make-certs.sh") .. " " .. q(dir)):match("ok"), "could not make certificates")

-- A free loopback port: bind to port 0, read it back, let it go.
local l = assert(native.listen { host = "127.0.0.1", port = 0 })
local port = l.port
l:close()

local maildir = dir .. "/Maildir"
local sinklog = dir .. "/sink.log"
local pid = sh(string.format(
  "exec timeout 60 lua5.4 %s sink --listen 127.0.0.1:%d --maildir %s --tls-cert %s --tls-key %s " ..
  "--auth demo:secret --hostname sink.demo.test >%s 2>&1 </dev/null & echo $!",
  q(top .. "/bin/lua-smtp"), port, q(maildir), q(dir .. "/server.pem"), q(dir .. "/server.key"), q(sinklog)))

local function stop()
  os.execute("kill " .. pid .. " 2>/dev/null")
end

-- Wait until the sink accepts connections (at most 10 s).
local up = false
for _ = 1, 100 do
  local s = native.connect { host = "127.0.0.1", port = port, timeout = 1 }
  if s then s:close(); up = true; break end
  os.execute("sleep 0.1")
end
if not up then stop(); io.stderr:write("demo: the sink did not start:\n", sh("cat " .. q(sinklog)), "\n"); os.exit(1) end

local attachment = dir .. "/report.csv"
local f = assert(io.open(attachment, "wb"))
f:write("city,temperature\r\nZürich,21.5\r\n東京,26.0\r\n"); f:close()

local msg = assert(message.new {
  from = "Demo Sender <sender@demo.test>",
  to = { "Zoë Recipient <zoe@demo.test>" },
  subject = "Grüße from lua-smtp ✉",
  text = "Hello!\n\nThis message was composed by smtp.message and sent with STARTTLS and AUTH.\n",
  html = "<p>Hello!</p><p>This message was composed by <b>smtp.message</b>.</p>",
  attachments = { { path = attachment } },
})

local res, err = smtp.send {
  server = "localhost", port = port, tls = "starttls", cafile = dir .. "/ca.pem",
  auth = { user = "demo", password = "secret" }, message = msg, timeout = 10,
}
os.execute("sleep 0.2")
stop()
if not res then
  io.stderr:write("demo: send failed: ", tostring(err), "\n", sh("cat " .. q(sinklog)), "\n")
  os.exit(1)
end

print(string.format("sent over %s (%s) to 127.0.0.1:%d: %d %s %s",
  res.server and res.server.tls or "?", "verified", port, res.reply.code, res.reply.enhanced or "", res.reply.text or ""))
print("accepted: " .. table.concat(res.accepted, ", "))
print("sink printed: " .. sh("cat " .. q(sinklog)))
local file = sh("ls " .. q(maildir .. "/new") .. " | head -n 1")
local stored = assert(io.open(maildir .. "/new/" .. file, "rb")):read("a")
print(string.format("stored %s (%d bytes); its headers:", maildir .. "/new/" .. file, #stored))
for line in stored:gmatch("([^\r\n]*)\r?\n") do
  if line == "" then break end
  print("  " .. line)
end
local parts = 0
for _ in stored:gmatch("\r\nContent%-Type: ") do parts = parts + 1 end
print(string.format("MIME parts: %d (text, HTML, attachment report.csv)", parts))
os.execute("rm -rf " .. q(dir))
