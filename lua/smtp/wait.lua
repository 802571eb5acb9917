-- smtp.wait: the one place where lua-smtp waits for an fd. Inside an smtp.loop task it yields to
-- the loop; inside a cqueues controller it uses cqueues.poll; anywhere else it blocks in C (poll).
local core = require "smtp.core"
local loop = require "smtp.loop"

local M = {}

local now, cwait = core.now, core.wait
local park_fd, coyield = loop.park_fd, coroutine.yield

-- A throwaway object cqueues.poll can wait on (it asks pollfd/events/timeout by method call).
local pollable = { __name = "smtp.wait.pollable" }
pollable.__index = {
  pollfd = function(self) return self.fd end,
  events = function(self) return self.ev end,
  timeout = function(self) return self.t end,
}

local function cqueues_running()
  local cq = package.loaded.cqueues   -- only when the program uses cqueues itself
  if type(cq) == "table" and cq.running and cq.running() then return cq end
  return nil
end

-- Waits until fd is ready for "r" or "w" or until `deadline` (an absolute core.now() value; nil =
-- no limit). Returns true, or nil, "timeout" (or nil, "closed" if another loop task closed it).
-- `true` can come early (a spurious wakeup): callers just retry their non-blocking call.
function M.fd(fd, what, deadline)
  local ok, err = park_fd(fd, what, deadline)   -- not a tail call: misuse is raised at our caller
  if ok == 0 then return coyield() end          -- parked in the running loop task
  if ok ~= false then return ok, err end
  local timeout
  if deadline then
    timeout = deadline - now()
    if timeout <= 0 then return nil, "timeout" end
  end
  local cq = cqueues_running()
  if cq then
    local obj = setmetatable({ fd = fd, ev = what, t = timeout }, pollable)
    if cq.poll(obj) == obj then return true end
    if deadline and now() >= deadline then return nil, "timeout" end
    return true
  end
  return cwait(fd, what, timeout)
end

-- Sleeps `seconds` the same way.
function M.sleep(seconds)
  if loop.current() then return loop.sleep(seconds) end
  local cq = cqueues_running()
  if cq then return cq.sleep(seconds) end
  cwait(-1, "r", seconds)
end

-- Tells the schedulers that fd is about to be closed, so nobody stays parked on a dead (or
-- reused) fd.
-- cqueues keeps its own registration per fd, which must go before the fd number is reused.
function M.closing(fd)
  loop.forget(fd)
  local cq = package.loaded.cqueues
  if type(cq) == "table" and cq.cancel then cq.cancel(fd) end
end

return M
