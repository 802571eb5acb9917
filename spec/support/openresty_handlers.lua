-- Request handlers run inside the spec's nginx (required from content_by_lua_block): they drive
-- smtp.transport.ngx and smtp.send against the spec's SMTP peers and print what happened.
local M = {}

local ngx = rawget(_G, "ngx")

local function arg(name) return ngx.var["arg_" .. name] end

-- Reads one whole SMTP reply (all lines up to "NNN text\r\n") through the transport.
local function reply(s, buf)
  buf = buf or { data = "" }
  while true do
    local from = 1
    while true do
      local e = buf.data:find("\r\n", from, true)
      if not e then break end
      local line = buf.data:sub(from, e - 1)
      if line:match("^%d%d%d ") or line:match("^%d%d%d$") then
        local r = buf.data:sub(1, e + 1)
        buf.data = buf.data:sub(e + 2)
        return r
      end
      from = e + 2
    end
    local chunk, err = s:read(5, 4096)
    if not chunk then return nil, err end
    buf.data = buf.data .. chunk
  end
end

local function fail(what, err)
  ngx.status = 500
  ngx.say(what, ": ", tostring(err))
  return ngx.exit(500)
end

-- /transport?port=N&servername=localhost: a whole session by hand over the cosocket transport:
-- greeting, EHLO, STARTTLS, TLS handshake, EHLO, one message, QUIT.
function M.transport()
  local t = require("smtp.transport").get()
  local s, err = t.connect { host = "127.0.0.1", port = tonumber(arg("port")), timeout = 5 }
  if not s then return fail("connect", err) end
  local out = {}
  local buf = { data = "" }
  local function step(cmd)
    if cmd then
      local ok, werr = s:write(cmd, 5)
      if not ok then return fail("write", werr) end
    end
    local r, rerr = reply(s, buf)
    if not r then return fail("read", rerr) end
    out[#out + 1] = r
    return r
  end
  step(nil)
  step("EHLO client.test\r\n")
  step("STARTTLS\r\n")
  local ok
  ok, err = s:starttls { servername = arg("servername") or "localhost", verify = arg("verify") ~= "0", timeout = 5 }
  if not ok then return fail("starttls", err) end
  out[#out + 1] = "TLS " .. tostring(s:info().tls) .. " " .. tostring(s:info().cipher) .. "\r\n"
  step("EHLO client.test\r\n")
  step("MAIL FROM:<a@client.test>\r\n")
  step("RCPT TO:<b@smtpd.test>\r\n")
  step("DATA\r\n")
  step("Subject: by hand\r\n\r\nline one\r\n..dot line\r\n.\r\n")
  step("QUIT\r\n")
  s:close()
  ngx.print(table.concat(out))
end

-- /phase: what the transport says in this phase (used from log_by_lua, header_filter, ...).
function M.phase_error()
  local t = require("smtp.transport").get()
  local s, err = t.connect { host = "127.0.0.1", port = 25, timeout = 1 }
  return s, err
end

return M
