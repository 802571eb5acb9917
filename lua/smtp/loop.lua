-- smtp.loop: the built-in scheduler: one coroutine per task, epoll for sockets, a heap of timers.
-- Tasks block through smtp.wait, which yields here when it runs inside a loop task. The
-- scheduler's state and its turn (epoll_wait, waking and resuming tasks) live in C
-- (csrc/sched.c); C never yields: a task parks itself there and then yields here, in Lua.
local core = require "smtp.core"

local M = {}

local S = core.scheduler()
local park_fd, park_sleep, srun = S.park_fd, S.park_sleep, S.run
local now = core.now
local cocreate, coyield = coroutine.create, coroutine.yield
local unpack = table.unpack or unpack
local traceback = debug.traceback

local running = false

-- The running loop task, or nil outside one (on the main thread or in a foreign coroutine).
M.current = S.current

function M.now() return now() end

-- Asks for the heap's free pages to go back to the system before the loop next waits (called
-- after each TLS handshake; done at most once a second, and within a second of the last ask).
M.release_memory_later = S.release_memory_later

-- Counts for tests and diagnostics: live tasks, tasks parked on fds, timer entries held, and
-- of those the disarmed ones (waits that ended early, dropped when they reach the heap's top).
function M.stats()
  local tasks, waiting, timers, cancelled = S.stats()
  return { tasks = tasks, waiting = waiting, timers = timers, cancelled_timers = cancelled }
end

function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("bad argument #1 to 'spawn' (function expected)", 2) end
  local args, n = { ... }, select("#", ...)
  local co = cocreate(function() fn(unpack(args, 1, n)) end)
  S.spawn(co)
  return co
end

-- Parks the running task until fd is ready for "r" or "w", or until deadline (absolute now()).
-- Returns true, or nil, "timeout" / "closed" (another task closed the fd). A true can come
-- early (a spurious wakeup): callers retry their non-blocking call.
function M.wait_fd(fd, what, deadline)
  local ok, err = park_fd(fd, what, deadline)   -- not a tail call: misuse is raised at our caller
  if ok == 0 then return coyield() end
  if ok == false then error("smtp.loop.wait_fd called outside a loop task", 2) end
  return ok, err
end

-- smtp.wait's way in (C): 0 when the running task has parked on fd and must now yield (the
-- resume brings true / nil, "timeout" / nil, "closed"), false outside a loop task, or the
-- wait's result when it needs no wait (nil, "timeout"; true for an fd epoll cannot watch).
-- Misuse raises at the level of its caller's caller, as wait_fd does.
M.park_fd = park_fd

function M.sleep(seconds)
  if park_sleep(seconds) == 0 then
    coyield()
    return
  end
  core.wait(-1, "r", seconds)
end

-- Wakes whoever waits on fd with nil, "closed" and stops watching it; call before closing it.
M.forget = S.forget

-- Runs every task until all have finished. Errors in a task propagate out of run(), with the
-- task's traceback.
function M.run()
  if running then error("smtp.loop.run: the loop is already running", 2) end
  running = true
  local ok, co, res = pcall(srun)
  running = false
  if not ok then error(co, 0) end
  if co then error(traceback(co, tostring(res)), 0) end
end

return M
