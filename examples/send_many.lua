-- Many messages over one session: smtp.connect once, then conn:send_many (with PIPELINING each
-- message costs one round trip). A refused recipient is a result, the session goes on.
--   SMTP_HOST=localhost SMTP_PORT=2525 SMTP_CAFILE=ca.pem SMTP_USER=demo SMTP_PASSWORD=secret \
--     lua5.4 examples/send_many.lua [COUNT]
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local message = require "smtp.message"

local count = tonumber(arg and arg[1] or "") or 5
local user = os.getenv("SMTP_USER")
local conn, err = smtp.connect {
  server = os.getenv("SMTP_HOST") or "localhost",
  port = tonumber(os.getenv("SMTP_PORT") or "587"),
  cafile = os.getenv("SMTP_CAFILE"),
  auth = user and { user = user, password = os.getenv("SMTP_PASSWORD") or "" } or nil,
  timeout = 30,
}
if not conn then io.stderr:write("no session: ", tostring(err), "\n"); os.exit(1) end
print("session: " .. tostring(conn:info().tls) .. ", extensions: " ..
  (conn:extensions().PIPELINING and "PIPELINING " or "") .. (conn:extensions().CHUNKING and "CHUNKING" or ""))

local list = {}
for i = 1, count do
  list[i] = { message = assert(message.new {
    from = "newsletter@example.com", to = { ("reader%d@example.org"):format(i) },
    subject = ("Issue %d"):format(i), text = ("This is message %d of %d.\n"):format(i, count),
  }) }
end
local failed = 0
for i, r in ipairs(conn:send_many(list)) do
  if r.accepted then
    print(("%d: %s %d %s"):format(i, r.accepted[1], r.reply.code, r.reply.text or ""))
  else
    failed = failed + 1
    print(("%d: failed: %s"):format(i, tostring(r)))
  end
end
conn:close()
os.exit(failed == 0 and 0 or 1)
