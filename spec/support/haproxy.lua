-- HAProxy in front of an in-process smtp.server, for the PROXY protocol specs: one TCP frontend
-- per entry, each on its own free loopback port, relaying to the server with `send-proxy` (v1) or
-- `send-proxy-v2`. It runs in the foreground (-db) under helper.spawn's time bound and is stopped
-- by its PID.
local helper = require "helper"

local M = {}

-- haproxy.start(server_port, { { name=, bind = "127.0.0.1" | "::1", send = "send-proxy" |
-- "send-proxy-v2" }, ... }) -> { port = { name = port }, stop = fn, output = fn }
function M.start(server_port, fronts)
  helper.need("haproxy")
  local dir = helper.tmpdir()
  local cfg = { "global", "  maxconn 64", "defaults", "  mode tcp", "  timeout connect 5s",
    "  timeout client 60s", "  timeout server 60s" }
  local ports = {}
  for _, f in ipairs(fronts) do
    local bind = f.bind or "127.0.0.1"
    local port = helper.free_port(bind)
    ports[f.name] = port
    cfg[#cfg + 1] = "frontend f_" .. f.name
    cfg[#cfg + 1] = ("  bind %s:%d"):format(bind:find(":") and "[" .. bind .. "]" or bind, port)
    cfg[#cfg + 1] = "  default_backend b_" .. f.name
    cfg[#cfg + 1] = "backend b_" .. f.name
    cfg[#cfg + 1] = ("  server s 127.0.0.1:%d %s"):format(server_port, f.send)
  end
  helper.write(dir .. "/haproxy.cfg", table.concat(cfg, "\n") .. "\n")
  local p = helper.spawn({ "/usr/sbin/haproxy", "-db", "-f", dir .. "/haproxy.cfg" }, { limit = 120 })
  for _, f in ipairs(fronts) do
    assert(helper.wait_port(f.bind or "127.0.0.1", ports[f.name], 10), "haproxy did not start: " .. p:output())
  end
  return { port = ports, stop = function() p:stop() end, output = function() return p:output() end }
end

return M
