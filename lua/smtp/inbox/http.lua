-- smtp.inbox.http: the web inbox's HTTP side: lua-http's server in a cqueues controller that one
-- smtp.loop task drives, so the SMTP sessions keep running on smtp.loop in the same process and
-- pay nothing while no one browses. Serves the page, the API (smtp.inbox.api), the message views,
-- server-sent events for new mail and a long-poll wait.
local core = require "smtp.core"
local loop = require "smtp.loop"
local wait = require "smtp.wait"
local api_mod = require "smtp.inbox.api"
local store_mod = require "smtp.inbox.store"

local M = {}

-- Debian installs lua-http's pure-Lua files for 5.1 to 5.3 only; they run unchanged on 5.4.
local function require_http()
  local ok, hs = pcall(require, "http.server")
  if not ok and _VERSION == "Lua 5.4" then
    package.path = package.path .. ";/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua"
      .. ";/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
    ok, hs = pcall(require, "http.server")
  end
  if not ok then return nil, "lua-http is not installed (" .. tostring(hs):match("^[^\n]*") .. ")" end
  return hs, require "http.headers", require "cqueues", require "cqueues.condition"
end

local function unescape(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function parse_query(q)
  local t = {}
  for k, v in (q or ""):gmatch("([^&=]+)=?([^&]*)") do t[unescape(k)] = unescape(v) end
  return t
end

local LOOPBACK = { ["127.0.0.1"] = true, ["::1"] = true, localhost = true, ["[::1]"] = true }
function M.is_loopback(host)
  return LOOPBACK[host] or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

-- start{ host, port, store, faults, public, log } -> server { port, close() } | nil, err
function M.start(o)
  local hs, headers, cqueues, condition = require_http()
  if not hs then return nil, headers end
  local store = o.store
  local api = api_mod.new(store, o.faults)
  local page = require "smtp.inbox.page"
  local cq = cqueues.new()
  local changed = condition.new()
  local events = {}   -- the change log the streams read: seq -> { what, x }, the last 1000
  local eseq = 0
  local waiting = 0   -- coroutines in changed:wait
  local function wait_change(t)
    waiting = waiting + 1
    changed:wait(t)
    waiting = waiting - 1
  end

  store:watch(function(what, x)
    eseq = eseq + 1
    -- not the entry: the ring must not keep dropped messages' bytes alive
    if what == "new" then x = { id = x.id, size = x.size } end
    events[eseq] = { what = what, x = x }
    events[eseq - 1000] = nil   -- a stream further behind than that has lost them anyway
    -- a signal wakes the controller (a step, syscalls): only when someone waits
    if waiting > 0 then changed:signal() end
  end)

  -- body nil: the headers only, the stream left open (server-sent events)
  local function respond(stream, status, h, body)
    local out = headers.new()
    out:append(":status", tostring(status))
    for k, v in pairs(h or {}) do out:append(k, v) end
    out:append("cache-control", "no-store")
    stream:write_headers(out, false)
    if body ~= nil then stream:write_chunk(body, true) end
  end

  -- The stream of changes as server-sent events: "new" with the id and size, "delete" with the
-- ids; the changes that come while one write is under way go together in the next.
  local function sse(stream)
    respond(stream, 200, { ["content-type"] = "text/event-stream" })
    local last = eseq
    local ok = stream:write_chunk(": hello\n\n", false)
    while ok do
      if eseq == last then wait_change(15) end
      -- a burst of mail goes out in one write, not one write per message
      if eseq > last then cqueues.sleep(0.05) end
      local buf = {}
      for n = math.max(last + 1, eseq - 999), eseq do
        local ev = events[n]
        last = n
        if ev.what == "new" then
          -- the id and size only: the SMTP side pays for every byte formatted here while a page
          -- is open; the page asks the API for the summaries it shows
          buf[#buf + 1] = ('event: new\ndata: {"ID":"%s","Size":%d}\n\n'):format(ev.x.id, ev.x.size or 0)
        else
          -- the store's ids (hex) are written as they are: the JSON encoder cost ~23,000
          -- instructions a message (callgrind; 5 % of the sink's work) when a full memory store
          -- drops one message for each new one
          buf[#buf + 1] = table.concat(ev.x, ","):find("[^%w%-_.:,=+]") and
            "event: delete\ndata: " .. api.json.encode(setmetatable(ev.x, { __jsontype = "array" })) .. "\n\n"
            or ('event: delete\ndata: ["%s"]\n\n'):format(table.concat(ev.x, '","'))
        end
      end
      ok = stream:write_chunk(#buf > 0 and table.concat(buf) or ": ping\n\n", false)
    end
  end

  -- GET /api/v1/wait?query=...&timeout=S[&since=ID|&new=1]: the first message that matches, among
  -- those after `since` (all stored ones without it; none stored with new=1), waiting for it.
  local function wait_for(stream, q)
    local match = store_mod.query(q.query or "")
    local after = 0
    if q.since and store:get(q.since) then after = store:get(q.since).seq
    elseif q.new == "1" or q.new == "true" then after = store.seq end
    local deadline = core.now() + math.min(tonumber(q.timeout) or 30, 3600)
    while true do
      for _, e in ipairs(store.list) do
        if e.seq > after and match(store:summary(e)) then
          return respond(stream, 200, { ["content-type"] = "application/json" },
            api.json.encode(api.summary_json(store:summary(e))))
        end
      end
      local left = deadline - core.now()
      if left <= 0 then
        return respond(stream, 408, { ["content-type"] = "text/plain" }, "no matching message before the timeout\n")
      end
      wait_change(left)
    end
  end

  local function onstream(_, stream)
    local req = stream:get_headers()
    if not req then return end
    local method, target = req:get(":method"), req:get(":path") or "/"
    local path, qs = target:match("^([^?]*)%??(.*)$")
    -- a page elsewhere must not reach a loopback inbox through a name it made point here
    local host = (req:get(":authority") or ""):gsub(":%d+$", "")
    if not o.public and not M.is_loopback(host) then
      return respond(stream, 403, { ["content-type"] = "text/plain" }, "forbidden host\n")
    end
    local q = parse_query(qs)
    if method == "GET" and (path == "/" or path == "/index.html") then
      return respond(stream, 200, { ["content-type"] = "text/html; charset=utf-8",
        ["content-security-policy"] = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-src 'self'",
        ["x-frame-options"] = "DENY" }, page.html)
    end
    local vid = path:match("^/view/([%w]+)%.html$")
    if vid and method == "GET" then return respond(stream, api.view_html(vid, q.remote == "1")) end
    local rest = path:match("^/api/v1/(.*)$")
    if not rest then return respond(stream, 404, { ["content-type"] = "text/plain" }, "not found\n") end
    if rest == "events" and method == "GET" then return sse(stream) end
    if rest == "wait" and method == "GET" then return wait_for(stream, q) end
    local body
    if method == "POST" or method == "PUT" or method == "DELETE" then
      -- state changes only from clients that can send JSON: a form on another site cannot
      local ct = req:get("content-type")
      if method == "POST" and not (ct and ct:lower():find("application/json", 1, true)) then
        return respond(stream, 415, { ["content-type"] = "text/plain" }, "application/json expected\n")
      end
      body = stream:get_body_as_string(30)
    end
    return respond(stream, api.handle(method, rest, q, body))
  end

  local srv, err = hs.listen {
    host = o.host, port = o.port, cq = cq, reuseaddr = true, tls = false,
    onstream = onstream,
    onerror = function(_, context, op, e)
      if o.log then o.log(("http: %s %s: %s"):format(tostring(context), tostring(op), tostring(e))) end
    end,
  }
  if not srv then return nil, err end
  local ok, lerr = srv:listen()
  if not ok then return nil, lerr end
  local _, _, port = srv:localname()

  local closed = false
  loop.spawn(function()
    while not closed do
      local t = cq:timeout()
      -- a condition signalled from an SMTP task wakes its waiters only at the next step: the
      -- short cap bounds that delay
      wait.fd(cq:pollfd(), "r", core.now() + math.min(t or 0.1, 0.1))
      local sok, serr = cq:step(0)
      if not sok and o.log then o.log("http: " .. tostring(serr)) end
    end
  end)

  return { port = port, cq = cq, api = api,
           close = function() closed = true; srv:close() end }
end

return M
