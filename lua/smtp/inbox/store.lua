-- smtp.inbox.store: the index of the messages `lua-smtp sink --http` has received, over the sink's
-- Maildir, its mbox or memory alone, with the summaries, search and change notices the web inbox
-- and its API read. Summaries are worked out on first read, not as mail arrives: the SMTP side
-- pays for a string copy per message, nothing more. A Maildir or mbox that already holds mail is
-- indexed at start (Store:load) from names, mtimes and From_ lines only; the envelope of those
-- messages is read back from their trace lines when they are first summarized.
local core = require "smtp.core"
local errors = require "smtp.errors"
local message = require "smtp.message"
local wait = require "smtp.wait"

local M = {}

local Store = {}
Store.__index = Store

-- Summaries of messages whose file went away (a search never matches them; weak keys).
local vanished = setmetatable({}, { __mode = "k" })

-- new{ kind = "memory"|"maildir"|"mbox", max = N (memory: oldest dropped past it), maildir = DIR,
-- mbox = FILE (what Store:load indexes and Store:delete rewrites), lock_wait = seconds an mbox
-- delete waits for the lock another process holds (default 10) }
function M.new(opts)
  opts = opts or {}
  return setmetatable({ kind = opts.kind or "memory", max = opts.max, list = {}, by_id = {},
                        watchers = {}, seq = 0, bytes = 0, ngone = 0, maildir = opts.maildir,
                        mbox = opts.mbox, lock_wait = opts.lock_wait or 10 }, Store)
end

-- Adds a message: e = { raw = data (memory), file = path (maildir), mbox = { path, start, stop }
-- (mbox), head = its header block, size, from, to = { ... } (the envelope; left out for mail
-- indexed at start, see envelope()), created, sender (an mbox From_ line's) }. Returns its id.
function Store:add(e)
  self.seq = self.seq + 1
  e.id = e.id or ("%08x%04x%04x%04x"):format(os.time(), self.seq % 0x10000, math.random(0, 0xffff),
                                              math.random(0, 0xffff))
  e.created = e.created or os.time()
  e.seq = self.seq
  local l = self.list
  l[#l + 1] = e
  self.by_id[e.id] = e
  if self.max and #l > self.max then
    local old = table.remove(l, 1)   -- oldest first in the list: the list is in arrival order
    if old.gone then self.ngone = self.ngone - 1 end
    self.by_id[old.id] = nil
    self:notify("delete", { old.id })
  end
  self:notify("new", e)
  return e.id
end

function Store:watch(fn) self.watchers[fn] = true end
function Store:unwatch(fn) self.watchers[fn] = nil end
function Store:notify(what, x)
  for fn in pairs(self.watchers) do fn(what, x) end
end

function Store:count() return #self.list - self.ngone end
function Store:get(id) return self.by_id[id] end

-- A message whose file went away (deleted or moved by another program): no longer found by id,
-- left out of pages, and out of the list the next time a page is made (not at once: callers may
-- be walking the list).
function Store:forget(e)
  if self.by_id[e.id] ~= e then return end
  self.by_id[e.id] = nil
  e.gone = true
  if e.summary then vanished[e.summary] = true end
  self.ngone = self.ngone + 1
  self:notify("delete", { e.id })
end

function Store:compact()
  if self.ngone == 0 then return end
  local keep = {}
  for _, e in ipairs(self.list) do if not e.gone then keep[#keep + 1] = e end end
  self.list, self.ngone = keep, 0
end

-- Loading what is on disk at start ---------------------------------------------------------------

-- A name's sort key, for files with the same mtime. The sink's names are
-- SECONDS.M<microseconds>P<pid>Q<counter>.host, but its microseconds come from the monotonic
-- clock, not the wall clock's second: one process's files order by seconds then counter. Other
-- names: digit runs compared as numbers.
local function pad(d) return ("0"):rep(24 - #d) .. d end
local function name_key(name)
  local sec, pid, n = name:match("^(%d+)%.M%d+P(%d+)Q(%d+)%.")
  if sec then return pad(sec) .. "P" .. pad(pid) .. "Q" .. pad(n) end
  return (name:gsub("%d+", pad))
end

-- Seconds since the epoch of a civil UTC date (no time zone of this machine involved).
local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8, Sep = 9,
                 Oct = 10, Nov = 11, Dec = 12 }
local function utc_epoch(y, m, d, hh, mm, ss)
  if m <= 2 then y = y - 1 end
  local fl = math.floor
  local era = fl(y / 400)
  local yoe = y - era * 400
  local doy = fl((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + fl(yoe / 4) - fl(yoe / 100) + doy
  return ((era * 146097 + doe - 719468) * 24 + hh) * 3600 + mm * 60 + ss
end

-- The date of a From_ line ("From sender Sat Dec  5 18:30:09 2026", asctime's form, read as UTC
-- as the sink writes it; a zone or "remote from" after it is ignored), or nil.
local function from_line_date(line)
  local mon, d, hh, mm, ss, y = line:match(" (%a%a%a) +(%d%d?) +(%d%d?):(%d%d):(%d%d) +(%d%d%d%d)")
  if not mon or not MONTHS[mon] then return nil end
  return utc_epoch(tonumber(y), MONTHS[mon], tonumber(d), tonumber(hh), tonumber(mm), tonumber(ss))
end

-- The start of every message of an mbox with its From_ line, in one pass of 64 KB reads: a
-- message starts at each line beginning with "From " (mboxrd: the sink quotes such lines inside
-- messages as ">From ", which raw() undoes). -> { { start, line } ... }, size
local function scan_mbox(f)
  local found = {}
  -- a line end before the file's first byte makes a From_ line there look like any other
  local buf, base, pos = "\n", -1, 1   -- base: the file offset of buf's first byte
  local function more()
    local b = f:read(65536)
    if not b then return false end
    local k = math.max(pos - 1, 1)
    buf, base, pos = buf:sub(k) .. b, base + k - 1, pos - k + 1
    return true
  end
  while true do
    local j = buf:find("\nFrom ", pos, true)
    if j then
      local e = buf:find("\n", j + 1, true)
      if e or not more() then
        found[#found + 1] = { base + j, buf:sub(j + 1, (e or #buf + 1) - 1) }
        pos = j + 1
      end
    else
      pos = math.max(pos, #buf - 4)   -- "\nFrom" may go on in the next read
      if not more() then break end
    end
  end
  return found, base + #buf
end

-- Indexes the messages the Maildir or mbox holds already, oldest first as if they had arrived in
-- that order: a Maildir's new/ and cur/ by mtime, then name; an mbox in file order. Nothing is
-- parsed: a Maildir costs a readdir and a stat per file, an mbox one read through.
function Store:load()
  if self.maildir then
    local files = {}
    for _, sub in ipairs { "new", "cur" } do
      local dir = self.maildir .. "/" .. sub
      for _, f in ipairs(core.sink_list(dir) or {}) do
        f.path = dir .. "/" .. f.name
        files[#files + 1] = f
      end
    end
    table.sort(files, function(a, b)
      if a.mtime ~= b.mtime then return a.mtime < b.mtime end
      a.key, b.key = a.key or name_key(a.name), b.key or name_key(b.name)   -- seldom needed
      return a.key < b.key
    end)
    for _, f in ipairs(files) do self:add { file = f.path, created = math.floor(f.mtime) } end
  elseif self.mbox then
    local f = io.open(self.mbox, "rb")
    if not f then return end
    local found, size = scan_mbox(f)
    f:close()
    for i, x in ipairs(found) do
      local sender = x[2]:match("^From (%S+)")
      self:add { mbox = { path = self.mbox, start = x[1], stop = found[i + 1] and found[i + 1][1] or size },
                 created = from_line_date(x[2]), sender = sender ~= "MAILER-DAEMON" and sender or "" }
    end
  end
end

-- The message as stored (the sink's trace lines, then the data as received); nil when its file
-- is gone.
function Store:raw(e)
  if e.raw then return e.raw end
  if e.file then
    local f = io.open(e.file, "rb")
    if not f and self.maildir then
      -- a mail reader moved it from new/ to cur/, with flags after the unique part's ":"
      local uniq = e.file:match("([^/:]+)[^/]*$")
      for _, sub in ipairs { "cur", "new" } do
        for _, x in ipairs(core.sink_list(self.maildir .. "/" .. sub) or {}) do
          if x.name:match("^[^:]*") == uniq then
            e.file = self.maildir .. "/" .. sub .. "/" .. x.name
            f = io.open(e.file, "rb")
            break
          end
        end
        if f then break end
      end
    end
    if not f then return nil end
    local s = f:read("a")
    f:close()
    return s
  end
  if e.mbox then
    local f = io.open(e.mbox.path, "rb")
    if not f then return nil end
    f:seek("set", e.mbox.start)
    local s = f:read(e.mbox.stop - e.mbox.start) or ""
    f:close()
    if s:sub(1, 5) ~= "From " then return nil end   -- the mbox changed under us
    -- undo the mbox framing: the From_ line, the blank line after, the mboxrd quoting
    s = s:gsub("^From [^\n]*\n", ""):gsub("\r?\n$", "")
    s = ("\n" .. s):gsub("\n>(>*From )", "\n%1"):sub(2)
    return s
  end
end

-- Deleting -----------------------------------------------------------------------------------

-- The mbox under the sink's lock (core.sink_file's flock, which every `lua-smtp sink` appending
-- to it takes): tried without blocking, then again every 50 ms (smtp.wait.sleep: it yields in
-- the web inbox's cqueues controller and in smtp.loop) until lock_wait runs out.
function Store:lock_mbox(path)
  local deadline = core.now() + self.lock_wait
  while true do
    local f, err, locked = core.sink_file(path, "append")
    if f or not locked then return f, err end
    if core.now() >= deadline then return nil, path .. ": locked by another process" end
    wait.sleep(0.05)
  end
end

local function fail(text) return nil, errors.new { kind = "invalid", text = "mbox: " .. text } end

-- Removes the byte ranges `cut` (sorted, { start, stop }) from the mbox at path, under its lock
-- (held as `lock`). The ranges are checked to still frame messages first: a mailbox another
-- program rewrote is left alone. What stays is written to a new file beside it (fsync'd) that
-- is renamed over it, so a crash leaves the old mailbox or the new one, never half of one;
-- removing everything truncates in place.
local function cut_mbox(path, lock, cut)
  local size, serr = lock:size()
  if not size then return fail(tostring(serr)) end
  local src, oerr = io.open(path, "rb")
  if not src then return fail(tostring(oerr)) end
  local function at(off, n) src:seek("set", off); return src:read(n) or "" end
  local kept = size
  for _, r in ipairs(cut) do
    local ok = r[2] <= size and at(r[1], 5) == "From " and (r[1] == 0 or at(r[1] - 1, 1) == "\n")
      and (r[2] == size or at(r[2] - 1, 6) == "\nFrom ")
    if not ok then src:close(); return fail(path .. " changed since it was read; nothing deleted") end
    kept = kept - (r[2] - r[1])
  end
  if kept == 0 then
    src:close()
    local ok, err = lock:truncate(0)
    if ok then ok, err = lock:sync() end
    if not ok then return fail(tostring(err)) end
    return true
  end
  local dir = path:match("^(.*)/[^/]*$") or "."
  local tmp, out, err
  for _ = 1, 5 do
    tmp = ("%s/.sink-rewrite-%d-%08x"):format(dir, os.time(), math.random(0, 0x7fffffff))
    out, err = core.sink_file(tmp, "create")
    if out then break end
  end
  if not out then src:close(); return fail(tostring(err)) end
  local ok = true
  local function copy(from, to)
    src:seek("set", from)
    while ok and from < to do
      local b = src:read(math.min(65536, to - from))
      if not b then ok, err = nil, "short read"; break end
      ok, err = out:write(b)
      from = from + #b
    end
  end
  local prev = 0
  for _, r in ipairs(cut) do copy(prev, r[1]); prev = r[2] end
  copy(prev, size)
  src:close()
  if ok then ok, err = out:sync() end
  out:close()
  if ok then ok, err = os.rename(tmp, path) end
  if not ok then os.remove(tmp); return fail(tostring(err)) end
  ok, err = core.fsync_dir(dir)
  if not ok then return fail(tostring(err)) end
  return true
end

-- Deletes messages by id (all when ids is nil): a Maildir's files are removed, an mbox loses
-- their bytes (rewritten under the sink's lock, see cut_mbox; the offsets of the messages after
-- them move down). -> the number deleted, or nil, err when the mbox could not be changed (then
-- nothing is deleted).
function Store:delete(ids)
  local lock, path
  if self.kind == "mbox" then
    path = self.mbox
    if not path then for _, e in ipairs(self.list) do if e.mbox then path = e.mbox.path; break end end end
    if path then
      -- waiting for the lock lets the sink go on, so the set is worked out once it is held
      local lerr
      lock, lerr = self:lock_mbox(path)
      if not lock then return fail(tostring(lerr)) end
    end
  end
  local gone, set = {}, {}
  if ids == nil then
    for _, e in ipairs(self.list) do if not e.gone then gone[#gone + 1] = e; set[e] = true end end
  else
    for _, id in ipairs(ids) do
      local e = self.by_id[id]
      if e and not set[e] then set[e] = true; gone[#gone + 1] = e end
    end
  end
  if lock then
    local cut = {}
    for _, e in ipairs(gone) do
      if e.mbox and e.mbox.path == path then cut[#cut + 1] = { e.mbox.start, e.mbox.stop } end
    end
    table.sort(cut, function(a, b) return a[1] < b[1] end)
    if #cut > 0 then
      local ok, err = cut_mbox(path, lock, cut)
      if not ok then lock:close(); return nil, err end
      -- each message left moves down by the bytes cut before it
      local before, total = {}, 0
      for i, r in ipairs(cut) do total = total + r[2] - r[1]; before[i] = total end
      for _, e in ipairs(self.list) do
        if e.mbox and e.mbox.path == path and not set[e] then
          local lo, hi = 1, #cut   -- the last range ending at or before this message
          local n = 0
          while lo <= hi do
            local mid = math.floor((lo + hi) / 2)
            if cut[mid][2] <= e.mbox.start then n = mid; lo = mid + 1 else hi = mid - 1 end
          end
          if n > 0 then
            e.mbox.start, e.mbox.stop = e.mbox.start - before[n], e.mbox.stop - before[n]
          end
        end
      end
    end
    lock:close()
  end
  local keep, out = {}, {}
  for _, e in ipairs(self.list) do if not set[e] and not e.gone then keep[#keep + 1] = e end end
  self.list, self.ngone = keep, 0
  for _, e in ipairs(gone) do
    self.by_id[e.id] = nil
    if e.file then os.remove(e.file) end
    out[#out + 1] = e.id
  end
  if #out > 0 then self:notify("delete", out) end
  return #out
end

-- Address lists ------------------------------------------------------------------------------

-- "Ann <ann@x>, \"B, b\" <b@y>, c@z" -> { { Name =, Address = }, ... }
function M.addresses(v)
  local out = {}
  if not v or v == "" then return out end
  local cur, q, a = {}, false, false
  local items = {}
  for c in v:gmatch(utf8 and utf8.charpattern or "[%z\1-\127\194-\244][\128-\191]*") do
    if c == '"' then q = not q
    elseif not q and c == "<" then a = true
    elseif not q and c == ">" then a = false end
    if c == "," and not q and not a then
      items[#items + 1] = table.concat(cur); cur = {}
    else
      cur[#cur + 1] = c
    end
  end
  items[#items + 1] = table.concat(cur)
  for _, it in ipairs(items) do
    it = it:gsub("^%s+", ""):gsub("%s+$", "")
    if it ~= "" then
      local name, addr = it:match("^(.-)%s*<([^>]*)>")
      if not addr then name, addr = "", it end
      name = name:gsub('^"(.*)"$', "%1"):gsub('\\(.)', "%1")
      out[#out + 1] = { Name = name, Address = addr }
    end
  end
  return out
end

-- Summaries ----------------------------------------------------------------------------------

-- The parsed message (not kept: a tree with contents can be large); nil, and the entry
-- forgotten, when its file is gone.
function Store:parse(e)
  local raw = self:raw(e)
  if not raw then self:forget(e); return nil end
  return message.parse(raw, { max_kept = 64 * 1024 * 1024 })
end

-- The text and HTML bodies and the other leaves of a parsed message, as a mail reader picks them:
-- the first text/plain and text/html that are not attachments.
function M.bodies(msg)
  local text, html, attachments, inline = nil, nil, {}, {}
  for p in msg:walk() do
    if #p.parts == 0 and p.maintype ~= "multipart" then
      local attached = p.disposition and p.disposition:lower() == "attachment"
      if not attached and p.content_type == "text/plain" and not text and not p.filename then
        text = p
      elseif not attached and p.content_type == "text/html" and not html and not p.filename then
        html = p
      elseif p ~= msg or p.filename then
        if p.cid and not attached then inline[#inline + 1] = p else attachments[#attachments + 1] = p end
      end
    end
  end
  return text, html, attachments, inline
end

local function snippet_of(text, html)
  local s = text and (text.text or text.content) or ""
  if s == "" and html then
    s = (html.text or html.content or ""):gsub("<[Ss][Tt][Yy][Ll][Ee].-</[Ss][Tt][Yy][Ll][Ee]>", "")
      :gsub("<[Ss][Cc][Rr][Ii][Pp][Tt].-</[Ss][Cc][Rr][Ii][Pp][Tt]>", "")
      :gsub("<[^>]*>", " "):gsub("&nbsp;", " "):gsub("&lt;", "<"):gsub("&gt;", ">"):gsub("&amp;", "&")
  end
  s = s:gsub("%s+", " "):gsub("^ ", "")
  if #s > 250 then
    s = s:sub(1, 250)
    -- not in the middle of a UTF-8 sequence
    s = s:gsub("[\192-\255][\128-\191]*$", "")
    s = s .. "…"
  end
  return s
end

-- The envelope of a message indexed from disk at start, from the trace lines at its top: the
-- sink writes `Return-Path: <sender>`, a `Delivered-To: rcpt` line per recipient, then (unless
-- --no-received) its `Received:` header naming lua-smtp, as Postfix's local delivery writes the
-- first two. Mail another program wrote: its Return-Path and Delivered-To fields wherever they
-- are, else the mbox From_ line's sender, the From address, the To and Cc addresses. The size,
-- as for mail received now, is that of the data without the sink's lines.
local function envelope(e, raw, msg)
  local to, trace = {}, 0
  local from, n = raw:match("^Return%-Path:[ \t]*<([^>\r\n]*)>[ \t]*\r?\n()")
  if from then
    trace = n - 1
    while true do
      local r, m = raw:match("^Delivered%-To:[ \t]*([^\r\n]-)[ \t]*\r?\n()", trace + 1)
      if not r then break end
      to[#to + 1], trace = r, m - 1
    end
    if #to > 0 and raw:sub(trace + 1, trace + 9) == "Received:" then
      local stop = trace
      repeat stop = (raw:find("\n", stop + 1, true) or #raw) until not raw:sub(stop + 1, stop + 1):match("^[ \t]$")
      if raw:sub(trace + 1, stop):find("(lua-smtp) with", 1, true) then trace = stop end
    end
  end
  if msg and not from then
    local rp = msg:header("return-path")
    from = rp and (rp:match("<([^>]*)>") or rp:match("%S+"))
  end
  if msg and #to == 0 then
    for _, f in ipairs(msg.headers) do
      if f.name:lower() == "delivered-to" then to[#to + 1] = f.value:match("^%s*<?(.-)>?%s*$") end
    end
    if #to == 0 then
      for _, k in ipairs { "to", "cc" } do
        for _, a in ipairs(M.addresses(msg:header(k))) do to[#to + 1] = a.Address end
      end
    end
  end
  if not from then
    from = e.sender or (msg and (M.addresses(msg:header("from"))[1] or {}).Address) or ""
  end
  e.from, e.to, e.size = from, to, #raw - trace
end


-- The summary of one message (cached on the entry).
function Store:summary(e)
  if e.summary then return e.summary end
  local raw = not e.gone and self:raw(e)
  if not raw then
    self:forget(e)
    local s = { ID = e.id, Created = os.date("!%Y-%m-%dT%H:%M:%SZ", e.created), Size = 0,
                From = { Name = "", Address = e.from or "" }, To = {}, Cc = {}, Bcc = {}, ReplyTo = {},
                Subject = "", MessageID = "", Snippet = "", Attachments = 0, Tags = {}, Read = false }
    vanished[s] = true
    return s
  end
  local msg = message.parse(raw, { max_kept = 64 * 1024 * 1024 })
  if e.from == nil then envelope(e, raw, msg) end
  local s = { ID = e.id, Created = os.date("!%Y-%m-%dT%H:%M:%SZ", e.created), Size = e.size or 0,
              From = { Name = "", Address = e.from or "" }, To = {}, Cc = {}, Bcc = {}, ReplyTo = {},
              Subject = "", MessageID = "", Snippet = "", Attachments = 0, Tags = {}, Read = false }
  if msg then
    local from = M.addresses(msg:header("from"))[1]
    if from then s.From = from end
    s.To = M.addresses(msg:header("to"))
    s.Cc = M.addresses(msg:header("cc"))
    s.ReplyTo = M.addresses(msg:header("reply-to"))
    s.Subject = msg:header("subject") or ""
    s.MessageID = (msg:header("message-id") or ""):match("^%s*<?(.-)>?%s*$")
    local text, html, att = M.bodies(msg)
    s.Snippet = snippet_of(text, html)
    s.Attachments = #att
  end
  -- envelope recipients not in To or Cc were blind copies
  local seen = {}
  for _, l in ipairs { s.To, s.Cc } do for _, a in ipairs(l) do seen[a.Address:lower()] = true end end
  for _, r in ipairs(e.to or {}) do
    if not seen[r:lower()] then s.Bcc[#s.Bcc + 1] = { Name = "", Address = r } end
  end
  e.summary = s
  return s
end

-- Search -------------------------------------------------------------------------------------

-- "from:ann to:bob subject:hello word" -> a predicate over summaries (case-insensitive,
-- substrings; "quoted words" keep their spaces; free words match sender, recipients or subject).
function M.query(q)
  local terms = {}
  q = q or ""
  local i = 1
  while i <= #q do
    local s, e = q:find("^%s+", i)
    if s then i = e + 1 end
    if i > #q then break end
    local key, rest = q:sub(i):match("^(%a+):(.*)$")
    local k = key and key:lower()
    if k ~= "from" and k ~= "to" and k ~= "subject" then k = nil end
    local start = k and (i + #key + 1) or i
    local v
    if q:sub(start, start) == '"' then
      local stop = q:find('"', start + 1, true) or (#q + 1)
      v = q:sub(start + 1, stop - 1); i = stop + 1
    else
      local stop = q:find("%s", start) or (#q + 1)
      v = q:sub(start, stop - 1); i = stop
    end
    _ = rest
    if v ~= "" then terms[#terms + 1] = { k = k or "any", v = v:lower() } end
  end
  local function has(s, v) return s and s:lower():find(v, 1, true) ~= nil end
  local function addrs(list, v)
    for _, a in ipairs(list) do if has(a.Address, v) or has(a.Name, v) then return true end end
  end
  return function(s)
    if vanished[s] then return false end
    for _, t in ipairs(terms) do
      local from = has(s.From.Address, t.v) or has(s.From.Name, t.v)
      local to = addrs(s.To, t.v) or addrs(s.Cc, t.v) or addrs(s.Bcc, t.v)
      local subj = has(s.Subject, t.v)
      local ok = (t.k == "from" and from) or (t.k == "to" and to) or (t.k == "subject" and subj)
        or (t.k == "any" and (from or to or subj))
      if not ok then return false end
    end
    return true
  end
end

-- Messages newest first, those `match` keeps (all without it): the page [start, start+limit).
function Store:page(match, start, limit)
  start, limit = start or 0, limit or 50
  local out, total = {}, 0
  for i = #self.list, 1, -1 do
    local e = self.list[i]
    -- without a query only the page's own messages are read (a summary may find a file gone)
    local s = match and not e.gone and self:summary(e)
    if not e.gone and (not match or match(s)) then
      total = total + 1
      if total > start and #out < limit then
        s = s or self:summary(e)
        if e.gone then total = total - 1 else out[#out + 1] = s end
      end
    end
  end
  self:compact()
  return out, total
end

return M
