-- smtp: send mail through a submission server (smtp.send, smtp.connect and the session methods)
-- and direct delivery (smtp.deliver). This is the public face; the work is done by
-- smtp.config (options), smtp.session (a connection), smtp.transaction and smtp.batch (sending),
-- over the C engine (core.client_engine) and a transport (smtp.transport.native by default).
local config = require "smtp.config"
local session = require "smtp.session"
local batch = require "smtp.batch"
local observe = require "smtp.observe"

local M = { _VERSION = "0.1.0" }

M.DEFAULT_TIMEOUTS = config.DEFAULT_TIMEOUTS
-- smtp.check_address(addr, what [, allow_null]) -> true, needs_smtputf8 | nil, err
M.check_address = require("smtp.check").address

-- smtp.counters() -> a copy of the process-wide client counters (connections, tls, auth,
-- transactions, recipients, deliver outcomes, retries and their failures)
M.counters = observe.snapshot

-- smtp.connect{...} or smtp.connect(url) -> conn | nil, err
function M.connect(opts)
  if type(opts) == "string" then opts = { url = opts } end
  local cfg, err = config.connection(opts, "connect")
  if not cfg then return nil, err end
  observe.check(opts, "connect")
  local conn = session.new(cfg, false, opts)
  local ok
  ok, err = conn:_open()
  if not ok then conn:_abort(); return nil, err end
  return conn
end

-- smtp.send{...}: connect, one transaction, QUIT (or back to the pool inside nginx). Everything
-- is checked before connecting.
function M.send(opts)
  local cfg, err = config.connection(opts, "send")
  if not cfg then return nil, err end
  local d
  d, err = config.message(opts, "send")
  if not d then return nil, err end
  observe.check(opts, "send")
  -- opts.limits (smtp.limits): a connection slot and a message of the server's "host:port"
  local lim, dest = opts.limits, nil
  if lim ~= nil then
    local limits = require "smtp.limits"
    if not limits.is(lim) then error("bad argument #1 to 'send' (limits: smtp.limits expected)", 2) end
    dest = cfg.server .. ":" .. cfg.port
    lim:wait(dest, "connection")
    lim:wait(dest, "message")
  end
  local conn = session.new(cfg, true, opts)
  local ok
  ok, err = conn:_open()
  if not ok then
    conn:_abort()
    if lim then lim:release(dest, require("smtp.limits").outcome(err)) end
    return nil, err
  end
  local res
  res, err = batch.run_one(conn, d)
  if not conn:_release() then conn:close() end
  if lim then lim:release(dest, require("smtp.limits").outcome(err)) end
  return res, err
end

function M.deliver(opts) return require("smtp.deliver").deliver(opts) end

-- smtp.background{...} -> id | nil, err: inside nginx, queue a message in a lua_shared_dict and
-- send it from a timer (smtp.background.start, .status, .stats)
M.background = require "smtp.background"

return M
