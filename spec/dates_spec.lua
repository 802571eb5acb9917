-- Specs for spec/support/dates.lua, the date matcher the other specs use on peers' output: fixed
-- dates only (the 1st, the 9th and the 31st, across a year boundary, in several zones), in the
-- forms Postfix, Exim, Python (aiosmtpd's peers and smtplib) and our own smtp.message write.
local dates = require "support.dates"
local helper = require "helper"

-- 2027-01-01 00:30:00 UTC: the instant every "year boundary" case below names.
local T = 1798763400

describe("dates.parse", function()
  it("reads Postfix's Received dates: the day padded with a space, any zone, its comment", function()
    local cases = {
      -- the 1st and the 9th, where Postfix pads ("%e"), and the 31st
      { "Fri,  1 Jan 2027 00:30:00 +0000 (UTC)", 2027, 1, 1, 0, "UTC" },
      { "Sat,  9 Jan 2027 13:05:59 +0100 (CET)", 2027, 1, 9, 60, "CET" },
      { "Thu, 31 Dec 2026 23:59:59 -0800 (PST)", 2026, 12, 31, -480, "PST" },
      { "Wed,  9 Dec 2026 08:00:00 +0530 (IST)", 2026, 12, 9, 330, "IST" },
      { "Sun, 31 Jan 2027 00:00:00 -0330 (NST)", 2027, 1, 31, -210, "NST" },
      -- folded before the date, as Postfix folds a long Received field after its ";"
      { "\r\n\tFri,  1 Jan 2027 00:30:00 +0000 (UTC)", 2027, 1, 1, 0, "UTC" },
    }
    for _, c in ipairs(cases) do
      local t = dates.check(c[1])
      assert.same({ c[2], c[3], c[4], c[5], c[6] }, { t.year, t.month, t.day, t.offset, t.comment }, c[1])
    end
  end)

  it("reads Exim's dates (the day in two digits) and swaks's", function()
    local t = dates.check("Fri, 01 Jan 2027 00:30:00 +0000")
    assert.equal(T, t.epoch)
    t = dates.check("Sat, 09 Jan 2027 01:30:00 +0100")
    assert.equal(T + 8 * 86400, t.epoch)
    assert.equal(T, dates.check("Thu, 31 Dec 2026 19:30:00 -0500").epoch)
  end)

  it("gives one instant for the same moment written in different zones across the year boundary", function()
    for _, s in ipairs {
      "Fri,  1 Jan 2027 00:30:00 +0000 (UTC)", "Fri, 01 Jan 2027 00:30:00 GMT",
      "Thu, 31 Dec 2026 19:30:00 -0500 (EST)", "Thu, 31 Dec 2026 19:30:00 EST",
      "Fri, 01 Jan 2027 09:30:00 +0900", "Thu, 31 Dec 2026 16:30:00 PST",
      "1 Jan 2027 00:30 +0000", "Fri, 1 Jan 27 00:30:00 UT",
    } do
      assert.equal(T, dates.check(s).epoch, s)
    end
  end)

  it("reads what Python's email.utils writes (aiosmtpd's and smtplib's peers)", function()
    local out = helper.sh(helper.python .. " -c " .. helper.quote(
      "import sys, datetime, email.utils as u\n" ..
      "for t in map(int, sys.argv[1:]):\n" ..
      "  print(t, u.formatdate(t), sep='|')\n" ..
      "  print(t, u.formatdate(t, usegmt=True), sep='|')\n" ..
      "  z = datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))\n" ..
      "  print(t, u.format_datetime(datetime.datetime.fromtimestamp(t, z)), sep='|')\n") ..
      " " .. T - 86400 .. " " .. T .. " " .. T + 8 * 86400 .. " " .. T + 30 * 86400)
    local n = 0
    for t, s in out:gmatch("(%d+)|([^\n]+)") do
      n = n + 1
      local d = dates.check(s)
      assert.equal(tonumber(t), d.epoch, s)
    end
    assert.equal(12, n, out)
  end)

  it("reads what smtp.message writes, for every day of four years, both day forms of os.date too", function()
    local message = require "smtp.message"
    local start = 1767225600 -- 2026-01-01 00:00:00 UTC
    for day = 0, 4 * 366 do
      local t = start + day * 86400 + (day * 3607) % 86400
      assert.equal(t, dates.check(message.date(t)).epoch)
      for _, form in ipairs { "!%a, %e %b %Y %H:%M:%S +0000", "!%a, %d %b %Y %H:%M:%S +0000" } do
        local s = os.date(form, t)
        local d = dates.check(s)
        assert.equal(t, d.epoch, s)
        assert.equal(tonumber(os.date("!%w", t)) + 1, d.wday, s)
      end
    end
  end)

  it("refuses what is not a date-time, or names a day that does not exist", function()
    for _, s in ipairs {
      "Sat, 15 Dec 2026 09:33:32 +0000",   -- 15 Dec 2026 is a Tuesday
      "Fri, 32 Dec 2026 09:33:32 +0000", "Sun, 29 Feb 2026 00:00:00 +0000", "Mon, 31 Apr 2026 00:00:00 +0000",
      "Fri, 001 Jan 2027 00:30:00 +0000", "Fri, 1 Jan 2027 0:30:00 +0000", "Fri, 1 Jan 2027 24:00:00 +0000",
      "Fri, 1 Jan 2027 00:60:00 +0000", "Fri, 1 Jan 2027 00:30:00 +0060", "Fri, 1 Jan 2027 00:30:00",
      "Fri, 1 Jan 2027 00:30:00 CET", "Fri, 1 January 2027 00:30:00 +0000", "Fri 1 Jan 2027 00:30:00 +0000",
      "Jan 1 2027 00:30:00 +0000", "Fri, 1 Jan 2027 00:30:00 +0000\r\n", "Fri, 1 Jan\n 2027 00:30:00 +0000",
      "Fri, 1 Jan 2027 00:30:00 +0000 (UTC", "Fri, 1 Jan 7 00:30:00 +0000", "", "yesterday",
    } do
      assert.is_nil(dates.parse(s), s)
    end
    assert.has_error(function() dates.check("Sat, 15 Dec 2026 09:33:32 +0000") end)
    assert.equal(29, dates.check("Tue, 29 Feb 2028 12:00:00 +0000").day)
  end)
end)

describe("dates.parse_ctime", function()
  it("reads the asctime form of an mbox From_ line, the day padded with a space or a zero", function()
    for _, c in ipairs {
      { "Fri Jan  1 00:30:00 2027", 1 }, { "Sat Jan  9 23:59:59 2027", 9 }, { "Thu Dec 31 23:59:60 2026", 31 },
      { "Fri Jan 01 00:30:00 2027", 1 },
    } do
      assert.equal(c[2], dates.check(c[1], "ctime").day, c[1])
    end
    for _, s in ipairs { "Sat Jan  1 00:30:00 2027", "Fri Jan 1 00:30:00 2027", "Thu Dec 32 00:00:00 2026",
                         "Fri, 01 Jan 2027 00:30:00 +0000" } do
      assert.is_nil(dates.parse_ctime(s), s)
    end
    -- the sink's own form (os.date's "%e"), for every day of two years
    for day = 0, 2 * 366 do
      local t = 1767225600 + day * 86400 + (day * 3607) % 86400
      assert.truthy(dates.parse_ctime(os.date("!%a %b %e %H:%M:%S %Y", t)), os.date("!%c", t))
    end
  end)
end)
