-- smtp.message: MIME composition (RFC 5322, 2045-2047, 2231, 6532) as a stream of chunks, with
-- optional DKIM signing. Date, Message-ID and boundaries are fixed when the message is created,
-- so tostring() and the concatenated source() chunks are the same bytes.
local core = require "smtp.core"
local errors = require "smtp.errors"
local dkim = require "smtp.dkim"

local M = {}

local Message = {}
local mt = { __name = "smtp.message", __index = Message }

local BLOCK = 57 * 1152          -- bytes read per attachment block: whole base64 lines
local CHUNK = 64 * 1024          -- chunks handed to the caller are about this size

local function invalid(text) return nil, errors.new{ kind = "invalid", text = "message: " .. text,
                                                     temporary = false } end

local check = require "smtp.check"
-- CR, LF or NUL: what would end or split a header line (a tab is fine in a header)
local has_ctl = check.breaks_line
local has_8bit = check.has_8bit
local function is_ascii(s) return not has_8bit(s) end

-- Extension -> content type, for attachments given without one.
M.types = {
  txt = "text/plain", text = "text/plain", log = "text/plain", csv = "text/csv",
  htm = "text/html", html = "text/html", css = "text/css", ics = "text/calendar",
  md = "text/markdown", xml = "application/xml", json = "application/json",
  js = "text/javascript", pdf = "application/pdf", zip = "application/zip",
  gz = "application/gzip", tar = "application/x-tar", ["7z"] = "application/x-7z-compressed",
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  webp = "image/webp", svg = "image/svg+xml", bmp = "image/bmp", ico = "image/vnd.microsoft.icon",
  tif = "image/tiff", tiff = "image/tiff", mp3 = "audio/mpeg", wav = "audio/wav",
  ogg = "audio/ogg", mp4 = "video/mp4", webm = "video/webm", mov = "video/quicktime",
  doc = "application/msword", xls = "application/vnd.ms-excel",
  ppt = "application/vnd.ms-powerpoint",
  docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
  xlsx = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
  pptx = "application/vnd.openxmlformats-officedocument.presentationml.presentation",
  odt = "application/vnd.oasis.opendocument.text", rtf = "application/rtf",
}

------------------------------------------------------------------------------------------------
-- Header encoding
------------------------------------------------------------------------------------------------

-- Splits UTF-8 text into pieces of at most `max` bytes without cutting a character.
local function utf8_pieces(s, max)
  local out, i, n = {}, 1, #s
  while i <= n do
    local j = math.min(i + max - 1, n)
    if j < n then
      -- step back while the byte after j is a continuation byte (10xxxxxx)
      while j > i and s:byte(j + 1) >= 0x80 and s:byte(j + 1) < 0xC0 do j = j - 1 end
    end
    out[#out + 1] = s:sub(i, j)
    i = j + 1
  end
  return out
end

-- RFC 2047 B-encoded words of at most 75 characters: "=?UTF-8?B?" + 60 base64 + "?=" = 72.
-- With firstroom, the first word is cut to fit the columns left after the field name.
local function encoded_words(s, firstroom)
  local words, i = {}, 1
  if firstroom and firstroom < 72 and firstroom >= 20 then
    local first = utf8_pieces(s, math.floor((firstroom - 12) / 4) * 3)[1]
    words[1] = "=?UTF-8?B?" .. core.b64encode(first) .. "?="
    i = #first + 1
  end
  for _, p in ipairs(utf8_pieces(s:sub(i), 45)) do
    words[#words + 1] = "=?UTF-8?B?" .. core.b64encode(p) .. "?="
  end
  return words
end
M._encoded_words = encoded_words

-- Folds a header at spaces so lines stay within 78 columns where the words allow it. Words are
-- joined with single spaces; a fold puts CRLF before the space (RFC 5322 2.2.3).
local function fold_words(name, words)
  local out, col = { name, ":" }, #name + 1
  for _, w in ipairs(words) do
    if col + 1 + #w > 78 then
      out[#out + 1] = "\r\n "; col = 1
    else
      out[#out + 1] = " "; col = col + 1
    end
    out[#out + 1] = w; col = col + #w
  end
  return table.concat(out)
end

-- An unstructured value (Subject, caller headers): as it is when plain ASCII that folds safely,
-- else encoded words (which also keep runs of spaces and leading/trailing space exactly).
local function unstructured_words(v, name)
  if v == "" then return {} end
  local plain = is_ascii(v) and not v:find("[%c]") and not v:find("=?", 1, true)
    and not v:find("  ", 1, true) and not v:find("^ ") and not v:find(" $")
  if plain then
    local words = {}
    for w in v:gmatch("[^ ]+") do
      if #w > 76 then plain = false; break end
      words[#words + 1] = w
    end
    if plain then return words end
  end
  return encoded_words(v, 78 - #name - 2)
end

local atext = "^[%w!#$%%&'*+/=?^_`{|}~%-]+$"

-- A display name: atoms as they are, else a quoted string, else encoded words when not ASCII.
-- Non-ASCII names keep their ASCII atoms plain and encode each run of other words in one encoded
-- word when it fits (45 bytes), so no two encoded words touch: RFC 2047 readers drop the space
-- between adjacent encoded words while Python's email package keeps it, and only separate words
-- read the same in both. Longer runs split with the space inside the encoded text (RFC 2047 6.2).
local function phrase_words(name)
  if is_ascii(name) and not name:find("=?", 1, true) then
    local words, plain = {}, not name:find("  ", 1, true) and not name:find("^ ") and not name:find(" $")
    if plain then
      for w in name:gmatch("[^ ]+") do
        if not w:match(atext) then plain = false; break end
        words[#words + 1] = w
      end
    end
    if plain then return words end
    if not name:find("%c") then
      local q = '"' .. name:gsub('([\\"])', "\\%1") .. '"'
      if #q <= 70 then return { q } end
    end
    return encoded_words(name)
  end
  if name:find("  ", 1, true) or name:find("^ ") or name:find(" $") or name:find("%c") then
    return encoded_words(name)
  end
  local words, run = {}, nil
  local function flush()
    if run then for _, w in ipairs(encoded_words(run)) do words[#words + 1] = w end end
    run = nil
  end
  for tok in name:gmatch("[^ ]+") do
    if tok:match(atext) and not tok:find("=?", 1, true) then
      flush()
      words[#words + 1] = tok
    elseif run and #run + 1 + #tok <= 45 then
      run = run .. " " .. tok
    elseif run then
      flush()
      run = " " .. tok       -- adjacent to the previous word: the space goes inside
    else
      run = tok
    end
  end
  flush()
  return words
end

------------------------------------------------------------------------------------------------
-- Addresses
------------------------------------------------------------------------------------------------

-- Checks an addr-spec (smtp.check's rules, the same as the envelope's); returns it, whether it
-- needs SMTPUTF8 (a local part that is not ASCII), and its form with an international domain as
-- the A-label, which the header carries so that readers and servers without RFC 6532 take it.
local function check_address(a)
  local ok, u8, wire = check.address(a)
  if not ok then return nil, u8.text end
  return a, u8, wire
end

-- Splits "a, b <c>, \"d, e\" <f>" at commas outside quotes and angle brackets.
local function split_list(s)
  local out, cur, q, ang, esc = {}, {}, false, false, false
  for ch in s:gmatch(".") do
    if esc then cur[#cur + 1] = ch; esc = false
    elseif q and ch == "\\" then cur[#cur + 1] = ch; esc = true
    elseif ch == '"' then q = not q; cur[#cur + 1] = ch
    elseif not q and ch == "<" then ang = true; cur[#cur + 1] = ch
    elseif not q and ch == ">" then ang = false; cur[#cur + 1] = ch
    elseif ch == "," and not q and not ang then out[#out + 1] = table.concat(cur); cur = {}
    else cur[#cur + 1] = ch end
  end
  out[#out + 1] = table.concat(cur)
  local r = {}
  for _, x in ipairs(out) do
    x = x:match("^%s*(.-)%s*$")
    if x ~= "" then r[#r + 1] = x end
  end
  return r
end

-- One mailbox: "Name <a@b>", "a@b", or { name =, address = } -> { name =, address = }.
local function parse_mailbox(v)
  local name, addr
  if type(v) == "table" then
    name, addr = v.name, v.address
    if name ~= nil and type(name) ~= "string" then return nil, "name must be a string" end
  elseif type(v) == "string" then
    if has_ctl(v) then return nil, "CR, LF or NUL in address" end
    local n, a = v:match("^(.-)%s*<([^<>]*)>%s*$")
    if n then
      name, addr = n, a
      local qn = name:match('^"(.*)"$')
      if qn then name = qn:gsub("\\(.)", "%1") end
      if name == "" then name = nil end
    else
      addr = v:match("^%s*(.-)%s*$")
    end
  else
    return nil, "address must be a string or a table"
  end
  if name and has_ctl(name) then return nil, "CR, LF or NUL in display name" end
  local a, err, wire = check_address(addr)
  if not a then return nil, err end
  local utf8 = err
  if name and not is_ascii(name) and not core.utf8_valid(name) then
    return nil, "display name is not UTF-8"
  end
  return { name = name, address = a, wire = wire, utf8 = utf8 }
end

-- A list option (string with commas, one table mailbox, or a list) -> list of mailboxes.
local function parse_list(v, what)
  if v == nil then return {} end
  local items
  if type(v) == "string" then items = split_list(v)
  elseif type(v) == "table" and (v.address or v.name) then items = { v }
  elseif type(v) == "table" then items = v
  else return nil, what .. ": string or list expected" end
  local out = {}
  for _, it in ipairs(items) do
    local mb, err
    if type(it) == "string" and split_list(it)[2] then
      return nil, what .. ": one address per list item"
    end
    mb, err = parse_mailbox(it)
    if not mb then return nil, what .. ": " .. err end
    out[#out + 1] = mb
  end
  return out
end

local function mailbox_words(mb, last)
  local words = {}
  if mb.name then for _, w in ipairs(phrase_words(mb.name)) do words[#words + 1] = w end end
  words[#words + 1] = (mb.name and "<" .. mb.wire .. ">" or mb.wire) .. (last and "" or ",")
  return words
end

local function address_header(name, list)
  local words = {}
  for i, mb in ipairs(list) do
    for _, w in ipairs(mailbox_words(mb, i == #list)) do words[#words + 1] = w end
  end
  return fold_words(name, words)
end

------------------------------------------------------------------------------------------------
-- Bodies and parts
------------------------------------------------------------------------------------------------

local function hexs(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end

-- Text body: 7bit when it can be, else quoted-printable. Line ends become CRLF.
local function text_part(ctype, s)
  if core.is_7bit(s) then
    return { ctype = ctype .. "; charset=UTF-8", cte = "7bit", body = (s:gsub("\r?\n", "\r\n")) }
  end
  return { ctype = ctype .. "; charset=UTF-8", cte = "quoted-printable", body = core.qpencode(s) }
end

-- A filename as MIME parameters: plain quoted when short ASCII, else RFC 2231 (continued when
-- long) for Content-Disposition and an RFC 2047 word list for the old name= of Content-Type.
local function pct(s)
  return (s:gsub("[^%w!#$&+%-%.^_`|~]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function name_params(param, filename)
  if is_ascii(filename) and #filename <= 60 and not filename:find('[%c"\\]') then
    return { param .. '="' .. filename .. '"' }
  end
  if param == "name" then
    -- one quoted string that folds between its encoded words
    local w = encoded_words(filename)
    w[1] = 'name="' .. w[1]; w[#w] = w[#w] .. '"'
    return { w }
  end
  local enc = pct(filename)
  if #enc <= 60 then return { param .. "*=UTF-8''" .. enc } end
  -- continuations cut between characters: Python decodes each section on its own
  local out, seg = {}, ""
  for ch in filename:gmatch("[%z\1-\127\194-\244][\128-\191]*") do
    local e = pct(ch)
    if #seg + #e > 60 then
      out[#out + 1] = string.format("%s*%d*=%s%s", param, #out, #out == 0 and "UTF-8''" or "", seg)
      seg = ""
    end
    seg = seg .. e
  end
  out[#out + 1] = string.format("%s*%d*=%s%s", param, #out, #out == 0 and "UTF-8''" or "", seg)
  return out
end

local function param_header(name, value, params)
  local words = { value .. (#params > 0 and ";" or "") }
  for i, p in ipairs(params) do
    if type(p) == "string" then p = { p } end
    for j, w in ipairs(p) do
      words[#words + 1] = w .. ((j == #p and i < #params) and ";" or "")
    end
  end
  return fold_words(name, words)
end

local function check_ctype(ct)
  if type(ct) ~= "string" or has_ctl(ct) or not ct:match("^[%w!#$&%-^_.+]+/[%w!#$&%-^_.+]+") then
    return nil
  end
  return ct
end

-- An attachment or inline part. Paths are checked now and read when the message is produced.
local function file_part(a, disposition)
  if type(a) ~= "table" then return nil, "attachment must be a table" end
  local filename = a.filename
  if filename == nil and a.path then filename = tostring(a.path):match("([^/\\]+)$") end
  if filename ~= nil and (type(filename) ~= "string" or has_ctl(filename)) then
    return nil, "bad attachment filename"
  end
  if filename and not is_ascii(filename) and not core.utf8_valid(filename) then
    return nil, "attachment filename is not UTF-8"
  end
  local part = { cte = "base64" }
  if a.path ~= nil then
    if type(a.path) ~= "string" then return nil, "attachment path must be a string" end
    local f, err = io.open(a.path, "rb")
    if not f then return nil, "attachment cannot be read: " .. tostring(err) end
    local d, rerr = f:read(1)   -- a directory opens but does not read
    f:close()
    if d == nil and rerr then return nil, "attachment cannot be read: " .. tostring(rerr) end
    part.path = a.path
  elseif type(a.content) == "string" then
    part.content = a.content
  else
    return nil, "attachment needs path or content"
  end
  local ct = a.content_type
  if ct ~= nil then
    ct = check_ctype(ct)
    if not ct then return nil, "bad content_type" end
  else
    local ext = filename and filename:match("%.([%w]+)$")
    ct = ext and M.types[ext:lower()] or "application/octet-stream"
  end
  local h = {}
  h[#h + 1] = param_header("Content-Type", ct, filename and name_params("name", filename) or {})
  h[#h + 1] = "Content-Transfer-Encoding: base64"
  h[#h + 1] = param_header("Content-Disposition", disposition,
                           filename and name_params("filename", filename) or {})
  if a.cid ~= nil then
    if type(a.cid) ~= "string" or not a.cid:match("^[%w!#$%%&'*+/=?^_`{|}~%-%.@]+$") then
      return nil, "bad cid"
    end
    h[#h + 1] = "Content-ID: <" .. a.cid .. ">"
  end
  part.headers = h
  return part
end

local function leaf_headers(p)
  return { "Content-Type: " .. p.ctype, "Content-Transfer-Encoding: " .. p.cte }
end

------------------------------------------------------------------------------------------------
-- Threading, mailing list fields and calendar invitations
------------------------------------------------------------------------------------------------

local DOT_ATOM = "^[%w!#$%%&'*+/=?^_`{|}~%-]+$"
M.MSG_ID_MAX = 250   -- octets of a msg-id with its brackets: it cannot be folded, so it must fit a line

-- RFC 5322 msg-id, "<id-left@id-right>" (the brackets may be left out): id-left a dot-atom-text,
-- id-right a dot-atom-text or a no-fold-literal, printable ASCII only -> "<...>" | nil, why.
local function msg_id(v, what)
  if type(v) ~= "string" then return nil, what .. ": msg-id must be a string" end
  if check.has_ctl(v) then return nil, what .. ": control character (CR, LF, NUL, ...) in msg-id" end
  local inner = v:match("^<(.*)>$") or v
  if #inner + 2 > M.MSG_ID_MAX then
    return nil, what .. ": msg-id over " .. M.MSG_ID_MAX .. " octets"
  end
  local left, right = inner:match("^([^@]*)@(.*)$")
  local function dot_atom(x)
    for atom in (x .. "."):gmatch("(.-)%.") do
      if not atom:match(DOT_ATOM) then return false end
    end
    return x ~= ""
  end
  if not left or not dot_atom(left) or not (dot_atom(right) or right:match("^%[[!-Z^-~]*%]$")) then
    return nil, what .. ": not a msg-id (<id-left@id-right>): " .. v:gsub("[^ -~]", "?")
  end
  return "<" .. inner .. ">"
end

-- One msg-id or several (a list, or a string of them separated by spaces) -> list of "<...>".
local function msg_ids(v, what)
  local items = v
  if type(v) == "string" then
    items = {}
    for tok in v:gmatch("[^%s,]+") do items[#items + 1] = tok end
    if check.has_ctl(v) then items = { v } end
  elseif type(v) ~= "table" then
    return nil, what .. ": a msg-id or a list of them expected"
  end
  local out = {}
  for _, it in ipairs(items) do
    local id, err = msg_id(it, what)
    if not id then return nil, err end
    out[#out + 1] = id
  end
  if #out == 0 then return nil, what .. ": no msg-id" end
  return out
end

M.URL_MAX = 900   -- octets of a List-* URL: one angle-bracketed URL must fit a header line

-- A URL of an RFC 2369 field: printable ASCII of RFC 3986's characters, "%" only in escapes.
local function url(u, what)
  if type(u) ~= "string" then return nil, what .. ": URL must be a string" end
  if #u > M.URL_MAX then return nil, what .. ": URL over " .. M.URL_MAX .. " octets" end
  local scheme = u:match("^([%a][%w+.%-]*):")
  if not scheme or not u:match("^[%w%-._~:/?#%[%]@!$&'()*+,;=%%]+$") or u:gsub("%%%x%x", ""):find("%%") then
    return nil, what .. ": not a URL (ASCII, no spaces, <, > or quotes, %XX escapes): " .. u:gsub("[^ -~]", "?")
  end
  scheme = scheme:lower()
  if scheme == "http" or scheme == "https" then
    if not u:match("^[%a]+://[^/?#]+") then return nil, what .. ": URL without a host: " .. u end
  elseif scheme == "mailto" then
    local a = u:match("^[%a]+:([^?]+)")
    local ok = a and check.address((a:gsub("%%(%x%x)", function(x) return string.char(tonumber(x, 16)) end)))
    if not ok then return nil, what .. ": mailto URL without an address: " .. u end
  end
  return u, scheme
end

-- A list of URLs -> the value of an RFC 2369 field: "<url>, <url>" (folded between them).
local function url_words(list)
  local words = {}
  for i, u in ipairs(list) do words[i] = "<" .. u .. ">" .. (i < #list and "," or "") end
  return words
end

local LIST_FIELDS = { { "help", "List-Help" }, { "subscribe", "List-Subscribe" },
                      { "post", "List-Post" }, { "owner", "List-Owner" }, { "archive", "List-Archive" } }

-- list = { id =, unsubscribe = { url =, mailto =, one_click = }, help =, subscribe =, post =,
-- owner =, archive = } -> header fields (RFC 2369, 2919, 8058) | nil, why
local function list_fields(l)
  if type(l) ~= "table" then return nil, "list must be a table" end
  local fields = {}
  if l.id ~= nil then
    if type(l.id) ~= "string" or has_ctl(l.id) then return nil, "list.id must be a string without CR, LF or NUL" end
    local name, id = l.id:match("^(.-)%s*<([^<>]*)>%s*$")
    if not name then id = l.id end
    local qn = name and name:match('^"(.*)"$')
    if qn then name = qn:gsub("\\(.)", "%1") end
    if name == "" then name = nil end
    -- RFC 2919: a list-label, a dot and a namespace, as a dot-atom-text of at most 255 octets
    local ok = #id <= 255 and id:find(".", 1, true)
    if ok then for atom in (id .. "."):gmatch("(.-)%.") do ok = ok and atom:match(DOT_ATOM) end end
    if not ok then return nil, "list.id: not a list id (label.namespace, e.g. news.example.com): " .. id end
    if name and not is_ascii(name) and not core.utf8_valid(name) then return nil, "list.id: name is not UTF-8" end
    local words = {}
    if name then for _, w in ipairs(phrase_words(name)) do words[#words + 1] = w end end
    words[#words + 1] = "<" .. id .. ">"
    fields[#fields + 1] = { "List-Id", words }
  end
  for _, f in ipairs(LIST_FIELDS) do
    local v = l[f[1]]
    if v ~= nil then
      local list = type(v) == "table" and v or { v }
      if #list == 0 then return nil, "list." .. f[1] .. ": no URL" end
      for _, u in ipairs(list) do
        local ok, err = url(u, "list." .. f[1])
        if not ok then return nil, err end
      end
      fields[#fields + 1] = { f[2], url_words(list) }
    end
  end
  local u = l.unsubscribe
  if u ~= nil then
    if type(u) ~= "table" or (u.url == nil and u.mailto == nil) then
      return nil, "list.unsubscribe: { url = \"https://...\", mailto = \"mailto:...\" } expected"
    end
    local list, https = {}, false
    if u.url ~= nil then
      local ok, scheme = url(u.url, "list.unsubscribe.url")
      if not ok then return nil, scheme end
      if scheme ~= "https" and scheme ~= "http" then
        return nil, "list.unsubscribe.url: an https URL expected: " .. u.url
      end
      https = scheme == "https"
      list[#list + 1] = u.url
    end
    if u.mailto ~= nil then
      local ok, scheme = url(u.mailto, "list.unsubscribe.mailto")
      if not ok then return nil, scheme end
      if scheme ~= "mailto" then return nil, "list.unsubscribe.mailto: a mailto: URL expected: " .. u.mailto end
      list[#list + 1] = u.mailto
    end
    if u.one_click ~= nil and type(u.one_click) ~= "boolean" then
      return nil, "list.unsubscribe.one_click must be a boolean"
    end
    if u.one_click == true and not https then
      return nil, "list.unsubscribe: one-click unsubscribe (RFC 8058) needs an https URL"
    end
    fields[#fields + 1] = { "List-Unsubscribe", url_words(list) }
    -- RFC 8058: the receiver POSTs "List-Unsubscribe=One-Click" to the https URL; only https
    if https and u.one_click ~= false then
      fields[#fields + 1] = { "List-Unsubscribe-Post", { "List-Unsubscribe=One-Click" } }
    end
  end
  return fields
end

-- iTIP methods (RFC 5546) a text/calendar part may carry.
local METHODS = { PUBLISH = true, REQUEST = true, REPLY = true, ADD = true, CANCEL = true,
                  REFRESH = true, COUNTER = true, DECLINECOUNTER = true }

-- Lines longer than 75 octets folded (RFC 5545 3.1: CRLF and a space), never inside a character.
local function fold_ical_line(line, out)
  while #line > 75 do
    local j = 75
    while j > 1 and line:byte(j + 1) and line:byte(j + 1) >= 0x80 and line:byte(j + 1) < 0xC0 do j = j - 1 end
    out[#out + 1] = line:sub(1, j)
    line = " " .. line:sub(j + 1)
  end
  out[#out + 1] = line
end

-- calendar = "BEGIN:VCALENDAR..." or { content =, method =, filename = "invite.ics",
-- attachment = true } -> { text = CRLF text, folded, method = "REQUEST", filename =, attach = } | nil, why
local function calendar(c)
  if type(c) == "string" then c = { content = c } end
  if type(c) ~= "table" or type(c.content) ~= "string" then
    return nil, "calendar: iCalendar text, or { content = text, method = ... } expected"
  end
  local text = c.content
  if text:find("%z") then return nil, "calendar: NUL in the iCalendar text" end
  if not is_ascii(text) and not core.utf8_valid(text) then return nil, "calendar: not UTF-8" end
  text = text:gsub("\r\n", "\n"):gsub("\r", "\n")
  local lines = {}
  for l in (text:gsub("\n+$", "") .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  if not (lines[1] or ""):upper():match("^BEGIN:VCALENDAR%s*$") or not lines[#lines]:upper():match("^END:VCALENDAR%s*$") then
    return nil, "calendar: BEGIN:VCALENDAR ... END:VCALENDAR expected"
  end
  -- METHOD of the VCALENDAR itself (depth 1), read from unfolded lines
  local method, depth, logical = nil, 0, {}
  for _, l in ipairs(lines) do
    if l:match("^[ \t]") and #logical > 0 then logical[#logical] = logical[#logical] .. l:sub(2)
    else logical[#logical + 1] = l end
  end
  for _, l in ipairs(logical) do
    local u = l:upper()
    if u:match("^BEGIN:") then depth = depth + 1
    elseif u:match("^END:") then depth = depth - 1
    elseif depth == 1 and u:match("^METHOD[:;]") then
      if method then return nil, "calendar: METHOD given twice" end
      method = u:match("^METHOD[^:]*:%s*(.-)%s*$")
    end
  end
  if not method then return nil, "calendar: the VCALENDAR has no METHOD (REQUEST, CANCEL, REPLY, ...)" end
  if not METHODS[method] then return nil, "calendar: unknown METHOD " .. method:gsub("[^ -~]", "?") end
  if c.method ~= nil then
    if type(c.method) ~= "string" or c.method:upper() ~= method then
      return nil, "calendar: method " .. tostring(c.method) .. " does not match the text's METHOD:" .. method
    end
  end
  local filename = c.filename or "invite.ics"
  if type(filename) ~= "string" or has_ctl(filename) or filename == "" then return nil, "calendar: bad filename" end
  if not is_ascii(filename) and not core.utf8_valid(filename) then return nil, "calendar: filename is not UTF-8" end
  local out = {}
  for _, l in ipairs(lines) do fold_ical_line(l, out) end
  return { text = table.concat(out, "\r\n") .. "\r\n", method = method, filename = filename,
           attach = c.attachment ~= false }
end

------------------------------------------------------------------------------------------------
-- message.new
------------------------------------------------------------------------------------------------

local single = { date = true, from = true, sender = true, ["reply-to"] = true, to = true,
                 cc = true, bcc = true, ["message-id"] = true, ["in-reply-to"] = true,
                 references = true, subject = true, ["mime-version"] = true,
                 ["content-type"] = true, ["content-transfer-encoding"] = true }
local generated = { date = true, from = true, sender = true, ["reply-to"] = true, to = true,
                    cc = true, bcc = true, ["message-id"] = true, subject = true,
                    ["mime-version"] = true, ["content-type"] = true,
                    ["content-transfer-encoding"] = true }

local days = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" }
local months = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" }

function M.date(epoch)
  local t = os.date("!*t", epoch)
  return string.format("%s, %02d %s %04d %02d:%02d:%02d +0000", days[t.wday], t.day,
                       months[t.month], t.year, t.hour, t.min, t.sec)
end

local function default_random(n) return core.random(n) end

local function default_hostname()
  local f = io.open("/proc/sys/kernel/hostname", "rb")
  local h = f and f:read("*l"); if f then f:close() end
  if not h or h == "" then h = os.getenv("HOSTNAME") end
  if not h or not h:match("^[%w%-%.]+$") then h = "localhost" end
  return h
end

function M.new(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'new' (options table expected)", 2) end
  local clock = opts.clock or os.time
  local random = opts.random or default_random
  if type(clock) ~= "function" or type(random) ~= "function" then
    error("bad argument #1 to 'new' (clock and random must be functions)", 2)
  end
  local err
  local from, sender, to, cc, bcc, reply_to
  local froms
  froms, err = parse_list(opts.from, "from")
  if not froms then return invalid(err) end
  if #froms ~= 1 then return invalid("from: exactly one address required") end
  from = froms[1]
  if opts.sender ~= nil then
    local s; s, err = parse_list(opts.sender, "sender")
    if not s then return invalid(err) end
    if #s ~= 1 then return invalid("sender: exactly one address") end
    sender = s[1]
  end
  to, err = parse_list(opts.to, "to"); if not to then return invalid(err) end
  cc, err = parse_list(opts.cc, "cc"); if not cc then return invalid(err) end
  bcc, err = parse_list(opts.bcc, "bcc"); if not bcc then return invalid(err) end
  reply_to, err = parse_list(opts.reply_to, "reply_to"); if not reply_to then return invalid(err) end
  local subject = opts.subject
  if subject ~= nil then
    if type(subject) ~= "string" then return invalid("subject must be a string") end
    if has_ctl(subject) then return invalid("CR, LF or NUL in subject") end
    if not is_ascii(subject) and not core.utf8_valid(subject) then return invalid("subject is not UTF-8") end
  end
  local hostname = opts.hostname or default_hostname()
  if type(hostname) ~= "string" or not hostname:match("^[%w%-%.]+$") then
    return invalid("bad hostname")
  end

  local self = setmetatable({ from = from, to = to, cc = cc, bcc = bcc, smtputf8 = false }, mt)
  for _, l in ipairs({ froms, to, cc, bcc, reply_to, sender and { sender } or {} }) do
    for _, mb in ipairs(l) do if mb.utf8 then self.smtputf8 = true end end
  end

  -- header fields, in order
  local fields = {}
  local now = clock()
  if type(now) ~= "number" then error("bad argument #1 to 'new' (clock() must return seconds)", 2) end
  self.now = math.floor(now)
  fields[#fields + 1] = "Date: " .. M.date(self.now)
  fields[#fields + 1] = address_header("From", { from })
  if sender then fields[#fields + 1] = address_header("Sender", { sender }) end
  if #reply_to > 0 then fields[#fields + 1] = address_header("Reply-To", reply_to) end
  if #to > 0 then fields[#fields + 1] = address_header("To", to) end
  if #cc > 0 then fields[#fields + 1] = address_header("Cc", cc) end
  if subject ~= nil then fields[#fields + 1] = fold_words("Subject", unstructured_words(subject, "Subject")) end
  local domain = from.address:match("@([^@]+)$")
  if not is_ascii(domain) then domain = check.idna_domain(domain) end   -- valid: checked above
  if domain:sub(1, 1) == "[" then domain = hostname end
  if opts.message_id ~= nil then
    local id; id, err = msg_id(opts.message_id, "message_id")
    if not id then return invalid(err) end
    self.message_id = id
  else
    local rnd = random(16)
    if type(rnd) ~= "string" or #rnd < 16 then error("bad argument #1 to 'new' (random(n) must return n bytes)", 2) end
    self.message_id = "<" .. hexs(rnd:sub(1, 16)) .. "@" .. domain .. ">"
  end
  fields[#fields + 1] = "Message-ID: " .. self.message_id
  -- fields set here are refused in `headers` as given twice
  local seen = {}
  for _, t in ipairs({ { "in_reply_to", "In-Reply-To" }, { "references", "References" } }) do
    if opts[t[1]] ~= nil then
      local ids; ids, err = msg_ids(opts[t[1]], t[1])
      if not ids then return invalid(err) end
      fields[#fields + 1] = fold_words(t[2], ids)
      seen[t[2]:lower()] = true
    end
  end
  if opts.list ~= nil then
    local lf; lf, err = list_fields(opts.list)
    if not lf then return invalid(err) end
    for _, f in ipairs(lf) do
      fields[#fields + 1] = fold_words(f[1], f[2])
      seen[f[1]:lower()] = "list"
    end
  end
  fields[#fields + 1] = "MIME-Version: 1.0"
  if opts.headers ~= nil then
    if type(opts.headers) ~= "table" then return invalid("headers must be a list of {name, value}") end
    for _, hv in ipairs(opts.headers) do
      if type(hv) ~= "table" then return invalid("headers must be a list of {name, value}") end
      local n, v = hv[1] or hv.name, hv[2] or hv.value
      if type(n) ~= "string" or not n:match("^[!-9;-~]+$") or #n > 76 then
        return invalid("bad header name: " .. tostring(n):gsub("[%c]", "?"))
      end
      if type(v) ~= "string" then return invalid("header value must be a string: " .. n) end
      if has_ctl(v) then return invalid("CR, LF or NUL in header " .. n) end
      if not is_ascii(v) and not core.utf8_valid(v) then return invalid("header " .. n .. " is not UTF-8") end
      local ln = n:lower()
      if generated[ln] then return invalid("header " .. n .. " given twice (set by message.new)") end
      if seen[ln] == "list" then return invalid("header " .. n .. " given twice (set by list)") end
      if single[ln] and seen[ln] then return invalid("header " .. n .. " given twice") end
      seen[ln] = true
      fields[#fields + 1] = fold_words(n, unstructured_words(v, n))
    end
  end

  -- body tree
  -- "=_" cannot occur in quoted-printable or base64 text; the counter keeps nested boundaries
  -- apart even when the random source repeats itself (tests)
  local nb = 0
  local function boundary()
    local r = random(12)
    if type(r) ~= "string" or #r < 12 then error("bad argument #1 to 'new' (random(n) must return n bytes)", 3) end
    nb = nb + 1
    return "=_" .. hexs(r:sub(1, 12)) .. "." .. nb
  end
  for _, k in ipairs({ "text", "html" }) do
    local v = opts[k]
    if v ~= nil and type(v) ~= "string" then return invalid(k .. " must be a string") end
  end
  local textp = opts.text and text_part("text/plain", opts.text)
  local htmlp = opts.html and text_part("text/html", opts.html)
  if not textp and not htmlp then textp = text_part("text/plain", "") end
  local cal
  if opts.calendar ~= nil then
    cal, err = calendar(opts.calendar)
    if not cal then return invalid(err) end
  end
  local inl, att = {}, {}
  for _, spec in ipairs({ { opts.inline, inl, "inline" }, { opts.attachments, att, "attachment" } }) do
    local list = spec[1]
    if list ~= nil then
      if type(list) ~= "table" then return invalid(spec[3] .. " must be a list") end
      for _, a in ipairs(list) do
        local p, perr = file_part(a, spec[3])
        if not p then return invalid(perr) end
        spec[2][#spec[2] + 1] = p
      end
    end
  end
  local function multipart(sub, children)
    return { multipart = sub, boundary = boundary(), children = children }
  end
  local body
  if htmlp and #inl > 0 then
    local kids = { htmlp }
    for _, p in ipairs(inl) do kids[#kids + 1] = p end
    htmlp = multipart("related", kids)
  end
  -- An invitation is the last (richest) alternative, text/calendar with the METHOD as a parameter,
  -- as Outlook, Gmail and Apple Mail expect; the .ics file goes along as an attachment too.
  -- Not quoted-printable: base64 when it is not ASCII, which every calendar reader decodes.
  local calp
  if cal then
    calp = { ctype = "text/calendar; charset=UTF-8; method=" .. cal.method, cte = "7bit", body = cal.text }
    if not core.is_7bit(cal.text) then calp.cte, calp.body, calp.content = "base64", nil, cal.text end
  end
  if textp and htmlp then body = multipart("alternative", { textp, htmlp, calp })
  elseif calp then body = multipart("alternative", { textp or htmlp, calp })
  else body = textp or htmlp end
  if not htmlp and #inl > 0 then
    local kids = { body }
    for _, p in ipairs(inl) do kids[#kids + 1] = p end
    body = multipart("related", kids)
  end
  if cal and cal.attach then
    local p = assert(file_part({ content = cal.text, filename = cal.filename, content_type = "application/ics" }, "attachment"))
    table.insert(att, 1, p)
  end
  if #att > 0 then
    local kids = { body }
    for _, p in ipairs(att) do kids[#kids + 1] = p end
    body = multipart("mixed", kids)
  end
  self.body = body
  self.fields = fields

  if opts.dkim ~= nil then
    if type(opts.dkim) ~= "table" then return invalid("dkim must be a table") end
    local d = {}
    for k, v in pairs(opts.dkim) do d[k] = v end
    if d.timestamp == nil then d.timestamp = self.now end
    local signer, serr = dkim.signer(d)
    if not signer then return nil, serr end
    self.signer = signer
  end
  return self
end

------------------------------------------------------------------------------------------------
-- Output
------------------------------------------------------------------------------------------------

local function part_headers(p)
  if p.multipart then
    return { 'Content-Type: multipart/' .. p.multipart .. '; boundary="' .. p.boundary .. '"' }
  end
  return p.headers or leaf_headers(p)
end

-- Emits the body of part p through put(s). Files are read in whole base64 lines' worth of bytes.
local function emit_body(p, put, top)
  if p.multipart then
    if top then put("This is a multi-part message in MIME format.\r\n") end
    for _, c in ipairs(p.children) do
      put("\r\n--" .. p.boundary .. "\r\n")
      put(table.concat(part_headers(c), "\r\n") .. "\r\n\r\n")
      local ok, err = emit_body(c, put)
      if not ok then return nil, err end
    end
    put("\r\n--" .. p.boundary .. "--\r\n")
  elseif p.path then
    local f, err = io.open(p.path, "rb")
    if not f then return nil, "attachment cannot be read: " .. tostring(err) end
    local first = true
    while true do
      local block = f:read(BLOCK)
      if not block or block == "" then break end
      if not first then put("\r\n") end
      put(core.b64encode(block, 76))
      first = false
      block = nil
      -- keep the heap flat however large the caller's own heap is (the GC pause scales with it)
      collectgarbage("step", 0)
    end
    f:close()
  elseif p.content then
    put(core.b64encode(p.content, 76))
  else
    put(p.body)
  end
  return true
end

-- Runs emit over a buffer that hands out chunks of about CHUNK bytes through yield(chunk).
local function buffered(yield)
  local buf, n = {}, 0
  local function put(s)
    if #s >= CHUNK then
      if n > 0 then yield(table.concat(buf)); buf, n = {}, 0 end
      yield(s)
      return
    end
    buf[#buf + 1] = s; n = n + #s
    if n >= CHUNK then yield(table.concat(buf)); buf, n = {}, 0 end
  end
  local function flush() if n > 0 then yield(table.concat(buf)); buf, n = {}, 0 end end
  return put, flush
end

function Message:_header_block()
  local h = table.concat(self.fields, "\r\n") .. "\r\n" ..
            table.concat(part_headers(self.body), "\r\n") .. "\r\n\r\n"
  return h
end

-- The DKIM-Signature field, computed once: the body is streamed through the hash (constant memory).
function Message:_signature()
  if self.sig then return self.sig end
  local h = self.signer:body_hasher()
  local ok, err = emit_body(self.body, function(s) h:update(s) end, true)
  if not ok then return nil, err end
  local fields = {}
  for _, f in ipairs(self.fields) do fields[#fields + 1] = f end
  for _, f in ipairs(part_headers(self.body)) do fields[#fields + 1] = f end
  local sig, serr = self.signer:sign(fields, h:digest(), self.now)
  if not sig then return nil, serr end
  self.sig = sig
  return sig
end

-- msg:source() -> iterator of chunks (nil at the end). An attachment file that went away
-- since message.new raises an smtp.errors value (kind "invalid"): returning nil would read as
-- the end of the message and send it cut short.
function Message:source()
  local co = coroutine.wrap(function()
    local put, flush = buffered(coroutine.yield)
    if self.signer then
      local sig, err = self:_signature()
      if not sig then
        error(errors.is(err) and err or errors.new{ kind = "invalid", text = "message: " .. tostring(err) }, 0)
      end
      put(sig)
    end
    put(self:_header_block())
    local ok, err = emit_body(self.body, put, true)
    if not ok then error(errors.new{ kind = "invalid", text = "message: " .. err }, 0) end
    flush()
  end)
  local done = false
  return function()
    if done then return nil end
    local c = co()
    if c == nil then done = true end
    return c
  end
end

function Message:tostring()
  local t = {}
  for c in self:source() do t[#t + 1] = c end
  return table.concat(t)
end
mt.__tostring = Message.tostring

-- msg:envelope() -> from address, { To + Cc + Bcc, each once }
function Message:envelope()
  local rcpts, seen = {}, {}
  for _, l in ipairs({ self.to, self.cc, self.bcc }) do
    for _, mb in ipairs(l) do
      local a = mb.address
      -- one recipient however its domain is written (case, U-label or A-label)
      local key = mb.wire:gsub("@(.*)$", function(d) return "@" .. d:lower() end)
      if not seen[key] then seen[key] = true; rcpts[#rcpts + 1] = a end
    end
  end
  return self.from.address, rcpts
end

function Message:needs()
  return { smtputf8 = self.smtputf8 }
end

M.Message = Message
-- reading messages back: smtp.message.parse(source [, opts]), and the same driven by pushes
M.parse = require("smtp.parse").parse
M.parser = require("smtp.parse").parser
return M
