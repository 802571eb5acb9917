-- Option values shared by the lua-smtp commands (`send`, `mx`): checked here once, so both
-- commands accept the same spellings and refuse bad ones with the same words, before any
-- connection or query is made.
local util = require "smtp.dnsutil"

local M = {}

-- The resolver takes at most this many name servers (csrc/dns.c).
M.max_nameservers = 8

-- One --nameserver value, HOST[:PORT] where HOST is an IP address (the resolver asks servers by
-- address: naming one by a name would need a resolver first): "192.0.2.1", "192.0.2.1:5353",
-- "::1", "[::1]", "[::1]:5353". Returns the value as the resolver takes it ("ip" or "ip:port",
-- IPv6 with a port in brackets) | nil, reason.
function M.nameserver(v)
  if type(v) ~= "string" or v == "" then return nil, "an IP address expected" end
  if v:find(",", 1, true) then return nil, "one address per --nameserver (repeat the option)" end
  local host, port = v:match("^%[(.+)%]:(%d+)$")
  if host then
    if not util.is_ipv6(host) then return nil, "not an IPv6 address in brackets" end
  else
    host = v:match("^%[(.+)%]$")
    if host then
      if not util.is_ipv6(host) then return nil, "not an IPv6 address in brackets" end
    elseif util.is_ipv6(v) then
      host = v
    else
      host, port = v:match("^([^:]+):(%d+)$")
      host = host or v
      if not util.is_ipv4(host) then return nil, "HOST must be an IP address" end
    end
  end
  if port then
    local n = tonumber(port)
    if #port > 5 or n < 1 or n > 65535 then return nil, "port must be 1 to 65535" end
    return (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. n
  end
  return host
end

-- Appends the checked --nameserver value `v` to `list`: true | nil, message for the user.
function M.add_nameserver(list, v)
  local ns, why = M.nameserver(v)
  if not ns then return nil, "bad --nameserver '" .. tostring(v) .. "': " .. why end
  if #list >= M.max_nameservers then
    return nil, "at most " .. M.max_nameservers .. " --nameserver options"
  end
  list[#list + 1] = ns
  return true
end

-- A --timeout value: seconds > 0 | nil, message for the user.
function M.timeout(v)
  local t = tonumber(v)
  if not t or t <= 0 or t ~= t then return nil, "bad --timeout '" .. tostring(v) .. "'" end
  return t
end

return M
