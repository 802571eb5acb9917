-- MX hosts for the deliver specs: aiosmtpd on a loopback address (127.0.0.2, 127.0.0.3, ...) that
-- logs each accepted transaction as a JSON line and refuses the local parts it is told to; and a
-- host that greets with 421 (busy), for the "4xx greeting -> next host" path.
local helper = require "helper"
local dnsmasq = require "support.dnsmasq"

local M = {}

local sink_py = [[
import asyncio, json, sys, time
from aiosmtpd.controller import Controller
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
reject = set(sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else set()

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@")[0] in reject:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"
    async def handle_DATA(self, server, session, envelope):
        print(json.dumps({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                          "size": len(envelope.original_content or b"")}), flush=True)
        return "250 2.0.0 queued"

if mode == "busy":
    async def greet(reader, writer):
        writer.write(b"421 4.3.2 busy, try later\r\n")
        await writer.drain()
        writer.close()
    async def main():
        srv = await asyncio.start_server(greet, host, port)
        print("ready", flush=True)
        await srv.serve_forever()
    asyncio.run(main())
elif mode == "badtls":
    # Offers STARTTLS but can only speak TLS 1.1, which the client refuses: the handshake fails.
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[5], sys.argv[6])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    c = Controller(Handler(), hostname=host, port=port, ready_timeout=10, tls_context=ctx)
    c.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)
else:
    c = Controller(Handler(), hostname=host, port=port, ready_timeout=10)
    c.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)
]]

-- M.start(ip, port, {mode="sink"|"busy"|"badtls", reject={"nobody"}, cert=, key=}) -> handle with :stop() and
-- :transactions() (a list of {from=, to={...}, size=} in arrival order).
function M.start(ip, port, o)
  helper.need("aiosmtpd")
  o = o or {}
  local dir = helper.tmpdir()
  helper.write(dir .. "/sink.py", sink_py)
  local proc = helper.spawn(dnsmasq.argv_clean { helper.python, "-u", dir .. "/sink.py", ip, tostring(port),
    o.mode or "sink", table.concat(o.reject or {}, ","), o.cert or "", o.key or "" }, { limit = 300 })
  for _ = 1, 200 do
    if proc:output():match("ready") or not proc:alive() then break end
    helper.sleep(0.05)
  end
  assert(proc:output():match("ready"), "MX host did not start on " .. ip .. ":" .. port .. ": " .. proc:output())
  local h = { ip = ip, port = port, proc = proc }
  function h:stop() self.proc:stop() end
  function h:transactions()
    local list = {}
    for line in self.proc:output():gmatch("[^\n]+") do
      if line:sub(1, 1) == "{" then
        local from = line:match('"from": "([^"]*)"')
        local to = {}
        for addr in (line:match('"to": %[(.-)%]') or ""):gmatch('"([^"]*)"') do to[#to + 1] = addr end
        list[#list + 1] = { from = from, to = to, size = tonumber(line:match('"size": (%d+)')) }
      end
    end
    return list
  end
  return h
end

return M
