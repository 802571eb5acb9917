-- Test utility for smtp.message and smtp.dkim specs: runs many messages through Python's email
-- package (and dkimpy) in one process and returns what a reader sees, for exact comparison.
local helper = require "helper"

local S = {}

local function unhex(s)
  if s == "-" then return nil end
  if s == "=" then return "" end
  return (s:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end
S.unhex = unhex

-- S.parse({raw1, raw2, ...} [, dkim_record]) -> { {defects=, hdr=, addr=, parts=, multi=, type=, verify=}, ... }
function S.parse(raws, record)
  local dir = helper.tmpdir()
  local paths = {}
  for i, raw in ipairs(raws) do
    paths[i] = dir .. "/m" .. i .. ".eml"
    helper.write(paths[i], raw)
  end
  local cmd = { helper.python, helper.root .. "/spec/support/mailcheck.py" }
  if record then helper.need("python3 dkim"); cmd[#cmd + 1] = "--dkim"; cmd[#cmd + 1] = record end
  local q = {}
  for i, a in ipairs(cmd) do q[i] = helper.quote(a) end
  for _, p in ipairs(paths) do q[#q + 1] = helper.quote(p) end
  local out = helper.sh(table.concat(q, " ") .. " 2>&1")
  local results, cur = {}, nil
  for line in out:gmatch("[^\n]+") do
    local w = {}
    for x in line:gmatch("%S+") do w[#w + 1] = x end
    local tag = w[1]
    if tag == "MSG" then
      cur = { defects = {}, hdr = {}, addr = {}, parts = {}, multi = {} }
      results[#results + 1] = cur
    elseif tag == "DEFECT" then cur.defects[#cur.defects + 1] = unhex(w[2])
    elseif tag == "HDR" then
      cur.hdr[w[2]] = cur.hdr[w[2]] or {}
      table.insert(cur.hdr[w[2]], unhex(w[3]))
    elseif tag == "ADDR" then
      cur.addr[w[2]] = cur.addr[w[2]] or {}
      table.insert(cur.addr[w[2]], { name = unhex(w[3]), address = unhex(w[4]) })
    elseif tag == "TYPE" then cur.type = w[2]
    elseif tag == "MULTI" then cur.multi[#cur.multi + 1] = w[2]
    elseif tag == "PART" then
      cur.parts[#cur.parts + 1] = { ctype = unhex(w[2]), disposition = unhex(w[3]),
        filename = unhex(w[4]), cid = unhex(w[5]), content = unhex(w[6]) }
    elseif tag == "VERIFY" then cur.verify = w[2] == "1"
    elseif tag == "END" then cur = nil
    else error("mailcheck.py: " .. out) end
  end
  assert(#results == #raws, "mailcheck.py: " .. out)
  return results
end

-- Reproducible options for message.new.
function S.fixed(t)
  t.clock = t.clock or function() return 1700000000 end
  local n = 0
  t.random = t.random or function(k)
    n = n + 1
    return (string.rep(string.char(n % 256), k))
  end
  t.hostname = t.hostname or "host.test"
  return t
end

return S
