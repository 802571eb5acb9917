-- smtp.background: sending from OpenResty content handlers without making the request wait.
-- smtp.background{...} puts the message in a lua_shared_dict queue and returns its id at once;
-- a per-worker timer loop sends it with smtp.send (or smtp.deliver for via = "mx"), retrying
-- temporary failures with backoff. Any worker may send any message: entries are claimed with an
-- atomic add that expires, so a worker that dies mid-send only delays the message.
--
-- The queue in the shared dict (n counts up from 1 through incr on "tail"):
--   gen        random text, the queue's identity (ids are "<gen>-<n>", unique across restarts)
--   tail       the last index handed out
--   low        every index below it is finished (advisory: a lagging worker may lower it)
--   count      messages held
--   e:<n>      the message: the serialized options, "\n", the message bytes (never rewritten)
--   m:<n>      fixed-width state: attempts, next try, first try, one byte per recipient
--              (rewritten in place: same size, so the dict never frees it to store it again)
--   x:<n>      the last temporary error (best effort)
--   c:<n>      a claim: the sending worker's pid, expiring after claim_ttl
--   s:<n>      the outcome once finished (sent or failed), expiring after status_ttl
-- Nothing here uses the dict's evicting calls (set, add, incr with init): a full dict refuses a
-- new message instead of dropping an old one.
local errors = require "smtp.errors"

local M = { _VERSION = "0.1.0" }

local ngx = rawget(_G, "ngx")

local DEFAULTS = {
  interval = 1,          -- seconds between a worker's scans of the queue
  concurrency = 10,      -- sends in flight per worker
  claim_ttl = 30,        -- a claim not renewed for this long is taken to be a dead worker's
  status_ttl = 3600,     -- how long an outcome stays readable through status(id)
  initial = 60,          -- first retry after this many seconds
  factor = 2,
  max_delay = 3600,      -- retries at most this far apart
  jitter = 0.25,         -- each delay is shortened by up to this fraction, at random
  max_age = 5 * 86400,   -- then the message fails (RFC 5321 4.5.4.1 suggests 4-5 days)
  max_attempts = nil,
  max_messages = nil,    -- nil: as many as the dict holds
  hole_grace = 10,       -- an index without entry or outcome this long is taken as finished
}
M.DEFAULTS = DEFAULTS

-- Options that belong to the queue, not to smtp.send.
local OWN = {
  dict = true, interval = true, concurrency = true, claim_ttl = true, status_ttl = true,
  retry = true, max_messages = true, headroom = true, on_failure = true, on_sent = true,
  hole_grace = true,
}

local function misuse(n, fname, msg)
  error("bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")", 3)
end

local function need_ngx(fname)
  ngx = ngx or rawget(_G, "ngx")
  if type(ngx) ~= "table" or type(ngx.timer) ~= "table" or type(ngx.shared) ~= "table" then
    error(fname .. ": smtp.background runs inside nginx (OpenResty / lua-nginx-module) only", 3)
  end
end

----------------------------------------------------------------------------------------------------
-- Serializing the send options: plain data only (strings, numbers, booleans, tables of them).
local function ser(v, out, fname, path)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = string.format("%q", v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then misuse(1, fname, path .. ": finite number expected") end
    out[#out + 1] = string.format("%.17g", v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    out[#out + 1] = "{"
    for k, x in pairs(v) do
      if type(k) == "string" then
        out[#out + 1] = "[" .. string.format("%q", k) .. "]="
      elseif type(k) == "number" and k % 1 == 0 then
        out[#out + 1] = "[" .. string.format("%d", k) .. "]="
      else
        misuse(1, fname, path .. ": only string and integer keys can be queued")
      end
      ser(x, out, fname, path .. "." .. tostring(k))
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  else
    misuse(1, fname, "option '" .. path .. "' is a " .. t .. ": only plain data can be queued "
      .. "(give functions to smtp.background.start in every worker)")
  end
end

local function serialize(v, fname)
  local out = {}
  ser(v, out, fname, "opts")
  return table.concat(out)
end

local function deserialize(s)
  local f = load("return " .. s, "=smtp.background", "t", {})
  if not f then return nil end
  local ok, v = pcall(f)
  return ok and v or nil
end

----------------------------------------------------------------------------------------------------
-- The fixed-width state of an entry: attempts (6 digits), next try and first try (milliseconds
-- since the epoch, 15 digits each), then one byte per recipient: "." pending, "s" sent, "f" failed.
local function meta_pack(attempts, due, first, states)
  return string.format("%06d %015d %015d ", attempts, math.floor(due * 1000), math.floor(first * 1000)) .. states
end

local function meta_unpack(m)
  local a, d, f, st = m:match("^(%d+) (%d+) (%d+) (.*)$")
  if not a then return nil end
  return tonumber(a), tonumber(d) / 1000, tonumber(f) / 1000, st
end

----------------------------------------------------------------------------------------------------
-- Per-worker queues, by dict name.
local queues = {}

local function open_dict(name, fname)
  local d = ngx.shared[name]
  if not d then
    error(fname .. ": no lua_shared_dict named '" .. tostring(name) .. "' (add `lua_shared_dict "
      .. tostring(name) .. " 10m;` to the http block)", 3)
  end
  return d
end

-- The queue's identity and counters: made once, by whichever worker comes first (safe_add is
-- atomic and never evicts). The counters are then only changed by incr on an existing number,
-- which is done in place.
local function generation(dict)
  local g = dict:get("gen")
  if not g then
    dict:safe_add("gen", string.format("%011x%05x%04x", math.floor(ngx.now() * 1000),
      ngx.worker.pid() % 0x100000, math.random(0, 0xffff)))
    g = dict:get("gen")
  end
  for _, k in ipairs { "tail", "count" } do
    if dict:get(k) == nil then dict:safe_add(k, 0) end
  end
  if dict:get("low") == nil then dict:safe_add("low", 1) end
  if not g or dict:get("tail") == nil or dict:get("count") == nil then
    error("smtp.background: the lua_shared_dict has no room for the queue's counters", 3)
  end
  return g
end

local function check_cfg(cfg, fname)
  if type(cfg) ~= "table" then misuse(1, fname, "table expected, got " .. type(cfg)) end
  if type(cfg.dict) ~= "string" then misuse(1, fname, "option 'dict': name of a lua_shared_dict expected") end
  for _, k in ipairs { "interval", "concurrency", "claim_ttl", "status_ttl", "max_messages", "headroom", "hole_grace" } do
    if cfg[k] ~= nil and (type(cfg[k]) ~= "number" or cfg[k] < 0) then
      misuse(1, fname, "option '" .. k .. "': non-negative number expected")
    end
  end
  for _, k in ipairs { "on_failure", "on_sent" } do
    if cfg[k] ~= nil and type(cfg[k]) ~= "function" then
      misuse(1, fname, "option '" .. k .. "': function expected")
    end
  end
  if cfg.retry ~= nil then
    if type(cfg.retry) ~= "table" then misuse(1, fname, "option 'retry': table expected") end
    for k, v in pairs(cfg.retry) do
      if DEFAULTS[k] == nil and k ~= "max_attempts" then misuse(1, fname, "option 'retry': unknown field '" .. tostring(k) .. "'") end
      if type(v) ~= "number" or v < 0 then misuse(1, fname, "option 'retry." .. tostring(k) .. "': non-negative number expected") end
    end
  end
end

local function setting(q, k)
  local r = q.cfg.retry
  if r and r[k] ~= nil then return r[k] end
  if q.cfg[k] ~= nil then return q.cfg[k] end
  return DEFAULTS[k]
end

local pass   -- forward

-- A run at once (after the current request's handler), unless one runs or is already coming: a
-- burst of submits must not pile up zero-delay timers (nginx caps the pending ones).
local function kick(q)
  if q.running or q.kicked or q.stopping then return end
  local ok, err = ngx.timer.at(0, pass, q)
  if ok then q.kicked = true else ngx.log(ngx.WARN, "smtp.background: could not start a queue run: ", err) end
end

-- The send defaults: everything in cfg that is not the queue's own.
local function defaults_of(cfg)
  local d = {}
  for k, v in pairs(cfg) do if not OWN[k] then d[k] = v end end
  return d
end

-- start(cfg): this worker's queue loop (call it from init_worker_by_lua). cfg holds the queue's
-- settings and the send defaults every message of this worker is sent with. Again in the same
-- worker: new settings for the running loop.
function M.start(cfg)
  need_ngx("start")
  check_cfg(cfg, "start")
  local q = queues[cfg.dict]
  if not q then
    local dict = open_dict(cfg.dict, "start")
    q = { name = cfg.dict, dict = dict, low = 1, holes = {}, running = false, stopping = false }
    q.gen = generation(dict)
    queues[cfg.dict] = q
    math.randomseed(math.floor(ngx.now() * 1000) + ngx.worker.pid() * 7919)
  end
  q.cfg, q.defaults = cfg, defaults_of(cfg)
  if q.timer then return true end
  local every = setting(q, "interval")
  if every <= 0 then every = DEFAULTS.interval end
  local ok, err = ngx.timer.every(every, function(premature)
    if premature then q.stopping = true; return end
    if not q.running then pass(false, q) end
  end)
  if not ok then return nil, err end
  q.timer = true
  kick(q)
  return true
end

local function queue_of(name, fname)
  need_ngx(fname)
  local q = queues[name]
  if q then return q end
  -- A worker that never called start: a loop with the defaults, so the message is sent anyway.
  M.start { dict = name }
  return queues[name]
end

----------------------------------------------------------------------------------------------------
local function full_error(q, why)
  return nil, errors.new { kind = "full", temporary = true,
    text = "smtp.background: queue '" .. q.name .. "' is full (" .. why .. "): message not accepted" }
end

local function render(message)
  local t = type(message)
  if t == "string" then return message end
  if io.type(message) == "file" then return message:read("*a") end
  if t == "function" then
    local parts = {}
    for chunk in message do parts[#parts + 1] = chunk end
    return table.concat(parts)
  end
  if (t == "table" or t == "userdata") and type(message.source) == "function" then
    local parts = {}
    for chunk in message:source() do parts[#parts + 1] = chunk end
    return table.concat(parts)
  end
  return nil
end

-- smtp.background(opts) -> id | nil, err: queues one message (the options of smtp.send, plus
-- dict = and via = "mx"); nothing is sent before this returns.
function M.submit(opts)
  if type(opts) ~= "table" then misuse(1, "background", "table expected, got " .. type(opts)) end
  need_ngx("background")
  local name = opts.dict
  if name == nil then
    name = next(queues)
    if name == nil then
      misuse(1, "background", "option 'dict': no queue started in this worker (call smtp.background.start"
        .. "{ dict = ... } from init_worker_by_lua, or give dict =)")
    end
  elseif type(name) ~= "string" then
    misuse(1, "background", "option 'dict': name of a lua_shared_dict expected")
  end
  local q = queue_of(name, "background")
  if opts.message == nil then misuse(1, "background", "option 'message': message expected") end
  local from, to = opts.from, opts.to
  if (from == nil or to == nil) and type(opts.message) == "table" and type(opts.message.envelope) == "function" then
    local mf, mt = opts.message:envelope()
    if from == nil then from = mf end
    if to == nil then to = mt end
  end
  if type(to) == "string" then to = { to } end
  if type(to) == "table" then
    -- each recipient once: the state bytes are per address
    local seen, once = {}, {}
    for _, r in ipairs(to) do
      if not seen[r] then seen[r] = true; once[#once + 1] = r end
    end
    to = once
  end
  local raw = render(opts.message)
  if raw == nil then misuse(1, "background", "option 'message': string, file, function or smtp.message expected") end
  if type(from) ~= "string" then return errors.invalid("from: no envelope sender (give from = ...)") end
  if type(to) ~= "table" or #to == 0 then return errors.invalid("to: no recipients") end
  -- What the message is sent with: this worker's defaults, then the caller's options. Checked
  -- now, as smtp.send would, so bad input is refused here and not hours later.
  local rec = {}
  for k, v in pairs(opts) do
    if not OWN[k] and k ~= "message" and k ~= "from" and k ~= "to" then rec[k] = v end
  end
  rec.from, rec.to = from, to
  local body = serialize(rec, "background")
  local merged = {}
  for k, v in pairs(q.defaults) do merged[k] = v end
  for k, v in pairs(rec) do merged[k] = v end
  local config = require "smtp.config"
  local copy = {}
  for k, v in pairs(merged) do copy[k] = v end
  copy.message, copy.to = raw, {}
  for i, r in ipairs(to) do copy.to[i] = r end
  local ok, err = config.message(copy, "background")
  if not ok then return nil, err end
  if merged.via ~= "mx" then
    if merged.via ~= nil then misuse(1, "background", "option 'via': \"mx\" or nil expected") end
    ok, err = config.connection(copy, "background")
    if not ok then return nil, err end
  end

  local dict = q.dict
  local max = q.cfg.max_messages
  local headroom = q.cfg.headroom or math.max(64 * 1024, math.floor(dict:capacity() / 20))
  -- Keep room for the claims, states and outcomes of the messages already held.
  if dict:free_space() < headroom + #body + #raw then
    return full_error(q, "the lua_shared_dict has no room left")
  end
  local n = dict:incr("count", 1)
  if not n then return full_error(q, "the queue's counters are gone") end
  if max and n > max then
    dict:incr("count", -1)
    return full_error(q, "it holds " .. max .. " messages, its max_messages")
  end
  local idx = dict:incr("tail", 1)
  local now = ngx.now()
  local okm, e1 = dict:safe_add("m:" .. idx, meta_pack(0, now, now, ("."):rep(#to)))
  local oke, e2 = okm and dict:safe_add("e:" .. idx, #body .. "\n" .. body .. raw)
  if not (okm and oke) then
    dict:delete("m:" .. idx)
    dict:incr("count", -1)
    return full_error(q, "the lua_shared_dict has no room left: " .. tostring(e1 or e2))
  end
  kick(q)
  return q.gen .. "-" .. idx
end

----------------------------------------------------------------------------------------------------
-- Sending.

local function short(s, n)
  s = tostring(s)
  if #s > n then s = s:sub(1, n) end
  return s
end

local function finish(q, idx, outcome)
  local dict = q.dict
  local id = q.gen .. "-" .. idx
  outcome.id = id
  -- The entry goes first, so its room can hold the outcome. Until the outcome is written a
  -- scanning worker sees an index with neither, and waits hole_grace before passing it by.
  dict:delete("e:" .. idx)
  dict:delete("m:" .. idx)
  dict:delete("x:" .. idx)
  dict:incr("count", -1)
  dict:delete("c:" .. idx)
  -- Outcomes only while some room is left: claims and the messages held come first.
  local s = serialize(outcome, "background")
  if dict:free_space() >= 8192 + #s then
    local ok, err = dict:safe_set("s:" .. idx, s, setting(q, "status_ttl"))
    if not ok then ngx.log(ngx.WARN, "smtp.background: outcome of ", id, " not kept: ", err) end
  else
    ngx.log(ngx.WARN, "smtp.background: outcome of ", id, " not kept: the lua_shared_dict is nearly full")
  end
  local cb = outcome.state == "sent" and q.cfg.on_sent or (outcome.state ~= "sent" and q.cfg.on_failure)
  if cb then
    local ok, err = pcall(cb, id, outcome)
    if not ok then ngx.log(ngx.ERR, "smtp.background: callback for ", id, " raised: ", err) end
  end
end

local function err_table(e)
  if type(e) ~= "table" then return { kind = "closed", text = short(e, 300), temporary = true } end
  return { kind = e.kind, text = short(e.text, 300), code = e.code, enhanced = e.enhanced,
    phase = e.phase, temporary = e.temporary == true }
end

-- The recipients whose state byte is `c`.
local function pick(to, states, c)
  local out = {}
  for i, r in ipairs(to) do if states:sub(i, i) == c then out[#out + 1] = r end end
  return out
end

-- One claimed entry: send it to its pending recipients, then record what became of each.
local function send_one(q, idx)
  local dict = q.dict
  local raw = dict:get("e:" .. idx)
  local meta = dict:get("m:" .. idx)
  if not raw or not meta then dict:delete("c:" .. idx); return end
  local attempts, _, first, states = meta_unpack(meta)
  local len, rest = raw:match("^(%d+)\n()")
  local rec = len and deserialize(raw:sub(rest, rest + tonumber(len) - 1))
  if not rec or not attempts then
    finish(q, idx, { state = "failed", error = { kind = "invalid", text = "corrupt queue entry" } })
    return
  end
  local message = raw:sub(rest + tonumber(len))
  local opts = {}
  for k, v in pairs(q.defaults) do opts[k] = v end
  for k, v in pairs(rec) do opts[k] = v end
  local pending, at = {}, {}
  for i, r in ipairs(rec.to) do
    if states:sub(i, i) == "." then pending[#pending + 1] = r; at[r] = i end
  end
  opts.to, opts.message, opts.via = pending, message, nil
  attempts = attempts + 1

  local st = {}
  for i = 1, #states do st[i] = states:sub(i, i) end
  local results, temp_err = {}, nil
  local ok, a, b = pcall(function()
    if rec.via == "mx" then return require("smtp").deliver(opts) end
    return require("smtp").send(opts)
  end)
  if not ok then a, b = nil, errors.new { kind = "invalid", text = "send raised: " .. short(a, 300) } end
  if rec.via == "mx" and a then
    for _, r in ipairs(a) do
      local i = at[r.recipient]
      if i then
        if r.status == "sent" then st[i] = "s"
        elseif r.status == "failed" then st[i] = "f"
        else temp_err = temp_err or { kind = "rejected", code = r.code, enhanced = r.enhanced, text = short(r.text, 300), temporary = true } end
        results[#results + 1] = { recipient = r.recipient, status = r.status, code = r.code, enhanced = r.enhanced, text = short(r.text, 300) }
      end
    end
  elseif a then
    for _, r in ipairs(a.accepted or {}) do
      local i = at[r]
      if i then st[i] = "s"; results[#results + 1] = { recipient = r, status = "sent", code = a.reply and a.reply.code } end
    end
    for _, r in ipairs(a.rejected or {}) do
      local i = at[r.recipient]
      if i then
        local temporary = r.code and r.code >= 400 and r.code < 500
        if not temporary then st[i] = "f" else temp_err = temp_err or err_table(errors.new { kind = "rejected", code = r.code, enhanced = r.enhanced, text = r.text or "" }) end
        results[#results + 1] = { recipient = r.recipient, status = temporary and "deferred" or "failed", code = r.code, enhanced = r.enhanced, text = short(r.text, 300) }
      end
    end
  else
    local e = err_table(b)
    if type(b) == "table" and type(b.rejected) == "table" and #b.rejected > 0 then
      -- every recipient refused: each for good (5xx) or for now (4xx)
      for _, r in ipairs(b.rejected) do
        local i = at[r.recipient]
        if i then
          local temporary = not (r.code and r.code >= 500)
          if temporary then
            temp_err = temp_err or err_table(errors.new { kind = "rejected", code = r.code, enhanced = r.enhanced, text = r.text or "", temporary = true })
          else
            st[i] = "f"
          end
          results[#results + 1] = { recipient = r.recipient, status = temporary and "deferred" or "failed",
            code = r.code, enhanced = r.enhanced, text = short(r.text, 300) }
        end
      end
    elseif e.temporary then
      temp_err = e
    else
      for _, r in ipairs(pending) do
        st[at[r]] = "f"
        results[#results + 1] = { recipient = r, status = "failed", code = e.code, enhanced = e.enhanced, text = e.text }
      end
    end
    b = e
  end
  local states2 = table.concat(st)
  local now = ngx.now()
  if not states2:find(".", 1, true) then
    local sent = states2:find("s", 1, true) ~= nil
    local failed = states2:find("f", 1, true) ~= nil
    finish(q, idx, { state = failed and (sent and "partial" or "failed") or "sent", attempts = attempts,
      results = results, error = failed and (b or temp_err) or nil, sent = pick(rec.to, states2, "s"),
      failed = pick(rec.to, states2, "f"), message_id = a and a.message_id or nil,
      reply = a and a.reply and { code = a.reply.code, text = short(a.reply.text, 300) } or nil })
    return
  end
  -- Some recipients wait: retry later, or give up.
  local max_attempts = setting(q, "max_attempts")
  if now - first >= setting(q, "max_age") or (max_attempts and attempts >= max_attempts) then
    local why = (max_attempts and attempts >= max_attempts) and ("gave up after " .. attempts .. " attempts")
      or ("gave up after " .. math.floor(now - first) .. " s")
    for i = 1, #st do if st[i] == "." then st[i] = "f" end end
    local final = table.concat(st)
    local sent = final:find("s", 1, true) ~= nil
    finish(q, idx, { state = sent and "partial" or "failed", attempts = attempts, results = results,
      sent = pick(rec.to, final, "s"), failed = pick(rec.to, final, "f"),
      error = { kind = temp_err and temp_err.kind or "closed", text = why .. ": " .. tostring(temp_err and temp_err.text),
        code = temp_err and temp_err.code, temporary = false } })
    return
  end
  local delay = setting(q, "initial") * setting(q, "factor") ^ (attempts - 1)
  delay = math.min(delay, setting(q, "max_delay"))
  delay = delay * (1 - setting(q, "jitter") * math.random())
  dict:replace("m:" .. idx, meta_pack(attempts, now + delay, first, states2))
  dict:safe_set("x:" .. idx, serialize(temp_err or {}, "background"), setting(q, "max_age"))
  dict:delete("c:" .. idx)
end

-- One run over the queue: claims due entries, sends up to `concurrency` at a time in light
-- threads, and goes on until nothing is due.
pass = function(premature, q)
  q.kicked = false
  if premature then q.stopping = true; return end
  if q.running then return end
  q.running = true
  local ok, err = pcall(function()
    local dict = q.dict
    local pid = ngx.worker.pid()
    local conc = setting(q, "concurrency")
    if conc < 1 then conc = 1 end
    while not q.stopping and not ngx.worker.exiting() do
      ngx.update_time()
      local now = ngx.now()
      local tail = dict:get("tail") or 0
      local shared_low = dict:get("low") or 1
      if shared_low > q.low then q.low = shared_low end
      local contiguous, batch = true, {}
      local i = q.low
      while i <= tail and #batch < conc do
        local meta = dict:get("m:" .. i)
        if meta == nil then
          if contiguous then
            -- a hole at the front: finished, or refused when full, or being written this instant
            local done = dict:get("s:" .. i) ~= nil
            if not done then
              local seen = q.holes[i]
              if not seen then q.holes[i] = now elseif now - seen > setting(q, "hole_grace") then done = true end
            end
            if done then
              q.holes[i] = nil
              q.low = i + 1
            else
              contiguous = false
            end
          end
        else
          contiguous = false
          local _, due = meta_unpack(meta)
          if due and due <= now and dict:get("c:" .. i) == nil then
            -- the claim: only one worker's safe_add succeeds
            if dict:safe_add("c:" .. i, pid, setting(q, "claim_ttl")) then
              if dict:get("m:" .. i) then batch[#batch + 1] = i else dict:delete("c:" .. i) end
            end
          end
        end
        i = i + 1
      end
      if q.low > shared_low then dict:safe_set("low", q.low) end
      if #batch == 0 then break end
      local threads, inflight = {}, {}
      for _, idx in ipairs(batch) do
        inflight[idx] = true
        threads[#threads + 1] = ngx.thread.spawn(function()
          local sok, serr = pcall(send_one, q, idx)
          inflight[idx] = nil
          if not sok then
            ngx.log(ngx.ERR, "smtp.background: sending ", q.gen, "-", idx, " raised: ", serr)
            dict:delete("c:" .. idx)
          end
        end)
      end
      -- Claims last claim_ttl, and are renewed every third of it while their send goes on: a
      -- send may take longer than the ttl, a dead worker's claim still lapses soon.
      local ttl = setting(q, "claim_ttl")
      local keeper = ngx.thread.spawn(function()
        while next(inflight) do
          ngx.sleep(ttl / 3)
          for idx in pairs(inflight) do dict:expire("c:" .. idx, ttl) end
        end
      end)
      for _, t in ipairs(threads) do ngx.thread.wait(t) end
      ngx.thread.kill(keeper)
    end
  end)
  q.running = false
  if not ok then ngx.log(ngx.ERR, "smtp.background: queue run failed: ", err) end
end

----------------------------------------------------------------------------------------------------
-- status(id [, dict]) -> { state = "queued" | "sending" | "sent" | "partial" | "failed", ... } | nil, err
function M.status(id, name)
  if type(id) ~= "string" then misuse(1, "status", "string expected, got " .. type(id)) end
  need_ngx("status")
  name = name or next(queues)
  if type(name) ~= "string" then misuse(2, "status", "name of a lua_shared_dict expected") end
  local dict = open_dict(name, "status")
  local gen, idx = id:match("^(%x+)%-(%d+)$")
  if not gen then return nil, "not an smtp.background id: " .. id end
  if gen ~= dict:get("gen") then return nil, "unknown id (another queue, or before a restart): " .. id end
  local s = dict:get("s:" .. idx)
  if s then return deserialize(s) or { state = "unknown", id = id } end
  local meta = dict:get("m:" .. idx)
  if not meta then return nil, "unknown id (finished long ago, or never accepted): " .. id end
  local attempts, due, first, states = meta_unpack(meta)
  local x = dict:get("x:" .. idx)
  local by = dict:get("c:" .. idx)
  return {
    id = id, state = by and "sending" or "queued", claimed_by = by, attempts = attempts,
    next_attempt = due, queued_at = first, recipients = #states,
    pending = select(2, states:gsub("%.", "")), last_error = x and deserialize(x) or nil,
  }
end

-- stats([dict]) -> { queued =, accepted =, low = }: messages held, ids handed out, scan start.
function M.stats(name)
  need_ngx("stats")
  name = name or next(queues)
  local dict = open_dict(name, "stats")
  return { queued = dict:get("count") or 0, accepted = dict:get("tail") or 0, low = dict:get("low") or 1,
    free_space = dict:free_space(), capacity = dict:capacity() }
end

return setmetatable(M, { __call = function(_, opts) return M.submit(opts) end })
