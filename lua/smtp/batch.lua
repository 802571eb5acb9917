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
local function outcomes(sess, descs, out, n)
  local ev = sess.ev
  for i = 1, n do
    local r = out[i]
    if descs[i] then
      local failed = errors.is(r)
      local reply = failed and r or r.reply
      observe.event(ev, "transaction", sess.id, { ok = not failed, index = i,
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

-- conn:send_many{ opts1, opts2, ... } -> a list with, for each, the result conn:send would give
-- or its error (an smtp.errors table: check `.kind`).
function M.send_many(sess, list)
  local ok, err = session.alive(sess, "send_many")
  if type(list) ~= "table" then error("bad argument #1 to 'send_many' (list expected)", 3) end
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
  return run(sess, descs, out, n)
end

return M
