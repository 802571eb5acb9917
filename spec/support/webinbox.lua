-- The web inbox specs' shared steps (spec/webinbox_api_spec.lua, spec/inbox_disk_spec.lua):
-- checking lua-http is there, starting `lua-smtp sink --http` with a store, sending with swaks,
-- calling the API with curl.
local helper = require "helper"

local BIN = helper.root .. "/bin/lua-smtp"

-- lua-http and curl are these specs' peers: missing ones fail, naming the package
local function need_http()
  local lua = helper.lua
  local out = helper.sh(lua .. " -e " .. helper.quote(
    'package.path = package.path .. ";/usr/share/lua/5.3/?.lua;/usr/share/lua/5.3/?/init.lua;/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua" require "http.server" require "dkjson" print "ok"') .. " 2>&1")
  assert(out:match("ok"), "needs lua-http and lua-dkjson (apt-get install lua-http lua-dkjson): " .. out)
  helper.need("curl")
end

local function sink(args)
  local port, hport = helper.free_port(), helper.free_port()
  local argv = { helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port, "--http", "127.0.0.1:" .. hport }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = helper.spawn(argv, { limit = 120 })
  assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
  assert(helper.wait_port("127.0.0.1", hport, 10), "web inbox did not start: " .. p:output())
  return p, port, hport
end

local function swaks(port, extra)
  local argv = { "swaks", "--server", "127.0.0.1", "--port", tostring(port), "--from", "ann@x.test" }
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  helper.need_argv(argv)
  local q = {}
  for i, a in ipairs(argv) do q[i] = helper.quote(a) end
  return (helper.sh(table.concat(q, " ") .. " 2>&1"))
end

local json = require "dkjson"

-- curl: status, body
local function http(hport, method, path, body, headers)
  local dir = helper.tmpdir()
  local cmd = { "curl", "-s", "-m", "20", "-o", dir .. "/body", "-w", "%{http_code}", "-X", method }
  if body then
    cmd[#cmd + 1] = "-H"; cmd[#cmd + 1] = "content-type: application/json"
    cmd[#cmd + 1] = "--data-binary"; cmd[#cmd + 1] = body
  end
  for _, h in ipairs(headers or {}) do cmd[#cmd + 1] = "-H"; cmd[#cmd + 1] = h end
  cmd[#cmd + 1] = "http://127.0.0.1:" .. hport .. path
  local q = {}
  for i, a in ipairs(cmd) do q[i] = helper.quote(a) end
  local code = helper.sh(table.concat(q, " "))
  return tonumber(code), helper.read(dir .. "/body") or ""
end
local function get_json(hport, path)
  local code, body = http(hport, "GET", path)
  assert(code == 200, ("GET %s: %s %s"):format(path, tostring(code), body))
  return json.decode(body)
end

return { need_http = need_http, sink = sink, swaks = swaks, http = http, get_json = get_json, json = json }
