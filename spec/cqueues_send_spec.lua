-- smtp.send inside a cqueues controller: fifty sends to a server that takes 0.5 s to accept each
-- message overlap, so the whole batch takes about the time of one send, not fifty.
local helper = require "helper"
local core = require "smtp.core"
local smtp = require "smtp"

local has_cqueues, cqueues = pcall(require, "cqueues")

-- aiosmtpd whose DATA handler sleeps (asynchronously) before accepting, and counts messages.
local SLOW_SERVER = [[
import asyncio, sys, time
from aiosmtpd.controller import Controller
class Slow:
    count = 0
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(float(sys.argv[2]))
        Slow.count += 1
        with open(sys.argv[3], "w") as f: f.write(str(Slow.count))
        return "250 2.0.0 OK"
c = Controller(Slow(), hostname="127.0.0.1", port=int(sys.argv[1]))
c.start()
print("ready", flush=True)
while True: time.sleep(1)
]]

describe("smtp.send under cqueues", function()
  if not has_cqueues then
    it("needs cqueues", function() helper.need("cqueues") end)
    return
  end

  local proc
  after_each(function() if proc then proc:stop() end end)

  it("overlaps 50 sends to a slow server in one controller", function()
    local dir = helper.tmpdir()
    helper.need("aiosmtpd")
    helper.write(dir .. "/slow.py", SLOW_SERVER)
    local port = helper.free_port()
    proc = helper.spawn { helper.python, dir .. "/slow.py", tostring(port), "0.5", dir .. "/count" }
    assert.is_true(helper.wait_port("127.0.0.1", port, 15), proc:output())

    local cq = cqueues.new()
    local ok, failures = 0, {}
    local t0 = core.now()
    for i = 1, 50 do
      cq:wrap(function()
        local res, err = smtp.send {
          server = "127.0.0.1", port = port, tls = "none", timeout = 20,
          from = "a@example.com", to = { "b" .. i .. "@example.org" },
          message = "Subject: " .. i .. "\r\n\r\nbody " .. i .. "\r\n",
        }
        if res then ok = ok + 1 else failures[#failures + 1] = tostring(err) end
      end)
    end
    assert(cq:loop(60))
    local dt = core.now() - t0
    assert.same({}, failures)
    assert.equal(50, ok)
    assert.equal("50", helper.read(dir .. "/count"))
    -- One send takes at least 0.5 s; fifty in sequence would take 25 s.
    assert.is_true(dt < 5, "50 sends took " .. dt .. " s")
  end)
end)
