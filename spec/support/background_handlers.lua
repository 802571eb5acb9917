-- Handlers for spec/background_spec.lua's nginx: starting the smtp.background loop in each worker
-- (init_worker_by_lua) and content handlers that queue a message, read its status and the
-- queue's figures, each printing one plain line.
local M = {}

local ngx = rawget(_G, "ngx")
local background = require "smtp.background"

-- init_worker: the queue `dict`, sending to 127.0.0.1:port with STARTTLS (the test CA is
-- lua_ssl_trusted_certificate), retrying after about 0.5 s, then 1 s at most.
function M.init(dict, port, extra)
  local cfg = {
    dict = dict, server = "localhost", port = port, helo = "client.test", interval = 0.2,
    concurrency = 8, timeout = 5, retry = { initial = 0.5, max_delay = 1, jitter = 0.25 },
    on_failure = function(id, st)
      ngx.log(ngx.WARN, "BGFAILED ", id, " ", st.state, " ", tostring(st.error and st.error.text))
    end,
  }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  assert(background.start(cfg))
end

-- /queue?n=N[&size=BYTES][&to=ADDR,ADDR]: one message whose Message-ID names N.
function M.queue()
  local n = ngx.var.arg_n or "0"
  local body = "request " .. n .. "\r\n"
  local size = tonumber(ngx.var.arg_size)
  if size then body = body .. (("x"):rep(76) .. "\r\n"):rep(math.ceil(size / 78)) end
  local raw = "From: a@client.test\r\nTo: b@smtpd.test\r\nSubject: background " .. n
    .. "\r\nMessage-ID: <bg-" .. n .. "@client.test>\r\n\r\n" .. body
  local to = {}
  for a in (ngx.var.arg_to or "b@smtpd.test"):gmatch("[^,]+") do to[#to + 1] = a end
  local id, err = background { message = raw, from = "a@client.test", to = to }
  if not id then
    ngx.status = 503
    ngx.say("error ", err.kind, " ", tostring(err))
    return
  end
  ngx.say("queued ", id)
end

-- /status?id=ID
function M.status()
  local st, err = background.status(ngx.var.arg_id)
  if not st then ngx.say("none ", err); return end
  ngx.say(st.state, " attempts=", tostring(st.attempts), " error=",
    tostring(st.error and st.error.text or (st.last_error and st.last_error.text)),
    " sent=", table.concat(st.sent or {}, ","), " failed=", table.concat(st.failed or {}, ","),
    st.claimed_by and (" by=" .. st.claimed_by) or "")
end

-- /stats
function M.stats()
  local s = background.stats()
  ngx.say("queued=", s.queued, " accepted=", s.accepted, " low=", s.low)
end

return M
