-- smtp.received: the Received header a receiving server prepends (RFC 5321 4.4), in the shape
-- Postfix writes it, so tools that parse Postfix's headers read ours.
local message = require "smtp.message"

local M = {}

-- RFC 3848's protocol words: ESMTP (LMTP for an LMTP server), plus S with TLS, plus A after AUTH;
-- plain SMTP after HELO.
local function protocol(f)
  if not f.esmtp and not f.lmtp then return "SMTP" end
  return (f.lmtp and "LMTP" or "ESMTP") .. (f.tls and "S" or "") .. (f.user and "A" or "")
end
M.protocol = protocol

-- A name or address taken from the client goes into a comment or a domain slot: only printable
-- ASCII without the characters that would end or nest them.
local function clean(s)
  return (tostring(s):gsub("[^%w%.%-%:%[%]_@]", "?"))
end

-- received.header{ helo=, name=, address=, tls = { version=, cipher=, bits= } | nil, user=,
--   esmtp=, lmtp=, by=, id=, rcpt=, time= } -> "Received: ...\r\n" (folded lines, CRLF). `name` is the
-- client's host name when known ("unknown" otherwise, as Postfix writes without reverse DNS);
-- `rcpt` is written as "for <rcpt>" (Postfix names the recipient only when there is one).
function M.header(f)
  local addr = tostring(f.address or "unknown")
  if addr:find(":", 1, true) then addr = "IPv6:" .. addr end
  local lines = { ("Received: from %s (%s [%s])"):format(clean(f.helo or "unknown"), clean(f.name or "unknown"),
    clean(addr)) }
  -- a Unix socket's client has no address to show (the server's sessions say "unix")
  if addr == "unix" then lines[1] = ("Received: from %s"):format(clean(f.helo or "unknown")) end
  if f.tls then
    local bits = tonumber(f.tls.bits)
    lines[#lines + 1] = ("\t(using %s with cipher %s (%s bits))"):format(clean(f.tls.version or "TLS"),
      clean(f.tls.cipher or "unknown"), bits and ("%d/%d"):format(bits, bits) or "?")
    lines[#lines + 1] = "\t(No client certificate requested)"
  end
  lines[#lines + 1] = ("\tby %s (lua-smtp) with %s id %s"):format(clean(f.by or "localhost"), protocol(f),
    clean(f.id or "unknown"))
  local date = message.date(f.time or os.time())
  if f.rcpt then
    lines[#lines + 1] = ("\tfor <%s>; %s"):format((tostring(f.rcpt):gsub("[%c<>]", "?")), date)
  else
    lines[#lines] = lines[#lines] .. "; " .. date
  end
  return table.concat(lines, "\r\n") .. "\r\n"
end

return M
