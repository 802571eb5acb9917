-- smtp.cidr: lists of trusted addresses and networks ("127.0.0.1", "10.0.0.0/8", "2001:db8::/32")
-- for the server's PROXY protocol and XCLIENT peers; an IPv4-mapped IPv6 peer matches as IPv4.
local M = {}

-- The address as a string of 4 or 16 bytes, or nil when it is not one.
local function bytes(ip)
  if type(ip) ~= "string" then return nil end
  ip = ip:gsub("%%.*$", "")
  local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
    return string.char(a, b, c, d)
  end
  if not ip:find(":", 1, true) or ip:find("[^%x:%.]") then return nil end
  -- an IPv4 tail counts as two groups
  local head, v4 = ip:match("^(.*:)(%d+%.%d+%.%d+%.%d+)$")
  local tail = ""
  if head then
    local t = bytes(v4)
    if not t then return nil end
    tail = t
    ip = head:sub(-2) == "::" and head or head:sub(1, -2)
  end
  local want = (16 - #tail) / 2
  local left, right = ip:match("^(.-)::(.*)$")
  local groups = {}
  local function add(part)
    if part == "" then return true end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if g == "" or #g > 4 then return false end
      groups[#groups + 1] = tonumber(g, 16)
    end
    return true
  end
  if left then
    if right:find("::", 1, true) or not add(left) then return nil end
    local nl = #groups
    if not add(right) then return nil end
    local nr = #groups - nl
    if nl + nr >= want then return nil end
    for i = #groups, nl + 1, -1 do groups[i + want - nl - nr] = groups[i] end
    for i = nl + 1, want - nr do groups[i] = 0 end
  elseif not add(ip) or #groups ~= want then
    return nil
  end
  local out = {}
  for i = 1, want do out[i] = string.char(math.floor(groups[i] / 256), groups[i] % 256) end
  local s = table.concat(out) .. tail
  -- ::ffff:a.b.c.d is the IPv4 host a.b.c.d
  if s:sub(1, 12) == ("\0"):rep(10) .. "\255\255" then return s:sub(13) end
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
