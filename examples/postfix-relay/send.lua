-- Hands messages to the local Postfix (docs/delivery.md; Postfix's settings are in main.cf here):
-- lua-smtp's part ends when Postfix answers "250 ... queued as ID"; from then on the message is
-- on Postfix's disk and Postfix retries, relays and bounces it. COUNT messages (default 1):
--   RELAY_HOST=127.0.0.1 RELAY_PORT=25 MAIL_FROM=app@example.com MAIL_TO=you@example.org lua send.lua
-- RELAY_CAFILE: the CA of Postfix's smtpd certificate, when it has one (STARTTLS is then required).
local smtp = require "smtp"
local message = require "smtp.message"

local n = tonumber(os.getenv("COUNT") or "1")
local cafile = os.getenv("RELAY_CAFILE")
local msgs = {}
for i = 1, n do
  msgs[i] = { message = assert(message.new {
    from = os.getenv("MAIL_FROM") or "app@example.com",
    to = { os.getenv("MAIL_TO") or "you@example.org" },
    subject = "Relayed " .. i,
    text = "Handed to the local Postfix, which relays it onward.\n",
  }) }
end

-- One session for all of them: the local MTA is the fast, always-there hop.
local conn, err = smtp.connect {
  server = os.getenv("RELAY_HOST") or "127.0.0.1",
  port = tonumber(os.getenv("RELAY_PORT") or "25"),
  -- loopback: STARTTLS when Postfix offers it, checked against RELAY_CAFILE when given
  tls = cafile and "starttls" or "opportunistic", cafile = cafile,
  helo = "app.example.com", timeout = 30,
}
if not conn then
  io.stderr:write("no connection to the local Postfix: ", tostring(err), "\n")
  os.exit(1)
end
local failed = 0
for i, res in ipairs(conn:send_many(msgs)) do
  if res.kind then
    failed = failed + 1
    io.stderr:write("message ", i, " not accepted: ", tostring(res), "\n")
  else
    print(("queued %s %s"):format(res.message_id, res.reply.text:match("queued as (%w+)") or res.reply.text))
  end
end
conn:close()
os.exit(failed == 0 and 0 or 1)
