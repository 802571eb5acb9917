-- Plain data as Lua text and back, for what the spool (smtp.queue) and the nginx queue
-- (smtp.background) store: strings, finite numbers, booleans and tables of them with string or
-- integer keys. Text is read back by load() in text mode with an empty environment, so a stored
-- state can run nothing that reaches anything. Output is deterministic (keys sorted).
local M = {}

local function bad(path, why) error({ path = path, why = why }, 0) end

local function key_less(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta == "number" end
  return a < b
end

local function ser(v, out, path, depth)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = ("%q"):format(v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then bad(path, "finite number expected") end
    if v == math.floor(v) and v > -2 ^ 53 and v < 2 ^ 53 then
      out[#out + 1] = ("%d"):format(v)
    else
      out[#out + 1] = ("%.17g"):format(v)
    end
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth > 20 then bad(path, "tables nested too deep") end
    out[#out + 1] = "{"
    local n = #v
    for i = 1, n do
      ser(v[i], out, path .. "[" .. i .. "]", depth + 1)
      out[#out + 1] = ","
    end
    local keys = {}
    for k in pairs(v) do
      local int = type(k) == "number" and k == math.floor(k) and k > -2 ^ 53 and k < 2 ^ 53
      if not (int and k >= 1 and k <= n) then
        if type(k) ~= "string" and not int then bad(path, "only string and integer keys can be stored") end
        keys[#keys + 1] = k
      end
    end
    table.sort(keys, key_less)
    for _, k in ipairs(keys) do
      out[#out + 1] = "["
      ser(k, out, path, depth + 1)
      out[#out + 1] = "]="
      ser(v[k], out, path == "" and tostring(k) or path .. "." .. tostring(k), depth + 1)
      out[#out + 1] = ",\n"
    end
    out[#out + 1] = "}"
  else
    bad(path, "a " .. t .. " cannot be stored")
  end
end

-- encode(v) -> text | nil, path, why (path: where in v the value that cannot be stored is).
function M.encode(v)
  local out = {}
  local ok, e = pcall(ser, v, out, "", 0)
  if not ok then
    if type(e) == "table" then return nil, e.path, e.why end
    error(e, 0)
  end
  return table.concat(out)
end

-- decode(text [, name]) -> value | nil, why
function M.decode(s, name)
  if type(s) ~= "string" then return nil, "missing" end
  local fn, err = load("return " .. s, "=" .. (name or "stored data"), "t", {})
  if not fn then return nil, err end
  local ok, v = pcall(fn)
  if not ok then return nil, tostring(v) end
  return v
end

return M
