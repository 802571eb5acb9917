-- `lua-smtp mx DOMAIN [--nameserver HOST[:PORT]]... [--timeout S] [--tls]`: prints the MX hosts of a
-- domain in the order direct delivery would try them, one line each: preference, host, addresses;
-- with --tls also the policies that would secure delivery to them (lines "dane: ...").
local args_mod = require "smtp.cli.args"

local M = {}

local usage = [==[
usage: lua-smtp mx DOMAIN [--nameserver HOST[:PORT]]... [--timeout SECONDS] [--tls]
Prints the MX hosts of DOMAIN in delivery order: preference, host name, addresses.
--tls adds lines "dane: ..." with each host's TLSA records and DANE state (the resolver must be
a DNSSEC-validating one on loopback for any answer to count as validated).
--nameserver asks that server (an IP address, port 53 unless given; repeat for more)
instead of the system's resolver.]==]

function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local domain, servers, timeout, tls = nil, nil, nil, false
  local i = 1
  while i <= #args do
    local a = args[i]
    local v = a:match("^%-%-nameserver=(.*)$")
    if a == "--nameserver" then v = args[i + 1]; i = i + 1 end
    local t = a:match("^%-%-timeout=(.*)$")
    if a == "--timeout" then t = args[i + 1]; i = i + 1 end
    if a == "--tls" then
      tls = true
    elseif a == "-h" or a == "--help" then
      out:write(usage, "\n")
      return 0
    elseif v then
      servers = servers or {}
      local ok, why = args_mod.add_nameserver(servers, v)
      if not ok then
        err:write("lua-smtp mx: ", why, "\n", usage, "\n")
        return 2
      end
    elseif t then
      local why
      timeout, why = args_mod.timeout(t)
      if not timeout then
        err:write("lua-smtp mx: ", why, "\n", usage, "\n")
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
  if tls then
    local domain_name = require("smtp.dns").normalize(domain) or domain
    local policy = require("smtp.dane").domain(domain_name, res, { mode = "opportunistic",
      nameservers = servers, timeout = timeout })
    for _, l in ipairs(policy:describe(res)) do out:write("dane: ", l, "\n") end
  end
  return 0
end

return M
