-- The one date matcher every spec uses when a peer's output holds a date: peers write the date
-- and time they run at, in their own time zone and style, so specs check the grammar (RFC 5322
-- date-time, or the ctime form of an mbox From_ line) and never a calendar value.
local M = {}

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6,
                 jul = 7, aug = 8, sep = 9, oct = 10, nov = 11, dec = 12 }
local DAYS = { "sun", "mon", "tue", "wed", "thu", "fri", "sat" }
local DAY_INDEX = {}
for i, d in ipairs(DAYS) do DAY_INDEX[d] = i end
-- RFC 5322 4.3 obs-zone names with their offsets in minutes; military letters mean "unknown".
local ZONES = { ut = 0, gmt = 0, est = -300, edt = -240, cst = -360, cdt = -300,
                mst = -420, mdt = -360, pst = -480, pdt = -420 }

local function leap(y) return (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0 end

local function month_days(y, m)
  if m == 2 then return leap(y) and 29 or 28 end
  return (m == 4 or m == 6 or m == 9 or m == 11) and 30 or 31
end

local floor = math.floor

-- Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (no // : LuaJIT runs this too).
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m + (m > 2 and -3 or 9)) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- 1 = Sunday ... 7 = Saturday.
local function weekday(y, m, d) return (days_from_civil(y, m, d) + 4) % 7 + 1 end
M.weekday = weekday

-- Comments become a space (they are CFWS); folds (CRLF + WSP) become their WSP. Returns the text
-- and the last comment's content, or nil and why.
local function uncomment(s)
  local out, depth, i, comment, last = {}, 0, 1, {}, nil
  while i <= #s do
    local c = s:sub(i, i)
    if c == "\r" then
      if s:sub(i + 1, i + 1) ~= "\n" or not s:sub(i + 2, i + 2):match("^[ \t]$") then
        return nil, "CR or LF outside a fold"
      end
      i = i + 2
    elseif c == "\n" then
      return nil, "CR or LF outside a fold"
    elseif depth > 0 then
      if c == "\\" then
        comment[#comment + 1] = s:sub(i + 1, i + 1); i = i + 2
      else
        if c == "(" then depth = depth + 1 elseif c == ")" then depth = depth - 1 end
        if depth == 0 then
          last = table.concat(comment); comment = {}; out[#out + 1] = " "
        else
          comment[#comment + 1] = c
        end
        i = i + 1
      end
    elseif c == "(" then
      depth = 1; i = i + 1
    elseif c == ")" then
      return nil, "unbalanced comment"
    else
      out[#out + 1] = c; i = i + 1
    end
  end
  if depth > 0 then return nil, "unterminated comment" end
  return table.concat(out), last
end

local function num(s) return s and tonumber(s, 10) end

-- Parses an RFC 5322 date-time (section 3.3, with the obsolete forms of 4.3: alphabetic zones, two-
-- or three-digit years, CFWS around the parts). `s` is the field body after the colon (or after a
-- Received field's ";"), folds included. Returns a table { wday?, day, month, year, hour, min, sec,
-- offset (minutes east of UTC; nil for -0000 or an unknown zone), zone (as written), comment (the
-- last comment, e.g. Postfix's "(UTC)"), epoch (the instant, UTC) }, or nil and why.
function M.parse(s)
  if type(s) ~= "string" then return nil, "not a string" end
  local text, comment = uncomment(s)
  if not text then return nil, comment end
  -- FWS is optional before ":" and "," only in the obsolete forms; allowed here, as RFC 5322 says
  -- a reader must accept them.
  text = text:gsub("[ \t]+", " "):gsub("^ ", ""):gsub(" $", ""):gsub(" ?([:,]) ?", "%1")
  local t, rest = { comment = comment }, text
  local dow, after = rest:match("^(%a+),(.*)$")
  if dow then
    t.wday = DAY_INDEX[dow:lower()]
    if not t.wday or #dow ~= 3 then return nil, "bad day of the week " .. dow end
    rest = after:gsub("^ ", "")
  end
  -- day month year time zone, the time as hh:mm or hh:mm:ss
  local d, mon, y, clock, zone = rest:match("^(%d+) (%a+) (%d+) ([%d:]+) (%S+)$")
  if not d then return nil, "not day month year time zone: " .. rest end
  if #d > 2 then return nil, "day of more than two digits" end
  t.day, t.month = num(d), MONTHS[mon:lower()]
  if not t.month or #mon ~= 3 then return nil, "bad month " .. mon end
  if #y < 2 then
    return nil, "year of one digit"
  elseif #y == 2 then
    t.year = num(y) + (num(y) < 50 and 2000 or 1900)
  elseif #y == 3 then
    t.year = num(y) + 1900
  else
    t.year = num(y)
  end
  if t.day < 1 or t.day > month_days(t.year, t.month) then
    return nil, ("no day %d in %s %d"):format(t.day, mon, t.year)
  end
  local h, mi, sec = clock:match("^(%d%d):(%d%d):(%d%d)$")
  if not h then h, mi = clock:match("^(%d%d):(%d%d)$"); sec = "00" end
  if not h then return nil, "bad time " .. clock end
  t.hour, t.min, t.sec = num(h), num(mi), num(sec)
  if t.hour > 23 or t.min > 59 or t.sec > 60 then return nil, "time out of range " .. clock end
  t.zone = zone
  local sign, zh, zm = zone:match("^([+-])(%d%d)(%d%d)$")
  if sign then
    if num(zm) > 59 then return nil, "zone minutes out of range " .. zone end
    if zone ~= "-0000" then t.offset = (sign == "-" and -1 or 1) * (num(zh) * 60 + num(zm)) end
  elseif ZONES[zone:lower()] then
    t.offset = ZONES[zone:lower()]
  elseif not (#zone == 1 and zone:match("^[A-IK-Za-ik-z]$")) then
    return nil, "bad zone " .. zone
  end
  if t.wday and t.wday ~= weekday(t.year, t.month, t.day) then
    return nil, ("%s is not a %s"):format(rest, DAYS[t.wday])
  end
  t.epoch = days_from_civil(t.year, t.month, t.day) * 86400 + t.hour * 3600 + t.min * 60 + t.sec
    - (t.offset or 0) * 60
  return t
end

-- Parses the asctime(3) date of an mbox From_ line, "Sat Dec  5 09:33:32 2026" (the day padded
-- with a space; "05" accepted too). Returns { wday, day, month, year, hour, min, sec } or nil, why.
function M.parse_ctime(s)
  if type(s) ~= "string" then return nil, "not a string" end
  local dow, mon, d, h, mi, sec, y = s:match("^(%a%a%a) (%a%a%a) ([ %d]%d) (%d%d):(%d%d):(%d%d) (%d%d%d%d)$")
  if not dow then return nil, "not in the asctime form: " .. s end
  local t = { wday = DAY_INDEX[dow:lower()], month = MONTHS[mon:lower()], day = num(d:match("%d+")),
              year = num(y), hour = num(h), min = num(mi), sec = num(sec) }
  if not t.wday or not t.month then return nil, "bad day or month name in " .. s end
  if t.day < 1 or t.day > month_days(t.year, t.month) then return nil, "no such day: " .. s end
  if t.hour > 23 or t.min > 59 or t.sec > 60 then return nil, "time out of range: " .. s end
  if t.wday ~= weekday(t.year, t.month, t.day) then return nil, "wrong day of the week: " .. s end
  return t
end

-- For assertions: the parsed date, or an error naming the text and what is wrong with it.
function M.check(s, ctime)
  local t, why = (ctime and M.parse_ctime or M.parse)(s)
  if not t then error(("not a date: %q (%s)"):format(tostring(s), why), 2) end
  return t
end

return M
