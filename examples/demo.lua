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
local core = require "smtp.core"

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

print(string.format("sent over %s, certificate verified against the demo CA, to 127.0.0.1:%d: %d %s %s",
  tostring(res.server and res.server.tls), port, res.reply.code, res.reply.enhanced or "", res.reply.text or ""))
print("accepted: " .. table.concat(res.accepted, ", "))
print("the sink printed: " .. sh("cat " .. q(sinklog)))
local file = sh("ls " .. q(maildir .. "/new") .. " | head -n 1")
local stored = assert(io.open(maildir .. "/new/" .. file, "rb")):read("*a")

-- Reading the stored message back: header fields (unfolded), RFC 2047 words, MIME parts.
local function split(raw)
  local head, body = raw:match("^(.-\r\n)\r\n(.*)$")
  if not head then return {}, raw end
  local fields = {}
  for line in head:gsub("\r\n[ \t]+", " "):gmatch("([^\r\n]+)") do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then fields[#fields + 1] = { name = name, lname = name:lower(), value = value } end
  end
  return fields, body
end
local function field(fields, lname)
  for _, f in ipairs(fields) do if f.lname == lname then return f.value end end
end
local function decode_words(v)   -- RFC 2047: =?charset?B|Q?text?=, spaces between words dropped
  v = v:gsub("(%?=)%s+(=%?)", "%1%2")
  return (v:gsub("=%?[^?]+%?([BbQq])%?([^?]*)%?=", function(enc, text)
    if enc:upper() == "B" then return core.b64decode(text) end
    return (text:gsub("_", " "):gsub("=(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
  end))
end
local function param(v, name)   -- a plain, quoted or RFC 2231 (name*=UTF-8''...) parameter
  local ext = v:match(";%s*" .. name .. "%*=[^']*'[^']*'([^;%s]+)")
  if ext then return (ext:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)) end
  local quoted = v:match(";%s*" .. name .. '="([^"]*)"')
  return quoted and decode_words(quoted) or v:match(";%s*" .. name .. "=([^;%s]+)")
end
local function parts(raw, depth, out)
  local fields, body = split(raw)
  local ctype = field(fields, "content-type") or "text/plain"
  local boundary = param(ctype, "boundary")
  local mime = ctype:match("^%s*([^;%s]+)"):lower()
  if boundary then
    out[#out + 1] = { depth = depth, type = mime }
    local marker = "--" .. boundary
    local pieces, pos = {}, 1
    while true do
      local s, e = body:find("\r?\n?" .. marker:gsub("%p", "%%%0"), pos)
      if not s then break end
      pieces[#pieces + 1] = e + 1
      pos = e + 1
      if body:sub(e + 1, e + 2) == "--" then break end
    end
    for i = 1, #pieces - 1 do
      local chunk = body:sub(pieces[i], pieces[i + 1] - 1):gsub("^\r\n", ""):gsub("\r\n%-%-" .. boundary:gsub("%p", "%%%0") .. ".*$", "")
      parts(chunk, depth + 1, out)
    end
  else
    local disp = field(fields, "content-disposition") or ""
    out[#out + 1] = { depth = depth, type = mime, filename = param(disp, "filename") or param(ctype, "name"),
      encoding = field(fields, "content-transfer-encoding"), size = #body }
  end
  return out
end

local fields = split(stored)
print(string.format("stored %s (%d bytes)", maildir .. "/new/" .. file, #stored))
for _, name in ipairs { "return-path", "delivered-to", "from", "to", "subject", "date", "message-id" } do
  for _, f in ipairs(fields) do
    if f.lname == name then print(string.format("  %-13s %s", f.name .. ":", decode_words(f.value))) end
  end
end
print("  raw Subject:  " .. field(fields, "subject"))
print("MIME structure:")
for _, p in ipairs(parts(stored, 1, {})) do
  print(string.format("  %s%s%s%s", string.rep("  ", p.depth - 1), p.type,
    p.filename and (' "' .. p.filename .. '"') or "",
    p.encoding and string.format(" (%s, %d bytes encoded)", p.encoding, p.size) or ""))
end
os.execute("rm -rf " .. q(dir))
