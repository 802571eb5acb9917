-- A durable spool on one machine: submit writes the message and its envelope to disk (tmp, fsync,
-- rename, fsync of the directory) before it returns an id; a runner delivers what is due, one
-- recipient state per address written back before the next transaction, retries with backoff,
-- and bounces (smtp.dsn) what fails for good or outlives max_age. Layout of DIR:
--   tmp/    files being written, each flock'd by its writer (a lockable one is a dead writer's)
--   msg/ID  the message bytes, never changed; its flock is the per-message lock
--   state/ID  the envelope and per-recipient state, replaced by rename
--   done/ID   the last state of a finished message, kept for keep_done (idempotency keys)
local core = require "smtp.core"
local errors = require "smtp.errors"
local source = require "smtp.source"
local check = require "smtp.check"
local serial = require "smtp.serial"

local M = {}

M.RETRY_BASE = 300          -- first retry after about 5 minutes
M.RETRY_MAX = 4 * 3600      -- backoff never waits longer than 4 hours
M.MAX_AGE = 5 * 86400       -- RFC 5321 §4.5.4.1: give up after 4-5 days
M.KEEP_DONE = 5 * 86400     -- finished messages' states kept this long (for idempotency keys)

local Q = {}
Q.__index = Q
Q.__name = "smtp.queue"

local function badarg(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

local function invalid(text)
  return nil, errors.new { kind = "invalid", text = text }
end

-- States are stored as Lua text (smtp.serial: plain data, read back without running anything).
local function serialize(v)
  local text, path, why = serial.encode(v)
  if not text then error(why .. (path ~= "" and (" at " .. path) or ""), 0) end
  return text
end

local function read_all(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local d = f:read("*a")
  f:close()
  return d
end

local function deserialize(s)
  local v, err = serial.decode(s, "state")
  if v == nil then return nil, err end
  if type(v) ~= "table" or type(v.recipients) ~= "table" then return nil, "not a state" end
  return v
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function list(dir)
  local names = core.spool_list(dir) or {}
  local out = {}
  for _, n in ipairs(names) do
    if n:match("^[%w_-]+$") then out[#out + 1] = n end
  end
  table.sort(out)
  return out
end

-- Test-only kill points: SMTP_QUEUE_CRASH_AT="point" or "point:n" (the n-th time the point is
-- reached in this process) makes the process kill itself with SIGKILL there, as a power cut or
-- OOM kill would. spec/queue_crash_spec.lua walks every point.
local function crash_hook(spec)
  if not spec or spec == "" then return function() end end
  local point, n = spec:match("^([%w_]+):(%d+)$")
  point, n = point or spec, tonumber(n) or 1
  local seen = 0
  return function(at)
    if at ~= point then return end
    seen = seen + 1
    if seen == n then
      io.stdout:flush()
      os.execute("kill -KILL $PPID")
      -- never reached: the shell's parent (this process) is gone
      os.exit(137, false)
    end
  end
end

-- queue.open(dir [, opts]) -> q | nil, err
function M.open(dir, opts)
  if type(dir) ~= "string" or dir == "" then badarg(1, "open", "directory name expected") end
  if opts ~= nil and type(opts) ~= "table" then badarg(2, "open", "table expected, got " .. type(opts)) end
  opts = opts or {}
  for _, k in ipairs { "retry_base", "retry_max", "max_age", "keep_done", "warn_after", "poll" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v ~= v or v < 0) then
      badarg(2, "open", "option '" .. k .. "': non-negative number expected")
    end
  end
  if opts.now ~= nil and type(opts.now) ~= "function" then badarg(2, "open", "option 'now': function expected") end
  if opts.random ~= nil and type(opts.random) ~= "function" then badarg(2, "open", "option 'random': function expected") end
  if opts.via ~= nil and opts.via ~= "mx" and type(opts.via) ~= "table" then
    badarg(2, "open", "option 'via': \"mx\" or a table expected")
  end
  if opts.limits ~= nil and (type(opts.limits) ~= "table" and type(opts.limits) ~= "userdata") then
    badarg(2, "open", "option 'limits': limiter expected")
  end
  for _, sub in ipairs { "", "/tmp", "/msg", "/state", "/done" } do
    local ok, err = core.spool_mkdir(dir .. sub)
    if ok then ok, err = core.spool_list(dir .. sub) end
    if not ok then return invalid("queue directory: " .. tostring(err)) end
  end
  local q = setmetatable({
    dir = dir,
    now = opts.now or os.time,
    random = opts.random or math.random,
    retry_base = opts.retry_base or M.RETRY_BASE,
    retry_max = opts.retry_max or M.RETRY_MAX,
    max_age = opts.max_age or M.MAX_AGE,
    keep_done = opts.keep_done or M.KEEP_DONE,
    warn_after = opts.warn_after,
    limits = opts.limits,
    hostname = opts.hostname,
    via = opts.via,             -- the default of submit's via
    poll = opts.poll or 60,
    connect = opts.connect or function(o) return require("smtp").connect(o) end,
    deliver = opts.deliver or function(o) return require("smtp").deliver(o) end,
    options = opts.options,     -- added to every send/deliver call, not stored (transcript, on_event)
    log = opts.log,
    crash = crash_hook(opts.crash_at or os.getenv("SMTP_QUEUE_CRASH_AT")),
  }, Q)
  return q
end

local function tmpname(q, id)
  return q.dir .. "/tmp/" .. id .. "." .. hex(core.random(6))
end

-- Writes `data` (a string, or an iterator of strings) to tmp/, fsyncs it, renames it to `dest`
-- and fsyncs dest's directory. Returns the still locked file (close it once whatever depends on
-- it is on disk) | nil, err.
local function write_durable(q, id, dest, data, point)
  local tmp, f, err, why
  for _ = 1, 10 do
    tmp = tmpname(q, id)
    f, err, why = core.spool_create(tmp)
    if f or why ~= "retry" then break end
  end
  if not f then return nil, err end
  local ok, werr = true, nil
  if type(data) == "string" then
    ok, werr = f:write(data)
  else
    local pok, perr = pcall(function()
      for chunk in data do
        if type(chunk) ~= "string" then error("message source gave a " .. type(chunk), 0) end
        local w, e = f:write(chunk)
        if not w then error(e, 0) end
      end
    end)
    if not pok then ok, werr = nil, perr end
  end
  q.crash(point .. "_tmp_written")
  if ok then ok, werr = f:sync() end
  if not ok then
    f:close(); os.remove(tmp)
    return nil, werr
  end
  q.crash(point .. "_before_rename")
  local rok, rerr = os.rename(tmp, dest)
  if not rok then
    f:close(); os.remove(tmp)
    return nil, rerr
  end
  q.crash(point .. "_after_rename")
  local dok, derr = core.fsync_dir(dest:match("^(.*)/[^/]*$"))
  if not dok then f:close(); return nil, derr end
  return f
end

function Q:_write_state(st)
  local f, err = write_durable(self, st.id, self.dir .. "/state/" .. st.id, serialize(st), "state")
  if not f then return nil, err end
  f:close()
  return true
end

function Q:_read_state(id, where)
  return deserialize(read_all(self.dir .. "/" .. (where or "state") .. "/" .. id))
end

local function valid_id(id)
  return type(id) == "string" and id:match("^[%w_-]+$") ~= nil and #id <= 64
end

-- q:submit{ message =, from =, to =, via =, key = } -> id | nil, err
function Q:submit(t)
  if getmetatable(self) ~= Q then badarg(1, "submit", "queue expected") end
  if type(t) ~= "table" then badarg(1, "submit", "table expected, got " .. type(t)) end
  local m = t.message
  if m == nil then badarg(1, "submit", "option 'message' required") end
  local from, to = t.from, t.to
  if (from == nil or to == nil) and source.is_message(m) and m.envelope then
    local mf, mt = m:envelope()
    if from == nil then from = mf end
    if to == nil then to = mt end
  end
  if type(to) == "string" then to = { to } end
  if type(from) ~= "string" then badarg(1, "submit", "option 'from': string expected, got " .. type(from)) end
  if type(to) ~= "table" then badarg(1, "submit", "option 'to': string or list expected, got " .. type(to)) end
  local via = t.via or self.via
  if via ~= "mx" and type(via) ~= "table" then badarg(1, "submit", "option 'via': \"mx\" or a table of smtp.send options expected") end
  if t.key ~= nil and (type(t.key) ~= "string" or t.key == "") then badarg(1, "submit", "option 'key': non-empty string expected") end
  local ok, err = check.address(from, "from", true)
  if not ok then return nil, err end
  if #to == 0 then return invalid("to: no recipients") end
  local recipients, seen = {}, {}
  for _, a in ipairs(to) do
    ok, err = check.address(a, "to", false)
    if not ok then return nil, err end
    if not seen[a] then
      seen[a] = true
      recipients[#recipients + 1] = { rcpt = a, state = "pending", attempts = 0 }
    end
  end
  local sok, serr = pcall(serialize, via)
  if not sok then return invalid("via: " .. serr .. " (it is stored with the message)") end

  local id
  if t.key then
    id = hex(core.sha256("lua-smtp queue key\0" .. t.key)):sub(1, 32)
    if exists(self.dir .. "/state/" .. id) or exists(self.dir .. "/done/" .. id) then return id end
  else
    id = hex(core.random(16))
  end
  local src = source.of(m)
  if not src then badarg(1, "submit", "option 'message': string, file, function or smtp.message expected") end
  local now = self.now()
  local lock, werr = write_durable(self, id, self.dir .. "/msg/" .. id, src, "msg")
  if not lock then return nil, errors.new { kind = "invalid", text = "spool: " .. tostring(werr) } end
  local st = { v = 1, id = id, from = from, via = via, key = t.key, created = now, next = now,
    recipients = recipients }
  ok, err = self:_write_state(st)
  lock:close()
  if not ok then
    os.remove(self.dir .. "/msg/" .. id)
    return nil, errors.new { kind = "invalid", text = "spool: " .. tostring(err) }
  end
  return id
end

local function final(r) return r.state == "sent" or r.state == "failed" end

local function domain_of(a)
  return (a:match("@([^@]*)$") or ""):lower()
end

-- The destination a limiter counts: the MX domain, or the smarthost.
local function smarthost_name(via)
  -- "host:port" as smtp.send keys its limits (a limiter's settings for "host" serve every port)
  if via.server then return tostring(via.server):lower() .. (via.port and (":" .. via.port) or "") end
  if via.url then
    local ok, url = pcall(require, "smtp.url")
    if ok then
      local p = url.parse(via.url)
      if p and p.server then return tostring(p.server):lower() end
    end
    return tostring(via.url):gsub("//[^@/]*@", "//")
  end
  return "smarthost"
end

function Q:_backoff(attempts)
  local d = math.min(self.retry_max, self.retry_base * 2 ^ math.max(0, attempts - 1))
  -- jitter: 75% to 125%, so retries of messages deferred together spread out
  d = d * (0.75 + 0.5 * self.random())
  return math.min(self.retry_max, math.floor(d + 0.5))
end

local function set_reply(r, x)
  r.code, r.enhanced, r.text = x.code, x.enhanced, x.text and tostring(x.text) or nil
  r.host = x.host or r.host
end

-- Applies one outcome { status =, code =, enhanced =, text =, host = } to a recipient.
function Q:_outcome(r, o, now, counts)
  set_reply(r, o)
  r.last = now
  r.attempts = (r.attempts or 0) + 1
  if o.status == "sent" then
    r.state = "sent"; r.next = nil
    counts.sent = counts.sent + 1
  elseif o.status == "failed" then
    r.state = "failed"; r.next = nil
    counts.failed = counts.failed + 1
  else
    r.state = "deferred"
    r.next = now + self:_backoff(r.attempts)
    counts.deferred = counts.deferred + 1
  end
end

local function err_outcome(err)
  local permanent = err.kind == "invalid" or (err.kind == "rejected" and not err.temporary)
  return { status = permanent and "failed" or "deferred", code = err.code, enhanced = err.enhanced,
    text = err.text or tostring(err) }
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- Sends one group of recipients; returns { [rcpt] = outcome }, limiter outcome.
function Q:_transmit(st, group)
  local addrs = {}
  for i, r in ipairs(group) do addrs[i] = r.rcpt end
  local f = io.open(self.dir .. "/msg/" .. st.id, "rb")
  if not f then
    local o = { status = "deferred", text = "message file missing" }
    local res = {}
    for _, a in ipairs(addrs) do res[a] = o end
    return res, "error"
  end
  local out = {}
  local busy = false
  local via = st.via
  local mx = via == "mx" or (type(via) == "table" and via.mx)
  local o = (type(via) == "table") and copy(via) or {}
  o.mx = nil
  for k, v in pairs(self.options or {}) do if o[k] == nil then o[k] = v end end
  o.message, o.from, o.to = f, st.from, addrs
  if mx then
    local results, err = self.deliver(o)
    f:close()
    if not results then
      local e = err_outcome(err)
      for _, a in ipairs(addrs) do out[a] = e end
      return out, "error"
    end
    local anyok = false
    for _, r in ipairs(results) do
      out[r.recipient] = { status = r.status, code = r.code, enhanced = r.enhanced, text = r.text, host = r.host }
      if r.status == "sent" then anyok = true end
      if r.code == 421 or (r.code == 451 and tostring(r.text or ""):lower():find("too many")) then busy = true end
    end
    return out, busy and "busy" or (anyok and "ok" or "error")
  end
  -- connect, send, and leave QUIT until the outcome is on disk: the wait for QUIT's reply would
  -- only widen the window in which a kill makes an accepted recipient look unsent
  local dsn = o.dsn
  o.message, o.from, o.to, o.dsn = nil, nil, nil, nil
  local conn, err = self.connect(o)
  local res
  if conn then
    res, err = conn:send { message = f, from = st.from, to = addrs, dsn = dsn }
  end
  f:close()
  if res then
    local host = res.server and res.server.host
    for _, a in ipairs(res.accepted or {}) do
      out[a] = { status = "sent", code = res.reply.code, enhanced = res.reply.enhanced, text = res.reply.text, host = host }
    end
    for _, rj in ipairs(res.rejected or {}) do
      out[rj.recipient] = { status = (rj.code and rj.code >= 500) and "failed" or "deferred",
        code = rj.code, enhanced = rj.enhanced, text = rj.text, host = host }
    end
    return out, "ok", conn
  end
  if err.rejected then
    for _, rj in ipairs(err.rejected) do
      out[rj.recipient] = { status = (rj.code and rj.code >= 500) and "failed" or "deferred",
        code = rj.code, enhanced = rj.enhanced, text = rj.text }
    end
  end
  local e = err_outcome(err)
  for _, a in ipairs(addrs) do out[a] = out[a] or e end
  if err.code == 421 or (err.code == 451 and tostring(err.text or ""):lower():find("too many")) then
    return out, "busy", conn
  end
  return out, "error", conn
end

-- The original's header section, for the DSN's text/rfc822-headers part.
function Q:_headers(id)
  local f = io.open(self.dir .. "/msg/" .. id, "rb")
  if not f then return "" end
  local d = f:read(65536) or ""
  f:close()
  return require("smtp.dsn").headers_of(d)
end

-- Submits a DSN about `rs` (recipients of st) to st.from; idempotent through its key, so a runner
-- killed before it marks them reported submits the same notification again, which is a no-op.
function Q:_notify(st, rs, action, key)
  local dsn = require "smtp.dsn"
  local list = {}
  for _, r in ipairs(rs) do
    list[#list + 1] = { recipient = r.rcpt, action = action, code = r.code, enhanced = r.enhanced,
      status = r.status, text = r.text or (action == "delayed" and "not delivered yet") or nil,
      remote_mta = r.host, last_attempt = r.last,
      will_retry_until = action == "delayed" and (st.created + self.max_age) or nil }
  end
  local msg = dsn.build { to = st.from, recipients = list, arrival = st.created, now = self.now(),
    headers = self:_headers(st.id), reporting_mta = self.hostname, queue_id = st.id }
  return self:submit { message = msg, from = "", to = { st.from }, via = st.via, key = key }
end

-- One message, its lock held: attempts the due recipients, then bounces, warns or finishes.
function Q:_process(id, counts)
  local st = self:_read_state(id)
  if not st then counts.broken = counts.broken + 1; return end
  local now = self.now()
  local changed = false
  -- past max_age: whatever is not final fails now (RFC 5321 §4.5.4.1)
  if now - st.created >= self.max_age then
    for _, r in ipairs(st.recipients) do
      if not final(r) then
        r.state = "failed"; r.next = nil
        r.status = "4.4.7"
        r.text = "delivery time expired" .. (r.text and ("; last reply: " .. r.text) or "")
        counts.failed = counts.failed + 1
        changed = true
      end
    end
  end
  -- groups of due recipients: one per domain for MX delivery, one for a smarthost
  local groups, order = {}, {}
  local mx = st.via == "mx" or (type(st.via) == "table" and st.via.mx)
  for _, r in ipairs(st.recipients) do
    if not final(r) and (r.next or 0) <= now then
      local dest = mx and domain_of(r.rcpt) or smarthost_name(st.via)
      if not groups[dest] then groups[dest] = {}; order[#order + 1] = dest end
      table.insert(groups[dest], r)
    end
  end
  if changed then self:_write_state(st) end
  for _, dest in ipairs(order) do
    local group = groups[dest]
    local go, wait = true, nil
    if self.limits then
      go, wait = self.limits:acquire(dest)
      -- and the destination's message rate, when the limiter keeps one (smtp.limits does)
      if go and self.limits.take then
        local tok, twait = self.limits:take(dest)
        if not tok then
          self.limits:release(dest, "ok")
          go, wait = nil, twait
        end
      end
    end
    if not go then
      -- not an attempt: the destination is at its limit; come back when the limiter says
      local t = now + math.max(1, math.ceil(tonumber(wait) or 60))
      for _, r in ipairs(group) do r.next = t end
      counts.limited = counts.limited + #group
    else
      self.crash("before_transaction")
      local ok, out, outcome, conn = pcall(self._transmit, self, st, group)
      if not ok then
        if self.limits then self.limits:release(dest, "error") end
        error(out, 0)
      end
      self.crash("after_transaction")
      now = self.now()
      for _, r in ipairs(group) do
        self:_outcome(r, out[r.rcpt] or { status = "deferred", text = "no outcome for this recipient" }, now, counts)
      end
      -- on disk before the next transaction begins: a restart never repeats an accepted recipient
      local wok, werr = self:_write_state(st)
      if conn then conn:close() end
      if self.limits then self.limits:release(dest, outcome) end
      if not wok then error("queue: cannot write the state of " .. id .. ": " .. tostring(werr), 0) end
    end
    if not go then self:_write_state(st) end
  end
  -- bounces for recipients failed and not yet reported; never to the null sender
  local failed = {}
  for _, r in ipairs(st.recipients) do
    if r.state == "failed" and not r.reported then failed[#failed + 1] = r end
  end
  if #failed > 0 then
    if st.from ~= "" then
      local names = {}
      for i, r in ipairs(failed) do names[i] = r.rcpt end
      local bid, berr = self:_notify(st, failed, "failed", "dsn:" .. id .. ":" .. table.concat(names, ","))
      if not bid then error("queue: cannot queue the bounce of " .. id .. ": " .. tostring(berr), 0) end
      counts.bounced = counts.bounced + 1
      self.crash("after_bounce")
    end
    for _, r in ipairs(failed) do r.reported = true end
    self:_write_state(st)
  end
  -- delayed-delivery warning, once
  if self.warn_after and not st.warned and st.from ~= "" and now - st.created >= self.warn_after then
    local late = {}
    for _, r in ipairs(st.recipients) do
      if r.state == "deferred" then late[#late + 1] = r end
    end
    if #late > 0 then
      local wid, werr = self:_notify(st, late, "delayed", "delay:" .. id)
      if not wid then error("queue: cannot queue the warning for " .. id .. ": " .. tostring(werr), 0) end
      counts.warned = counts.warned + 1
      st.warned = true
      self:_write_state(st)
    end
  end
  local nxt
  for _, r in ipairs(st.recipients) do
    if not final(r) then nxt = math.min(nxt or math.huge, r.next or now) end
  end
  if not nxt then
    -- finished: the state moves to done/ (one rename), then the message goes
    st.finished = self.now()
    st.next = nil
    self:_write_state(st)
    self.crash("before_done_rename")
    os.rename(self.dir .. "/state/" .. id, self.dir .. "/done/" .. id)
    core.fsync_dir(self.dir .. "/done")
    core.fsync_dir(self.dir .. "/state")
    self.crash("after_done_rename")
    os.remove(self.dir .. "/msg/" .. id)
    counts.done = counts.done + 1
  elseif nxt ~= st.next then
    st.next = nxt
    self:_write_state(st)
  end
end

-- Removes what dead writers left: tmp files nobody holds, messages without a state.
function Q:_clean()
  for _, n in ipairs(core.spool_list(self.dir .. "/tmp") or {}) do
    local p = self.dir .. "/tmp/" .. n
    local l = core.spool_lock(p)
    if l then os.remove(p); l:close() end
  end
  for _, id in ipairs(list(self.dir .. "/msg")) do
    if not exists(self.dir .. "/state/" .. id) then
      local l = core.spool_lock(self.dir .. "/msg/" .. id)
      -- a live submitter holds the lock until the state is in place
      if l then
        if not exists(self.dir .. "/state/" .. id) then os.remove(self.dir .. "/msg/" .. id) end
        l:close()
      end
    end
  end
  local now = self.now()
  -- finished states are few to drop and many to read: once an hour is enough
  if self.purged and now - self.purged < 3600 and now >= self.purged then return end
  self.purged = now
  for _, id in ipairs(list(self.dir .. "/done")) do
    local st = self:_read_state(id, "done")
    if not st or now - (st.finished or st.created or now) >= self.keep_done then
      os.remove(self.dir .. "/done/" .. id)
    end
  end
end

-- q:run_once([opts]) -> counts: one pass over the spool, delivering what is due now. counts has
-- messages (looked at), sent, failed, deferred (recipients), bounced, warned, done (messages
-- finished), locked (skipped: another runner holds them), limited, broken, next (the earliest
-- time something is due, or nil when the spool is empty).
function Q:run_once()
  if getmetatable(self) ~= Q then badarg(1, "run_once", "queue expected") end
  local counts = { messages = 0, sent = 0, failed = 0, deferred = 0, bounced = 0, warned = 0,
    done = 0, locked = 0, limited = 0, broken = 0 }
  self:_clean()
  -- each pass reads the directory afresh: bounces submitted during the pass go out in it too
  local pass, seen = 0, {}
  repeat
    pass = pass + 1
    local more = false
    for _, id in ipairs(list(self.dir .. "/state")) do
      if not seen[id] then
        seen[id] = true
        more = true
        local st = self:_read_state(id)
        if not st then counts.broken = counts.broken + 1 end
        if st and (st.next or 0) <= self.now() then
          local lock, _, why = core.spool_lock(self.dir .. "/msg/" .. id)
          if lock then
            counts.messages = counts.messages + 1
            local ok, err = pcall(self._process, self, id, counts)
            lock:close()
            if not ok then
              if self.log then self.log("queue: " .. id .. ": " .. tostring(err)) end
              counts.errors = (counts.errors or 0) + 1
            end
            st = self:_read_state(id)
          elseif why == "locked" then
            counts.locked = counts.locked + 1
            st = nil
          end
        end
        if st and st.next then counts.next = math.min(counts.next or math.huge, st.next) end
      end
    end
  until not more or pass >= 3
  return counts
end

-- q:run([opts]): runs passes until opts.stop() is true (or forever), sleeping until the next due
-- time (at most opts.poll seconds, default the queue's poll, 60) between them. Inside smtp.loop or
-- cqueues the sleep yields; elsewhere it blocks. opts.sleep replaces the sleep (tests).
function Q:run(opts)
  if getmetatable(self) ~= Q then badarg(1, "run", "queue expected") end
  opts = opts or {}
  local sleep = opts.sleep or function(s) require("smtp.wait").sleep(s) end
  local poll = opts.poll or self.poll
  while true do
    local counts = self:run_once()
    if opts.on_pass then opts.on_pass(counts) end
    if opts.stop and opts.stop(counts) then return counts end
    local wait = poll
    if counts.next then wait = math.max(0, math.min(poll, counts.next - self.now())) end
    if counts.locked > 0 then wait = math.min(wait, 1) end
    sleep(math.max(wait, 0.05))
  end
end

-- q:list() -> { { id =, from =, created =, next =, recipients = {...} , state = "corrupt"? } ... }
function Q:list()
  local out = {}
  for _, id in ipairs(list(self.dir .. "/state")) do
    local st = self:_read_state(id)
    out[#out + 1] = st or { id = id, corrupt = true, recipients = {} }
  end
  return out
end

-- q:show(id) -> state | nil, err
function Q:show(id)
  if not valid_id(id) then return invalid("not a queue id: " .. tostring(id)) end
  local st = self:_read_state(id) or self:_read_state(id, "done")
  if not st then return invalid("no message " .. id .. " in the queue") end
  return st
end

-- Changes a message's state under its lock: nil, err when a runner holds it now.
function Q:_with_lock(id, fn)
  if not valid_id(id) or not exists(self.dir .. "/state/" .. id) then
    return invalid("no message " .. tostring(id) .. " in the queue")
  end
  local lock, err, why = core.spool_lock(self.dir .. "/msg/" .. id)
  if not lock then
    return nil, errors.new { kind = "invalid", text = why == "locked" and ("message " .. id .. " is being delivered now") or tostring(err),
      temporary = why == "locked" }
  end
  local ok, r, e = pcall(fn)
  lock:close()
  if not ok then error(r, 0) end
  return r, e
end

-- q:retry(id) -> true | nil, err: makes every deferred recipient due now.
function Q:retry(id)
  return self:_with_lock(id, function()
    local st = self:_read_state(id)
    if not st then return invalid("no message " .. id .. " in the queue") end
    local now = self.now()
    for _, r in ipairs(st.recipients) do
      if not final(r) then r.next = now end
    end
    st.next = now
    local ok, err = self:_write_state(st)
    if not ok then return invalid(tostring(err)) end
    return true
  end)
end

-- q:delete(id) -> true | nil, err: removes the message without a bounce.
function Q:delete(id)
  return self:_with_lock(id, function()
    os.remove(self.dir .. "/state/" .. id)
    core.fsync_dir(self.dir .. "/state")
    os.remove(self.dir .. "/msg/" .. id)
    return true
  end)
end

-- q:stats() -> { messages =, recipients = { pending =, deferred =, sent =, failed = },
--               destinations = { [domain or smarthost] = { pending =, deferred = } } }
function Q:stats()
  local s = { messages = 0, recipients = { pending = 0, deferred = 0, sent = 0, failed = 0 }, destinations = {} }
  for _, st in ipairs(self:list()) do
    s.messages = s.messages + 1
    local mx = st.via == "mx" or (type(st.via) == "table" and st.via.mx)
    for _, r in ipairs(st.recipients) do
      s.recipients[r.state] = (s.recipients[r.state] or 0) + 1
      if not final(r) then
        local dest = mx and domain_of(r.rcpt) or smarthost_name(st.via or {})
        local d = s.destinations[dest] or { pending = 0, deferred = 0 }
        s.destinations[dest] = d
        d[r.state] = (d[r.state] or 0) + 1
      end
    end
  end
  return s
end

return M
