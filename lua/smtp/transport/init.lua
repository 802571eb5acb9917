-- Picks the transport for the running context: cosockets inside nginx, native sockets elsewhere.
-- Inside nginx the cosocket transport is returned in every phase: in a phase without cosockets its
-- connect fails at once with an error pointing to ngx.timer.at, because native sockets there would
-- block the whole worker.
local M = {}

local function ngx_table()
  local n = rawget(_G, "ngx")
  if type(n) == "table" and type(n.get_phase) == "function" and type(n.socket) == "table" then
    return n
  end
  return nil
end

-- True when running inside nginx (lua-nginx-module), whatever the phase.
function M.inside_nginx() return ngx_table() ~= nil end

-- The transport module: smtp.transport.ngx inside nginx, smtp.transport.native elsewhere.
function M.get()
  if ngx_table() then return require "smtp.transport.ngx" end
  return require "smtp.transport.native"
end

-- The resolver module with resolve(name, opts) and mx(name, opts): smtp.transport.ngx_dns inside
-- nginx, smtp.dns elsewhere.
function M.dns()
  if ngx_table() then return require "smtp.transport.ngx_dns" end
  return require "smtp.dns"
end

-- Whether a connection made now can use cosockets: true, phase | false, phase.
function M.usable()
  if not ngx_table() then return true, nil end
  return require("smtp.transport.ngx").usable()
end

return M
