-- The RFC 7208 conformance suite (rfc7208-tests.yml, from the pyspf project under the licence in
-- rfc7208-tests.LICENSE beside it) loaded for spec/spf_rfc7208_spec.lua: each scenario's zone
-- becomes a table resolver with the `opts.dns` contract of smtp.spf, each test a case.
local lyaml = require "lyaml"
local errors = require "smtp.errors"

local M = {}

local function dns_error(name, rcode)
  return errors.new { kind = "dns", rcode = rcode, name = name, text = name .. ": " .. rcode,
                      temporary = rcode ~= "nxdomain" }
end

-- The suite's zone: name -> list of { type, value } or "TIMEOUT". A name without TXT records
-- gets its SPF (type 99) records as TXT, as the suite's drivers do ("TXT: NONE" prevents it).
local function load_zone(zonedata)
  local zone = {}
  for name, entries in pairs(zonedata or {}) do
    local list, has_txt, spf = {}, false, {}
    for _, e in ipairs(entries) do
      if e == "TIMEOUT" then
        list[#list + 1] = "TIMEOUT"
      else
        for t, v in pairs(e) do
          if t == "TXT" then has_txt = true end
          if t == "TXT" or t == "SPF" then
            if type(v) == "table" then v = table.concat(v) end
            v = v:gsub("\238\128\128", "\0")
          end
          if t == "SPF" then
            spf[#spf + 1] = v
          elseif v ~= "NONE" then
            list[#list + 1] = { t, v }
          end
        end
      end
    end
    if not has_txt then
      for _, v in ipairs(spf) do list[#list + 1] = { "TXT", v } end
    end
    zone[name:lower():gsub("%.$", "")] = list
  end
  return zone
end

-- The resolver: NXDOMAIN for unknown names (a timeout for "error.*" ones), TIMEOUT entries and
-- values as timeouts, CNAMEs followed.
local function resolver(zone, log)
  local function query(name, qtype, depth)
    name = name:lower():gsub("%.$", "")
    if log then log[#log + 1] = qtype .. " " .. name end
    local entries = zone[name]
    if not entries then
      if name:match("^error%.") then return nil, dns_error(name, "timeout") end
      return nil, dns_error(name, "nxdomain")
    end
    local out = {}
    for _, e in ipairs(entries) do
      if e == "TIMEOUT" then
        if #out == 0 then return nil, dns_error(name, "timeout") end
      elseif e[1] == qtype then
        if e[2] == "TIMEOUT" then return nil, dns_error(name, "timeout") end
        local v = e[2]
        if qtype == "MX" then v = { preference = v[1], host = tostring(v[2]):gsub("%.$", "") } end
        if qtype == "PTR" then v = tostring(v):gsub("%.$", "") end
        out[#out + 1] = v
      elseif e[1] == "CNAME" and depth < 8 then
        return query(e[2], qtype, depth + 1)
      end
    end
    return out
  end
  return function(name, qtype) return query(name, qtype, 0) end
end

-- M.load(path) -> { { name=, scenario=, spec=, helo=, host=, mailfrom=, results={...},
--   explanation=, dns=function }, ... } in file order.
function M.load(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("a")
  f:close()
  -- libyaml hands strings over up to their first NUL; the suite's two records with "\0" in them
  -- (a-null, mx-null) travel as U+E000 and are turned back into NUL in the zone.
  text = text:gsub("\\0", "\\uE000")
  local docs = lyaml.load(text, { all = true })
  local cases = {}
  for _, doc in ipairs(docs) do
    local zone = load_zone(doc.zonedata)
    local names = {}
    for name in pairs(doc.tests) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local t = doc.tests[name]
      local results = type(t.result) == "table" and t.result or { t.result }
      cases[#cases + 1] = {
        name = name, scenario = doc.description, spec = t.spec, helo = t.helo, host = t.host,
        mailfrom = t.mailfrom, results = results, explanation = t.explanation,
        zone = zone, dns = resolver(zone),
      }
    end
  end
  return cases
end

M.resolver = resolver

return M
