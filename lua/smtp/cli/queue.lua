-- `lua-smtp queue run|list|show|retry|delete DIR [ID]`: the command line of smtp.queue, to run the
-- spool's deliveries (long-running, or one pass for cron) and to look at and manage what it holds.
local args_mod = require "smtp.cli.args"

local M = {}

local usage = [==[
usage: lua-smtp queue run DIR [--once] [--poll SECONDS] [--max-age SECONDS] [--warn-after SECONDS]
                              [--hostname NAME] [--rate N/SECONDS] [--max-connections N] [--json]
       lua-smtp queue list DIR [--json]
       lua-smtp queue show DIR ID [--json]
       lua-smtp queue retry DIR ID
       lua-smtp queue delete DIR ID
run delivers what is due in the spool DIR (made by smtp.queue), then sleeps until the next
retry is due (at most --poll seconds, default 60) and goes on; with --once it makes one pass and
exits (for cron), printing what it did. --max-age (default 432000, 5 days) is how long a message
is retried before it bounces; --warn-after sends a delayed-delivery notice once a message has
waited that long. --rate (at most N messages in any SECONDS) and --max-connections hold each
destination (MX domain or smarthost) to a provider's limits (smtp.limits) within this runner.
Several runners may share one DIR: each message is locked while delivered.
list prints each message (id, age, sender, each recipient's state) and counts by state and by
destination; show prints one message; retry makes its deferred recipients due now; delete removes
it without a bounce. --json prints the same as JSON.
Exit status: 0 done, 1 a message that is not there or is being delivered now, 2 usage error.]==]

local spec = {
  single = { poll = true, ["max-age"] = true, ["warn-after"] = true, hostname = true, rate = true,
    ["max-connections"] = true },
  flags = { once = true, json = true },
}

local json = require "smtp.json"
local ARRAY = json.ARRAY
local to_json = json.encode
M.to_json = to_json

-- What is shown of a message: never the smarthost's credentials.
local function public(st)
  local via = st.via
  if type(via) == "table" then
    local v = {}
    for k, x in pairs(via) do
      if k ~= "auth" and k ~= "password" then v[k] = x end
    end
    if v.url then v.url = tostring(v.url):gsub("//[^@/]*@", "//") end
    via = v
  end
  local rs = {}
  for i, r in ipairs(st.recipients or {}) do
    rs[i] = { recipient = r.rcpt, state = r.state, attempts = r.attempts, next = r.next, code = r.code,
      enhanced = r.enhanced, text = r.text, host = r.host, last = r.last, reported = r.reported }
  end
  return { id = st.id, from = st.from, created = st.created, next = st.next, via = via, key = st.key,
    finished = st.finished, corrupt = st.corrupt, recipients = rs }
end

local function when(t, now)
  if not t then return "-" end
  local d = t - now
  local a = math.abs(d)
  local s = a < 120 and (a .. "s") or a < 7200 and (math.floor(a / 60) .. "m") or
    a < 172800 and (math.floor(a / 3600) .. "h") or (math.floor(a / 86400) .. "d")
  return d >= 0 and ("in " .. s) or (s .. " ago")
end

local function print_message(out, st, now)
  out:write(st.id, "  ", st.corrupt and "(unreadable state)" or
    ("from <" .. tostring(st.from) .. ">, queued " .. when(st.created, now)), "\n")
  for _, r in ipairs(st.recipients) do
    local line = "  " .. r.recipient .. "  " .. r.state
    if r.attempts and r.attempts > 0 then line = line .. ", " .. r.attempts .. " attempt" .. (r.attempts > 1 and "s" or "") end
    if r.state == "deferred" then line = line .. ", next " .. when(r.next, now) end
    if r.code or r.text then
      line = line .. ": " .. (r.code and (r.code .. " ") or "") .. (r.enhanced and (r.enhanced .. " ") or "") .. tostring(r.text or "")
    end
    out:write(line:gsub("[%c]", " "), "\n")
  end
end

function M.main(argv, out, err)
  out, err = out or io.stdout, err or io.stderr
  local sub = argv[1]
  if sub == "-h" or sub == "--help" then out:write(usage, "\n"); return 0 end
  local subs = { run = 1, list = 1, show = 2, retry = 2, delete = 2 }
  if not subs[sub] then
    err:write("lua-smtp queue: ", sub and ("unknown subcommand '" .. sub .. "'") or "a subcommand is needed", "\n", usage, "\n")
    return 2
  end
  -- positional words (DIR, ID) are those that are neither options nor an option's value
  local pos, rest = {}, {}
  local i = 2
  while i <= #argv do
    local a = argv[i]
    if args_mod.is_option(a) then
      rest[#rest + 1] = a
      local name = a:match("^%-%-([%w%-]+)$")
      if name and spec.single[name] and argv[i + 1] and not args_mod.is_option(argv[i + 1]) then
        rest[#rest + 1] = argv[i + 1]
        i = i + 1
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  local o, why = args_mod.parse(rest, spec)
  if not o then
    if why == "help" then out:write(usage, "\n"); return 0 end
    err:write("lua-smtp queue: ", why, "\n", usage, "\n")
    return 2
  end
  if #pos ~= subs[sub] then
    err:write("lua-smtp queue ", sub, ": ", subs[sub] == 1 and "DIR" or "DIR and ID", " expected\n", usage, "\n")
    return 2
  end
  local nums = {}
  for _, k in ipairs { "poll", "max-age", "warn-after" } do
    if o[k] then
      local n = tonumber(o[k])
      if not n or n ~= n or n < 0 then
        err:write("lua-smtp queue: bad --", k, " '", o[k], "'\n")
        return 2
      end
      nums[k] = n
    end
  end
  if sub ~= "run" and (o.once or o.poll or o["max-age"] or o["warn-after"] or o.hostname or o.rate
      or o["max-connections"]) then
    err:write("lua-smtp queue ", sub, ": --once, --poll, --max-age, --warn-after, --hostname, --rate and ",
      "--max-connections are for run\n")
    return 2
  end
  local lim, why = require("smtp.limits").from_flags(o)
  if lim == false then
    err:write("lua-smtp queue: ", why, "\n", usage, "\n")
    return 2
  end
  local queue = require "smtp.queue"
  local q, qerr = queue.open(pos[1], { max_age = nums["max-age"], warn_after = nums["warn-after"],
    hostname = o.hostname, poll = nums.poll, limits = lim or nil,
    log = function(s) err:write("lua-smtp queue: ", s, "\n") end })
  if not q then
    err:write("lua-smtp queue: ", tostring(qerr), "\n")
    return 2
  end
  local now = os.time()

  if sub == "run" then
    local function report(c)
      if o.json then
        out:write(to_json(c), "\n")
      else
        out:write(("sent %d, failed %d, deferred %d, bounced %d, done %d, locked %d\n"):format(
          c.sent, c.failed, c.deferred, c.bounced, c.done, c.locked))
      end
      if out.flush then out:flush() end
    end
    if o.once then
      report(q:run_once())
      return 0
    end
    q:run { on_pass = function(c)
      if c.messages > 0 then report(c) end
    end }
    return 0
  end

  if sub == "list" then
    local msgs = {}
    for _, st in ipairs(q:list()) do msgs[#msgs + 1] = public(st) end
    local s = q:stats()
    if o.json then
      out:write(to_json { messages = setmetatable(msgs, ARRAY), counts = s.recipients,
        total = s.messages, destinations = s.destinations }, "\n")
      return 0
    end
    for _, st in ipairs(msgs) do print_message(out, st, now) end
    out:write(("%d message%s; recipients: %d pending, %d deferred, %d sent, %d failed\n"):format(
      s.messages, s.messages == 1 and "" or "s", s.recipients.pending, s.recipients.deferred,
      s.recipients.sent, s.recipients.failed))
    local dests = {}
    for d in pairs(s.destinations) do dests[#dests + 1] = d end
    table.sort(dests)
    for _, d in ipairs(dests) do
      local x = s.destinations[d]
      out:write(("  %s: %d pending, %d deferred\n"):format(d, x.pending or 0, x.deferred or 0))
    end
    return 0
  end

  local id = pos[2]
  if sub == "show" then
    local st, e = q:show(id)
    if not st then err:write("lua-smtp queue: ", e.text, "\n"); return 1 end
    if o.json then out:write(to_json(public(st)), "\n") else print_message(out, public(st), now) end
    return 0
  end
  local ok, e = q[sub](q, id)
  if not ok then err:write("lua-smtp queue: ", e.text, "\n"); return 1 end
  if o.json then out:write(to_json { id = id, ok = true }, "\n")
  else out:write(sub == "retry" and "retry " or "deleted ", id, "\n") end
  return 0
end

return M
