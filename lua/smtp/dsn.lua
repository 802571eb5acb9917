-- Delivery status notifications (RFC 3464, RFC 3462's multipart/report): the bounce and the
-- delayed-delivery warning the queue sends to an envelope sender. Pure Lua, no I/O: it returns the
-- message as a string for the queue to submit with the null sender.
local core = require "smtp.core"

local M = {}

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local h = f and f:read("l")
  if f then f:close() end
  return (h and h ~= "") and h or "localhost"
end

-- RFC 5322 date-time in UTC (the spool keeps epoch seconds; a zone would only add a question).
function M.date(t)
  return os.date("!%a, %d %b %Y %H:%M:%S +0000", math.floor(t))
end
local date = M.date

-- A reply text as a header value on one line: control characters would end the field or forge the
-- next one (a remote server writes these words).
local function one_line(s)
  return (tostring(s or ""):gsub("[%z\1-\31\127]+", " "))
end

-- "x.y.z" for a recipient: its enhanced code, else the class of its reply code, else `default`.
local function status_of(r, default)
  if r.status and r.status:match("^[245]%.%d+%.%d+$") then return r.status end
  if r.enhanced and r.enhanced:match("^[245]%.%d+%.%d+$") then return r.enhanced end
  if r.code and r.code >= 400 and r.code < 600 then return math.floor(r.code / 100) .. ".0.0" end
  return default
end

-- Final-Recipient's address type: rfc822 for an ASCII address, utf-8 for an internationalized
-- one (RFC 6533), since rfc822 allows ASCII only.
local function addr_field(a)
  if a:find("[\128-\255]") then return "utf-8; " .. a end
  return "rfc822; " .. a
end

-- The header section of a raw message (up to the empty line, at most `max` bytes), CRLF line ends.
function M.headers_of(raw, max)
  max = max or 65536
  local head = raw:sub(1, max)
  local e = head:find("\n\r?\n")
  if e then head = head:sub(1, e) end
  head = head:gsub("\r?\n", "\r\n")
  if head ~= "" and head:sub(-2) ~= "\r\n" then head = head .. "\r\n" end
  return head
end

local function wrap(s, width)
  local out, line = {}, ""
  for word in s:gmatch("%S+") do
    if #line > 0 and #line + 1 + #word > width then
      out[#out + 1] = line
      line = word
    else
      line = (#line > 0) and (line .. " " .. word) or word
    end
  end
  if #line > 0 then out[#out + 1] = line end
  return out
end

-- dsn.build(opts) -> message (a string with CRLF line ends)
--   opts.to          the envelope sender being told (required; never "")
--   opts.recipients  list of { recipient =, action = "failed" | "delayed", status = "x.y.z"?,
--                    code =, enhanced =, text =, remote_mta =, last_attempt = epoch,
--                    will_retry_until = epoch? }
--   opts.arrival     epoch seconds the message was accepted into the queue
--   opts.headers     the original message's header section (text/rfc822-headers)
--   opts.now         epoch seconds (default os.time())
--   opts.reporting_mta, opts.postmaster  this host's name, the From address
--   opts.envelope_id, opts.queue_id      Original-Envelope-Id, X-Postfix-style queue id field
function M.build(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'build' (table expected, got " .. type(opts) .. ")", 2) end
  if type(opts.to) ~= "string" or opts.to == "" then
    error("bad argument #1 to 'build' (option 'to': a non-empty address expected)", 2)
  end
  if type(opts.recipients) ~= "table" or #opts.recipients == 0 then
    error("bad argument #1 to 'build' (option 'recipients': a non-empty list expected)", 2)
  end
  local now = opts.now or os.time()
  local mta = one_line(opts.reporting_mta or hostname())
  local postmaster = opts.postmaster or ("MAILER-DAEMON@" .. mta)
  local delayed = true
  for _, r in ipairs(opts.recipients) do
    if r.action ~= "delayed" then delayed = false end
  end
  local boundary = "=_dsn_" .. (core.b64encode(core.random(18)):gsub("[+/=]", "x"))
  local subject = delayed and "Delayed Mail (still being retried)" or "Undelivered Mail Returned to Sender"

  local h = {
    "From: Mail Delivery System <" .. postmaster .. ">",
    "To: <" .. one_line(opts.to) .. ">",
    "Subject: " .. subject,
    "Date: " .. date(now),
    "Message-ID: <" .. (core.b64encode(core.random(12)):gsub("[+/=]", "x")) .. "." .. math.floor(now) .. "@" .. mta .. ">",
    "Auto-Submitted: auto-replied",
    "MIME-Version: 1.0",
    "Content-Type: multipart/report; report-type=delivery-status;",
    "\tboundary=\"" .. boundary .. "\"",
  }

  -- the part a person reads
  local text = {}
  local intro = delayed
    and ("This is the mail system at " .. mta .. ". Your message could not be delivered yet to the recipients below; it will be retried.")
    or ("This is the mail system at " .. mta .. ". Your message could not be delivered to the recipients below. This is a permanent error; the message will not be retried.")
  for _, l in ipairs(wrap(intro, 72)) do text[#text + 1] = l end
  text[#text + 1] = ""
  for _, r in ipairs(opts.recipients) do
    local why = one_line(r.text or "")
    if r.code then why = r.code .. (r.enhanced and (" " .. r.enhanced) or "") .. " " .. why end
    text[#text + 1] = "<" .. one_line(r.recipient) .. ">: " .. (r.remote_mta and ("host " .. one_line(r.remote_mta) .. " said: ") or "") .. why
    if r.will_retry_until then text[#text + 1] = "  (retried until " .. date(r.will_retry_until) .. ")" end
  end

  -- the machine-readable part (RFC 3464 §2.2, §2.3)
  local st = { "Reporting-MTA: dns; " .. mta }
  if opts.envelope_id then st[#st + 1] = "Original-Envelope-Id: " .. one_line(opts.envelope_id) end
  if opts.queue_id then st[#st + 1] = "X-Queue-ID: " .. one_line(opts.queue_id) end
  if opts.arrival then st[#st + 1] = "Arrival-Date: " .. date(opts.arrival) end
  for _, r in ipairs(opts.recipients) do
    st[#st + 1] = ""
    st[#st + 1] = "Final-Recipient: " .. addr_field(one_line(r.recipient))
    st[#st + 1] = "Action: " .. (r.action == "delayed" and "delayed" or "failed")
    st[#st + 1] = "Status: " .. status_of(r, r.action == "delayed" and "4.0.0" or "5.0.0")
    if r.remote_mta then st[#st + 1] = "Remote-MTA: dns; " .. one_line(r.remote_mta) end
    if r.code then
      st[#st + 1] = "Diagnostic-Code: smtp; " .. r.code .. (r.enhanced and (" " .. r.enhanced) or "")
        .. (r.text and r.text ~= "" and (" " .. one_line(r.text)) or "")
    elseif r.text then
      st[#st + 1] = "Diagnostic-Code: X-lua-smtp; " .. one_line(r.text)
    end
    if r.last_attempt then st[#st + 1] = "Last-Attempt-Date: " .. date(r.last_attempt) end
    if r.will_retry_until then st[#st + 1] = "Will-Retry-Until: " .. date(r.will_retry_until) end
  end

  local b = "--" .. boundary
  local out = {
    table.concat(h, "\r\n"), "",
    "This is a MIME-encapsulated delivery status notification.", "",
    b, "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "",
    table.concat(text, "\r\n"), "",
    b, "Content-Type: message/delivery-status", "",
    table.concat(st, "\r\n"), "",
    b, "Content-Type: text/rfc822-headers", "",
    (M.headers_of(opts.headers or "")):gsub("\r\n$", ""), "",
    b .. "--", "",
  }
  return table.concat(out, "\r\n")
end

return M
