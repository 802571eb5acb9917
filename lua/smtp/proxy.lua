-- smtp.proxy: the client side of a SOCKS5 (RFC 1928, RFC 1929 user/password) or HTTP CONNECT
-- (RFC 9110 §9.3.6) handshake as a sans-I/O object: bytes out, bytes in, done or an error. The
-- transport moves the bytes and owns the deadline. It never asks for more bytes than the proxy's
-- reply can still hold, so nothing the server sends after it (an SMTP greeting) is read here: the
-- transport keeps no buffer to hand such bytes on.
local errors = require "smtp.errors"
local b64encode = require("smtp.core").b64encode

local M = {}

local char, byte, sub, find, match, format, concat = string.char, string.byte, string.sub,
  string.find, string.match, string.format, table.concat
local floor = math.floor

-- RFC 1928 §6 replies: the text, and whether another try may work.
local SOCKS_REPLY = {
  [1] = { "general SOCKS server failure", true },
  [2] = { "connection not allowed by ruleset", false },
  [3] = { "network unreachable", true },
  [4] = { "host unreachable", true },
  [5] = { "connection refused", true },
  [6] = { "TTL expired", true },
  [7] = { "command not supported", false },
  [8] = { "address type not supported", false },
}

-- The longest HTTP response head taken from a proxy before giving up on it.
M.MAX_HTTP_HEAD = 16384

local H = {}
H.__index = H
H.__name = "smtp.proxy.handshake"

local function ipv4_bytes(s)
  local a, b, c, d = match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  return char(tonumber(a), tonumber(b), tonumber(c), tonumber(d))
end

-- "2001:db8::1" -> 16 bytes (an embedded IPv4 tail allowed) | nil
local function ipv6_bytes(s)
  local v4tail = match(s, ":(%d+%.%d+%.%d+%.%d+)$")
  local tail = ""
  if v4tail then
    local b = ipv4_bytes(v4tail)
    if not b then return nil end
    tail = b
    s = sub(s, 1, #s - #v4tail) .. "0:0"
  end
  local head, rest = match(s, "^(.-)::(.*)$")
  local function groups(part)
    local out = {}
    if part == "" then return out end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not match(g, "^%x%x?%x?%x?$") then return nil end
      out[#out + 1] = tonumber(g, 16)
    end
    return out
  end
  local left, right
  if head then left, right = groups(head), groups(rest) else left, right = groups(s), {} end
  if not left or not right then return nil end
  local n = #left + #right
  if (head and n > 7) or (not head and n ~= 8) then return nil end
  local all = {}
  for _, g in ipairs(left) do all[#all + 1] = g end
  for _ = 1, 8 - n do all[#all + 1] = 0 end
  for _, g in ipairs(right) do all[#all + 1] = g end
  local b = {}
  for i, g in ipairs(all) do b[i] = char(floor(g / 256), g % 256) end
  local out = concat(b)
  if v4tail then out = sub(out, 1, 12) .. tail end
  return out
end

function H:fail(text, temporary, extra)
  self.failed = true
  local t = extra or {}
  t.kind, t.phase, t.temporary = "proxy", "connect", temporary == true
  t.text = format("proxy %s port %d: %s", self.where, self.proxy.port, text)
  t.proxy = self.where .. ":" .. self.proxy.port
  return nil, errors.new(t)
end

-- Bytes to write now (the caller writes all of them before reading), or nil.
function H:output()
  local o = self.out
  self.out = nil
  return o
end

-- How many bytes the proxy's reply may still hold: read at most this many. 0 once done.
function H:want()
  if self.done or self.failed then return 0 end
  return self.need
end

-- socks5 -----------------------------------------------------------------------------------

local function socks_request(self)
  local host, atyp, addr = self.host, nil, nil
  addr = ipv4_bytes(host)
  if addr then atyp = 1 else
    addr = host:find(":", 1, true) and ipv6_bytes(host)
    if addr then atyp = 4 else atyp, addr = 3, char(#host) .. host end
  end
  self.out = "\5\1\0" .. char(atyp) .. addr .. char(floor(self.port / 256), self.port % 256)
  self.state, self.need, self.buf = "reply", 5, ""
end

local socks = {}

function socks.method(self, data)
  if byte(data, 1) ~= 5 then return self:fail("not a SOCKS5 proxy (its first reply is not version 5)", false) end
  local m = byte(data, 2)
  if m == 0 then socks_request(self); return true end
  if m == 2 and self.proxy.user then
    local u, p = self.proxy.user, self.proxy.password
    self.out = "\1" .. char(#u) .. u .. char(#p) .. p
    self.state, self.need = "auth", 2
    return true
  end
  if m == 255 or m == 2 then
    if self.proxy.user then
      return self:fail("accepts none of our authentication methods", false)
    end
    return self:fail("requires authentication (give a user name and password in the proxy URL)", false)
  end
  return self:fail(format("chose an authentication method we did not offer (%d)", m), false)
end

function socks.auth(self, data)
  if byte(data, 2) ~= 0 then
    return self:fail("refused the user name and password (RFC 1929 status " .. byte(data, 2) .. ")", false)
  end
  socks_request(self)
  return true
end

function socks.reply(self, data)
  self.buf = self.buf .. data
  if #self.buf < 5 then self.need = 5 - #self.buf; return true end
  local ver, rep, atyp = byte(self.buf, 1), byte(self.buf, 2), byte(self.buf, 4)
  if ver ~= 5 then return self:fail("sent no SOCKS5 reply (version " .. ver .. ")", false) end
  if rep ~= 0 then
    local r = SOCKS_REPLY[rep] or { "unknown SOCKS5 reply", true }
    return self:fail(format("could not connect to %s port %d: %s (SOCKS5 reply %d)",
      self.shown, self.port, r[1], rep), r[2], { proxy_code = rep })
  end
  local total
  if atyp == 1 then total = 4 + 4 + 2
  elseif atyp == 4 then total = 4 + 16 + 2
  elseif atyp == 3 then total = 4 + 1 + byte(self.buf, 5) + 2
  else return self:fail("sent a SOCKS5 reply with an unknown address type " .. atyp, false) end
  if #self.buf >= total then
    self.done, self.buf = true, nil
  else
    self.need = total - #self.buf
  end
  return true
end

-- http CONNECT -----------------------------------------------------------------------------

-- Up to 4 bytes may complete the "\r\n\r\n" that ends the head; fewer when its start is there.
local function head_need(buf)
  if sub(buf, -3) == "\r\n\r" then return 1 end
  if sub(buf, -2) == "\r\n" then return 2 end
  if sub(buf, -1) == "\r" then return 3 end
  return 4
end

local http = {}

function http.head(self, data)
  self.buf = self.buf .. data
  if #self.buf > M.MAX_HTTP_HEAD then return self:fail("sent an HTTP reply head over 16 KB", false) end
  if not find(self.buf, "\r\n\r\n", 1, true) then
    self.need = head_need(self.buf)
    return true
  end
  local status, reason = match(self.buf, "^HTTP/1%.[01] (%d%d%d) ?([^\r\n]*)\r\n")
  if not status then return self:fail("sent no HTTP reply to CONNECT", false) end
  status = tonumber(status)
  self.buf = nil
  if status >= 200 and status < 300 then self.done = true; return true end
  -- The proxy's own words, shown: printable ASCII, and not too many.
  reason = reason:gsub("[^ -~]", "?"):sub(1, 100)
  local said = format("HTTP %d %s", status, reason):gsub(" $", "")
  -- 407 is the standard answer; tinyproxy says 401 to credentials it does not take
  if status == 407 or (status == 401 and self.proxy.user) then
    if self.proxy.user then
      return self:fail("refused the user name and password (" .. said .. ")", false, { proxy_code = status })
    end
    return self:fail("requires authentication (" .. said .. "; give a user name and password in the proxy URL)",
      false, { proxy_code = status })
  end
  return self:fail(format("refused to connect to %s port %d (%s)", self.shown, self.port, said),
    status >= 500, { proxy_code = status })
end

-- M.new(proxy, host, port) -> handshake | nil, err. `proxy` is a url.proxy table; `host` the server's name or
-- numeric address (an IPv6 address without brackets).
function M.new(proxy, host, port)
  local self = setmetatable({ proxy = proxy, host = host, port = port, done = false, failed = false,
    buf = "", where = proxy.host, shown = host }, H)
  if proxy.kind == "socks5" then
    if #host > 255 then return self:fail("a host name over 255 bytes cannot go through SOCKS5", false) end
    self.handler = socks
    self.out = proxy.user and "\5\2\0\2" or "\5\1\0"
    self.state, self.need = "method", 2
  else
    self.handler = http
    local target = host:find(":", 1, true) and ("[" .. host .. "]:" .. port) or (host .. ":" .. port)
    local lines = { "CONNECT " .. target .. " HTTP/1.1", "Host: " .. target }
    if proxy.user then
      lines[#lines + 1] = "Proxy-Authorization: Basic " .. b64encode(proxy.user .. ":" .. proxy.password)
    end
    lines[#lines + 1] = "\r\n"
    self.out = concat(lines, "\r\n")
    self.state, self.need = "head", 4
  end
  return self
end

-- h:feed(data) -> true | nil, err: a reply's bytes (at most want() of them).
function H:feed(data)
  if self.failed or self.done then error("proxy handshake: feed after the end", 2) end
  if #data > self.need then error("proxy handshake: more bytes than asked for", 2) end
  if self.handler == socks and self.state ~= "reply" then
    self.buf = self.buf .. data
    self.need = self.need - #data
    if self.need > 0 then return true end
    local whole = self.buf
    self.buf = ""
    return socks[self.state](self, whole)
  end
  return self.handler[self.state](self, data)
end

-- Why a proxy connection ended before the handshake was done.
function H:closed()
  return self:fail(format("closed the connection during the %s handshake",
    self.proxy.kind == "socks5" and "SOCKS5" or "HTTP CONNECT"), true)
end

return M
