-- Child process for spec/stream_memory_spec.lua: sends one big message with smtp.send to an SMTP
-- server on loopback and prints what happened and this process's peak memory, so the spec can
-- hold the client to issue 3's "a 1 GB message streams in constant memory".
--   lua5.4 stream_send.lua PORT function MB    -- a function source returning 64 KB blocks of lines
--   lua5.4 stream_send.lua PORT file PATH      -- a file handle opened on PATH
-- Prints "sent <bytes> <code> <enhanced>" or "failed <error>", then "hwm <kB>" (VmHWM).
local smtp = require "smtp"

local port, mode, what = tonumber(arg[1]), arg[2], arg[3]

local HEAD = "From: a@example.com\r\nTo: b@example.org\r\nSubject: big\r\n\r\n"

-- One 64 KB block of 78-byte lines (some start with a dot, to keep the stuffer busy), built once:
-- the source hands out the same string again and again, so the script itself holds ~64 KB.
local function block()
  local lines, n = {}, 0
  while n + 80 <= 65536 do
    local i = #lines + 1
    local l = (i % 7 == 0 and "." or "x") .. ("%077d"):format(i):sub(1, 76) .. "\r\n"
    lines[i] = l
    n = n + #l
  end
  return table.concat(lines)
end

local message, bytes
if mode == "function" then
  local b = block()
  local blocks = math.floor(tonumber(what) * 1024 * 1024 / #b)
  bytes = #HEAD + blocks * #b
  local i = -1
  message = function()
    i = i + 1
    if i == 0 then return HEAD end
    if i <= blocks then return b end
    return nil
  end
elseif mode == "file" then
  message = assert(io.open(what, "rb"))
  bytes = message:seek("end")
  message:seek("set", 0)
else
  error("mode: function or file")
end

local res, err = smtp.send {
  server = "127.0.0.1", port = port, tls = "none", helo = "client.test", message = message,
  from = "a@example.com", to = { "b@example.org" }, timeout = 120,
}
if io.type(message) == "file" then message:close() end
if res then
  print(("sent %d %d %s"):format(bytes, res.reply.code, res.reply.enhanced or "-"))
else
  print("failed " .. tostring(err))
end
local st = io.open("/proc/self/status"):read("*a")
print("hwm " .. st:match("VmHWM:%s*(%d+)"))
