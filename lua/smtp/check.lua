-- smtp.check: the input checks every module shares, one function per meaning, so the client, the
-- composer and the command line refuse and accept the same values for the same reasons.
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

local find, match, sub, gsub, byte = string.find, string.match, string.sub, string.gsub, string.byte

-- Any C0 control character or DEL: nothing that goes into a command line, a host name or an
-- address may hold one.
function M.has_ctl(s) return find(s, "[%z\1-\31\127]") ~= nil end

-- CR, LF or NUL: what would end or split a line. Header values (where a tab is legal) use this.
function M.breaks_line(s) return find(s, "[\r\n%z]") ~= nil end

M.has_8bit = core.has_8bit

local function invalid(what, text)
  return nil, errors.new { kind = "invalid", temporary = false, text = what and (what .. ": " .. text) or text }
end

-- UTF-8 as RFC 3629 has it: the C core's check (the server engine uses the same one).
local utf8_valid = core.utf8_valid

-- RFC 5322 atext, plus any UTF-8 byte (RFC 6531/6532).
local ATEXT = "^[%w!#$%%&'*+/=?^_`{|}~%-\128-\255]+$"

-- Addresses that passed, so a program sending many messages to the same few addresses checks
-- each once; emptied when it reaches CHECKED_MAX entries, so it stays small.
local checked, nchecked, CHECKED_MAX = {}, 0, 1024

-- An addr-spec as it goes between the angle brackets of MAIL FROM / RCPT TO and in a header
-- (RFC 5321 §4.1.2 Mailbox, with RFC 6531's UTF-8): a dot-string or quoted-string local part of at
-- most 64 octets, a domain of dot-separated labels or an address literal of at most 255, at most
-- 254 in all (a path is 256 with its brackets). -> true, needs_smtputf8 | nil, err.
-- `what` prefixes the error text ("to", "from"); `allow_null` accepts "" (the null sender).
function M.address(a, what, allow_null)
  local c = checked[a]
  if c ~= nil then return true, c end
  if type(a) ~= "string" then return invalid(what, "address must be a string") end
  if a == "" then
    if allow_null then return true, false end
    return invalid(what, "empty address")
  end
  if M.has_ctl(a) then return invalid(what, "control character (CR, LF, NUL, ...) in address") end
  if find(a, "[<>]") then return invalid(what, "'<' or '>' in address") end
  local at = match(a, "^.*()@")
  if not at or at == 1 or at == #a then return invalid(what, "not an address: " .. a) end
  local lp, domain = sub(a, 1, at - 1), sub(a, at + 1)
  if #lp > 64 then return invalid(what, "local part over 64 octets") end
  if #domain > 255 then return invalid(what, "domain over 255 octets") end
  if #a + 2 > 256 then return invalid(what, "path over 256 octets") end
  local utf8 = M.has_8bit(a)
  if utf8 and not utf8_valid(a) then return invalid(what, "address is not UTF-8") end
  local q = match(lp, '^"(.*)"$')
  if q then
    -- qtext and quoted pairs: printable ASCII (and UTF-8), '"' and '\' only escaped
    if find(gsub(q, "\\[ -~]", ""), '["\\]') then return invalid(what, "bad quoted local part: " .. a) end
  else
    if find(lp, "%s") then return invalid(what, "space in address") end
    for atom in (lp .. "."):gmatch("(.-)%.") do
      if not match(atom, ATEXT) then return invalid(what, "bad local part: " .. a) end
    end
  end
  if not match(domain, "^%[[^%[%]\\]+%]$") then
    if find(domain, "[%s\"\\]") then return invalid(what, "bad character in domain") end
    for label in (domain .. "."):gmatch("(.-)%.") do
      if not match(label, "^[%w%-\128-\255]+$") then return invalid(what, "bad domain: " .. a) end
    end
  end
  if nchecked >= CHECKED_MAX then checked, nchecked = {}, 0 end
  checked[a], nchecked = utf8, nchecked + 1
  return true, utf8
end

-- A host name or address literal as a client names itself (EHLO) or a server it connects to:
-- not empty, at most 255 octets, no control characters, spaces or angle brackets.
function M.hostname(h, what)
  if type(h) ~= "string" or h == "" then return invalid(what, "empty host name") end
  if #h > 255 or M.has_ctl(h) or find(h, "[%s<>]") then
    return invalid(what, "not a host name or address literal: " .. h)
  end
  return true
end

-- A name whose connections stay on this machine: where plaintext AUTH is allowed by default.
function M.is_loopback(h)
  if type(h) ~= "string" then return false end
  h = gsub(h, "^%[(.*)%]$", "%1"):lower()
  return h == "localhost" or match(h, "^127%.%d+%.%d+%.%d+$") ~= nil or h == "::1"
end

-- xtext (RFC 3461 §4) for ENVID and ORCPT: the C codec's, so there is one encoder.
M.xtext = core.xtext_encode

return M
