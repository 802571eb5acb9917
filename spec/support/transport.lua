-- Peers for the transport specs: one small Python process listening on one loopback port per
-- behaviour (echo, slow echo, silent, reset, half-close), started with helper.spawn.
local helper = require "helper"

local M = {}

local server_py = [[
import socket, sys, threading, time, struct
host, delay = sys.argv[1], float(sys.argv[2])
keep = []
def serve(mode, c):
    try:
        if mode in ('echo', 'slowecho'):
            while True:
                d = c.recv(65536)
                if not d: break
                if mode == 'slowecho': time.sleep(delay)
                c.sendall(d)
        elif mode == 'silent':
            keep.append(c); return
        elif mode == 'reset':
            c.recv(1)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        elif mode == 'hello':
            c.sendall(b'hello\n'); c.shutdown(socket.SHUT_WR); keep.append(c); return
    except OSError:
        pass
    c.close()
def run(mode, ls):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(mode, c), daemon=True).start()
ports = []
for mode in sys.argv[3:]:
    ls = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
    ls.bind((host, 0)); ls.listen(1024)
    ports.append('%s=%d' % (mode, ls.getsockname()[1]))
    threading.Thread(target=run, args=(mode, ls), daemon=True).start()
print(' '.join(ports), flush=True)
while True: time.sleep(3600)
]]

M.modes = { "echo", "slowecho", "silent", "reset", "hello" }

-- Starts the peer process. Returns proc and a table mode -> port. opts.delay: slowecho's delay.
function M.peers(opts)
  opts = opts or {}
  local host = opts.host or "127.0.0.1"
  local dir = helper.tmpdir()
  helper.write(dir .. "/peer.py", server_py)
  local argv = { helper.python, dir .. "/peer.py", host, tostring(opts.delay or 0.2) }
  for _, m in ipairs(M.modes) do argv[#argv + 1] = m end
  local p = helper.spawn(argv, { limit = opts.limit or 300 })
  local ports
  for _ = 1, 200 do
    local out = p:output()
    if out:find("\n") then
      ports = {}
      for m, port in out:gmatch("(%w+)=(%d+)") do ports[m] = tonumber(port) end
      break
    end
    helper.sleep(0.05)
  end
  assert(ports and ports.echo, "peer did not start: " .. p:output())
  return p, ports
end

-- Stops a spawned peer by its PID. Unlike helper's p:stop() it counts a zombie as gone: when
-- PID 1 does not reap orphans, `kill -0` keeps succeeding and p:stop() would wait 2.5 s each time.
function M.stop(p)
  if p.stopped then return end
  p.stopped = true
  helper.sh("kill -TERM " .. p.pid .. " 2>/dev/null")
  for _ = 1, 100 do
    local stat = helper.read("/proc/" .. p.pid .. "/stat")
    if not stat or stat:match("^%d+ %b() Z") then return end
    helper.sleep(0.02)
  end
  helper.sh("kill -KILL " .. p.pid .. " 2>/dev/null")
end

-- One behaviour only: returns proc, port.
function M.peer(mode, opts)
  local p, ports = M.peers(opts)
  return p, ports[mode]
end

return M
