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
-- each once; emptied when it reaches CHECKED_MAX entries, so it stays small. `wires` holds the
-- form sent for those whose domain is international (the others go as they are).
local checked, wires, nchecked, CHECKED_MAX = {}, {}, 0, 1024

-- A domain that is not ASCII -> its A-label form (IDNA2008, UTS #46 non-transitional mapping,
-- through libidn2), or nil, why. Mail goes to the domain the A-label names: a server without
-- SMTPUTF8 and every DNS resolver understand it.
local idna_to_ascii = core.idna_to_ascii
function M.idna_domain(domain)
  local ascii, why = idna_to_ascii(domain)
  if not ascii then return nil, why end
  return ascii
end

-- An addr-spec as it goes between the angle brackets of MAIL FROM / RCPT TO and in a header
-- (RFC 5321 §4.1.2 Mailbox, with RFC 6531's UTF-8): a dot-string or quoted-string local part of at
-- most 64 octets, a domain of dot-separated labels or an address literal of at most 255, at most
-- 254 in all (a path is 256 with its brackets). -> true, needs_smtputf8, wire | nil, err.
-- `what` prefixes the error text ("to", "from"); `allow_null` accepts "" (the null sender).
-- A domain that is not ASCII must be a valid international domain name. The third value is the
-- address as it goes on the wire: with an ASCII local part such a domain becomes its A-label, so
-- SMTPUTF8 is needed only when the local part is not ASCII (and then the address goes as given).
function M.address(a, what, allow_null)
  local c = checked[a]
  if c ~= nil then return true, c, wires[a] or a end
  if type(a) ~= "string" then return invalid(what, "address must be a string") end
  if a == "" then
    if allow_null then return true, false, "" end
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
  local wire
  if not match(domain, "^%[[^%[%]\\]+%]$") then
    if find(domain, "[%s\"\\]") then return invalid(what, "bad character in domain") end
    for label in (domain .. "."):gmatch("(.-)%.") do
      if not match(label, "^[%w%-\128-\255]+$") then return invalid(what, "bad domain: " .. a) end
    end
    if M.has_8bit(domain) then
      local ascii, why = M.idna_domain(domain)
      if not ascii then return invalid(what, "bad international domain name in " .. a .. ": " .. why) end
      if not M.has_8bit(lp) then
        -- an ASCII local part: the A-label makes the whole address ASCII, no SMTPUTF8 needed.
        -- Otherwise SMTPUTF8 is needed anyway and the address goes as written (RFC 6531).
        wire = lp .. "@" .. ascii
        if #ascii > 255 then return invalid(what, "domain over 255 octets as an A-label: " .. a) end
        if #wire + 2 > 256 then return invalid(what, "path over 256 octets with the domain as an A-label: " .. a) end
        utf8 = false
      end
    end
  end
  if nchecked >= CHECKED_MAX then checked, wires, nchecked = {}, {}, 0 end
  checked[a], nchecked = utf8, nchecked + 1
  wires[a] = wire
  return true, utf8, wire or a
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
