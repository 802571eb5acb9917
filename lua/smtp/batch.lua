-- smtp.batch: runs a list of transactions over one session (conn:send is a list of one). The
-- commands of one transaction never interleave with another's, so the replies on the wire come
-- in runs, one per transaction: the batch keeps the transactions in a FIFO and hands each reply to
-- the oldest one still awaiting some. It starts the next transaction as soon as the last one
-- allows (transaction.is_open), with RSET first when the one before may have left a MAIL open;
-- and when the session ends it gives each entry its own outcome: attempted ones their result or
-- error, the rest kind "closed", temporary, attempted = false.
local config = require "smtp.config"
local errors = require "smtp.errors"
local session = require "smtp.session"
local transaction = require "smtp.transaction"
local observe = require "smtp.observe"

local M = {}

local new_error = errors.new
local WRITE_BATCH, is_open = transaction.WRITE_BATCH, transaction.is_open
-- Transactions in flight at once with PIPELINING (small messages: MAIL, RCPTs and BDAT LAST
-- each), and how far the window drains before it is filled again, so writes stay large.
local WINDOW, REFILL = 32, 16


-- Each entry gets its own error table (a caller may annotate one without touching the others).
local function copy_error(err)
  local t = {}
  for k, v in pairs(err) do t[k] = v end
  return new_error(t)
end

-- The session ended with `err` while `culprit` waited for a reply: the transactions in q[qh..qt]
-- that are not over get kind "closed", the entries from nxt on were never attempted.
local function ended(err, culprit, q, qh, qt, descs, nxt, n, out)
  if culprit and not culprit:decided() then culprit:_fail(err) end
  local gone = new_error { kind = "closed", temporary = true, phase = err.phase,
    text = "the session ended before the server answered (" .. tostring(err) .. ")" }
  for i = qh, qt do
    local tx = q[i]
    if not tx:decided() then tx:_fail(copy_error(gone)) end
    out[tx.i] = tx.result or tx.err
  end
  for i = nxt, n do
    if descs[i] then
      out[i] = new_error { kind = "closed", temporary = true, attempted = false,
        text = "not attempted: the session ended (" .. tostring(err) .. ")" }
    end
  end
  return out
end

-- Tells the session's on_event about each transaction's outcome (smtp.transaction counts them).
-- `idx` maps a limited run's slice back to the entries' numbers.
local function outcomes(sess, descs, out, n, idx)
  local ev = sess.ev
  for i = 1, n do
    local r = out[i]
    if descs[i] then
      local failed = errors.is(r)
      local reply = failed and r or r.reply
      observe.event(ev, "transaction", sess.id, { ok = not failed, index = idx and idx[i] or i,
        accepted = failed and 0 or #r.accepted,
        rejected = (failed and (r.rejected and #r.rejected or 0)) or #r.rejected,
        code = reply.code, enhanced = reply.enhanced, text = reply.text,
        message_id = not failed and r.message_id or nil, error = failed and r or nil })
    end
  end
  return out
end

-- descs[i]: a transaction description (config.message) or false when out[i] already holds the
-- entry's error. Fills out[1..n].
local run_txs
local function run(sess, descs, out, n)
  out = run_txs(sess, descs, out, n)
  if sess.ev then return outcomes(sess, descs, out, n) end
  return out
end

function run_txs(sess, descs, out, n)
  local q, qh, qt = {}, 1, 0       -- transactions started and not over, oldest first
  local nxt, prev, last_sent = 1, nil, nil
  local e = sess.engine

  while true do
    -- start what may start now (most replies change nothing here: checked before the loop)
    if nxt <= n and qt - qh < REFILL and (not prev or is_open(prev)) then
      while nxt <= n and not sess.dead do
        local d = descs[nxt]
        if d then
          if prev and not is_open(prev) then break end
          if qt - qh + 1 >= WINDOW or e:outlen() >= WRITE_BATCH then break end
          local tx = transaction.new(sess, d)
          tx.i = nxt
          tx:start(last_sent ~= nil and last_sent.dirty ~= false)
          prev = tx
          if tx.nexp == 0 then
            out[nxt] = tx.result or tx.err   -- refused before any command
          else
            last_sent = tx
            qt = qt + 1
            q[qt] = tx
          end
        end
        nxt = nxt + 1
      end
    end
    if qh > qt then
      if nxt > n then break end
    else
      local tx = q[qh]
      -- _reply writes what the engine holds before it waits, so commands queued since the last
      -- reply leave together
      local r, err = sess:_reply(tx)
      if not r then return ended(err, tx, q, qh, qt, descs, nxt, n, out) end
      if not tx:take(r) then
        out[tx.i] = tx.result or tx.err
        return ended(tx.err, nil, q, qh, qt, descs, nxt, n, out)
      end
      if tx.nexp == 0 then
        out[tx.i] = tx.result or tx.err
        qh = qh + 1
      end
    end
  end
  -- leave the session clean for what comes next: the last transaction may have left a MAIL open
  if last_sent and last_sent.dirty ~= false and not sess.dead then
    local r = session.command(sess, "mail", e.rset)
    if r and r.code ~= 250 then sess:_abort() end
  end
  return out
end

-- conn:send{ message =, from =, to =, dsn = } -> result | nil, err
function M.send(sess, opts)
  local ok, err = session.alive(sess, "send")
  local d, derr = config.message(opts, "send")
  if not d then return nil, derr end
  if not ok then return nil, err end
  return M.run_one(sess, d)
end

-- One checked description on an open session -> result | nil, err.
function M.run_one(sess, d)
  local res = run(sess, { d }, {}, 1)[1]
  if errors.is(res) then return nil, res end
  return res
end

-- Limited runs (smtp.limits) -------------------------------------------------------------------
-- Workers share one queue of entries. Each holds a connection slot of the destination while its
-- session is open, takes a rate token per message (the first waited for, then as many as are
-- free, so a fast rate still pipelines), ends the session after messages_per_connection, and
-- puts back entries whose session ended under them or that the server refused for load: they go
-- out on a later session, after the limiter's pause, up to `retries` times each.

local RETRY_POLL = 0.05

-- entries whose input was refused (descs[i] false) already have their error: the queue skips them
local function pending(st)
  if st.rh <= st.rt then return true end
  while st.nxt <= st.n and not st.descs[st.nxt] do st.nxt = st.nxt + 1 end
  return st.nxt <= st.n
end

local function pop(st)
  if st.rh <= st.rt then
    local i = st.retry[st.rh]
    st.retry[st.rh] = nil
    st.rh = st.rh + 1
    return i
  end
  if pending(st) then
    local i = st.nxt
    st.nxt = i + 1
    return i
  end
end

local function finish(st, i, r)
  st.out[i] = r
  st.left = st.left - 1
  if st.on_result then st.on_result(i, r) end
end

-- Every entry still queued gets `err` (the destination cannot be reached the way it is asked).
local function fail_queued(st, err)
  while pending(st) do finish(st, pop(st), copy_error(err)) end
end

local function worker(st, conn)
  local lim, dest, limits = st.lim, st.dest, st.limits
  local wait = require "smtp.wait"
  local sent, fails = 0, 0
  local mpc = lim:settings(dest).messages_per_connection
  while st.left > 0 do
    if not pending(st) then
      -- the rest are on other sessions, one may come back
      if conn then
        if conn ~= st.keep then conn:quit() end
        lim:release(dest, "ok"); conn = nil
      end
      if st.left == 0 then break end
      wait.sleep(RETRY_POLL)
    elseif not conn then
      lim:wait(dest, "connection")
      local err
      if pending(st) then conn, err = st.open() end
      if not conn and not err then
        lim:release(dest, "ok")
      elseif not conn then
        lim:release(dest, limits.outcome(err))
        fails = fails + 1
        -- a refusal that is not about load, or a destination that stays away: the queue fails
        if not err.temporary or fails > st.retries then fail_queued(st, err) end
      else
        sent = 0
      end
    else
      lim:wait(dest, "message")
      local idx, k = {}, 0
      local room = math.min(WINDOW, mpc and (mpc - sent) or WINDOW)
      repeat
        local i = pop(st)
        if not i then break end
        k = k + 1; idx[k] = i
      until k >= room or not pending(st) or not lim:take(dest)
      local descs, out = {}, {}
      for j = 1, k do descs[j] = st.descs[idx[j]] end
      run_txs(conn, descs, out, k)
      if conn.ev then outcomes(conn, descs, out, k, idx) end
      sent = sent + k
      local busy = false
      for j = 1, k do
        local i, r = idx[j], out[j]
        if errors.is(r) then
          local oc = limits.outcome(r)
          if oc == "busy" then busy = true end
          -- a session that dropped (no reply) after a message's end may have delivered it:
          -- that one is not sent again, the caller decides
          local again = r.attempted == false or oc == "busy"
            or (r.kind == "closed" and not (r.code == nil and r.phase == "data_end"))
          if again and (r.attempted == false or st.tries[i] < st.retries) then
            if r.attempted ~= false then st.tries[i] = st.tries[i] + 1 end
            st.rt = st.rt + 1
            st.retry[st.rt] = i
          else
            finish(st, i, r)
          end
        else
          fails = 0
          finish(st, i, r)
        end
      end
      if conn.dead or busy or (mpc and sent >= mpc) then
        local outcome = busy and "busy" or (conn.dead and "error") or "ok"
        if not conn.dead then conn:quit() end
        lim:release(dest, outcome)
        conn = nil
      end
    end
  end
  if conn then
    if conn ~= st.keep then conn:quit() end
    lim:release(dest, "ok")
  end
end

local function limited_state(descs, out, n, lim, dest, opts)
  local retries = opts.retries
  if retries == nil then retries = 5 end
  local tries, left = {}, 0
  for i = 1, n do
    tries[i] = 0
    if descs[i] then left = left + 1 end
  end
  local st = { descs = descs, out = out, n = n, nxt = 1, retry = {}, rh = 1, rt = 0, tries = tries,
    left = left, lim = lim, dest = dest, retries = retries, on_result = opts.on_result,
    limits = require "smtp.limits" }
  return st
end

-- A session that ended is opened again on the same connection object (send_many's caller keeps
-- its conn): a new engine, nothing remembered of the old server's answers.
local function reopen(sess)
  sess:_abort()
  sess.engine = sess:_engine()
  sess.ext, sess.tls, sess.auth_mechanism, sess._info, sess.greeting = {}, nil, nil, nil, nil
  local ok, err = sess:_open()
  if not ok then sess:_abort(); return nil, err end
  return sess
end

local function check_limits(opts, fname)
  if opts == nil then return nil end
  if type(opts) ~= "table" then error("bad argument #2 to '" .. fname .. "' (table expected)", 4) end
  local lim = opts.limits
  if lim ~= nil and not require("smtp.limits").is(lim) then
    error("bad argument #2 to '" .. fname .. "' (limits: smtp.limits expected)", 4)
  end
  if opts.retries ~= nil and (type(opts.retries) ~= "number" or opts.retries < 0 or opts.retries % 1 ~= 0) then
    error("bad argument #2 to '" .. fname .. "' (retries: non-negative integer expected)", 4)
  end
  if opts.destination ~= nil and type(opts.destination) ~= "string" then
    error("bad argument #2 to '" .. fname .. "' (destination: string expected)", 4)
  end
  return lim
end

-- conn:send_many{ opts1, opts2, ... } [, { limits =, retries =, destination = }] -> a list with,
-- for each, the result conn:send would give or its error (an smtp.errors table: check `.kind`).
-- With limits the session counts as a connection of its destination (host:port) while the call
-- runs, messages are paced, and the session is opened again as the limits ask.
function M.send_many(sess, list, opts)
  local ok, err = session.alive(sess, "send_many")
  if type(list) ~= "table" then error("bad argument #1 to 'send_many' (list expected)", 3) end
  local lim = check_limits(opts, "send_many")
  local out, descs, n = {}, {}, #list
  for i = 1, n do
    local d, derr = config.message(list[i], "send_many")
    descs[i] = d or false
    if not d then out[i] = derr end
  end
  if not ok then
    for i = 1, n do out[i] = out[i] or copy_error(err) end
    return out
  end
  if not lim then return run(sess, descs, out, n) end
  local dest = opts.destination or (sess.cfg.server .. ":" .. sess.cfg.port)
  local st = limited_state(descs, out, n, lim, dest, opts)
  st.keep = sess
  st.open = function() return reopen(sess) end
  lim:wait(dest, "connection")
  worker(st, sess)
  return out
end

-- batch.bulk{ connect = smtp.connect options, entries = { send opts... }, limits =, destination =,
-- concurrency = 1, retries = 5, on_result = function(i, result_or_err) } -> results: every entry
-- through sessions of its own, at most `concurrency` at once (smtp.loop tasks; one after the
-- other inside cqueues), under the limiter.
function M.bulk(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'bulk' (table expected)", 2) end
  local lim = opts.limits
  if not require("smtp.limits").is(lim) then error("bad argument #1 to 'bulk' (limits: smtp.limits expected)", 2) end
  if type(opts.connect) ~= "table" then error("bad argument #1 to 'bulk' (connect: table expected)", 2) end
  local list = opts.entries
  if type(list) ~= "table" then error("bad argument #1 to 'bulk' (entries: list expected)", 2) end
  local smtp = require "smtp"
  local cfg, cerr = config.connection(opts.connect, "bulk")
  local out, descs, n = {}, {}, #list
  for i = 1, n do
    local d, derr = config.message(list[i], "bulk")
    descs[i] = d or false
    if not d then out[i] = derr end
    if not cfg and d then out[i] = copy_error(cerr); descs[i] = false end
  end
  if not cfg then return out end
  local dest = opts.destination or (cfg.server .. ":" .. cfg.port)
  local st = limited_state(descs, out, n, lim, dest, opts)
  st.open = function() return smtp.connect(opts.connect) end
  local workers = math.max(1, math.min(opts.concurrency or 1, st.left))
  local loop = require "smtp.loop"
  local cq = package.loaded.cqueues
  if workers == 1 or (type(cq) == "table" and cq.running and cq.running()) then
    worker(st, nil)
    return out
  end
  local running, failure = workers, nil
  for _ = 1, workers do
    loop.spawn(function()
      local fine, e = pcall(worker, st, nil)
      if not fine then failure = failure or e end
      running = running - 1
    end)
  end
  if loop.current() then
    while running > 0 do loop.sleep(0.01) end
  else
    loop.run()
  end
  if failure then error(failure, 0) end
  return out
end

return M
