-- smtp.inbox.store: the index of the messages `lua-smtp sink --http` has received, over the sink's
-- Maildir, its mbox or memory alone, with the summaries, search and change notices the web inbox
-- and its API read. Summaries are worked out on first read, not as mail arrives: the SMTP side
-- pays for a string copy per message, nothing more.
local message = require "smtp.message"

local M = {}

local Store = {}
Store.__index = Store

-- new{ kind = "memory"|"maildir"|"mbox", max = N (memory: oldest dropped past it) }
function M.new(opts)
  opts = opts or {}
  return setmetatable({ kind = opts.kind or "memory", max = opts.max, list = {}, by_id = {},
                        watchers = {}, seq = 0, bytes = 0 }, Store)
end

local function rand_hex(n)
  local t = {}
  for i = 1, n do t[i] = ("%x"):format(math.random(0, 15)) end
  return table.concat(t)
end

-- Adds a message: e = { raw = data (memory), file = path (maildir), mbox = { path, start, stop }
-- (mbox), head = its header block, size, from, to = { ... } (the envelope) }. Returns its id.
function Store:add(e)
  self.seq = self.seq + 1
  e.id = e.id or ("%08x%04x%s"):format(os.time(), self.seq % 0x10000, rand_hex(8))
  e.created = e.created or os.time()
  e.seq = self.seq
  local l = self.list
  l[#l + 1] = e
  self.by_id[e.id] = e
  if self.max and #l > self.max then
    local old = table.remove(l, 1)   -- oldest first in the list: the list is in arrival order
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

function Store:count() return #self.list end
function Store:get(id) return self.by_id[id] end

-- The message as stored (the sink's trace lines, then the data as received).
function Store:raw(e)
  if e.raw then return e.raw end
  if e.file then
    local f = io.open(e.file, "rb")
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
    -- undo the mbox framing: the From_ line, the blank line after, the mboxrd quoting
    s = s:gsub("^From [^\n]*\n", ""):gsub("\r\n$", "")
    s = ("\n" .. s):gsub("\n>(>*From )", "\n%1"):sub(2)
    return s
  end
end

-- Deletes messages by id (all when ids is nil). Maildir files go too; an mbox keeps its bytes
-- (rewriting a mailbox other programs may read is not the inbox's job).
function Store:delete(ids)
  local gone = {}
  if ids == nil then
    for _, e in ipairs(self.list) do gone[#gone + 1] = e end
    self.list, self.by_id = {}, {}
  else
    local set = {}
    for _, id in ipairs(ids) do
      if self.by_id[id] then set[id] = true; gone[#gone + 1] = self.by_id[id]; self.by_id[id] = nil end
    end
    local keep = {}
    for _, e in ipairs(self.list) do if not set[e.id] then keep[#keep + 1] = e end end
    self.list = keep
  end
  local out = {}
  for _, e in ipairs(gone) do
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

-- The parsed message (not kept: a tree with contents can be large).
function Store:parse(e)
  local raw = self:raw(e)
  if not raw then return nil end
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

-- The summary of one message (cached on the entry).
function Store:summary(e)
  if e.summary then return e.summary end
  local msg = self:parse(e)
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
    if not match or match(self:summary(e)) then
      total = total + 1
      if total > start and #out < limit then out[#out + 1] = self:summary(e) end
    end
  end
  return out, total
end

return M
