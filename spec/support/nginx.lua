-- Starts a private nginx (Debian's nginx with libnginx-mod-http-lua) on a loopback port for the
-- OpenResty specs: its own prefix in a temp dir, foreground, one worker, stopped by PID.
local helper = require "helper"

local M = {}

-- Stops a helper.spawn process by PID. A zombie counts as gone: PID 1 here may reap late, and
-- helper's own stop would wait for it (timeout(1) only exits after its child has).
local function stop(proc)
  if proc.stopped then return end
  proc.stopped = true
  helper.sh("kill -TERM " .. proc.pid .. " 2>/dev/null")
  for _ = 1, 100 do
    if not helper.alive(proc.pid) then return end
    helper.sleep(0.05)
  end
  helper.sh("kill -KILL " .. proc.pid .. " 2>/dev/null")
end
M.stop = stop

local module_dirs = { "/usr/lib/nginx/modules", "/usr/share/nginx/modules" }

local function find_module(name)
  for _, d in ipairs(module_dirs) do
    local p = d .. "/" .. name
    local f = io.open(p, "rb")
    if f then f:close(); return p end
  end
  -- Debian's modules-available/*.conf name the .so relative to nginx's module dir.
  local out = helper.sh("cat /usr/share/nginx/modules-available/*.conf 2>/dev/null")
  local rel = out:match("load_module%s+([^;]-" .. name:gsub("%.", "%%.") .. ");")
  if rel then return rel:match("^/") and rel or ("/usr/share/nginx/" .. rel) end
  return nil
end

-- True when nginx and the Lua module are installed.
function M.available()
  local ok = select(2, helper.sh("command -v nginx >/dev/null 2>&1"))
  return ok == true and find_module("ngx_http_lua_module.so") ~= nil
    and find_module("ndk_http_module.so") ~= nil
end

-- M.start{ http = "<extra http-block directives>", locations = "<location blocks>",
--          main = "<extra main-context directives>", env = { NAME = value },
--          no_ca = true (no lua_ssl_trusted_certificate), workers = n (a master and n workers) }
-- or M.start{ example = "examples/openresty/nginx.conf", env = {...} } for a shipped config -> handle with .port, .prefix, :url(path),
-- :stop(), :error_log(). The checkout's lua/ and LuaJIT build are on the Lua paths, and the test
-- CA is lua_ssl_trusted_certificate.
function M.start(opts)
  opts = opts or {}
  local prefix = helper.tmpdir()
  local port = helper.free_port()
  local root = helper.root
  local ndk = assert(find_module("ndk_http_module.so"), "ndk_http_module.so not found")
  local lua = assert(find_module("ngx_http_lua_module.so"), "ngx_http_lua_module.so not found")
  local ca = opts.ca or helper.certs().ca
  os.execute("mkdir -p " .. helper.quote(prefix .. "/logs") .. " " .. helper.quote(prefix .. "/tmp"))
  local conf = table.concat({
    "load_module " .. ndk .. ";",
    "load_module " .. lua .. ";",
    "daemon off;",
    opts.workers and "master_process on;" or "master_process off;",
    -- workers as root (not nobody): they read the test CA and the checkout in private temp dirs
    opts.workers and "user root;" or "",
    "worker_processes " .. (opts.workers or 1) .. ";",
    "error_log " .. prefix .. "/logs/error.log info;",
    "pid " .. prefix .. "/logs/nginx.pid;",
    opts.main or "",
    "events { worker_connections 1024; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. prefix .. "/tmp/body;",
    "  proxy_temp_path " .. prefix .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. prefix .. "/tmp/fastcgi;",
    "  uwsgi_temp_path " .. prefix .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. prefix .. "/tmp/scgi;",
    -- The `;;` keeps the default path: resty.core lives there and nginx will not start without it.
    '  lua_package_path "' .. root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. '/spec/?.lua;;";',
    '  lua_package_cpath "' .. root .. '/build/luajit/?.so;;";',
    opts.no_ca and "" or ("  lua_ssl_trusted_certificate " .. ca .. ";"),
    "  lua_ssl_verify_depth 4;",
    "  lua_ssl_protocols TLSv1.2 TLSv1.3;",
    "  lua_socket_log_errors off;",
    opts.http or "",
    "  server {",
    "    listen 127.0.0.1:" .. port .. ";",
    opts.locations or "",
    "  }",
    "}",
  }, "\n") .. "\n"
  local extra = {}
  if opts.example then
    -- A shipped example config, with the checkout, the port and the test CA put in.
    conf = assert(helper.read(opts.example), opts.example)
    local function sub(from, to)
      local n
      conf, n = conf:gsub(from:gsub("%p", "%%%0"), (to:gsub("%%", "%%%%")))
      assert(n > 0, "example config lacks " .. from)
    end
    sub("/path/to/lua-smtp", root)
    sub("listen 127.0.0.1:8080;", "listen 127.0.0.1:" .. port .. ";")
    sub("lua_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;", "lua_ssl_trusted_certificate " .. ca .. ";")
    extra = { "-g", "daemon off; master_process off;" }
  end
  helper.write(prefix .. "/nginx.conf", conf)
  -- The environment goes through env(1) in argv: helper.spawn's own `env` option puts `exec`
  -- after env, which env cannot run. No ASan runtime preloaded into nginx: it hangs with it.
  local argv = { "env", "-u", "LD_PRELOAD", "-u", "ASAN_OPTIONS", "-u", "UBSAN_OPTIONS" }
  for k, v in pairs(opts.env or {}) do argv[#argv + 1] = k .. "=" .. v end
  for _, a in ipairs { "nginx", "-p", prefix .. "/", "-e", prefix .. "/logs/error.log", "-c", prefix .. "/nginx.conf" } do
    argv[#argv + 1] = a
  end
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  local proc = helper.spawn(argv, { limit = opts.limit or 300, log = prefix .. "/logs/stdout.log" })
  local h = { port = port, prefix = prefix, proc = proc, conf = conf }
  function h.url(_, path) return "http://127.0.0.1:" .. port .. path end
  function h.error_log() return helper.read(prefix .. "/logs/error.log") or "" end
  function h.stop() stop(proc) end
  if not helper.wait_port("127.0.0.1", port, 10) then
    local log = h.error_log() .. proc:output()
    stop(proc)
    error("nginx did not start:\n" .. log)
  end
  return h
end

-- GET (or POST with `body`) through curl; returns status, body.
function M.request(url, body, timeout)
  local cmd = "env -u LD_PRELOAD curl -s -m " .. (timeout or 20) .. " -o - -w '\\n%{http_code}' "
  if body then cmd = cmd .. "--data-binary " .. helper.quote(body) .. " " end
  local out = helper.sh(cmd .. helper.quote(url))
  local b, status = out:match("^(.*)\n(%d+)$")
  return tonumber(status), b
end

-- The recording aiosmtpd peer (spec/support/openresty_smtpd.py) on a free loopback port:
-- M.smtpd{ tls = true, cert = "server" (or "wrong": a CA-signed certificate for wrong.example only),
--          implicit = false, greeting_delay = 2, require_tls = false, host =, port =,
--          rset_status = "421 ..." (RSET answered so, counted in :rsets()) } -> handle with .port, .dir,
-- :connections(), :messages(), :message(n), :envelope(n), :stop().
function M.smtpd(opts)
  helper.need("aiosmtpd")
  opts = opts or {}
  local dir = helper.tmpdir()
  local port = opts.port or helper.free_port()
  local argv = { "env", "-u", "LD_PRELOAD", helper.python, helper.root .. "/spec/support/openresty_smtpd.py", opts.host or "127.0.0.1",
    tostring(port), dir }
  if opts.tls ~= false then
    local c = helper.certs()
    local which = opts.cert or "server"
    argv[#argv + 1] = "--cert"; argv[#argv + 1] = c[which]
    argv[#argv + 1] = "--key"; argv[#argv + 1] = c[which .. "_key"]
  end
  if opts.greeting_delay then
    argv[#argv + 1] = "--greeting-delay"; argv[#argv + 1] = tostring(opts.greeting_delay)
  end
  if opts.require_tls then argv[#argv + 1] = "--require-tls" end
  if opts.implicit then argv[#argv + 1] = "--implicit" end
  if opts.rset_status then argv[#argv + 1] = "--rset-status"; argv[#argv + 1] = opts.rset_status end
  local proc = helper.spawn(argv, { limit = opts.limit or 300 })
  local h = { port = port, dir = dir, proc = proc }
  local function count(name) return tonumber(helper.read(dir .. "/" .. name) or "0") or 0 end
  function h.connections() return count("connections") end
  function h.messages() return count("messages") end
  function h.rsets() return count("rsets") end
  function h.message(n) return helper.read(dir .. "/" .. n .. ".eml") end
  function h.envelope(n) return helper.read(dir .. "/" .. n .. ".env") end
  function h.peer(n) return helper.read(dir .. "/" .. n .. ".peer") end
  function h.stop() stop(proc) end
  -- Ready once the controller has printed "ready" (it has then made its own trigger connection).
  for _ = 1, 200 do
    if proc:output():match("^ready\n") then return h end
    if not proc:alive() then break end
    helper.sleep(0.05)
  end
  local out = proc:output()
  stop(proc)
  error("aiosmtpd peer did not start:\n" .. out)
end

return M
