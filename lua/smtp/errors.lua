-- Error values of lua-smtp: one table shape for everything the world can do to a call.
local M = {}

local kinds = {
  invalid = true, dns = true, connect = true, tls = true, timeout = true,
  protocol = true, auth = true, rejected = true, closed = true, proxy = true,
  full = true,   -- a queue with no room left (smtp.background)
}
M.kinds = kinds

local mt = { __name = "smtp.error" }
function mt.__tostring(e)
  local parts = { e.kind }
  if e.phase then parts[#parts + 1] = "(" .. e.phase .. ")" end
  local s = table.concat(parts, " ") .. ":"
  if e.code then s = s .. " " .. e.code end
  if e.enhanced then s = s .. " " .. e.enhanced end
  if e.text and e.text ~= "" then s = s .. " " .. (tostring(e.text):gsub("[\r\n]+", " ")) end
  if e.temporary then s = s .. " (temporary)" end
  return s
end
-- "send failed: " .. err reads like tostring(err), from either side.
function mt.__concat(a, b)
  return tostring(a) .. tostring(b)
end
M.mt = mt

-- errors.new{kind=, text=, ...}; `temporary` defaults from the code (4xx) and the kind.
function M.new(t)
  assert(kinds[t.kind], "unknown error kind: " .. tostring(t.kind))
  if t.temporary == nil then
    if t.code then
      t.temporary = t.code >= 400 and t.code < 500
    else
      t.temporary = t.kind == "timeout" or t.kind == "closed" or t.kind == "connect"
    end
  end
  return setmetatable(t, mt)
end

function M.is(e, kind)
  return type(e) == "table" and getmetatable(e) == mt and (kind == nil or e.kind == kind)
end

-- Shorthand: errors.invalid("to: address too long") -> nil, err
function M.invalid(text, extra)
  local t = extra or {}
  t.kind, t.text, t.temporary = "invalid", text, false
  return nil, M.new(t)
end

return M
