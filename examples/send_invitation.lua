-- Sends a meeting invitation that Outlook, Gmail and Apple Mail show with Accept / Decline: the
-- iCalendar text goes in as text/calendar; method=REQUEST and as invite.ics. The invitee's domain
-- is international (sent as its A-label), and the message carries a one-click unsubscribe link.
--   SMTP_HOST=smtp.example.com SMTP_USER=me SMTP_PASSWORD=secret lua5.4 examples/send_invitation.lua
-- SMTP_PORT (default 587), SMTP_CAFILE (default: the system trust store), FROM and TO override the
-- defaults.
if not pcall(require, "smtp.core") then -- run from a checkout: its modules and build
  local top = (arg and arg[0] or "./x"):gsub("[^/]*$", "") .. ".."
  package.path = top .. "/lua/?.lua;" .. top .. "/lua/?/init.lua;" .. package.path
  package.cpath = top .. "/build/" .. (jit and "luajit" or "lua" .. _VERSION:match("%d+%.%d+")) .. "/?.so;" .. package.cpath
end
local smtp = require "smtp"
local message = require "smtp.message"

local from = os.getenv("FROM") or "alice@example.com"
local to = os.getenv("TO") or "bob@bücher.example"
-- The caller writes the event; lua-smtp checks it (VCALENDAR, METHOD), makes line ends CRLF and
-- folds lines over 75 octets.
local ics = table.concat({
  "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//Example//Planner//EN", "METHOD:REQUEST",
  "BEGIN:VEVENT",
  "UID:design-review-2024-01-02@example.com",
  "DTSTAMP:20240101T120000Z", "DTSTART:20240102T100000Z", "DTEND:20240102T110000Z",
  "SUMMARY:Design review: the new delivery pipeline, its queue and its retry policy",
  "LOCATION:Room Ödön, 3rd floor",
  "ORGANIZER;CN=Alice:mailto:" .. from,
  "ATTENDEE;CN=Bob;ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:" .. to,
  "SEQUENCE:0", "STATUS:CONFIRMED",
  "END:VEVENT", "END:VCALENDAR" }, "\n")

local msg = assert(message.new {
  from = "Alice <" .. from .. ">", to = to,
  subject = "Invitation: Design review, Tue 2 Jan 10:00 UTC",
  message_id = "design-review-2024-01-02.invite@example.com",
  text = "You are invited to the design review on Tuesday, 2 January, 10:00-11:00 UTC.\n",
  html = "<p>You are invited to the <b>design review</b> on Tuesday, 2 January, 10:00-11:00 UTC.</p>",
  calendar = ics,
  list = { id = "Team calendar <calendar.example.com>",
           unsubscribe = { url = "https://example.com/unsubscribe?list=calendar",
                           mailto = "mailto:unsubscribe@example.com?subject=calendar" } },
})

local res, err = smtp.send {
  server = os.getenv("SMTP_HOST") or "localhost",
  port = tonumber(os.getenv("SMTP_PORT") or "587"),
  cafile = os.getenv("SMTP_CAFILE"),
  auth = { user = os.getenv("SMTP_USER") or "demo", password = os.getenv("SMTP_PASSWORD") or "secret" },
  message = msg,
  timeout = { connect = 10, greeting = 30 },
}
if not res then
  io.stderr:write("not sent: ", tostring(err), "\n")
  os.exit(1)
end
print(("sent %s to %s: %d %s %s"):format(res.message_id, table.concat(res.accepted, ", "), res.reply.code,
  res.reply.enhanced or "", res.reply.text or ""))
