-- smtp.inbox.api: the web inbox's JSON API under /api/v1 (the shape of Mailpit's for the parts it
-- covers, so Mailpit's clients work) and the message views the page shows in a sandboxed frame.
-- Plain request -> response functions: smtp.inbox.http carries them over lua-http.
local json = require "dkjson"
local store_mod = require "smtp.inbox.store"

local M = {}

local JSON = { ["content-type"] = "application/json; charset=utf-8" }
local TEXT = { ["content-type"] = "text/plain; charset=utf-8" }

local function obj(t) return setmetatable(t or {}, { __jsontype = "object" }) end
local function arr(t) return setmetatable(t or {}, { __jsontype = "array" }) end

local function reply(status, t) return status, JSON, json.encode(t) end
local function err(status, text) return status, TEXT, text .. "\n" end

-- Arrays that may be empty must stay arrays in JSON.
local function summary_json(s)
  local c = {}
  for k, v in pairs(s) do c[k] = v end
  for _, k in ipairs { "To", "Cc", "Bcc", "ReplyTo", "Tags" } do c[k] = arr(s[k]) end
  c.From = obj(s.From)
  return c
end

local function header_map(part)
  local h = obj()
  for _, f in ipairs(part.headers) do
    h[f.name] = h[f.name] or arr()
    table.insert(h[f.name], f.value)
  end
  return h
end

local function part_json(p)
  return { PartID = p.path, FileName = p.filename or "", ContentType = p.content_type,
           ContentID = p.cid or "", Size = p.size or 0 }
end

-- The MIME tree, for the page.
local function tree(p)
  local t = { PartID = p.path, ContentType = p.content_type, FileName = p.filename or "",
              Size = p.size or 0, Parts = arr() }
  for _, c in ipairs(p.parts) do t.Parts[#t.Parts + 1] = tree(c) end
  return t
end

function M.new(store, faults)
  local api = { store = store, faults = faults }

  local function message(id)
    -- "latest", as Mailpit's clients default to
    if id == "latest" then
      local l = store.list[#store.list]
      id = l and l.id
    end
    local e = id and store:get(id)
    if not e then return nil end
    local msg = store:parse(e)
    if e.gone then return nil end   -- its file went away: forgotten, as if deleted
    return e, msg
  end

  local function find_part(msg, pid)
    for p in msg:walk() do if p.path == pid then return p end end
  end

  local function list(q, start, limit)
    local match = q and q ~= "" and store_mod.query(q) or nil
    local page, total = store:page(match, start, limit)
    local msgs = arr()
    for i, s in ipairs(page) do msgs[i] = summary_json(s) end
    return reply(200, { total = store:count(), unread = 0, count = #msgs, messages_count = total,
                        messages_unread = 0, start = start, tags = arr(), messages = msgs })
  end

  local routes = {}

  -- GET /api/v1/messages?start=&limit=
  routes["GET messages"] = function(r)
    return list(nil, tonumber(r.query.start) or 0, tonumber(r.query.limit) or 50)
  end
  routes["GET search"] = function(r)
    return list(r.query.query or "", tonumber(r.query.start) or 0, tonumber(r.query.limit) or 50)
  end
  -- DELETE /api/v1/messages: body {"IDs": [...]}, or none (all)
  routes["DELETE messages"] = function(r)
    local ids
    if r.body and r.body:match("%S") then
      local b = json.decode(r.body)
      if type(b) ~= "table" then return err(400, "invalid JSON body") end
      if type(b.IDs) == "table" and #b.IDs > 0 then ids = b.IDs end
    end
    local n, derr = store:delete(ids)
    if not n then return err(500, tostring(derr)) end
    return 200, TEXT, "ok"
  end
  routes["DELETE search"] = function(r)
    local match = store_mod.query(r.query.query or "")
    local ids = {}
    for _, e in ipairs(store.list) do if match(store:summary(e)) then ids[#ids + 1] = e.id end end
    local n, derr = store:delete(ids)
    if not n then return err(500, tostring(derr)) end
    return 200, TEXT, "ok"
  end
  -- PUT /api/v1/messages (read status): accepted, nothing is tracked
  routes["PUT messages"] = function() return 200, TEXT, "ok" end

  routes["GET message"] = function(_, id, sub, pid)
    local e, msg = message(id)
    if not e then return err(404, "message not found") end
    if sub == "raw" then return 200, TEXT, store:raw(e) or "" end
    if not msg then return err(500, "message cannot be read") end
    if sub == "headers" then return reply(200, header_map(msg)) end
    if sub == "part" then
      local p = pid and find_part(msg, pid)
      if not p or not p.content then return err(404, "part not found") end
      local fn = (p.filename or ("part-" .. p.path)):gsub('[%c"\\/]', "_")
      return 200, { ["content-type"] = p.content_type,
                    ["content-disposition"] = 'attachment; filename="' .. fn .. '"' }, p.content
    end
    if sub then return err(404, "not found") end
    id = e.id
    local s = store:summary(e)
    local text, html, att, inline = store_mod.bodies(msg)
    local m = summary_json(s)
    m.Snippet, m.Read, m.Attachments = nil, nil, nil
    m.Text = text and (text.text or text.content) or ""
    m.HTML = html and (html.text or html.content) or ""
    m.Date = s.Created
    m.ReturnPath = e.from or ""
    m.Attachments, m.Inline = arr(), arr()
    for _, p in ipairs(att) do m.Attachments[#m.Attachments + 1] = part_json(p) end
    for _, p in ipairs(inline) do m.Inline[#m.Inline + 1] = part_json(p) end
    m.Tree = tree(msg)
    m.Defects = arr(msg.defects)
    return reply(200, m)
  end

  routes["GET info"] = function()
    return reply(200, { Version = "lua-smtp", Messages = store:count(), Unread = 0, Tags = obj(),
                        RuntimeStats = obj() })
  end

  -- faults through smtp.faults: GET list, POST add (JSON rule), DELETE all or /faults/{id}
  routes["GET faults"] = function()
    if not api.faults then return err(404, "faults are not available") end
    local l = arr()
    for i, r in ipairs(api.faults:list()) do l[i] = r end
    return reply(200, l)
  end
  routes["POST faults"] = function(r)
    if not api.faults then return err(404, "faults are not available") end
    local rule = json.decode(r.body or "")
    if type(rule) ~= "table" then return err(400, "invalid JSON body") end
    local ok, id, why = pcall(api.faults.add, api.faults, rule)
    if not ok then return err(400, tostring(id)) end
    if not id then return err(400, tostring(why)) end
    return reply(200, { ID = id })
  end
  routes["DELETE faults"] = function(_, id)
    if not api.faults then return err(404, "faults are not available") end
    if id then
      local n = tonumber(id) or id
      api.faults:remove(n)
    else
      api.faults:clear()
    end
    return 200, TEXT, "ok"
  end

  -- The message's HTML for the sandboxed frame: cid: images point at their parts; remote content
  -- is blocked by the CSP unless `remote` (images only even then).
  function api.view_html(id, remote)
    local e, msg = message(id)
    if not e or not msg then return err(404, "message not found") end
    local _, html = store_mod.bodies(msg)
    local body = html and (html.text or html.content) or ""
    local cids = {}
    for p in msg:walk() do if p.cid then cids[p.cid] = p.path end end
    body = body:gsub("([\"'])cid:([^\"']+)%1", function(qq, cid)
      local pid = cids[cid]
      if not pid then return nil end
      return qq .. "/api/v1/message/" .. id .. "/part/" .. pid .. qq
    end)
    local csp = "default-src 'none'; style-src 'unsafe-inline'; font-src data:; img-src 'self' data:"
      .. (remote and " http: https:" or "") .. "; sandbox"
    return 200, { ["content-type"] = "text/html; charset=utf-8", ["content-security-policy"] = csp,
                  ["x-content-type-options"] = "nosniff", ["referrer-policy"] = "no-referrer" }, body
  end

  -- Dispatch: method, path (after /api/v1/), query table, body -> status, headers, body
  function api.handle(method, path, query, body)
    local r = { query = query or {}, body = body }
    local a, b, c, d = path:match("^([^/]+)/?([^/]*)/?([^/]*)/?([^/]*)$")
    if not a then return err(404, "not found") end
    local h = routes[method .. " " .. a]
    if not h then
      if routes["GET " .. a] or routes["DELETE " .. a] or routes["POST " .. a] then return err(405, "method not allowed") end
      return err(404, "not found")
    end
    return h(r, b ~= "" and b or nil, c ~= "" and c or nil, d ~= "" and d or nil)
  end

  api.summary_json = summary_json
  api.json = json
  return api
end

return M
