-- `lua-smtp mx DOMAIN [--nameserver HOST:PORT]... [--timeout S]`: prints the MX hosts of a domain in
-- the order direct delivery would try them, one line each: preference, host, addresses.
local M = {}

local usage = [[
usage: lua-smtp mx DOMAIN [--nameserver HOST:PORT]... [--timeout SECONDS]
Prints the MX hosts of DOMAIN in delivery order: preference, host name, addresses.]]

function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local domain, servers, timeout = nil, nil, nil
  local i = 1
  while i <= #args do
    local a = args[i]
    local v = a:match("^%-%-nameserver=(.*)$")
    if a == "--nameserver" then v = args[i + 1]; i = i + 1 end
    local t = a:match("^%-%-timeout=(.*)$")
    if a == "--timeout" then t = args[i + 1]; i = i + 1 end
    if a == "-h" or a == "--help" then
      out:write(usage, "\n")
      return 0
    elseif v then
      servers = servers or {}
      servers[#servers + 1] = v
    elseif t then
      timeout = tonumber(t)
      if not timeout or timeout <= 0 then
        err:write("lua-smtp mx: bad --timeout '", tostring(t), "'\n", usage, "\n")
        return 2
      end
    elseif a:sub(1, 1) == "-" or domain then
      err:write("lua-smtp mx: unexpected argument '", a, "'\n", usage, "\n")
      return 2
    else
      domain = a
    end
    i = i + 1
  end
  if not domain or (servers and #servers == 0) then
    err:write(usage, "\n")
    return 2
  end
  local mx = require "smtp.mx"
  local ok, res, e = pcall(mx.lookup, domain, { nameservers = servers, timeout = timeout })
  if not ok then
    err:write("lua-smtp mx: ", tostring(res), "\n")
    return 2
  end
  if not res then
    err:write("lua-smtp mx: ", tostring(e), "\n")
    return (e.kind == "invalid") and 2 or 1
  end
  for _, h in ipairs(res) do
    out:write(("%d %s%s %s\n"):format(h.preference, h.host, h.implicit and " (implicit)" or "",
      table.concat(h.addresses, " ")))
  end
  return 0
end

return M
