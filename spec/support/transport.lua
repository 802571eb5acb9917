-- Peers for the transport specs: a small Python TCP server (echo, delayed echo, silent, reset,
-- half-close) and a TLS echo server, each started with helper.spawn on a free loopback port.
local helper = require "helper"

local M = {}

local server_py = [[
import socket, sys, threading, time, ssl
mode, port = sys.argv[1], int(sys.argv[2])
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
host = sys.argv[4] if len(sys.argv) > 4 else '127.0.0.1'
ls = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port)); ls.listen(1024)
keep = []
def serve(c):
    try:
        if mode == 'echo':
            while True:
                d = c.recv(65536)
                if not d: break
                if delay: time.sleep(delay)
                c.sendall(d)
        elif mode == 'silent':
            keep.append(c); time.sleep(3600)
        elif mode == 'reset':
            c.recv(1)
            import struct
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            c.close(); return
        elif mode == 'halfclose':
            c.shutdown(socket.SHUT_WR); keep.append(c); time.sleep(3600)
        elif mode == 'hello':
            c.sendall(b'hello\n'); c.shutdown(socket.SHUT_WR); keep.append(c); time.sleep(3600)
    except OSError:
        pass
    finally:
        if mode in ('echo', 'reset'): c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]]

-- Starts a peer: mode is "echo", "silent", "reset", "halfclose" or "hello". Returns proc, port.
function M.peer(mode, opts)
  opts = opts or {}
  local host = opts.host or "127.0.0.1"
  local port = helper.free_port(host)
  local dir = helper.tmpdir()
  helper.write(dir .. "/peer.py", server_py)
  local p = helper.spawn({ helper.python, dir .. "/peer.py", mode, tostring(port),
    tostring(opts.delay or 0), host }, { limit = opts.limit or 120 })
  assert(helper.wait_port(host, port, 10), "peer did not start: " .. p:output())
  return p, port
end

return M
