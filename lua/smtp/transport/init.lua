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

-- Inside nginx, where cosockets exist: runs each function in its own light thread (ngx.thread)
-- and waits for them all, so their cosocket waits overlap (smtp.loop would block the worker in its
-- poll). Returns true, raising the first error any of them raised; false when not inside nginx
-- or in a phase without light threads (the caller then runs them its own way).
function M.run_concurrently(fns)
  local ngx = ngx_table()
  if not ngx or not ngx.thread or not require("smtp.transport.ngx").usable() then return false end
  local threads, failure = {}, nil
  for i, f in ipairs(fns) do
    threads[i] = ngx.thread.spawn(function() return pcall(f) end)
  end
  for _, th in ipairs(threads) do
    local ok, fine, err = ngx.thread.wait(th)
    if not ok then failure = failure or fine
    elseif not fine then failure = failure or err end
  end
  if failure then error(failure, 0) end
  return true
end

-- Whether a connection made now can use cosockets: true, phase | false, phase.
function M.usable()
  if not ngx_table() then return true, nil end
  return require("smtp.transport.ngx").usable()
end

return M
