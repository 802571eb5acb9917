-- smtp.argcheck: misuse raises Lua's standard "bad argument #n to 'f' (...)", with the same words
-- on every transport (spec/transport_contract_spec.lua). Pure Lua: loaded inside nginx too. Each
-- check raises at the caller of the function that called it.
local M = {}

local error, type, format = error, type, string.format

function M.arg(cond, n, fname, msg)
  if not cond then error(format("bad argument #%d to '%s' (%s)", n, fname, msg), 3) end
end

-- An option of the table in argument #n (default 1) that must have type `want` when given.
function M.opt(v, want, fname, name, n)
  if v ~= nil and type(v) ~= want then
    error(format("bad argument #%d to '%s' (option '%s': %s expected, got %s)", n or 1, fname, name, want, type(v)), 3)
  end
end

-- Argument #n, a number when given.
function M.num(v, n, fname)
  if v ~= nil and type(v) ~= "number" then
    error(format("bad argument #%d to '%s' (number expected, got %s)", n, fname, type(v)), 3)
  end
end

return M
