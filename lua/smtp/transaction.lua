-- smtp.transaction: one mail transaction (MAIL, RCPTs, then DATA and the body, or BDAT chunks)
-- as an object that queues its commands into the session's engine, counts the replies it awaits,
-- takes them in order and ends with exactly one result or error. Every way of sending
-- (conn:send, send_many with or without PIPELINING and CHUNKING) runs through it; which
-- transaction a reply belongs to is smtp.batch's business (their commands never interleave).
local errors = require "smtp.errors"
local check = require "smtp.check"
local source = require "smtp.source"
local session = require "smtp.session"
local counters = require("smtp.observe").counters

local M = {}

local type, ipairs, pcall, tostring, tonumber = type, ipairs, pcall, tostring, tonumber
local concat = table.concat
local new_error, reply_error = errors.new, session.reply_error
local is_message, message_id_of, message_id_in = source.is_message, source.message_id_of, source.message_id_in
local has_8bit, xtext = check.has_8bit, check.xtext

local WRITE_BATCH = 256 * 1024   -- body bytes gathered before one write
local BDAT_CHUNK = source.BDAT_CHUNK
M.WRITE_BATCH = WRITE_BATCH

local function invalid(text, phase)
  return new_error { kind = "invalid", text = text, temporary = false, phase = phase }
end

-- Streams a source after DATA's 354 into the engine, writing every WRITE_BATCH bytes, and queues
-- the end-of-data (left for the caller to write, so the next commands can share that write).
-- -> true, message_id | nil, err. A failing source closes the session without the end-of-data:
-- the server must never take a truncated message.
function M.stream_body(sess, src)
  local e = sess.engine
  local id, head = nil, true
  while true do
    local okc, chunk = pcall(src)
    if okc and chunk == nil then break end
    if not okc or type(chunk) ~= "string" then
      sess:_abort()
      return nil, invalid(okc and ("message source gave a " .. type(chunk) .. " instead of a string")
        or ("message source failed: " .. tostring(chunk)), "data")
    end
    if head then
      id = message_id_of(chunk)
      head = false
    end
    e:body(chunk)
    if e:outlen() >= WRITE_BATCH then
      local ok, err = sess:_flush("data_block")
      if not ok then return nil, err end
    end
  end
  e:body_end()
  return true, id
end

local function over_size(size, limit)
  return nil, new_error { kind = "rejected", code = 552, enhanced = "5.3.4", phase = "mail",
    temporary = false, text = ("message of %d bytes over the server's limit of %d"):format(size, limit) }
end

-- MAIL parameters for one transaction (SIZE, BODY, SMTPUTF8, DSN RET/ENVID), or nil, err for
-- what the server cannot take (SMTPUTF8 missing, over its SIZE): refused before any byte.
local function mail_params(sess, d, size)
  local ext = sess.ext
  if d.requiretls then
    -- RFC 8689 §4.2.1: only over TLS whose certificate was verified for the name dialled, to a
    -- server that takes the duty on; otherwise the message is not sent (no downgrade).
    local cfg = sess.cfg
    if not (sess.tls and cfg.verify and cfg.verify_name ~= false) then
      return nil, new_error { kind = "tls", phase = "mail", temporary = false, enhanced = "5.7.10",
        text = "REQUIRETLS: the session is not TLS with a verified certificate" }
    end
    if not ext.REQUIRETLS then
      return nil, new_error { kind = "tls", phase = "mail", temporary = false, enhanced = "5.7.10",
        text = "REQUIRETLS: the server does not offer REQUIRETLS" }
    end
  end
  if not d.smtputf8 and not d.dsn and not d.requiretls then
    -- the common case, once per message in send_many: the limit parsed once per EHLO
    if sess._mp_ext ~= ext then
      sess._mp_ext = ext
      sess._mp_limit = ext.SIZE and (tonumber(ext.SIZE:match("^%d+") or "") or false)
      sess._mp_body = ext["8BITMIME"] and "BODY=8BITMIME" or nil
    end
    local limit, body = sess._mp_limit, sess._mp_body
    if limit and limit > 0 and size and size > limit then return over_size(size, limit) end
    if limit == nil or not size then return body or false end
    if body then return "SIZE=" .. size .. " " .. body end
    return "SIZE=" .. size
  end
  if d.smtputf8 and not ext.SMTPUTF8 then
    return nil, invalid("the message needs SMTPUTF8 (non-ASCII address or header) and the server does not offer it", "mail")
  end
  local mp = {}
  if ext.SIZE then
    local limit = tonumber(ext.SIZE:match("^%d+") or "")
    if size then
      if limit and limit > 0 and size > limit then return over_size(size, limit) end
      mp[#mp + 1] = "SIZE=" .. size
    end
  end
  if ext["8BITMIME"] then mp[#mp + 1] = "BODY=8BITMIME" end
  if d.smtputf8 then mp[#mp + 1] = "SMTPUTF8" end
  if d.requiretls then mp[#mp + 1] = "REQUIRETLS" end
  local dsn = d.dsn and ext.DSN and d.dsn
  if dsn then
    if dsn.ret then mp[#mp + 1] = "RET=" .. dsn.ret end
    if dsn.envid then mp[#mp + 1] = "ENVID=" .. dsn.envid end
  end
  return #mp > 0 and concat(mp, " ") or false, dsn
end

local function rcpt_params(dsn, rcpt)
  if not dsn then return nil end
  local rp = {}
  if dsn.notify then rp[#rp + 1] = "NOTIFY=" .. dsn.notify end
  if dsn.orcpt then
    if has_8bit(rcpt) then
      -- RFC 6533 utf-8-addr-unitext (SMTPUTF8 is in use for this address): UTF-8 as is,
      -- '+', '=', space and controls as \x{HEX}
      rp[#rp + 1] = "ORCPT=utf-8;" .. rcpt:gsub("[%z\1-\32+=\127]", function(c)
        return ("\\x{%X}"):format(c:byte())
      end)
    else
      rp[#rp + 1] = "ORCPT=rfc822;" .. xtext(rcpt)
    end
  end
  return #rp > 0 and concat(rp, " ") or nil
end

local Tx = {}
Tx.__index = Tx

-- A transaction for description `d` (config.message) on `sess`.
function M.new(sess, d)
  local ext, cfg = sess.ext, sess.cfg
  -- every field the transaction will hold is named here, so the table is made at its final size
  -- once (fields added later would make it grow, twice, for every message)
  return setmetatable({
    sess = sess, d = d, i = 0,
    pipelining = (ext.PIPELINING and cfg.pipelining) and true or false,
    bdat = (ext.CHUNKING and cfg.chunking) and true or false,
    accepted = {}, rejected = {},
    nexp = 0,          -- replies awaited; which one comes next follows from the counters below
    rset_wait = false, -- the reply to its RSET comes first
    mail_r = false,    -- MAIL's reply, once taken
    nrcpt = 0,         -- RCPT replies taken
    data_r = false,    -- DATA's reply, once taken
    chunks_out = 0, chunks_in = 0,   -- BDAT chunks queued, and answered
    sent_last = false, -- the last BDAT chunk is queued
    whole = false,     -- the message is a string sent in one piece (no source)
    src = false, st = false, chunks = false,   -- the source, and the BDAT chunker over it
    mp = false, dsn = false, id = false,       -- MAIL parameters, DSN options, the Message-ID
    open = false,      -- see M.is_open
    result = false, err = false,               -- the outcome: one of them, once decided
    lmtp = sess.cfg.lmtp and true or false,    -- LMTP: one reply per accepted recipient at the end
    finals = false,    -- LMTP: those replies so far, in the order of `accepted`
    took = false,      -- LMTP: took[k] = the k-th RCPT was accepted
    dirty = nil,       -- after it: true = a MAIL may be open (RSET first), false = clean, nil = unknown
  }, Tx)
end

-- The transaction's outcome; the first one decided stands (and is counted, smtp.counters()).
function Tx:_fail(err, dirty)
  if not self.result and not self.err then
    self.err = err
    counters.transactions_failed = counters.transactions_failed + 1
    local rej = err.rejected
    if rej then counters.recipients_rejected = counters.recipients_rejected + #rej end
  end
  if dirty ~= nil then self.dirty = dirty end
  if self.bdat and self.pipelining then self.open = true end
end

function Tx:_succeed(r, id)
  local m = self.d.message
  self.result = { accepted = self.accepted, rejected = self.rejected,
    reply = { code = r.code, enhanced = r.enhanced, text = r.text },
    message_id = (is_message(m) and m.message_id) or id or nil,
    server = self.sess:info() }
  self.dirty = false
  counters.transactions = counters.transactions + 1
  counters.recipients_accepted = counters.recipients_accepted + #self.accepted
  local nrej = #self.rejected
  if nrej > 0 then counters.recipients_rejected = counters.recipients_rejected + nrej end
end

function Tx:decided() return (self.result or self.err) and true or false end

-- May the next transaction's commands be queued behind this one's now? When nothing of it is
-- awaited (nexp == 0), or when `open` is set: with PIPELINING, once nothing more of this one can
-- come before them: after DATA's reply (RFC 2920: DATA ends a command group, and the body must
-- follow the 354), or once its last BDAT chunk is queued or it failed (BDAT does not end a
-- group). Without PIPELINING `open` stays false: the next starts once this one is over.
-- A plain function: smtp.batch asks it after every reply.
function M.is_open(tx) return tx.nexp == 0 or tx.open end

local function all_rejected(self)
  local first = self.rejected[1]
  return new_error { kind = "rejected", phase = "rcpt", code = first and first.code,
    enhanced = first and first.enhanced, text = first and first.text or "every recipient was rejected",
    rejected = self.rejected, temporary = first and first.code < 500 or false }
end

-- One command on its own (without PIPELINING, or after the recipients): queued and counted,
-- or the transaction fails (a MAIL is open by now: RSET after it).
function Tx:_step(phase, fn, ...)
  local ok, err = fn(self.sess.engine, ...)
  if not ok then
    self:_fail(invalid(tostring(err), phase), true)
    return false
  end
  self.nexp = self.nexp + 1
  return true
end

-- The timeout phase of the next reply awaited.
function Tx:phase()
  if self.finals then return "data_end" end   -- LMTP: the next recipient's reply to the end
  if self.rset_wait or not self.mail_r then return "mail" end
  if self.nrcpt < #self.d.to then return "rcpt" end
  if self.bdat then
    return (self.sent_last and self.chunks_in + 1 == self.chunks_out) and "data_end" or "data_block"
  end
  return self.data_r and "data_end" or "data"
end

-- Starts the transaction: RSET first when `rset` (the one before may have left a MAIL open),
-- then MAIL, and with PIPELINING the RCPTs and DATA or the first BDAT chunk in the same write.
-- A transaction the server cannot take (SIZE, SMTPUTF8) or a value the engine refuses ends here
-- with nothing of it queued.
function Tx:start(rset)
  local d, e = self.d, self.sess.engine
  local m = d.message
  local size
  if type(m) == "string" and #m <= (self.bdat and BDAT_CHUNK or WRITE_BATCH) then
    -- one BDAT LAST chunk, or one body call: no source
    self.whole, size, self.id = true, #m, message_id_in(d.head or "")
  else
    self.src, size = source.of(m)
  end
  local mp, dsn = mail_params(self.sess, d, size)
  if mp == nil then self:_fail(dsn, false); return end
  self.mp, self.dsn = mp or nil, dsn or false
  if rset then
    e:rset()
    self.nexp, self.rset_wait = self.nexp + 1, true
    if not self.pipelining then return end   -- MAIL once RSET is answered
  end
  self:_mail()
end

-- MAIL, and with PIPELINING the RCPTs and DATA or the first BDAT chunk. They count only once all
-- of them are queued: if the engine refuses one (or the source fails before the first chunk),
-- the engine is rolled back to the mark, so none of them can leave with a later command.
function Tx:_mail()
  local e, to = self.sess.engine, self.d.to
  local ok, err = e:mail(self.d.from, self.mp)   -- true, the mark before MAIL | nil, why
  local mark = err
  local kind = "mail"
  if ok and self.pipelining then
    kind = "rcpt"
    for k = 1, #to do
      ok, err = e:rcpt(to[k], rcpt_params(self.dsn, to[k]))
      if not ok then break end
    end
    if ok then
      kind = "data"
      if self.bdat then ok, err = self:_first_chunk() else ok, err = e:data() end
    end
  end
  if not ok then
    if kind ~= "mail" then e:rollback(mark) end
    self:_fail(errors.is(err) and err or invalid(tostring(err), kind), false)
    return
  end
  if self.pipelining then
    self.nexp = self.nexp + #to + 2
    if self.bdat then self.chunks_out, self.open = 1, self.sent_last == true end
  else
    self.nexp = self.nexp + 1
  end
end

-- The first BDAT chunk (read from the source) after the pipelined RCPTs: queued, not counted.
function Tx:_first_chunk()
  local e = self.sess.engine
  if self.whole then
    self.sent_last = true
    return e:bdat_last(self.d.message)
  end
  self.st, self.chunks = source.bdat_chunks(self.src)
  local ok, n, last, first = pcall(self.chunks)
  if not ok then return nil, invalid("message source failed: " .. tostring(n), "data") end
  self.id = message_id_of(first or "") or false
  self.sent_last = last
  return e:bdat_from(self.st, last)
end

-- More BDAT chunks while fewer than the window are unanswered (two with PIPELINING: RFC 3030
-- has the server discard chunks in flight after a failed one; one without).
function Tx:_pump()
  local window = self.pipelining and 2 or 1
  local e = self.sess.engine
  while not self.sent_last and not self:decided() and self.chunks_out - self.chunks_in < window do
    if not self.chunks then
      self.st, self.chunks = source.bdat_chunks(self.src)
    end
    local ok, n, last, first = pcall(self.chunks)
    if not ok then
      -- no LAST went out: after the replies in flight a RSET drops what the server holds
      self:_fail(invalid("message source failed: " .. tostring(n), "data"), true)
      return
    end
    if first ~= nil then self.id = message_id_of(first) or false end
    local qok, err = e:bdat_from(self.st, last)
    if not qok then
      self:_fail(invalid(tostring(err), "data"), true)
      return
    end
    self.chunks_out, self.sent_last, self.nexp = self.chunks_out + 1, last, self.nexp + 1
  end
  if self.sent_last and self.pipelining then self.open = true end
end

-- What to send once every recipient has answered: nothing if none was accepted (the MAIL stays
-- open: RSET next), else DATA or the BDAT chunks (with PIPELINING the first is already out).
function Tx:_after_rcpts()
  if #self.accepted == 0 then
    self:_fail(all_rejected(self), true)
    return
  end
  local e = self.sess.engine
  if self.bdat then
    if self.whole and not self.pipelining then
      if not self:_step("data_end", e.bdat_last, self.d.message) then return end
      self.sent_last, self.chunks_out = true, 1
      return
    end
    return self:_pump()
  end
  if not self.pipelining then self:_step("data", e.data) end
end

local function status_of(code)
  return (code >= 200 and code < 300) and "accepted" or code < 500 and "temporary" or "permanent"
end

-- LMTP (RFC 2033): the end of the data is answered once per recipient accepted at RCPT, in
-- order (the engine counts them and marks every reply but the last `more`). Once all are in,
-- the message counts as sent when at least one recipient took it; each recipient's final reply is
-- in `recipients`, and those refused after the data join `rejected` with phase "data_end".
function Tx:_lmtp_end(r)
  local finals = self.finals
  if not finals then finals = {}; self.finals = finals end
  finals[#finals + 1] = r
  if r.more then return true end
  local accepted, rcpt_rej, ok, late, recipients = self.accepted, self.rejected, {}, {}, {}
  local first_ok
  local given, took = self.d.given or self.d.to, self.took
  local ia, ir = 0, 0
  for k = 1, #given do
    local f, phase
    if took[k] then
      ia = ia + 1
      f, phase = finals[ia] or finals[#finals], "data_end"
      if f.code >= 200 and f.code < 300 then
        ok[#ok + 1] = accepted[ia]
        first_ok = first_ok or f
      else
        late[#late + 1] = { recipient = accepted[ia], code = f.code, enhanced = f.enhanced, text = f.text,
          phase = "data_end" }
      end
    else
      ir = ir + 1
      f, phase = rcpt_rej[ir], "rcpt"
    end
    if f then
      recipients[#recipients + 1] = { recipient = given[k], code = f.code, enhanced = f.enhanced,
        text = f.text, status = status_of(f.code), phase = phase }
    end
  end
  for _, x in ipairs(late) do rcpt_rej[#rcpt_rej + 1] = x end
  if first_ok then
    self.accepted = ok
    self:_succeed(first_ok, self.id)
    self.result.recipients = recipients
  else
    local first, temp = late[1], false
    for _, x in ipairs(late) do if x.code < 500 then temp = true end end
    self:_fail(new_error { kind = "rejected", phase = "data_end", code = first.code, enhanced = first.enhanced,
      text = first.text, rejected = rcpt_rej, recipients = recipients, temporary = temp }, false)
  end
  self.dirty = false
  return true
end

-- Takes the next reply awaited (replies come in the order the commands were queued). -> true, or
-- false when the session ended here (the transaction's own error is then set).
function Tx:take(r)
  self.nexp = self.nexp - 1
  -- LMTP: the engine says another reply to this end of data follows
  if r.more then self.nexp = self.nexp + 1 end
  local code = r.code
  local ok2xx = code >= 200 and code < 300
  if self.rset_wait then
    self.rset_wait = false
    if code ~= 250 then
      self.sess:_abort()
      self:_fail(reply_error("closed", r, "mail", { temporary = true }))
      return false
    end
    if not self.pipelining and not (self.result or self.err) then self:_mail() end
    return true
  end
  if not self.mail_r then
    self.mail_r = r
    if not ok2xx then
      -- no transaction was opened; with PIPELINING the RCPTs and DATA get 503s still to read
      self:_fail(reply_error("rejected", r, "mail", { rejected = self.rejected }), false)
    elseif not self.pipelining then
      local to = self.d.to[1]
      self:_step("rcpt", self.sess.engine.rcpt, to, rcpt_params(self.dsn, to))
    end
    return true
  end
  local to = self.d.to
  local k = self.nrcpt
  if k < #to then
    k = k + 1
    self.nrcpt = k
    local rcpt = (self.d.given or to)[k]   -- named as the caller wrote it (not its A-label)
    if self.lmtp then
      if not self.took then self.took = {} end
      self.took[k] = ok2xx
    end
    if ok2xx then self.accepted[#self.accepted + 1] = rcpt
    else self.rejected[#self.rejected + 1] = { recipient = rcpt, code = code, enhanced = r.enhanced, text = r.text } end
    if not (self.result or self.err) then
      if k < #to then
        if not self.pipelining then
          local nx = to[k + 1]
          self:_step("rcpt", self.sess.engine.rcpt, nx, rcpt_params(self.dsn, nx))
        end
      else
        self:_after_rcpts()
      end
    end
    return true
  end
  if self.bdat then
    if self.finals then return self:_lmtp_end(r) end      -- LMTP: the next recipient's reply to LAST
    local j = self.chunks_in + 1
    self.chunks_in = j
    if self.result or self.err then return true end      -- chunks in flight after a failure: discarded
    local last = self.sent_last and j == self.chunks_out
    if last and self.lmtp then return self:_lmtp_end(r) end
    if code ~= 250 then
      if not (self.mail_r.code >= 200 and self.mail_r.code < 300) then
        self:_fail(reply_error("rejected", self.mail_r, "mail", { rejected = self.rejected }), true)
      elseif #self.accepted == 0 then
        self:_fail(all_rejected(self), true)
      else
        self:_fail(reply_error("rejected", r, last and "data_end" or "data", { rejected = self.rejected }), true)
      end
    elseif last then
      self:_succeed(r, self.id)
    else
      self:_pump()
    end
    return true
  end
  if not self.data_r then
    self.data_r = r
    self.open = self.pipelining
    if code == 354 then
      local e = self.sess.engine
      self.nexp = self.nexp + 1     -- the end-of-data's reply
      if self.result or self.err or #self.accepted == 0 then
        -- a server that said 354 with no transaction or no valid recipient: end the empty data
        if not (self.result or self.err) then self:_fail(all_rejected(self)) end
        e:body_end()
        self.dirty = false
        return true
      end
      if self.whole then
        e:body(self.d.message)
        e:body_end()
      else
        local sok, id = M.stream_body(self.sess, self.src)
        if not sok then self.nexp = self.nexp - 1; self:_fail(id, true); return false end
        self.id = id
      end
      self.dirty = false      -- the end-of-data ends the transaction, whatever its reply
    elseif not (self.result or self.err) then
      if #self.accepted == 0 then self:_fail(all_rejected(self), true)
      else self:_fail(reply_error("rejected", r, "data", { rejected = self.rejected }), true) end
    end
    return true
  end
  -- the end-of-data's reply
  if self.result or self.err then
    self.dirty = false        -- the empty data after a refused transaction: its error stands
  elseif self.lmtp then
    return self:_lmtp_end(r)
  elseif code ~= 250 then
    self:_fail(reply_error("rejected", r, "data_end", { rejected = self.rejected }), false)
  else
    self:_succeed(r, self.id)
  end
  return true
end

return M
