-- smtp.message.parse: reads an Internet message (RFC 5322 + MIME) into a tree of parts with
-- decoded headers and content, as a stream (bodies can go to a sink instead of memory), bounded
-- against hostile input, listing defects as mail readers do.
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

local MiB = 1024 * 1024

M.defaults = {
  max_size = math.huge,          -- octets of the whole message read from the source
  max_depth = 20,                -- nesting of multiparts and message/rfc822
  max_parts = 1000,              -- parts of every kind, the message itself included
  max_headers = 1000,            -- header fields per part
  max_header_size = 4 * MiB,     -- octets of header fields over the whole message
  max_line = 100000,             -- octets of one line; RFC 5322 says 998, real mail is sloppier
  max_kept = 64 * MiB,           -- octets of content, preambles and epilogues held in memory
}

local CHUNK = 65536

local function fail(text)
  return errors.new{ kind = "invalid", text = "parse: " .. text }
end

------------------------------------------------------------------------------------------------
-- Charsets
------------------------------------------------------------------------------------------------

-- Names mail uses that glibc's iconv spells differently (false: no charset at all).
local ALIASES = {
  ["latin-1"] = "latin1", ["x-sjis"] = "shift_jis", ["ks_c_5601-1987"] = "cp949",
  ["x-mac-roman"] = "macintosh", ["big5_tw"] = "big5", ["eucgb2312_cn"] = "gb2312", ["unicode-1-1-utf-7"] = "utf-7", ["x-euc-jp"] = "euc-jp",
  ["unknown-8bit"] = false, ["x-unknown"] = false, ["x-user-defined"] = false, ["default"] = false,
}
local UTF8 = { ["utf-8"] = true, ["utf8"] = true }
local ASCII = { ["us-ascii"] = true, ["ascii"] = true, ["ansi_x3.4-1968"] = true, ["iso646-us"] = true }

-- charset name as written -> name iconv knows, or false; bounded, as hostile mail can name many
local known, nknown = {}, 0
local function iconv_name(cs)
  local k = known[cs]
  if k ~= nil then return k end
  k = false
  if ALIASES[cs] ~= nil then
    k = ALIASES[cs]
  else
    for _, cand in ipairs { cs, (cs:gsub("_", "-")), (cs:gsub("[-_]", "")), cs:match("^x%-(.+)$") } do
      if core.charset_converter(cand) then k = cand; break end
    end
  end
  if nknown < 200 then known[cs] = k; nknown = nknown + 1 end
  return k
end

local function clean_charset(cs)
  return (cs or "us-ascii"):lower():gsub("^%s+", ""):gsub("%s+$", "")
end

-- UTF-8 with every octet that is not part of a valid sequence shown as U+FFFD.
local function utf8_repaired(s)
  return (core.charset_converter("utf-8"):convert(s, true))
end

-- Octets in charset cs -> UTF-8 text, and what was wrong ("unknown", "invalid", "8bit") or nil.
-- Unknown charsets and 8-bit octets in US-ASCII are read as UTF-8 when they are valid UTF-8 (what
-- such mail almost always holds), otherwise each stray octet becomes U+FFFD.
local function to_utf8(s, cs)
  cs = clean_charset(cs)
  if ASCII[cs] or UTF8[cs] then
    if not core.has_8bit(s) then return s end
    local why = ASCII[cs] and "8bit" or nil
    if core.utf8_valid(s) then return s, why end
    return utf8_repaired(s), why or "invalid"
  end
  local name = iconv_name(cs)
  if not name then
    if not core.has_8bit(s) or core.utf8_valid(s) then return s, "unknown" end
    return utf8_repaired(s), "unknown"
  end
  local out, bad = core.charset_converter(name):convert(s, true)
  return out, bad > 0 and "invalid" or nil
end
M._to_utf8 = to_utf8

local function charset_defect(defects, why, cs, where)
  if why == "unknown" then
    defects[#defects + 1] = "unknown charset " .. cs .. " in " .. where
  elseif why == "invalid" then
    defects[#defects + 1] = "octets invalid in charset " .. cs .. " in " .. where
  elseif why == "8bit" then
    defects[#defects + 1] = "8-bit octets in us-ascii text in " .. where
  end
end

------------------------------------------------------------------------------------------------
-- RFC 2047 encoded words
------------------------------------------------------------------------------------------------

local function qword_decode(s)
  s = s:gsub("_", " ")
  return (s:gsub("=(%x%x)", function(x) return string.char(tonumber(x, 16)) end))
end

-- One encoded word -> decoded UTF-8, or nil when it is not one this parser can decode.
local function decode_word(cs, enc, text, defects)
  cs = clean_charset(cs:gsub("%*.*$", ""))   -- RFC 2231 language suffix
  local bytes
  enc = enc:upper()
  if enc == "B" then
    local pad = (4 - #text % 4) % 4
    if pad > 0 then
      defects[#defects + 1] = "encoded word: base64 padding missing"
      text = text .. string.rep("=", pad)
    end
    bytes = core.b64decode(text)
    if not bytes then defects[#defects + 1] = "encoded word: invalid base64"; return nil end
  else
    bytes = qword_decode(text)
  end
  local u, why = to_utf8(bytes, cs)
  charset_defect(defects, why, cs, "an encoded word")
  return u
end

-- Unstructured text with encoded words decoded; whitespace between two adjacent words is dropped.
local function decode_2047(s, defects)
  if not s:find("=?", 1, true) then return s end
  local out, pos, last_word_end = {}, 1, nil
  while true do
    local a, b, cs, enc, text = s:find("=%?([^?%s]+)%?([BbQq])%?([^?%s]*)%?=", pos)
    if not a then break end
    local gap = s:sub(pos, a - 1)
    local dec = decode_word(cs, enc, text, defects)
    if dec == nil then
      out[#out + 1] = s:sub(pos, b)
      last_word_end = nil
    else
      if not (last_word_end and gap:match("^[ \t\r\n]*$")) then out[#out + 1] = gap end
      out[#out + 1] = dec
      last_word_end = b
    end
    pos = b + 1
  end
  out[#out + 1] = s:sub(pos)
  return table.concat(out)
end
M._decode_2047 = decode_2047

------------------------------------------------------------------------------------------------
-- Structured values: Content-Type and Content-Disposition with their parameters
------------------------------------------------------------------------------------------------

-- Strips RFC 5322 comments outside quoted strings (nesting bounded by the string's length).
local function strip_comments(s)
  if not s:find("(", 1, true) then return s end
  local out, depth, i, n, inq = {}, 0, 1, #s, false
  while i <= n do
    local c = s:sub(i, i)
    if c == "\\" and (inq or depth > 0) then
      if depth == 0 then out[#out + 1] = s:sub(i, i + 1) end
      i = i + 2
    else
      if c == '"' and depth == 0 then inq = not inq; out[#out + 1] = c
      elseif c == "(" and not inq then depth = depth + 1
      elseif c == ")" and not inq and depth > 0 then depth = depth - 1
      elseif depth == 0 then out[#out + 1] = c end
      i = i + 1
    end
  end
  return table.concat(out)
end

local function unpct(s)
  return (s:gsub("%%(%x%x)", function(x) return string.char(tonumber(x, 16)) end))
end

-- "value; a=1; b*=utf-8''x%20y; c*0=...; c*1=..." -> value (lower case), params (names lower case)
local function parse_params(v, defects)
  v = strip_comments(v)
  local value, rest = v:match("^%s*([^;]*)(.*)$")
  value = value:gsub("%s+$", ""):lower()
  local plain, sections = {}, {}
  local i, n = 1, #rest
  while i <= n do
    local a, b, name = rest:find("^[%s;]*([^=;%s]+)%s*=%s*", i)
    if not a then
      local skip = rest:find(";", i + 1, true)
      if rest:sub(i):match("^[%s;]*$") == nil then defects[#defects + 1] = "malformed parameter" end
      if not skip then break end
      i = skip
    else
      i = b + 1
      local val
      if rest:sub(i, i) == '"' then
        local buf, j = {}, i + 1
        while j <= n do
          local c = rest:sub(j, j)
          if c == "\\" then buf[#buf + 1] = rest:sub(j + 1, j + 1); j = j + 2
          elseif c == '"' then break
          else buf[#buf + 1] = c; j = j + 1 end
        end
        if j > n then defects[#defects + 1] = "unterminated quoted parameter" end
        val = table.concat(buf)
        i = j + 1
      else
        local e = rest:find("[;%s]", i) or n + 1
        val = rest:sub(i, e - 1)
        i = e
      end
      name = name:lower()
      local base, idx, star = name:match("^(.-)%*(%d+)(%*?)$")
      if base then
        sections[base] = sections[base] or {}
        sections[base][tonumber(idx)] = { val, star == "*" }
      elseif name:sub(-1) == "*" then
        sections[name:sub(1, -2)] = { [0] = { val, true } }
      else
        if val:find("=?", 1, true) then val = decode_2047(val, defects) end
        plain[name] = val
      end
    end
  end
  -- RFC 2231 values win over plain ones of the same name, as in Python's email
  for base, secs in pairs(sections) do
    local parts, cs = {}, nil
    for k = 0, 999 do   -- bounded: a hostile *N can't make us loop past the number of sections
      local sec = secs[k]
      if not sec then
        if k == 0 then defects[#defects + 1] = "parameter " .. base .. ": section 0 missing" end
        break
      end
      local val, enc = sec[1], sec[2]
      if enc then
        if k == 0 then
          local c, _, t = val:match("^([^']*)'([^']*)'(.*)$")
          if c then cs = c; val = t end
        end
        val = unpct(val)
      end
      parts[#parts + 1] = val
    end
    local joined = table.concat(parts)
    if cs and cs ~= "" then
      local u, why = to_utf8(joined, cs)
      charset_defect(defects, why, cs, "parameter " .. base)
      joined = u
    end
    plain[base] = joined
  end
  return value, plain
end
M._parse_params = parse_params

------------------------------------------------------------------------------------------------
-- Parts
------------------------------------------------------------------------------------------------

local Part = {}
Part.__index = Part

-- part:header(name) -> the decoded value of the first field of that name, or nil
function Part:header(name)
  local l = self.header_index[name:lower()]
  return l and self.headers[l[1]].value
end

-- part:header_all(name) -> every decoded value of that name, in order
function Part:header_all(name)
  local out = {}
  for _, i in ipairs(self.header_index[name:lower()] or {}) do out[#out + 1] = self.headers[i].value end
  return out
end

-- part:walk() -> iterator over this part and every part below it, depth first
function Part:walk()
  local stack = { self }
  return function()
    local p = table.remove(stack)
    if not p then return nil end
    for i = #p.parts, 1, -1 do stack[#stack + 1] = p.parts[i] end
    return p
  end
end

local function latin1_to_utf8(s)
  -- no utf8 library on LuaJIT; Latin-1 needs only two-octet sequences
  return (s:gsub("[\128-\255]", function(c)
    local b = c:byte()
    return string.char(0xC0 + math.floor(b / 64), 0x80 + b % 64)
  end))
end

-- Header lines collected -> fields with raw, unfolded and decoded values.
local function finish_fields(fields, defects)
  for _, f in ipairs(fields) do
    f.raw = table.concat(f.lines, "\r\n")
    f.lines = nil
    local v = f.raw:sub(#f.name + 1):gsub("^[ \t]*:", "")
    v = v:gsub("\r\n([ \t])", "%1"):gsub("^[ \t]+", ""):gsub("[ \t]+$", "")
    f.unfolded = v
    if core.has_8bit(v) and not core.utf8_valid(v) then
      -- readers fall back to Latin-1 for raw 8-bit headers; Python shows U+FFFD instead
      defects[#defects + 1] = "8-bit header " .. f.name .. " is not UTF-8"
      f.value = latin1_to_utf8(v)
    else
      f.value = decode_2047(v, defects)
    end
  end
end

-- Type, parameters, disposition, file name, Content-ID and transfer encoding from the headers.
local function describe(p, default_type, defects)
  local ct = p:header("content-type")
  local value, params = "", {}
  if ct then value, params = parse_params(ct, defects) end
  if not value:match("^[%w!#$&%-^_.+]+/[%w!#$&%-^_.+]+$") then
    if ct then defects[#defects + 1] = "invalid content type in part " .. p.path end
    value = default_type
    params = ct and params or {}
  end
  p.content_type = value
  p.maintype, p.subtype = value:match("^([^/]+)/(.+)$")
  p.params = params
  local cd = p:header("content-disposition")
  if cd then
    local d, dparams = parse_params(cd, defects)
    p.disposition, p.disposition_params = d, dparams
    p.filename = dparams.filename
  end
  p.filename = p.filename or params.name
  local cid = p:header("content-id")
  if cid then p.cid = cid:match("^%s*<(.-)>%s*$") or cid end
  local cte = p:header("content-transfer-encoding")
  p.transfer_encoding = cte and cte:lower():match("^%s*(%S*)") or "7bit"
end

------------------------------------------------------------------------------------------------
-- Body targets: where the octets between delimiters go
------------------------------------------------------------------------------------------------

-- Quoted-printable fed in pieces: whole lines are decoded (core.qpdecode works line by line, so
-- the result is the same as decoding the body at once); a partial line waits for the rest.
local function qp_decoder()
  local carry = ""
  return {
    feed = function(_, s, i, j)
      local data = carry .. s:sub(i, j)
      local cut = data:match("^.*\n()")
      if not cut then carry = data; return "" end
      carry = data:sub(cut)
      return core.qpdecode(data:sub(1, cut - 1))
    end,
    finish = function()
      local d = core.qpdecode(carry)
      carry = ""
      return d, 0
    end,
  }
end

local plain_decoder = {
  feed = function(_, s, i, j) return s:sub(i, j) end,
  finish = function() return "", 0 end,
}

local B64_DEFECTS = {
  { 1, "invalid characters in base64 (skipped)" },
  { 2, "data after base64 padding (ignored)" },
  { 4, "base64 padding missing" },
  { 8, "base64 length invalid (last character dropped)" },
}

local Parser = {}
Parser.__index = Parser

-- Memory: text kept while the budget allows; past it, the part is flagged and its text dropped.
function Parser:keep(list, s, what, part)
  if list.dropped then return end
  if self.kept + #s > self.o.max_kept then
    list.dropped = true
    for i = #list, 1, -1 do self.kept = self.kept - #list[i]; list[i] = nil end
    self.defects[#self.defects + 1] = what .. " of part " .. part.path .. " not kept: over max_kept"
    self.truncated = true
    return
  end
  self.kept = self.kept + #s
  list[#list + 1] = s
end

function Parser:deliver(t, d)
  if self.err then return end
  local p = t.part
  p.size = p.size + #d
  if d == "" then return end
  local sink = t.sink
  if sink == nil then
    self:keep(t.chunks, d, "content", p)
  elseif sink == false then
    return
  elseif type(sink) == "function" then
    sink(d)
  else
    local ok, err = sink:write(d)
    if not ok then
      self.err = fail("writing part " .. p.path .. " failed: " .. tostring(err))
    end
  end
end

-- Octets s[i..j] of the current target.
function Parser:put(s, i, j)
  local t = self.target
  if t.kind == "leaf" then
    self:deliver(t, t.decoder:feed(s, i, j))
  elseif t.kind == "collect" then
    self:keep(t.chunks, s:sub(i, j), t.what, t.part)
  end
end

local function has_write(x)
  local ok, w = pcall(function() return x.write end)
  return ok and w ~= nil
end

function Parser:open_leaf(p)
  local sink
  if self.o.on_part then
    sink = self.o.on_part(p)
    if sink ~= nil and sink ~= false and type(sink) ~= "function" and not has_write(sink) then
      error("on_part must return nil, false, a function or a file, got " .. type(sink), 0)
    end
    p.streamed = sink ~= nil or nil
  end
  local cte = p.transfer_encoding
  local decoder
  if cte == "base64" then
    decoder = core.b64_decoder()
  elseif cte == "quoted-printable" then
    decoder = qp_decoder()
  else
    if cte ~= "7bit" and cte ~= "8bit" and cte ~= "binary" then
      self.defects[#self.defects + 1] = "unknown transfer encoding " .. cte .. " in part " .. p.path
    end
    decoder = plain_decoder
  end
  p.size = 0
  self.target = { kind = "leaf", part = p, sink = sink, decoder = decoder, chunks = {} }
end

function Parser:close_leaf(t)
  local p = t.part
  local rest, flags = t.decoder:finish()
  self:deliver(t, rest)
  for _, f in ipairs(B64_DEFECTS) do
    if math.floor(flags / f[1]) % 2 == 1 then
      self.defects[#self.defects + 1] = f[2] .. " in part " .. p.path
    end
  end
  local sink = t.sink
  if type(sink) == "function" then sink(nil) end
  if sink == nil and not t.chunks.dropped then
    p.content = table.concat(t.chunks)
    if p.maintype == "text" then
      local why
      p.text, why = to_utf8(p.content, p.params.charset)
      charset_defect(self.defects, why, clean_charset(p.params.charset), "part " .. p.path)
    end
  end
end

-- Ends whatever receives octets now; `stop` is the offset of the last octet that belonged to it.
function Parser:end_target(stop)
  local t = self.target
  self.target = nil
  if not t then return end
  if t.kind == "leaf" then
    self:close_leaf(t)
    t.part.stop = stop
  elseif t.kind == "collect" and t.what == "epilogue" then
    if not t.chunks.dropped then t.part.epilogue = table.concat(t.chunks) end
    t.part.stop = stop
  end
  -- a preamble's octets are judged when its multipart ends (they may be its only text)
end

------------------------------------------------------------------------------------------------
-- Entities: header sections, multiparts and their delimiters
------------------------------------------------------------------------------------------------

-- Starts a part whose header section begins at buffer position pos.
function Parser:begin_entity(path, depth, default_type, pos)
  self.nparts = self.nparts + 1
  local p = setmetatable({ headers = {}, header_index = {}, parts = {}, path = path,
                           start = self.base + pos }, Part)
  self.h = { part = p, depth = depth, default_type = default_type, skipping = false }
  self.mode = "headers"
  return p
end

-- Pushes multipart p on the boundary stack, or returns false when it cannot be one.
function Parser:open_multipart(p, depth)
  local b = p.params.boundary
  if not b or b == "" then
    self.defects[#self.defects + 1] = "multipart without boundary in part " .. p.path
    return false
  end
  if depth >= self.o.max_depth then
    self.defects[#self.defects + 1] = "nesting too deep at part " .. p.path
    self.truncated = true
    return false
  end
  local e = { dash = "--" .. b, part = p, depth = depth, pre = {} }
  self.stack[#self.stack + 1] = e
  self.target = { kind = "collect", what = "preamble", part = p, chunks = e.pre }
  return true
end

-- A multipart on the stack ends without its close delimiter (or at it, with closed true).
function Parser:end_multipart(e, stop, closed)
  local p = e.part
  if not e.seen then
    -- no delimiter at all: readers show the body as text
    self.defects[#self.defects + 1] = "start boundary not found in part " .. p.path
    if not e.pre.dropped then p.content = table.concat(e.pre) end
  elseif not e.pre.dropped then
    p.preamble = table.concat(e.pre)
  end
  if not closed then
    if e.seen then self.defects[#self.defects + 1] = "close boundary missing in part " .. p.path end
    p.stop = stop
  end
end

-- The blank line (or what stands for it) after a header section: decide what the body is.
function Parser:end_headers(pos)
  local h = self.h
  self.h = nil
  local p = h.part
  finish_fields(p.headers, self.defects)
  describe(p, h.default_type, self.defects)
  p.body_start = self.base + pos
  self.mode = "body"
  self.bol = true
  if p.maintype == "multipart" and self:open_multipart(p, h.depth) then return end
  -- message/* holds a message (Python's reading too); delivery-status is text (RFC 3464)
  if p.maintype == "message" and p.subtype ~= "delivery-status" then
    if h.depth >= self.o.max_depth then
      self.defects[#self.defects + 1] = "nesting too deep at part " .. p.path
      self.truncated = true
    elseif self.nparts >= self.o.max_parts then
      self.defects[#self.defects + 1] = "too many parts at part " .. p.path
      self.truncated = true
    else
      p.parts[1] = self:begin_entity(p.path .. ".1", h.depth + 1, "text/plain", pos)
      return
    end
  end
  self:open_leaf(p)
end

-- A delimiter line of stack entry k (close: "--boundary--") ends at buffer position lend;
-- the part before it ended at offset stop.
function Parser:delimiter(k, close, stop, lend)
  -- a header section the delimiter cuts short (message/* parts nest at most max_depth deep)
  while self.mode == "headers" do self:end_headers(lend) end
  self:end_target(stop)
  local stack = self.stack
  for i = #stack, k + 1, -1 do
    self:end_multipart(stack[i], stop, false)
    stack[i] = nil
  end
  local e = stack[k]
  local p = e.part
  self.mode = "body"
  self.bol = true
  if close then
    self:end_multipart(e, stop, true)
    stack[k] = nil
    self.target = { kind = "collect", what = "epilogue", part = p, chunks = {} }
    return
  end
  e.seen = true
  e.n = (e.n or 0) + 1
  if self.nparts >= self.o.max_parts then
    if not e.full then
      self.defects[#self.defects + 1] = "too many parts at part " .. p.path
      self.truncated = true
      e.full = true
    end
    self.target = { kind = "discard" }
    return
  end
  local child = self:begin_entity(p.path .. "." .. e.n, e.depth + 1,
                                  p.subtype == "digest" and "message/rfc822" or "text/plain", lend)
  p.parts[#p.parts + 1] = child
end

-- Which stack entry a line (without its line end) delimits: k, close; or nil.
local function match_delim(stack, line)
  for k = #stack, 1, -1 do
    local dash = stack[k].dash
    if line:sub(1, #dash) == dash then
      local rest = line:sub(#dash + 1)
      local close = rest:sub(1, 2) == "--"
      if close then rest = rest:sub(3) end
      if not rest:find("[^ \t\r]") then return k, close end
    end
  end
end

-- Could the unfinished line s[c..n] still turn out to be a delimiter?
local function could_match(stack, s, c, n)
  for k = #stack, 1, -1 do
    local dash = stack[k].dash
    local m = math.min(#dash, n - c + 1)
    if s:sub(c, c + m - 1) == dash:sub(1, m) then return true end
  end
  return false
end

-- One header line (without its line end). Returns "end" (blank line), "body" (the line is not a
-- header: the body starts with it), or nil.
function Parser:header_line(line)
  local h = self.h
  local p = h.part
  local fields = p.headers
  if line == "" then return "end" end
  local first = line:byte(1)
  if first == 32 or first == 9 then
    if h.skipping then return end
    local f = fields[#fields]
    if not f then
      self.defects[#self.defects + 1] = "first header line is a continuation in part " .. p.path
      return
    end
    self.header_size = self.header_size + #line
    if self.header_size > self.o.max_header_size then
      self.defects[#self.defects + 1] = "header sections over max_header_size"
      self.truncated = true
      h.skipping = true
      return
    end
    -- a table, not repeated concatenation: thousands of continuation lines stay linear
    f.lines[#f.lines + 1] = line
    return
  end
  local name = line:match("^([!-9;-~]+)[ \t]*:")
  if not name then
    if line:sub(1, 5) == "From " then
      self.defects[#self.defects + 1] = (#fields == 0 and "mbox From_ line skipped" or "misplaced From_ line")
        .. " in part " .. p.path
      return
    end
    self.defects[#self.defects + 1] = "missing header body separator in part " .. p.path
    return "body"
  end
  if h.skipping then return end
  self.header_size = self.header_size + #line
  if #fields >= self.o.max_headers or self.header_size > self.o.max_header_size then
    self.defects[#self.defects + 1] = #fields >= self.o.max_headers
      and "too many header fields in part " .. p.path or "header sections over max_header_size"
    self.truncated = true
    h.skipping = true
    return
  end
  local f = { name = name, lines = { line } }
  fields[#fields + 1] = f
  local k = name:lower()
  local idx = p.header_index[k]
  if not idx then idx = {}; p.header_index[k] = idx end
  idx[#idx + 1] = #fields
end

-- Reads header lines; returns true when the mode changed, false when it needs more input.
function Parser:scan_headers()
  local buf, stack = self.buf, self.stack
  local n = #buf
  while true do
    local pos = self.pos
    if pos > n and not self.eof then return false end
    local nl = buf:find("\n", pos, true)
    local line, nextpos
    if nl then
      line, nextpos = buf:sub(pos, nl - 1), nl + 1
    elseif self.eof then
      if pos > n then
        self:end_headers(pos)
        return true
      end
      line, nextpos = buf:sub(pos), n + 1
    else
      return false
    end
    if line:byte(-1) == 13 then line = line:sub(1, -2) end
    if #stack > 0 and line:sub(1, 2) == "--" then
      local k, close = match_delim(stack, line)
      if k then
        self.pos = nextpos
        self:delimiter(k, close, self.base + pos - 1, nextpos)
        return true
      end
    end
    local r = self:header_line(line)
    if r == "body" then
      self:end_headers(pos)
      return true
    end
    self.pos = nextpos
    if r == "end" then
      self:end_headers(nextpos)
      return true
    end
  end
end

-- Hands body octets to the target up to the next delimiter line; returns true when a delimiter
-- changed the mode, false when it needs more input.
function Parser:scan_body()
  local buf, pos, stack = self.buf, self.pos, self.stack
  local n = #buf
  if #stack == 0 then
    -- no boundary to watch: everything left is this target's
    if pos <= n then self:put(buf, pos, n) end
    self.pos = n + 1
    return false
  end
  while true do
    local c, eolstart
    if self.bol then
      if n - pos + 1 < 2 and not self.eof then self.pos = pos; return false end
      self.bol = false
      if buf:sub(pos, pos + 1) == "--" then c, eolstart = pos, pos end
    end
    if not c then
      local nl = buf:find("\n--", pos, true)
      if not nl then
        local e = n
        if not self.eof then
          -- hold back the line end (and the CR of a CRLF) that could come before a delimiter
          e = n - 3
          if e >= pos and buf:byte(e) == 10 then e = e - 1 end
          if e >= pos and buf:byte(e) == 13 then e = e - 1 end
        end
        if e >= pos then self:put(buf, pos, e); pos = e + 1 end
        self.pos = pos
        return false
      end
      c = nl + 1
      eolstart = (nl > pos and buf:byte(nl - 1) == 13) and nl - 1 or nl
    end
    -- c starts a line beginning with "--"; the octets before eolstart are content for sure
    local lend = buf:find("\n", c, true)
    local delim, close
    if lend or self.eof then
      local line = buf:sub(c, (lend or n + 1) - 1)
      delim, close = match_delim(stack, line)
    elseif could_match(stack, buf, c, n) then
      if eolstart > pos then self:put(buf, pos, eolstart - 1) end
      self.pos = eolstart
      if eolstart == c then self.bol = true end
      return false
    end
    if delim then
      if eolstart > pos then self:put(buf, pos, eolstart - 1) end
      self.pos = lend and lend + 1 or n + 1
      self:delimiter(delim, close, self.base + eolstart - 1, self.pos)
      return true
    end
    self:put(buf, pos, c + 1)
    pos = c + 2
  end
end

function Parser:run()
  while not self.err do
    local moved
    if self.mode == "headers" then moved = self:scan_headers() else moved = self:scan_body() end
    if not moved then break end
  end
  if self.err then return nil, self.err end
  return true
end

-- p:feed(chunk) -> true | nil, err
function Parser:feed(chunk)
  if self.err then return nil, self.err end
  if #chunk == 0 then return true end
  self.total = self.total + #chunk
  if self.total > self.o.max_size then
    self.err = fail("message larger than " .. self.o.max_size .. " octets")
    return nil, self.err
  end
  if self.meter:feed(chunk) > self.o.max_line then
    self.err = fail("line longer than " .. self.o.max_line .. " octets")
    return nil, self.err
  end
  if self.pos > #self.buf then
    self.base = self.base + #self.buf
    self.buf = chunk
  else
    self.base = self.base + self.pos - 1
    self.buf = self.buf:sub(self.pos) .. chunk
  end
  self.pos = 1
  return self:run()
end

-- p:finish() -> message | nil, err
function Parser:finish()
  if self.err then return nil, self.err end
  self.eof = true
  local ok, err = self:run()
  if not ok then return nil, err end
  while self.mode == "headers" do self:end_headers(self.pos) end
  local stop = self.total
  self:end_target(stop)
  for i = #self.stack, 1, -1 do
    self:end_multipart(self.stack[i], stop, false)
    self.stack[i] = nil
  end
  if self.err then return nil, self.err end
  local crlf, lf, barecr = self.meter:finish()
  local defects = self.defects
  if crlf > 0 and lf > 0 then table.insert(defects, 1, "mixed line endings") end
  if barecr > 0 then table.insert(defects, 1, "bare CR") end
  -- a message/* part ends where the message inside it ends
  local order = {}
  for p in self.root:walk() do order[#order + 1] = p end
  for i = #order, 1, -1 do
    local p = order[i]
    if not p.stop then
      local last = p.parts[#p.parts]
      p.stop = last and last.stop or stop
    end
  end
  local msg = self.root
  msg.defects = defects
  msg.truncated = self.truncated
  self.buf = ""
  return msg
end

local function options(opts, level)
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #2 to 'parse' (table expected, got " .. type(opts) .. ")", level)
  end
  local o = {}
  for k, v in pairs(M.defaults) do
    local x = opts and opts[k]
    if x ~= nil and (type(x) ~= "number" or x < 1) then
      error("bad argument #2 to 'parse' (" .. k .. " must be a positive number)", level)
    end
    o[k] = x or v
  end
  local on_part = opts and opts.on_part
  if on_part ~= nil and type(on_part) ~= "function" then
    error("bad argument #2 to 'parse' (on_part must be a function)", level)
  end
  o.on_part = on_part
  return o
end

local function new_parser(o)
  local self = setmetatable({ o = o, buf = "", pos = 1, base = 0, total = 0, eof = false,
                              stack = {}, defects = {}, truncated = false, kept = 0, nparts = 0,
                              header_size = 0, meter = core.line_meter() }, Parser)
  self.root = self:begin_entity("1", 0, "text/plain", 1)
  return self
end

-- parser(opts) -> p, fed with p:feed(chunk) and ended with p:finish(), for callers that push.
function M.parser(opts)
  return new_parser(options(opts, 3))
end

-- a userdata or table without a read method may raise when indexed; that is misuse, not a crash
local function has_read(x)
  local ok, r = pcall(function() return x.read end)
  return ok and r ~= nil
end

-- parse(source [, opts]) -> message (the top part, with .defects and .truncated) or nil, err.
-- source: a string, a function returning chunks then nil, or anything with :read(n) (a file
-- handle, the server's message reader).
function M.parse(source, opts)
  local o = options(opts, 3)
  local t = type(source)
  local read
  if t == "function" then
    read = source
  elseif (t == "userdata" or t == "table") and has_read(source) then
    read = function() return source:read(CHUNK) end
  elseif t ~= "string" then
    error("bad argument #1 to 'parse' (string, function or file expected, got " .. t .. ")", 2)
  end
  local p = new_parser(o)
  if t == "string" then
    local ok, err = p:feed(source)
    if not ok then return nil, err end
    return p:finish()
  end
  while true do
    local c, err = read()
    if c == nil then
      if err ~= nil then
        if errors.is(err) then return nil, err end
        return nil, fail("source failed: " .. tostring(err))
      end
      break
    end
    if type(c) ~= "string" then return nil, fail("source returned a " .. type(c)) end
    local ok, perr = p:feed(c)
    if not ok then return nil, perr end
  end
  return p:finish()
end

return M
