-- MX lookup for direct delivery (RFC 5321 §5.1): hosts in preference order, shuffled among equal
-- preferences, each with its addresses; implicit MX, null MX (RFC 7505) and DNS failures mapped
-- to permanent or temporary errors.
local dns = require("smtp.transport").dns()
local errors = require "smtp.errors"

local M = {}

M.max_hosts = 10        -- MX hosts returned (the C core already keeps at most 16)
M.max_addresses = 8     -- addresses per host (AAAA first, then A)

local function check_opts(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error("bad argument #2 to 'lookup' (table expected)", 3) end
  if opts.random ~= nil and type(opts.random) ~= "function" then
    error("bad argument #2 to 'lookup' (random: function(n) -> 1..n expected)", 3)
  end
  return opts
end

-- Shuffles runs of equal preference in place (Fisher-Yates with the injectable random source).
local function shuffle_equal(list, random)
  local i = 1
  while i <= #list do
    local j = i
    while j < #list and list[j + 1].preference == list[i].preference do j = j + 1 end
    for k = j, i + 1, -1 do
      local n = k - i + 1
      local pick = random(n)
      if type(pick) ~= "number" or pick < 1 or pick > n or pick % 1 ~= 0 then
        error("bad argument #2 to 'lookup' (random(" .. n .. ") returned " .. tostring(pick) .. ", expected 1.." .. n .. ")", 4)
      end
      local m = i + pick - 1
      list[k], list[m] = list[m], list[k]
    end
    i = j + 1
  end
end

-- mx.lookup(domain, {nameservers=, timeout=, random=}) ->
--   { {host=, preference=, addresses={...}[, implicit=true]}, ... } | nil, err
function M.lookup(domain, opts)
  if type(domain) ~= "string" then error("bad argument #1 to 'lookup' (string expected)", 2) end
  opts = check_opts(opts)
  if domain:find("[\128-\255]") then
    -- an international name is looked up as its A-label (smtp.check loads the C core, which the
    -- engines need inside nginx too)
    local ascii, why = require("smtp.check").idna_domain(domain)
    if not ascii then return errors.invalid("not a valid international domain name: " .. ("%q"):format(domain) .. ": " .. why) end
    domain = ascii
  end
  local name = dns.normalize(domain)
  if not name then return errors.invalid("not a valid domain name: " .. ("%q"):format(domain)) end
  local random = opts.random or math.random

  local r, deadline = dns.resolver(opts)
  if not r then return nil, deadline end
  local id = assert(r:query(name, "MX"))
  dns.drive(r, deadline)
  local answer, err = dns.collect(r, id, name)
  if not answer then
    dns.close(r)
    return nil, err
  end

  local hosts = {}
  if answer.null then
    dns.close(r)
    return nil, dns.error(name, "nullmx", {
      temporary = false, code = 556, enhanced = "5.1.10",
      text = name .. ": domain does not accept mail (null MX)",
    })
  elseif #answer == 0 then
    if (answer.dropped or 0) > 0 then
      dns.close(r)
      return nil, dns.error(name, "badmx", {
        temporary = false, text = name .. ": no usable MX host names in the answer",
      })
    end
    hosts[1] = { host = name, preference = 0, implicit = true }
  else
    for i = 1, #answer do
      hosts[i] = { host = answer[i].host, preference = answer[i].preference }
    end
    -- A canonical order first, so that the same random source gives the same order whatever
    -- order the server answered in.
    table.sort(hosts, function(a, b)
      if a.preference ~= b.preference then return a.preference < b.preference end
      return a.host < b.host
    end)
    shuffle_equal(hosts, random)
    for i = #hosts, M.max_hosts + 1, -1 do hosts[i] = nil end
  end

  -- Every host's AAAA and A queries at once, under the same deadline.
  local pending = {}
  for i, h in ipairs(hosts) do pending[i] = dns.start_addresses(r, h.host, opts) end
  dns.drive(r, deadline)
  local out, temp_err, perm_err = {}, nil, nil
  for i, h in ipairs(hosts) do
    local addrs, aerr = dns.finish_addresses(r, pending[i], M.max_addresses)
    if addrs then
      h.addresses = addrs
      out[#out + 1] = h
    elseif aerr.temporary then
      temp_err = temp_err or aerr
    else
      perm_err = perm_err or aerr
    end
  end
  dns.close(r)
  if #out == 0 then
    -- A host that might answer later makes the whole lookup worth retrying.
    local e = temp_err or perm_err
    if hosts[1].implicit and e.rcode == "nodata" then
      e.text = name .. ": no MX and no address records"
    end
    return nil, e
  end
  return out
end

return M
