-- Handlers for examples/openresty/nginx.conf: sending mail from nginx with lua-smtp.
-- report(): a content handler that mails the request body as a CSV attachment (smtp.message +
-- smtp.send over cosockets: the worker keeps serving other requests while the mail goes out).
-- notify_later(): for the log phase, which has no cosockets: the mail goes from a timer.
-- start_queue() (init_worker) and signup(): smtp.background queues the mail in a shared dict and
-- the request is answered at once; mail_status() reads what became of a queued message.
local smtp = require "smtp"
local message = require "smtp.message"

local ngx = ngx
local M = {}

-- Where the mail goes, from the environment (see the `env` lines in nginx.conf).
local function settings()
  local user = os.getenv("SMTP_USER")
  return {
    server = os.getenv("SMTP_SERVER") or "localhost",
    port = tonumber(os.getenv("SMTP_PORT") or ""),        -- nil: 587 for STARTTLS
    auth = user and { user = user, password = os.getenv("SMTP_PASSWORD") } or nil,
    from = os.getenv("MAIL_FROM") or "nginx@localhost",
    to = os.getenv("MAIL_TO") or "postmaster@localhost",
  }
end

local function send(msg, cfg)
  return smtp.send {
    server = cfg.server, port = cfg.port,
    tls = "starttls",            -- required; checked against lua_ssl_trusted_certificate
    auth = cfg.auth,
    message = msg,
    timeout = { connect = 5, greeting = 10, data_end = 30 },
  }
end

-- POST /report[?to=addr]: the body becomes report.csv.
function M.report()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if not body then
    local file = ngx.req.get_body_file()   -- large bodies are spooled to a temp file
    if file then
      local f = io.open(file, "rb")
      if f then body = f:read("*a"); f:close() end
    end
  end
  local cfg = settings()
  local to = ngx.var.arg_to or cfg.to
  local msg, err = message.new {
    from = cfg.from, to = { to },
    subject = "Report from " .. ngx.var.host,
    text = "The report you asked for is attached.\n",
    attachments = { { filename = "report.csv", content = body or "", content_type = "text/csv" } },
  }
  if not msg then
    ngx.status = ngx.HTTP_BAD_REQUEST
    ngx.say("bad message: ", tostring(err))
    return
  end
  local res
  res, err = send(msg, cfg)
  if not res then
    ngx.status = ngx.HTTP_BAD_GATEWAY
    ngx.say("not sent: ", tostring(err))
    return
  end
  ngx.say("sent ", tostring(res.message_id), " to ", table.concat(res.accepted, ", "),
    ": ", res.reply.code, " ", res.reply.text)
end

-- log_by_lua: nothing here may wait on a socket, and smtp.send would fail at once with an error
-- that says so. A zero-delay timer runs the send right after the request, with cosockets.
function M.notify_later()
  local cfg = settings()
  local uri, status = ngx.var.request_uri, ngx.status
  local ok, err = ngx.timer.at(0, function(premature)
    if premature then return end      -- nginx is shutting down
    local msg = message.new {
      from = cfg.from, to = { cfg.to },
      subject = "nginx served " .. uri,
      text = "Request " .. uri .. " answered with status " .. status .. ".\n",
    }
    local res, serr = send(msg, cfg)
    if not res then ngx.log(ngx.ERR, "notify mail not sent: ", tostring(serr)) end
  end)
  if not ok then ngx.log(ngx.ERR, "could not start the mail timer: ", err) end
end

-- init_worker_by_lua: every worker runs a loop that sends what the handlers queue (any worker
-- may send any message; each is sent once). Connection settings live here, not in the queue.
function M.start_queue()
  local cfg = settings()
  assert(smtp.background.start {
    dict = "smtp_queue",
    server = cfg.server, port = cfg.port, tls = "starttls", auth = cfg.auth,
    timeout = { connect = 5, greeting = 10, data_end = 30 },
    retry = { initial = 30, max_delay = 1800, max_age = 2 * 86400 },
    on_failure = function(id, st)
      ngx.log(ngx.ERR, "mail ", id, " not delivered (", st.state, "): ",
        tostring(st.error and st.error.text), " failed: ", table.concat(st.failed or {}, ", "))
    end,
  })
end

-- POST /signup?email=ADDR: a welcome mail, queued; the answer does not wait for SMTP.
function M.signup()
  local cfg = settings()
  local email = ngx.var.arg_email
  local msg, err = message.new {
    from = cfg.from, to = { email },
    subject = "Welcome",
    text = "Thank you for signing up.\n",
  }
  if not msg then
    ngx.status = ngx.HTTP_BAD_REQUEST
    ngx.say("bad address: ", tostring(err))
    return
  end
  local id
  id, err = smtp.background { message = msg }
  if not id then
    -- kind "full": the queue has no room; the caller may try again later
    ngx.status = err.kind == "full" and ngx.HTTP_SERVICE_UNAVAILABLE or ngx.HTTP_BAD_REQUEST
    ngx.say("not queued: ", tostring(err))
    return
  end
  ngx.status = 202
  ngx.say("queued ", id)
end

-- GET /mail-status?id=ID
function M.mail_status()
  local st, err = smtp.background.status(ngx.var.arg_id or "")
  if not st then
    ngx.status = ngx.HTTP_NOT_FOUND
    ngx.say(err)
    return
  end
  ngx.say(st.state, " after ", tostring(st.attempts), " attempt(s)")
end

return M
