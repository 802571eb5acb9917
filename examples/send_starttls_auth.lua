-- Sends one message with a UTF-8 subject, text, HTML and an attachment through a submission
-- server with STARTTLS (required, certificate verified) and AUTH.
--   SMTP_HOST=smtp.example.com SMTP_USER=me SMTP_PASSWORD=secret lua5.4 examples/send_starttls_auth.lua
-- SMTP_PORT (default 587), SMTP_CAFILE (default: the system trust store), FROM and TO override the
-- defaults. Against the sink of `make demo`-style tests: SMTP_HOST=localhost SMTP_PORT=2525 SMTP_CAFILE=ca.pem.
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local message = require "smtp.message"

local msg = assert(message.new {
  from = os.getenv("FROM") or "Alice Example <alice@example.com>",
  to = { os.getenv("TO") or "Bob <bob@example.org>" },
  subject = "Grüße aus Zürich ✉",
  text = "Hello Bob,\n\nthe report is attached.\n",
  html = "<p>Hello Bob,</p><p>the report is <b>attached</b>.</p>",
  attachments = { { filename = "report.csv", content = "day,total\r\nMon,42\r\n", content_type = "text/csv" } },
})

local res, err = smtp.send {
  server = os.getenv("SMTP_HOST") or "localhost",
  port = tonumber(os.getenv("SMTP_PORT") or "587"),
  tls = "starttls",
  cafile = os.getenv("SMTP_CAFILE"),
  auth = { user = os.getenv("SMTP_USER") or "demo", password = os.getenv("SMTP_PASSWORD") or "secret" },
  message = msg,
  timeout = { connect = 10, greeting = 30 },
}
if not res then
  io.stderr:write("not sent: ", tostring(err), "\n")
  os.exit(1)
end
print(("sent %s over %s: %d %s %s"):format(res.message_id, tostring(res.server.tls), res.reply.code,
  res.reply.enhanced or "", res.reply.text or ""))
for _, r in ipairs(res.rejected) do print("rejected", r.recipient, r.code, r.enhanced, r.text) end
