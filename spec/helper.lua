-- Shared test setup: temp dirs, free loopback ports, starting real peers by PID with a time
-- bound, waiting for them, and TLS material made at test time.
local helper = {}

-- Under `make test-asan` the interpreter runs with the ASan runtime preloaded. Peers (curl, nginx,
-- python, dnsmasq) must not inherit it: some deadlock or die under it. Our own Lua processes need it.
local PRELOAD_VARS = { "LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS" }
local strip = "unset " .. table.concat(PRELOAD_VARS, " ") .. "; "
helper.preload = {}
for _, v in ipairs(PRELOAD_VARS) do helper.preload[v] = os.getenv(v) end

local function sh(cmd)
  local p = assert(io.popen(strip .. cmd, "r"))
  local out = p:read("a") or p:read("*a")
  local ok, _, code = p:close()
  return out, ok, code
end
helper.sh = sh

function helper.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
local q = helper.quote

-- The checkout's top directory (this file is spec/helper.lua).
do
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local dir = src:match("^(.*)/spec/[^/]*$")
  if dir and not dir:match("^/") then dir = (os.getenv("PWD") or ".") .. "/" .. dir end
  helper.root = dir or os.getenv("PWD") or "."
end
helper.lua = os.getenv("SMTP_TEST_LUA") or "lua5.4"

-- The interpreter as a shell command word for helper.sh (which strips the sanitizer runtime from
-- what it runs): our own Lua gets it back, as helper.spawn gives it.
function helper.lua_cmd()
  local env = {}
  for k, v in pairs(helper.preload) do env[#env + 1] = k .. "=" .. helper.quote(v) end
  if #env == 0 then return helper.lua end
  return "env " .. table.concat(env, " ") .. " " .. helper.lua
end
helper.python = "/usr/bin/python3"

-- A fresh directory removed at exit of the process (best effort).
local made = {}
function helper.tmpdir()
  local d = sh("mktemp -d /tmp/lua-smtp-test.XXXXXX"):gsub("%s+$", "")
  made[#made + 1] = d
  return d
end

function helper.write(path, data)
  local f = assert(io.open(path, "wb")); f:write(data); f:close()
end

function helper.read(path)
  local f = io.open(path, "rb"); if not f then return nil end
  local d = f:read("a") or f:read("*a"); f:close(); return d
end

-- True while process `pid` runs; a zombie (exited, not yet reaped) counts as gone. Reads
-- /proc/<pid>/stat rather than running ps: a minimal Debian root has no procps.
function helper.alive(pid)
  local f = io.open("/proc/" .. tostring(pid) .. "/stat", "rb")
  if not f then return false end
  local st = f:read("a") or f:read("*a") or ""
  f:close()
  -- The state letter follows the command name's closing parenthesis (the name may hold any byte).
  local state = st:match(".*%) (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- What the specs run, and the Debian package (or package set) that brings it. need() checks the
-- capability itself, not that a package is installed: swaks without Net::SSLeay runs but has no TLS.
local NEEDS = {
  swaks = { "command -v swaks", "swaks" },
  ["swaks TLS"] = { "swaks --support 2>&1 | grep -q '^=== TLS supported'", "libnet-ssleay-perl" },
  curl = { "command -v curl", "curl" },
  msmtp = { "command -v msmtp", "msmtp" },
  perl = { "perl -MNet::SMTP -e 1", "perl" },
  python3 = { "test -x /usr/bin/python3", "python3" },
  aiosmtpd = { "/usr/bin/python3 -c 'import aiosmtpd.controller'", "python3-aiosmtpd" },
  dnspython = { "/usr/bin/python3 -c 'import dns.message'", "python3-dnspython" },
  ["python3 dkim"] = { "/usr/bin/python3 -c 'import dkim'", "python3-dkim" },
  ["python3 authres"] = { "/usr/bin/python3 -c 'import authres'", "python3-authres" },
  publicsuffix = { "test -s /usr/share/publicsuffix/public_suffix_list.dat", "publicsuffix" },
  ["python3 idna"] = { "/usr/bin/python3 -c 'import idna'", "python3-idna" },
  ["python3 icalendar"] = { "/usr/bin/python3 -c 'import icalendar'", "python3-icalendar" },
  idn2 = { "command -v idn2", "idn2" },
  ["smtp-sink"] = { "command -v smtp-sink", "postfix" },
  ["smtp-source"] = { "command -v smtp-source", "postfix" },
  postfix = { "test -x /usr/sbin/postfix || command -v postfix", "postfix" },
  nginx = { "command -v nginx || test -x /usr/sbin/nginx", "nginx libnginx-mod-http-lua" },
  dnsmasq = { "command -v dnsmasq || test -x /usr/sbin/dnsmasq", "dnsmasq-base" },
  openssl = { "command -v openssl", "openssl" },
  luarocks = { "command -v luarocks", "luarocks" },
  script = { "command -v script", "bsdutils" },
  cqueues = { function() return (pcall(require, "cqueues")) end, "lua-cqueues" },
  microsocks = { "command -v microsocks", "microsocks" },
  tinyproxy = { "command -v tinyproxy", "tinyproxy-bin" },
  haproxy = { "command -v haproxy || test -x /usr/sbin/haproxy", "haproxy" },
  ["nginx lua"] = { function() return require("support.nginx").available() end, "nginx libnginx-mod-http-lua" },
}
local have = {}

-- Fails the running spec, naming the Debian package to install, unless `what` (a NEEDS key) works.
function helper.need(what)
  local n = assert(NEEDS[what], "helper.need: unknown peer " .. tostring(what))
  if have[what] == nil and type(n[1]) == "function" then
    have[what] = n[1]() and true or false
  elseif have[what] == nil then
    -- The shell prints the verdict: LuaJIT's popen close reports no exit status.
    have[what] = sh("PATH=\"$PATH:/usr/sbin:/sbin\"; { " .. n[1] .. "; } >/dev/null 2>&1 && echo yes")
      :match("yes") ~= nil
  end
  if not have[what] then
    error(("missing peer: %s (install the Debian package%s %s; `make deps` does)"):format(
      what, n[2]:find(" ") and "s" or "", n[2]), 2)
  end
end

-- need() for a command line about to run: its program, and for swaks the TLS it is asked for.
local by_program = { swaks = "swaks", curl = "curl", msmtp = "msmtp", perl = "perl", python3 = "python3",
  ["smtp-sink"] = "smtp-sink", ["smtp-source"] = "smtp-source", nginx = "nginx", dnsmasq = "dnsmasq",
  openssl = "openssl", luarocks = "luarocks", script = "script", microsocks = "microsocks",
  tinyproxy = "tinyproxy", haproxy = "haproxy" }
function helper.need_argv(argv)
  local prog = tostring(argv[1] or ""):match("([^/]+)$") or ""
  if by_program[prog] then helper.need(by_program[prog]) end
  if prog == "swaks" then
    for i = 2, #argv do
      local a = argv[i]
      if a == "-tls" or a == "--tls" or a == "-tlsc" or a == "--tls-on-connect" or a == "--tlsc"
        or a == "-tlso" or a == "--tls-optional" or a == "-tlsos" or a == "--tls-optional-strict" then
        helper.need("swaks TLS")
        break
      end
    end
  end
end

-- Sleeps without a scheduler (tests only).
function helper.sleep(s) sh("sleep " .. tostring(s)) end

-- A TCP port on `host` that nothing listens on right now (the kernel picks it).
function helper.free_port(host)
  host = host or "127.0.0.1"
  local out = sh(helper.python .. " -c " .. q(
    "import socket,sys\n" ..
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n" ..
    "s.bind((sys.argv[1],0)); print(s.getsockname()[1])") .. " " .. q(host))
  return assert(tonumber(out), "free_port: " .. tostring(out))
end

-- True once something accepts TCP connections on host:port, false after `timeout` seconds.
function helper.wait_port(host, port, timeout)
  local out = sh(helper.python .. " -c " .. q(
    "import socket,sys,time\n" ..
    "end=time.time()+float(sys.argv[3])\n" ..
    "while time.time()<end:\n" ..
    "  try:\n" ..
    "    socket.create_connection((sys.argv[1],int(sys.argv[2])),0.5).close(); print('up'); break\n" ..
    "  except OSError: time.sleep(0.05)\n") .. " " .. q(host) .. " " .. port .. " " .. (timeout or 10))
  return out:match("up") ~= nil
end

-- Starts a command in the background, bounded by `limit` seconds (default 600), with its output
-- in a log file. Returns a process handle; :stop() kills exactly that PID.
local procs = {}
function helper.spawn(argv, opts)
  opts = opts or {}
  helper.need_argv(argv)
  local parts = {}
  for i, a in ipairs(argv) do parts[i] = q(a) end
  local log = opts.log or (helper.tmpdir() .. "/out.log")
  local env = ""
  -- Our own Lua (lua5.4, luajit, bin/lua-smtp) keeps the sanitizer runtime; peers do not.
  local ours = opts.preload
  if ours == nil then
    local a1 = argv[1] or ""
    ours = a1:match("^lua") or a1:match("/lua[%d.]*$") or a1:match("luajit$") or a1:match("bin/lua%-smtp$")
  end
  if ours then
    for k, v in pairs(helper.preload) do env = env .. k .. "=" .. q(v) .. " " end
  end
  for k, v in pairs(opts.env or {}) do env = env .. k .. "=" .. q(v) .. " " end
  local cmd = string.format("%s exec timeout -s TERM %d %s >%s 2>&1 </dev/null & echo $!",
    env, opts.limit or 600, table.concat(parts, " "), q(log))
  if opts.cwd then cmd = "cd " .. q(opts.cwd) .. " && " .. cmd end
  local pid = tonumber((sh("sh -c " .. q(cmd))))
  assert(pid, "spawn failed: " .. cmd)
  local p = { pid = pid, log = log }
  -- A zombie counts as gone: PID 1 here may reap late, and kill -0 succeeds on zombies.
  function p:alive() return helper.alive(self.pid) end
  function p:stop(sig)
    if self.stopped then return end
    self.stopped = true
    sh("kill -" .. (sig or "TERM") .. " " .. self.pid .. " 2>/dev/null")
    for _ = 1, 50 do
      if not self:alive() then return end
      sh("sleep 0.05")
    end
    sh("kill -KILL " .. self.pid .. " 2>/dev/null")
  end
  function p:output() return helper.read(self.log) or "" end
  procs[#procs + 1] = p
  return p
end

function helper.stop_all()
  for _, p in ipairs(procs) do p:stop() end
  procs = {}
end

-- TLS material made at test time in `dir` (default a new temp dir): a CA, a server certificate for
-- localhost and 127.0.0.1 signed by it, one for a wrong name, an expired one, a self-signed one,
-- and a second CA that signed nothing the server uses. Returns a table of paths.
local cert_cache
function helper.certs(dir)
  if cert_cache and not dir then return cert_cache end
  dir = dir or helper.tmpdir()
  local out = sh("bash " .. q(helper.root .. "/scripts/make-certs.sh") .. " " .. q(dir))
  assert(out:match("ok"), "certificate generation failed: " .. out)
  local c = { dir = dir }
  for _, n in ipairs { "ca", "other-ca", "server", "wrong", "expired", "self" } do
    c[n:gsub("-", "_")] = dir .. "/" .. n .. ".pem"
    c[n:gsub("-", "_") .. "_key"] = dir .. "/" .. n .. ".key"
  end
  c.server_chain = dir .. "/server-chain.pem"
  if not cert_cache then cert_cache = c end
  return c
end

-- Reads an smtp.server reader to its end in pieces of `piece` bytes: the data, or nil when the
-- reader reports the message refused or the client gone.
function helper.read_message(reader, piece)
  local parts = {}
  while true do
    local c, err = reader:read(piece)
    if not c then
      if err then return nil end
      return table.concat(parts)
    end
    parts[#parts + 1] = c
  end
end

return helper
