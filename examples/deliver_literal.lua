-- Direct delivery without a smarthost: smtp.deliver looks up each recipient domain's MX hosts;
-- an address literal (user@[127.0.0.1]) goes straight to that address. Results are per recipient:
-- sent, failed (permanent) or deferred (try again later).
--   lua5.4 examples/deliver_literal.lua [PORT]        (or SMTP_PORT; default 25)
-- Against a local sink: lua-smtp sink --listen 127.0.0.1:2525 & lua5.4 examples/deliver_literal.lua 2525
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local message = require "smtp.message"

local port = tonumber(arg and arg[1] or os.getenv("SMTP_PORT") or "25")
local host = os.getenv("SMTP_HOST") or "127.0.0.1"
local msg = assert(message.new {
  from = "cron@example.com",
  to = { "ops@[" .. host .. "]", "backup@[" .. host .. "]" },
  subject = "nightly job finished", text = "All good.\n",
})
local results, err = smtp.deliver {
  message = msg, helo = "client.example.com", port = port,
  tls = "opportunistic",   -- STARTTLS when offered, without certificate checks, as MTAs do
  timeout = 20,
  -- This example delivers to this machine, which smtp.deliver refuses by default (recipient
  -- domains may come from users); a program delivering for others leaves this out.
  destinations = "any",
}
if not results then io.stderr:write("invalid: ", tostring(err), "\n"); os.exit(2) end
local status = 0
for _, r in ipairs(results) do
  print(("%s: %s %s %s %s (host %s, address %s)"):format(r.recipient, r.status, tostring(r.code),
    r.enhanced or "", r.text or "", tostring(r.host), tostring(r.address)))
  if r.status ~= "sent" then status = 1 end
end
os.exit(status)
