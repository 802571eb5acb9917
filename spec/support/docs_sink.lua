-- The server that spec/docs_spec.lua and spec/examples_spec.lua run documentation blocks and
-- examples against: smtp.server in its own process, STARTTLS with the test certificate, AUTH
-- that takes any credentials except the password "wrong-password" (so an example can show the
-- auth error), 550 5.1.1 for recipients starting with "nobody@", each message stored as
-- OUTDIR/<n>.eml with a first line "<sender> -> <recipients>".
-- usage: lua docs_sink.lua PORT CERT KEY OUTDIR
local server = require "smtp.server"

local port, cert, key, outdir = tonumber(arg[1]), arg[2], arg[3], arg[4]
local n = 0
local srv = assert(server.listen {
  host = "127.0.0.1", port = port, hostname = "sink.docs.test",
  tls = { cert = cert, key = key },
  auth = function(_, _, _, secret) return secret ~= "wrong-password" end,
  on_rcpt = function(_, rcpt)
    if rcpt:match("^nobody@") then return false, 550, "5.1.1 no such user" end
    return true
  end,
  on_message = function(_, envelope, reader)
    local parts = {}
    for chunk in reader:chunks() do parts[#parts + 1] = chunk end
    n = n + 1
    local f = assert(io.open(("%s/%d.eml"):format(outdir, n), "wb"))
    f:write(envelope.from, " -> ", table.concat(envelope.to, ","), "\n", table.concat(parts))
    f:close()
    return true
  end,
})
io.stdout:write("listening on ", srv.port, "\n"); io.stdout:flush()
srv:serve()
