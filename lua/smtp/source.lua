-- smtp.source: a message (string, file, function or smtp.message) as a source of chunks, the
-- header facts the client needs from it (Message-ID, 8-bit headers), and the BDAT chunker.
local core = require "smtp.core"

local M = {}

local type = type

M.STRING_SLICE = 65536        -- a string message is handed to the engine this much at a time
M.BDAT_CHUNK = 1024 * 1024    -- bytes per BDAT chunk
-- A file message is read this much at a time. Each read is a new string; LuaJIT's collector
-- does a fixed slice of work per allocation whatever its size, so bigger reads let garbage pile
-- up (64 KB reads: 11-21 MB peak for a big file there, 16 KB: under 9 MB).
M.FILE_READ = 16384
local STRING_SLICE, BDAT_CHUNK, FILE_READ = M.STRING_SLICE, M.BDAT_CHUNK, M.FILE_READ

function M.is_message(m)
  return (type(m) == "table" or type(m) == "userdata") and type(m.source) == "function"
end
local is_message = M.is_message

-- The header section of a raw message (for Message-ID and the SMTPUTF8 decision): up to the
-- first empty line, at most 16 KB. Plain finds: this runs once per message.
function M.headers_of(s)
  local a = s:find("\n\r\n", 1, true)
  if a then
    -- a bare "\n\n" can only end the headers earlier: look for it in that prefix only, not
    -- through the whole body
    local h = s:sub(1, a)
    local b = h:find("\n\n", 1, true)
    return b and h:sub(1, b) or h
  end
  local b = s:find("\n\n", 1, true)
  if b then return s:sub(1, b) end
  return #s > 16384 and s:sub(1, 16384) or s
end
local headers_of = M.headers_of

-- The Message-ID in a header section (from headers_of).
function M.message_id_in(h)
  if not (h:find("essage-", 1, true) or h:find("ESSAGE-", 1, true)) then return nil end
  return h:match("\n[Mm][Ee][Ss][Ss][Aa][Gg][Ee]%-[Ii][Dd]:%s*(<[^>\r\n]*>)") or
    h:match("^[Mm][Ee][Ss][Ss][Aa][Gg][Ee]%-[Ii][Dd]:%s*(<[^>\r\n]*>)")
end
local message_id_in = M.message_id_in

function M.message_id_of(chunk)
  return message_id_in(headers_of(chunk))
end

-- -> iterator of chunks, size or nil. A failing read raises (the caller's pcall turns it into the
-- transaction's error): a read error must never end a message early.
function M.of(m)
  local t = type(m)
  if t == "string" then
    local pos, n = 1, #m
    -- a big string goes out in slices: BDAT chunks of BDAT_CHUNK, and no copy of the whole
    -- message in the engine's output buffer
    return function()
      if pos > n then return nil end
      if pos == 1 and n <= STRING_SLICE then
        pos = n + 1
        return m
      end
      local s = m:sub(pos, pos + STRING_SLICE - 1)
      pos = pos + STRING_SLICE
      return s
    end, n
  elseif io.type(m) == "file" then
    local size
    local here = m:seek()
    if here then
      local last = m:seek("end")
      if last then size = last - here end
      m:seek("set", here)
    end
    return function()
      local d, err = m:read(FILE_READ)
      if d == nil and err then error(err, 0) end
      return d
    end, size
  elseif t == "function" then
    return m, nil
  elseif is_message(m) then
    return m:source(), nil
  end
end

-- BDAT chunks of about BDAT_CHUNK bytes, CRLF-normalized in C into the stuffer's own buffer, so
-- no Lua string is made of them. next() reads the source until a chunk is full and returns its
-- size and whether it is the last (one source chunk is read ahead to know), and on its first call
-- also the first source chunk (for the Message-ID); e:bdat_from(st, last) then queues the chunk.
-- A source failure raises out of next().
function M.bdat_chunks(src)
  local st = core.stuffer(false)
  local function read()
    local c = src()
    if c ~= nil and type(c) ~= "string" then
      error("message source gave a " .. type(c) .. " instead of a string", 0)
    end
    return c
  end
  local ahead, started
  return st, function()
    local first
    if not started then
      started = true
      ahead = read()
      first = ahead
    end
    local n = 0
    while ahead ~= nil and n < BDAT_CHUNK do
      n = st:add(ahead)
      ahead = read()
    end
    if ahead == nil then return st:add_end(), true, first end
    return n, false, first
  end
end

return M
