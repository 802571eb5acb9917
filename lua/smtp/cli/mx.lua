-- `lua-smtp mx DOMAIN [--nameserver HOST[:PORT]]... [--timeout S] [--tls]`: prints the MX hosts of a
-- domain in the order direct delivery would try them, one line each: preference, host, addresses;
-- with --tls also the policies that would secure delivery to them: DANE (lines "dane: ...") and
-- MTA-STS (lines "mta-sts: ...").
local args_mod = require "smtp.cli.args"

local M = {}

local usage = [==[
usage: lua-smtp mx DOMAIN [--nameserver HOST[:PORT]]... [--timeout SECONDS]
                 [--tls [--cafile F] [--destinations remote|public|any] [--mta-sts-port N]]
Prints the MX hosts of DOMAIN in delivery order: preference, host name, addresses.
--tls adds lines "dane: ..." with each host's TLSA records and DANE state (the resolver must be
a DNSSEC-validating one on loopback for any answer to count as validated).
--nameserver asks that server (an IP address, port 53 unless given; repeat for more)
instead of the system's resolver.
--tls also prints the domain's MTA-STS state (lines starting "mta-sts:"): the policy's mode, id,
max_age and mx patterns, and for each MX host whether the policy allows it, or why there is no
policy. --cafile verifies the policy host with those CA certificates, --destinations says where
the policy fetch may connect (as for send), --mta-sts-port fetches from another port than 443.]==]

function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local domain, servers, timeout = nil, nil, nil
  local tls, cafile, destinations, sts_port = false, nil, nil, nil
  local i = 1
  while i <= #args do
    local a = args[i]
    local v = a:match("^%-%-nameserver=(.*)$")
    if a == "--nameserver" then v = args[i + 1]; i = i + 1 end
    local t = a:match("^%-%-timeout=(.*)$")
    if a == "--timeout" then t = args[i + 1]; i = i + 1 end
    local function value(name)
      local x = a:match("^%-%-" .. name .. "=(.*)$")
      if a == "--" .. name:gsub("%%", "") then x = args[i + 1]; i = i + 1 end
      return x
    end
    local c = (a:match("^%-%-cafile") and value("cafile")) or nil
    local d = (a:match("^%-%-destinations") and value("destinations")) or nil
    local sp = (a:match("^%-%-mta%-sts%-port") and value("mta%-sts%-port")) or nil
    if a == "-h" or a == "--help" then
      out:write(usage, "\n")
      return 0
    elseif a == "--tls" then
      tls = true
    elseif c then
      cafile = c
    elseif d then
      if d ~= "remote" and d ~= "public" and d ~= "any" then
        err:write("lua-smtp mx: bad --destinations '", d, "'\n", usage, "\n")
        return 2
      end
      destinations = d
    elseif sp then
      sts_port = tonumber(sp)
      if not sts_port or sts_port % 1 ~= 0 or sts_port < 1 or sts_port > 65535 then
        err:write("lua-smtp mx: bad --mta-sts-port '", sp, "'\n", usage, "\n")
        return 2
      end
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
  if not domain or (servers and #servers == 0) or ((cafile or destinations or sts_port) and not tls) then
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
    -- the DANE lines ("dane:") go beside these
    local mtasts = require "smtp.mtasts"
    local st = mtasts.policy(domain, { nameservers = servers, timeout = timeout, cafile = cafile,
      port = sts_port, destinations = destinations, cache = mtasts.new_cache(), background = false })
    if st.policy then
      local p = st.policy
      out:write(("mta-sts: policy mode=%s id=%s max_age=%d\n"):format(p.mode, st.id, p.max_age))
      for _, m in ipairs(p.mx) do out:write("mta-sts: mx ", m, "\n") end
      for _, h in ipairs(res) do
        out:write(("mta-sts: %s %s\n"):format(h.host, mtasts.matches(p, h.host) and "allowed"
          or (p.mode == "enforce" and "not in the policy (not used)" or "not in the policy")))
      end
    elseif st.failure then
      out:write(("mta-sts: none (%s: %s)\n"):format(st.failure.result_type or "error", tostring(st.failure.text)))
    else
      out:write("mta-sts: none (no _mta-sts record)\n")
    end
  end
  return 0
end

return M
