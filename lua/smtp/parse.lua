-- smtp.message.parse: reads an Internet message (RFC 5322 + MIME) into a tree of parts with
-- decoded headers and content, bounded against hostile input, listing defects as mail readers do.
local core = require "smtp.core"
local errors = require "smtp.errors"

local M = {}

M.defaults = {
  max_size = 128 * 1024 * 1024,  -- octets of the whole message (this first cut holds it in memory)
  max_depth = 20,                -- multipart nesting
  max_parts = 1000,              -- parts of every kind, the message itself included
  max_headers = 1000,            -- header fields per part
  max_line = 100000,             -- octets of one line; RFC 5322 says 998, real mail is sloppier
}

local function fail(text)
  return nil, errors.new{ kind = "invalid", text = "parse: " .. text }
end

------------------------------------------------------------------------------------------------
-- Charsets and RFC 2047 encoded words
------------------------------------------------------------------------------------------------

local function latin1_to_utf8(s)
  -- no utf8 library on LuaJIT; Latin-1 needs only two-octet sequences
  return (s:gsub("[\128-\255]", function(c)
    local b = c:byte()
    return string.char(0xC0 + math.floor(b / 64), 0x80 + b % 64)
  end))
end

-- Bytes in charset cs -> UTF-8, or nil when the charset is one this first cut does not convert.
local function to_utf8(s, cs)
  cs = (cs or "us-ascii"):lower()
  if cs == "utf-8" or cs == "utf8" then return s end
  if cs == "us-ascii" or cs == "ascii" then
    if core.is_7bit(s) then return s end
    return nil
  end
  if cs == "iso-8859-1" or cs == "latin1" or cs == "latin-1" or cs == "l1" then
    return latin1_to_utf8(s)
  end
  return nil
end
M._to_utf8 = to_utf8

local function qword_decode(s)
  s = s:gsub("_", " ")
  return (s:gsub("=(%x%x)", function(x) return string.char(tonumber(x, 16)) end))
end

-- One encoded word -> decoded UTF-8, or nil when it is not one this parser can decode.
local function decode_word(cs, enc, text, defects)
  cs = cs:gsub("%*.*$", "")   -- RFC 2231 language suffix
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
  elseif enc == "Q" then
    bytes = qword_decode(text)
  else
    return nil
  end
  local u = to_utf8(bytes, cs)
  if not u then defects[#defects + 1] = "encoded word: charset not converted: " .. cs; return bytes end
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
        if next(secs, nil) and k == 0 then defects[#defects + 1] = "parameter " .. base .. ": section 0 missing" end
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
      local u = to_utf8(joined, cs)
      if u then joined = u else defects[#defects + 1] = "parameter " .. base .. ": charset not converted: " .. cs end
    end
    plain[base] = joined
  end
  return value, plain
end
M._parse_params = parse_params

------------------------------------------------------------------------------------------------
-- Lines and header sections
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

-- Reads the header section of s[from..to]; returns fields, body start offset.
local function read_headers(s, from, to, st, defects)
  local fields, index = {}, {}
  local pos = from
  local cur
  while pos <= to do
    local nl = s:find("\n", pos, true)
    local eol = (nl and nl <= to) and nl or to + 1
    local line = s:sub(pos, eol - 1)
    if line:sub(-1) == "\r" then line = line:sub(1, -2) end
    local nextpos = eol + 1
    if line == "" then return fields, index, nextpos end
    if line:match("^[ \t]") then
      if cur then
        -- a table, not repeated concatenation: thousands of continuation lines stay linear
        cur.lines[#cur.lines + 1] = line
      else
        defects[#defects + 1] = "first header line is a continuation"
      end
    else
      local name = line:match("^([!-9;-~]+)[ \t]*:")
      if not name then
        if line:match("^From ") and #fields == 0 then
          -- a Unix mbox separator: readers skip it
          defects[#defects + 1] = "mbox From_ line skipped"
        else
          defects[#defects + 1] = "missing header body separator"
          return fields, index, pos
        end
      else
        if #fields >= st.max_headers then
          defects[#defects + 1] = "too many header fields"
          st.truncated = true
          -- skip the rest of this header section
          local a, b = s:find("\r?\n\r?\n", pos)
          if not a or a > to then return fields, index, to + 1 end
          return fields, index, b + 1
        end
        cur = { name = name, lines = { line } }
        fields[#fields + 1] = cur
        local k = name:lower()
        index[k] = index[k] or {}
        table.insert(index[k], #fields)
      end
    end
    pos = nextpos
  end
  return fields, index, to + 1
end

local function finish_fields(fields, defects)
  for _, f in ipairs(fields) do
    f.raw = table.concat(f.lines, "\r\n")
    f.lines = nil
    local v = f.raw:sub(#f.name + 1):gsub("^[ \t]*:", "")
    v = v:gsub("\r\n([ \t])", "%1"):gsub("^[ \t]+", ""):gsub("[ \t]+$", "")
    f.unfolded = v
    if not core.is_7bit(v) and not core.utf8_valid(v) then
      defects[#defects + 1] = "8-bit header " .. f.name .. " is not UTF-8"
      f.value = latin1_to_utf8(v)
    else
      f.value = decode_2047(v, defects)
    end
  end
end

------------------------------------------------------------------------------------------------
-- Bodies
------------------------------------------------------------------------------------------------

local function decode_body(p, defects)
  local cte = p.transfer_encoding
  local body = p.body
  if cte == "base64" then
    local d = core.b64decode(body)
    if not d then
      defects[#defects + 1] = "invalid base64 in part " .. p.path
      -- keep what decodes, as readers do: drop foreign octets, fix the padding
      local clean = body:gsub("[^%w+/]", "")
      if #clean % 4 == 1 then clean = clean:sub(1, -2) end
      clean = clean .. string.rep("=", (4 - #clean % 4) % 4)
      d = core.b64decode(clean) or ""
    end
    p.content = d
  elseif cte == "quoted-printable" then
    p.content = core.qpdecode(body)
  else
    if cte ~= "7bit" and cte ~= "8bit" and cte ~= "binary" then
      defects[#defects + 1] = "unknown transfer encoding " .. cte .. " in part " .. p.path
    end
    p.content = body
  end
  if p.maintype == "text" then
    local u = to_utf8(p.content, p.params.charset or "us-ascii")
    if not u and not p.params.charset and core.utf8_valid(p.content) then u = p.content end
    p.text = u
  end
end

-- Offsets (first, last) of each part between delimiter lines of boundary b in s[from..to].
local function split_multipart(s, from, to, b, defects, path)
  local dash = "--" .. b
  local spans, preamble_end, epilogue_start = {}, nil, nil
  local start
  local pos = from
  local closed = false
  while pos <= to do
    local nl = s:find("\n", pos, true)
    local eol = (nl and nl <= to) and nl or to + 1
    if s:sub(pos, pos + #dash - 1) == dash then
      local rest = s:sub(pos + #dash, eol - 1)
      local isclose = rest:sub(1, 2) == "--"
      if isclose then rest = rest:sub(3) end
      if rest:match("^[ \t\r]*$") then
        -- the line break before a delimiter belongs to the delimiter
        local before = pos - 1
        if s:sub(before, before) == "\n" then before = before - 1 end
        if s:sub(before, before) == "\r" then before = before - 1 end
        if start then spans[#spans + 1] = { start, math.max(before, start - 1) }
        else preamble_end = before end
        if isclose then closed = true; epilogue_start = eol + 1; break end
        start = eol + 1
      end
    end
    pos = eol + 1
  end
  if not preamble_end then
    defects[#defects + 1] = "start boundary not found in part " .. path
    return nil
  end
  if not closed then
    defects[#defects + 1] = "close boundary missing in part " .. path
    if start then spans[#spans + 1] = { start, to } end
  end
  return spans, preamble_end, epilogue_start
end

local parse_entity

local function parse_multipart(s, p, from, to, depth, st, defects)
  local b = p.params.boundary
  if not b or b == "" then
    defects[#defects + 1] = "multipart without boundary in part " .. p.path
    return false
  end
  local spans, pre_end, epi = split_multipart(s, from, to, b, defects, p.path)
  if not spans then return false end
  p.preamble = s:sub(from, pre_end)
  p.epilogue = epi and s:sub(epi, to) or nil
  for i, sp in ipairs(spans) do
    if st.parts >= st.max_parts then
      defects[#defects + 1] = "too many parts"
      st.truncated = true
      break
    end
    local child = parse_entity(s, sp[1], sp[2], depth + 1, st, defects, p.path .. "." .. i,
                               p.subtype == "digest" and "message/rfc822" or "text/plain")
    p.parts[#p.parts + 1] = child
  end
  return true
end

-- Parses s[from..to] as one entity (headers + body) at nesting depth.
parse_entity = function(s, from, to, depth, st, defects, path, default_type)
  st.parts = st.parts + 1
  local fields, index, bstart = read_headers(s, from, to, st, defects)
  finish_fields(fields, defects)
  local p = setmetatable({ headers = fields, header_index = index, parts = {}, path = path }, Part)
  local ct = p:header("content-type")
  local value, params = "", {}
  if ct then value, params = parse_params(ct, defects) end
  if not value:match("^[%w!#$&%-^_.+]+/[%w!#$&%-^_.+]+$") then
    if ct then defects[#defects + 1] = "invalid content type in part " .. path end
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
  -- a multipart keeps offsets only: copying every level's text would cost depth times the message
  p.body_range = { bstart, to }
  if p.maintype == "multipart" then
    if depth >= st.max_depth then
      defects[#defects + 1] = "nesting too deep at part " .. path
      st.truncated = true
    elseif parse_multipart(s, p, bstart, to, depth, st, defects) then
      return p
    end
    -- readers show a broken multipart as its text
    p.body = s:sub(bstart, to)
    p.content = p.body
    return p
  end
  if p.content_type == "message/rfc822" and depth < st.max_depth and st.parts < st.max_parts then
    p.parts[1] = parse_entity(s, bstart, to, depth + 1, st, defects, path .. ".1", "text/plain")
  end
  p.body = s:sub(bstart, to)
  decode_body(p, defects)
  return p
end

------------------------------------------------------------------------------------------------
-- Entry point
------------------------------------------------------------------------------------------------

-- a userdata or table without a read method may raise when indexed; that is misuse, not a crash
local function has_read(x)
  local ok, r = pcall(function() return x.read end)
  return ok and r ~= nil
end

local function slurp(source, max)
  local t = type(source)
  if t == "string" then
    if #source > max then return nil, "message larger than " .. max .. " octets" end
    return source
  end
  local read
  if t == "function" then
    read = source
  elseif (t == "userdata" or t == "table") and has_read(source) then
    read = function() return source:read(65536) end
  else
    return false
  end
  local buf, n = {}, 0
  while true do
    local c, err = read()
    if c == nil then
      if err then return nil, "source failed: " .. tostring(err) end
      break
    end
    if type(c) ~= "string" then return nil, "source returned a " .. type(c) end
    n = n + #c
    if n > max then return nil, "message larger than " .. max .. " octets" end
    buf[#buf + 1] = c
  end
  return table.concat(buf)
end

-- parse(source [, opts]) -> message (the top part, with .defects and .truncated) or nil, err.
-- source: a string, a function returning chunks then nil, or a file handle.
function M.parse(source, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("bad argument #2 to 'parse' (table expected, got " .. type(opts) .. ")", 2)
  end
  local st = { parts = 0, truncated = false }
  for k, v in pairs(M.defaults) do
    local o = opts and opts[k]
    if o ~= nil and (type(o) ~= "number" or o < 1) then
      error("bad argument #2 to 'parse' (" .. k .. " must be a positive number)", 2)
    end
    st[k] = o or v
  end
  local s, err = slurp(source, st.max_size)
  if s == false then
    error("bad argument #1 to 'parse' (string, function or file expected, got " .. type(source) .. ")", 2)
  end
  if not s then return fail(err) end
  local defects = {}
  -- line discipline over the whole message, once
  local crlf, lf = 0, 0
  local pos, n = 1, #s
  while pos <= n do
    local nl = s:find("\n", pos, true)
    if (nl or n + 1) - pos > st.max_line then
      return fail("line longer than " .. st.max_line .. " octets")
    end
    if not nl then break end
    if nl > pos and s:byte(nl - 1) == 13 then crlf = crlf + 1 else lf = lf + 1 end
    pos = nl + 1
  end
  if crlf > 0 and lf > 0 then defects[#defects + 1] = "mixed line endings" end
  if s:find("\r[^\n]") or s:sub(-1) == "\r" then defects[#defects + 1] = "bare CR" end
  local msg = parse_entity(s, 1, n, 0, st, defects, "1", "text/plain")
  msg.defects = defects
  msg.truncated = st.truncated
  return msg
end

return M
