-- Test utility for spec/parse_spec.lua: runs files through spec/support/parsecheck.py (Python's
-- email, policy.default) and puts smtp.message.parse's result in the same shape, so a spec can
-- compare the two trees node by node.
local helper = require "helper"
local S = require "support.message"

local P = {}

-- P.python(paths) -> { { defects = {class names}, hdr = {{name, value}}, nodes = {...} }, ... }
function P.python(paths)
  local q = { helper.quote(helper.python), helper.quote(helper.root .. "/spec/support/parsecheck.py") }
  for _, p in ipairs(paths) do q[#q + 1] = helper.quote(p) end
  local out = helper.sh(table.concat(q, " ") .. " 2>&1")
  local results, cur = {}, nil
  for line in out:gmatch("[^\n]+") do
    local w = {}
    for x in line:gmatch("%S+") do w[#w + 1] = x end
    local tag = w[1]
    if tag == "MSG" then
      cur = { defects = {}, hdr = {}, nodes = {} }
      results[#results + 1] = cur
    elseif tag == "DEFECT" then cur.defects[#cur.defects + 1] = w[2]
    elseif tag == "HDR" then cur.hdr[#cur.hdr + 1] = { S.unhex(w[2]), S.unhex(w[3]) }
    elseif tag == "NODE" then
      cur.nodes[#cur.nodes + 1] = { multi = w[2] == "1", ctype = S.unhex(w[3]),
        disposition = S.unhex(w[4]), filename = S.unhex(w[5]), cid = S.unhex(w[6]),
        charset = S.unhex(w[7]), content = S.unhex(w[8]), text = S.unhex(w[9]) }
    elseif tag == "END" then cur = nil
    else error("parsecheck.py: " .. out) end
  end
  assert(#results == #paths, "parsecheck.py: " .. out)
  return results
end

-- The same facts from smtp.message.parse's result.
function P.lua(m)
  local nodes, hdr = {}, {}
  for _, f in ipairs(m.headers) do hdr[#hdr + 1] = { f.name, f.value } end
  for p in m:walk() do
    local multi = #p.parts > 0 or (p.maintype == "multipart" and p.content == nil)
    local cid = p.cid
    if cid and p:header("content-id"):match("^%s*<") then cid = "<" .. cid .. ">" end
    nodes[#nodes + 1] = { multi = multi, ctype = p.content_type, disposition = p.disposition,
      filename = p.filename, cid = cid, charset = (not multi) and p.params.charset or nil,
      content = (not multi) and p.content or nil, text = (not multi) and p.text or nil }
  end
  return { hdr = hdr, nodes = nodes, defects = m.defects }
end

-- Differences between Python's tree and ours, as readable lines (empty when they agree).
-- settle(kind, py, lua, node) may return true to accept a known, documented disagreement.
function P.diff(py, lu, settle)
  local out = {}
  local function say(s) out[#out + 1] = s end
  if #py.nodes ~= #lu.nodes then
    say(("node count: python %d, lua %d"):format(#py.nodes, #lu.nodes))
  end
  for i = 1, math.min(#py.nodes, #lu.nodes) do
    local a, b = py.nodes[i], lu.nodes[i]
    for _, k in ipairs { "multi", "ctype", "disposition", "filename", "cid", "charset", "content", "text" } do
      if a[k] ~= b[k] and not (settle and settle(k, a[k], b[k], b, i)) then
        say(("node %d %s: python %q, lua %q"):format(i, k, tostring(a[k]):sub(1, 200),
          tostring(b[k]):sub(1, 200)))
      end
    end
  end
  return out
end

return P
