-- An smtp.server run as its own process for the REQUIRETLS specs: STARTTLS with the given
-- certificate, REQUIRETLS advertised or not; prints "ready", then "msg FROM requiretls=BOOL tls=BOOL"
-- per message received.
-- usage: lua requiretls_server.lua HOST PORT CERT KEY REQUIRETLS(0|1)
local server = require "smtp.server"
io.stdout:setvbuf("line")
local host, port, cert, key, rt = arg[1], tonumber(arg[2]), arg[3], arg[4], arg[5] == "1"
local srv = assert(server.listen {
  host = host, port = port, hostname = "mx.test", timeout = 30, requiretls = rt,
  tls = { cert = cert, key = key },
  on_message = function(session, env, reader)
    for _ in reader:chunks() do end
    print(("msg %s requiretls=%s tls=%s"):format(env.from, tostring(env.requiretls == true),
      tostring(session.tls ~= nil and session.tls ~= false)))
    return true
  end,
})
print("ready " .. srv.port)
srv:serve()
