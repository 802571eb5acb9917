-- smtp.loop: the built-in scheduler: one coroutine per task, epoll for sockets, a heap of timers.
-- Tasks block through smtp.wait, which yields here when it runs inside a loop task.
local core = require "smtp.core"

local M = {}

local now = core.now
local cocreate, coresume, costatus, coyield, corunning =
  coroutine.create, coroutine.resume, coroutine.status, coroutine.yield, coroutine.running
local unpack = table.unpack or unpack
local traceback = debug.traceback

-- What a task yields when it waits through this module; any other yield just gives way.
local TOKEN = setmetatable({}, { __name = "smtp.loop.token" })
-- What a task's function returns at its end: step() then knows it died without asking
-- coroutine.status on every resume.
local DONE = setmetatable({}, { __name = "smtp.loop.done" })

local tasks = {}          -- co -> true while the task lives
local ntasks = 0
local ready, ready_v = {}, {}   -- run queue: coroutines and the value each is resumed with
local rhead, rtail = 1, 0
local readers, writers = {}, {} -- fd -> co waiting for that direction
local interest = {}       -- fd -> 1 (r), 2 (w), 3 (both): what epoll watches right now
local nwaiting = 0        -- coroutines parked on an fd
local waiting_fd = {}     -- co -> fd it waits on (with waiting_dir) so a timer can unhook it
local waiting_dir = {}
local timer_of = {}       -- co -> its pending timer entry
local heap = {}           -- binary heap of timers { t = deadline, co = co }, earliest first
local ncancelled = 0      -- entries in heap whose co is nil
local poller
local running = false
local fds, evs = {}, {}   -- reused by poller:wait

-- TLS handshakes free much of what they allocate at once; the loop hands those pages back to
-- the system when it is about to wait, at most once a second (see release_memory_later).
local trim_due, last_trim = false, -1

local EV = { r = 1, w = 2 }
local EVNAME = { "r", "w", "rw" }

local function push_ready(co, v)
  rtail = rtail + 1
  ready[rtail], ready_v[rtail] = co, v
end

-- Timers ------------------------------------------------------------------------------------

local function heap_push(e)
  local i = #heap + 1
  heap[i] = e
  while i > 1 do
    local p = (i - i % 2) / 2
    if heap[p].t <= e.t then break end
    heap[i], heap[p] = heap[p], e
    i = p
  end
end

local function heap_pop()
  local n = #heap
  local top = heap[1]
  local last = heap[n]
  heap[n] = nil
  n = n - 1
  if n > 0 then
    local i = 1
    while true do
      local l = 2 * i
      if l > n then break end
      local c = l
      if l + 1 <= n and heap[l + 1].t < heap[l].t then c = l + 1 end
      if heap[c].t >= last.t then break end
      heap[i] = heap[c]
      i = c
    end
    heap[i] = last
  end
  return top
end

-- Rebuilds the heap from its live, armed entries. Many tasks that ended, or armed earlier
-- deadlines, would otherwise leave their entries in the heap until those came due.
local function compact()
  local live = {}
  for i = 1, #heap do
    local e = heap[i]
    if e.co and e.due then
      e.t = e.due
      live[#live + 1] = e
    else
      e.inheap = false
    end
  end
  table.sort(live, function(a, b) return a.t < b.t end)   -- a sorted array is a valid heap
  heap = live
  ncancelled = 0
end

-- An entry nobody owns any more: left in the heap, counted, and compacted away when they pile up.
local function retire(e)
  e.co = nil
  if e.inheap then
    ncancelled = ncancelled + 1
    if ncancelled > 1024 and ncancelled * 2 > #heap then compact() end
  end
end

-- Each task keeps one timer entry { t = heap key, due = deadline or nil, co = co, inheap }. A
-- server sets a fresh idle deadline before every read, always later than the last: that only
-- moves `due` forward, and the entry is re-keyed when it reaches the heap's top (once per
-- timeout period, not once per read). A finished wait just clears `due`. Entries whose task has
-- died have co = nil and are counted in ncancelled until they leave the heap.
local function add_timer(co, deadline)
  local e = timer_of[co]
  if e and e.inheap and e.t <= deadline then
    e.due = deadline
    return
  end
  if e and not e.inheap then
    e.t, e.due, e.inheap = deadline, deadline, true
    heap_push(e)
    return
  end
  -- an earlier deadline than the entry's key: that entry becomes dead weight, a new one goes in
  if e then retire(e) end
  e = { t = deadline, due = deadline, co = co, inheap = true }
  timer_of[co] = e
  heap_push(e)
end

-- The task's wait finished before its deadline.
local function cancel_timer(co)
  local e = timer_of[co]
  if e then e.due = nil end
end

-- The task has ended: its entry is dead weight in the heap from now on.
local function drop_timer(co)
  local e = timer_of[co]
  if e then
    timer_of[co] = nil
    retire(e)
  end
end

-- Pops the top entry and returns it when it is armed and due at its key (a deadline to honour).
-- A disarmed or dead entry leaves the heap; one whose deadline moved later goes back in.
local function settle_top()
  local e = heap_pop()
  if not e.co then
    ncancelled = ncancelled - 1
    e.inheap = false
    return nil
  end
  if not e.due then
    e.inheap = false
    return nil
  end
  if e.due > e.t then
    e.t = e.due
    heap_push(e)
    return nil
  end
  e.inheap, e.due = false, nil
  return e
end

-- Drops disarmed and dead entries from the heap's top and returns the top, or nil. The top's key
-- may be earlier than its deadline (re-keyed lazily): the loop then wakes early once, re-keys it
-- and waits again.
local function top_timer()
  while true do
    local e = heap[1]
    if not e or (e.co and e.due) then return e end
    settle_top()
  end
end

-- Interest in fds ---------------------------------------------------------------------------

local function set_interest(fd, m)
  local old = interest[fd] or 0
  if m == old then return true end
  local ok, err, code
  if m == 0 then
    ok, err, code = poller:del(fd)
    interest[fd] = nil
    return true
  elseif old == 0 then
    ok, err, code = poller:add(fd, EVNAME[m])
    if not ok and code then ok, err = poller:mod(fd, EVNAME[m]) end
  else
    ok, err, code = poller:mod(fd, EVNAME[m])
    if not ok and code then ok, err = poller:add(fd, EVNAME[m]) end
  end
  if not ok then return nil, err end
  interest[fd] = m
  return true
end

-- fds whose epoll interest may exceed what their waiters want; settled before the next wait.
local unsettled, nunsettled = {}, 0

local function unsettle(fd)
  nunsettled = nunsettled + 1
  unsettled[nunsettled] = fd
end

-- Brings epoll in line with the waiters, once per loop turn. A task woken for an fd usually
-- waits on it again before the turn ends (a server reads a command, replies, waits for the
-- next): leaving the registration in place until then saves an EPOLL_CTL_DEL and an
-- EPOLL_CTL_ADD per wait. What nobody waits for any more is dropped before epoll_wait, so a
-- level-triggered event is never reported for an fd nobody waits on, and an fd closed behind
-- the loop's back (by the GC) stays registered at most until the end of the turn.
local function settle()
  for i = 1, nunsettled do
    local fd = unsettled[i]
    unsettled[i] = nil
    local want = (readers[fd] and 1 or 0) + (writers[fd] and 2 or 0)
    if want ~= (interest[fd] or 0) then set_interest(fd, want) end
  end
  nunsettled = 0
end

local function unhook(co)
  local fd, dir = waiting_fd[co], waiting_dir[co]
  if not fd then return end
  waiting_fd[co], waiting_dir[co] = nil, nil
  nwaiting = nwaiting - 1
  if dir == "r" then readers[fd] = nil else writers[fd] = nil end
  unsettle(fd)
end

-- Public ------------------------------------------------------------------------------------

-- The running loop task, or nil outside one (on the main thread or in a foreign coroutine).
function M.current()
  local co = corunning()
  if co and tasks[co] then return co end
  return nil
end

function M.now() return now() end

-- Asks for the heap's free pages to go back to the system before the loop next waits (called
-- after each TLS handshake; done at most once a second, and within a second of the last ask).
function M.release_memory_later() trim_due = true end

-- Counts for tests and diagnostics: live tasks, tasks parked on fds, timer entries held.
function M.stats()
  return { tasks = ntasks, waiting = nwaiting, timers = #heap, cancelled_timers = ncancelled }
end

function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("bad argument #1 to 'spawn' (function expected)", 2) end
  local args, n = { ... }, select("#", ...)
  local co = cocreate(function() fn(unpack(args, 1, n)) return DONE end)
  tasks[co] = true
  ntasks = ntasks + 1
  push_ready(co, true)
  return co
end

-- Parks the running task until fd is ready for "r" or "w", or until deadline (absolute now()).
-- Returns true, or nil, "timeout" / "closed" (another task closed the fd).
local function waiters_of(what) return what == "r" and readers or writers end

-- Parks task co (the running one, checked by the callers) until fd is ready or deadline.
local function wait_fd(co, fd, what, deadline)
  if deadline and deadline <= now() then return nil, "timeout" end
  local waiters = what == "r" and readers or writers
  local m = interest[fd] or 0
  local bit = EV[what]
  if (bit == 1 and m % 2 == 0) or (bit == 2 and m < 2) then
    local ok = set_interest(fd, m + bit)
    -- An fd epoll cannot watch (a regular file) is always ready.
    if not ok then return true end
  end
  waiters[fd] = co
  waiting_fd[co], waiting_dir[co] = fd, what
  nwaiting = nwaiting + 1
  if deadline then add_timer(co, deadline) end
  local ok, err = coyield(TOKEN)
  return ok, err
end

-- The misuse both ways in refuse; `level` is error()'s, counted from their caller.
local function check_wait(fd, what, level)
  if what ~= "r" and what ~= "w" then
    error("bad argument #2 to 'wait_fd' (\"r\" or \"w\" expected)", level + 1)
  end
  if waiters_of(what)[fd] then
    error("two tasks wait to " .. (what == "r" and "read" or "write") .. " fd " .. fd, level + 1)
  end
end

function M.wait_fd(fd, what, deadline)
  local co = M.current()
  if not co then error("smtp.loop.wait_fd called outside a loop task", 2) end
  check_wait(fd, what, 2)
  return wait_fd(co, fd, what, deadline)
end

-- smtp.wait's way in: wait_fd for the running task, or false outside a loop task (one lookup
-- of the running coroutine per wait, not two). Misuse raises as wait_fd does.
function M.wait_fd_if_task(fd, what, deadline)
  local co = corunning()
  if not co or not tasks[co] then return false end
  check_wait(fd, what, 3)
  return wait_fd(co, fd, what, deadline)
end

function M.sleep(seconds)
  local co = M.current()
  if not co then
    core.wait(-1, "r", seconds)
    return
  end
  add_timer(co, now() + (seconds or 0))
  coyield(TOKEN)
end

-- Wakes whoever waits on fd with nil, "closed" and stops watching it; call before closing it.
function M.forget(fd)
  local r, w = readers[fd], writers[fd]
  if r then cancel_timer(r); unhook(r); push_ready(r, "closed") end
  if w then cancel_timer(w); unhook(w); push_ready(w, "closed") end
  if interest[fd] and poller then set_interest(fd, 0) end
end

local function step(co, v)
  local ok, res
  if v == true then
    ok, res = coresume(co, true)
  else
    ok, res = coresume(co, nil, v)
  end
  if not ok then
    tasks[co] = nil
    ntasks = ntasks - 1
    drop_timer(co)
    error(traceback(co, tostring(res)), 0)
  end
  if res == TOKEN then return end
  if res == DONE and costatus(co) == "dead" then
    tasks[co] = nil
    ntasks = ntasks - 1
    drop_timer(co)
  else
    push_ready(co, true)   -- a bare coroutine.yield(): run again after the others
  end
end

-- Runs every task until all have finished. Errors in a task propagate out of run().
function M.run()
  if running then error("smtp.loop.run: the loop is already running", 2) end
  if not poller then poller = assert(core.poller()) end
  running = true
  local ok, err = pcall(function()
    while ntasks > 0 do
      while rhead <= rtail do
        local co, v = ready[rhead], ready_v[rhead]
        ready[rhead], ready_v[rhead] = nil, nil
        rhead = rhead + 1
        step(co, v)
      end
      rhead, rtail = 1, 0
      if nunsettled > 0 then settle() end
      if ntasks == 0 then break end
      -- Stale entries at the top must not cut the wait short.
      local top = top_timer()
      local timeout
      if top then
        timeout = top.t - now()
        if timeout < 0 then timeout = 0 end
      elseif nwaiting == 0 then
        error("smtp.loop: " .. ntasks .. " task(s) suspended with nothing to wait for", 0)
      end
      if trim_due then
        local left = last_trim + 1 - now()
        if left <= 0 then
          trim_due, last_trim = false, now()
          core.release_memory()
        elseif timeout == nil or timeout > left then
          timeout = left
        end
      end
      local n = poller:wait(timeout, fds, evs)
      -- The wake-up of each task is written out here (cancel_timer, unhook, push_ready): this
      -- runs for every read a server makes.
      for i = 1, n do
        local fd, e = fds[i], evs[i]
        local r, w = readers[fd], writers[fd]
        if r and e % 2 == 1 then
          local te = timer_of[r]
          if te then te.due = nil end
          readers[fd], waiting_fd[r], waiting_dir[r] = nil, nil, nil
          nwaiting = nwaiting - 1
          rtail = rtail + 1
          ready[rtail], ready_v[rtail] = r, true
        end
        if w and e >= 2 then
          local te = timer_of[w]
          if te then te.due = nil end
          writers[fd], waiting_fd[w], waiting_dir[w] = nil, nil, nil
          nwaiting = nwaiting - 1
          rtail = rtail + 1
          ready[rtail], ready_v[rtail] = w, true
        end
        -- Level-triggered: an event nobody waits for must not be reported again and again, so
        -- the fd's interest is settled before the next wait (once, however many woke).
        nunsettled = nunsettled + 1
        unsettled[nunsettled] = fd
      end
      local t = now()
      while heap[1] and heap[1].t <= t do
        local e = settle_top()
        local co = e and e.co
        if co then
          if waiting_fd[co] then
            unhook(co)
            push_ready(co, "timeout")
          else
            push_ready(co, true)   -- a sleep ended
          end
        end
      end
    end
  end)
  running = false
  if not ok then error(err, 0) end
end

return M
