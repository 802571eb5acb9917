-- JSON text for the command line's --json output and reports: strings (control bytes, quotes
-- and backslashes escaped), finite numbers, booleans, nil as null, and tables: a sequence is an
-- array, anything else an object with its keys sorted (so output is stable); an empty table is
-- an object unless it has the ARRAY metatable; json.object keeps a given key order.
local M = {}

local ARRAY = {}
M.ARRAY = ARRAY

-- json.object{ { key, value }, ... }: an object whose keys are written in this order (a pair whose
-- value is nil is left out), for formats whose readers expect their documents' order.
local ORDERED = {}
function M.object(list) return setmetatable({ list = list }, ORDERED) end

local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

-- A JSON string literal for s (any value, through tostring).
function M.string(s)
  return '"' .. tostring(s):gsub('[%c"\\]', function(c) return ESCAPES[c] or ("\\u%04x"):format(c:byte()) end) .. '"'
end

local function put(v, out)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = M.string(v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      out[#out + 1] = "null"
    else
      out[#out + 1] = (v == math.floor(v) and v > -2 ^ 53 and v < 2 ^ 53) and ("%d"):format(v) or ("%.17g"):format(v)
    end
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" and getmetatable(v) == ORDERED then
    out[#out + 1] = "{"
    local first = true
    for _, kv in ipairs(v.list) do
      if kv[2] ~= nil then
        if not first then out[#out + 1] = "," end
        first = false
        out[#out + 1] = M.string(kv[1])
        out[#out + 1] = ":"
        put(kv[2], out)
      end
    end
    out[#out + 1] = "}"
  elseif t == "table" then
    if #v > 0 or (next(v) == nil and getmetatable(v) == ARRAY) then
      out[#out + 1] = "["
      for i, x in ipairs(v) do
        if i > 1 then out[#out + 1] = "," end
        put(x, out)
      end
      out[#out + 1] = "]"
    else
      local keys = {}
      for k in pairs(v) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = M.string(k)
        out[#out + 1] = ":"
        local x = v[k]
        if x == nil then x = v[tonumber(k)] end
        put(x, out)
      end
      out[#out + 1] = "}"
    end
  else
    out[#out + 1] = "null"
  end
end

-- encode(v) -> JSON text
function M.encode(v)
  local out = {}
  put(v, out)
  return table.concat(out)
end

return M
