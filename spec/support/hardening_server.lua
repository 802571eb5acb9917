-- A smtp.server run as its own process for the resource-exhaustion specs (so its memory can be
-- read from /proc): prints "ready PORT", then one "msg N RCPTS BYTES" line per message, and
-- "active N" whenever asked through a NOOP-free side channel: the file given as arg 3 is
-- rewritten with the active-session count every 0.1 s.
-- usage: lua hardening_server.lua PORT MAX_CONNECTIONS STATUS_FILE
local server = require "smtp.server"
local loop = require "smtp.loop"
io.stdout:setvbuf("line")
local port, maxc, status = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local n = 0
local srv = assert(server.listen {
  host = "127.0.0.1", port = port, hostname = "mx.test", timeout = 30,
  max_connections = maxc, max_message_size = 1024 * 1024, max_recipients = 100,
  on_message = function(_, env, reader)
    local bytes = 0
    for c in reader:chunks() do bytes = bytes + #c end
    n = n + 1
    print(("msg %d %d %d"):format(n, #env.to, bytes))
    return true
  end,
})
loop.spawn(function()
  while true do
    local f = io.open(status .. ".tmp", "w")
    f:write(("active %d msgs %d\n"):format(srv.active, n))
    f:close()
    os.rename(status .. ".tmp", status)
    loop.sleep(0.1)
  end
end)
print("ready " .. srv.port)
srv:serve()
