-- Peers for the `lua-smtp send` direct-delivery specs: an aiosmtpd MX host on port 25 of a loopback address of its own
-- (MX records carry no port, so `lua-smtp send` without --server always dials 25) that stores each
-- message's bytes and envelope in files and counts the connections it accepts.
local helper = require "helper"
local dnsmasq = require "support.dnsmasq"

local M = {}

local mxhost_py = [[
import os, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
host, port, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count = [0]

class Handler:
    async def handle_DATA(self, server, session, envelope):
        count[0] += 1
        base = os.path.join(outdir, "msg-%d" % count[0])
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".env", "w") as f:
            f.write(envelope.mail_from + "\n" + "\n".join(envelope.rcpt_tos) + "\n")
        return "250 2.0.0 stored %d" % count[0]

class Counting(SMTP):
    def connection_made(self, transport):
        with open(os.path.join(outdir, "connections"), "a") as f:
            f.write("c\n")
        super().connection_made(transport)

class C(Controller):
    def factory(self):
        return Counting(self.handler, **self.SMTP_kwargs)

try:
    c = C(Handler(), hostname=host, port=port, ready_timeout=10)
    c.start()
except Exception as e:
    print("failed", e, flush=True)
    sys.exit(1)
print("ready", flush=True)
while True:
    time.sleep(3600)
]]

-- M.mxhost() -> { ip=, port=25, dir=, proc=, stop(), messages(), connections() } on a random
-- 127.x.y.z (tried up to 8 times: another run may hold port 25 of one address).
-- messages() is a list of { data = <bytes as received>, from =, to = {...} } in arrival order.
function M.mxhost()
  helper.need("aiosmtpd")
  local dir = helper.tmpdir()
  helper.write(dir .. "/mxhost.py", mxhost_py)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  local proc, ip
  for _ = 1, 8 do
    ip = ("127.%d.%d.%d"):format(math.random(100, 250), math.random(1, 250), math.random(2, 250))
    proc = helper.spawn(dnsmasq.argv_clean { helper.python, "-u", dir .. "/mxhost.py", ip, "25", dir },
      { limit = 300 })
    for _ = 1, 200 do
      local o = proc:output()
      if o:match("ready") or o:match("failed") or not proc:alive() then break end
      helper.sleep(0.05)
    end
    if proc:output():match("ready") then break end
    proc:stop()
    proc = nil
  end
  assert(proc, "no MX host could listen on port 25 of a loopback address")
  local h = { ip = ip, port = 25, dir = dir, proc = proc }
  function h.stop() proc:stop() end
  function h.connections()
    local n = 0
    for _ in (helper.read(dir .. "/connections") or ""):gmatch("c\n") do n = n + 1 end
    return n
  end
  function h.messages()
    local list = {}
    for i = 1, math.huge do
      local data = helper.read(dir .. "/msg-" .. i .. ".eml")
      if not data then break end
      local env = helper.read(dir .. "/msg-" .. i .. ".env") or ""
      local lines = {}
      for l in env:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
      list[i] = { data = data, from = lines[1], to = { (table.unpack or unpack)(lines, 2) } }
    end
    return list
  end
  return h
end

return M
