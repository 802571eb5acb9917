-- smtp.cidr: lists of trusted addresses and networks ("127.0.0.1", "10.0.0.0/8", "2001:db8::/32")
-- for the server's PROXY protocol and XCLIENT peers; an IPv4-mapped IPv6 peer matches as IPv4.
local M = {}

local util = require "smtp.dnsutil"

-- The address as a string of 4 or 16 bytes, or nil when it is not one; a zone ("%eth0") is
-- ignored and an IPv4-mapped IPv6 address is the IPv4 address it carries.
local function bytes(ip)
  if type(ip) ~= "string" then return nil end
  local s = util.ip_bytes((ip:gsub("%%.*$", "")))
  -- ::ffff:a.b.c.d is the IPv4 host a.b.c.d
  if s and #s == 16 and s:sub(1, 12) == ("\0"):rep(10) .. "\255\255" then return s:sub(13) end
  return s
end
M.bytes = bytes

local function prefix_match(a, net, bits)
  local whole = math.floor(bits / 8)
  if a:sub(1, whole) ~= net:sub(1, whole) then return false end
  local rest = bits % 8
  if rest == 0 then return true end
  local d = 2 ^ (8 - rest) -- no bit operators on LuaJIT
  return math.floor(a:byte(whole + 1) / d) == math.floor(net:byte(whole + 1) / d)
end

-- cidr.list(t) -> matcher | nil, why: t a list of addresses and networks.
function M.list(t)
  if type(t) ~= "table" then return nil, "a list of addresses expected" end
  local nets = {}
  for i, v in ipairs(t) do
    if type(v) ~= "string" then return nil, "entry " .. i .. ": string expected" end
    local ip, bits = v:match("^(.-)/(%d+)$")
    ip = ip or v
    local b = bytes(ip)
    if not b then return nil, "entry " .. i .. ": not an address or network: " .. v end
    bits = bits and tonumber(bits) or #b * 8
    -- an IPv4-mapped network is written with IPv6 prefix lengths
    if #b == 4 and ip:find(":", 1, true) and v:find("/", 1, true) then bits = bits - 96 end
    if bits < 0 or bits > #b * 8 then return nil, "entry " .. i .. ": prefix length out of range: " .. v end
    nets[#nets + 1] = { b, bits }
  end
  return function(ip)
    local a = bytes(ip)
    if not a then return false end
    for _, n in ipairs(nets) do
      if #n[1] == #a and prefix_match(a, n[1], n[2]) then return true end
    end
    return false
  end
end

return M
