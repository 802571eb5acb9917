-- `lua-smtp sink`: a local catch-all SMTP server that stores every accepted message in a Maildir
-- or an mbox (fsync'd before the 250) and prints one line per message.
local core = require "smtp.core"
local loop = require "smtp.loop"
local server = require "smtp.server"
local args_mod = require "smtp.cli.args"

local M = {}

local usage = [[
usage: lua-smtp sink --listen HOST:PORT [--maildir DIR | --mbox FILE] [options]
  --listen HOST:PORT     where to listen (default 127.0.0.1:2525; port 0 picks one), or a
                         Unix socket's path (starting with /)
  --lmtp                 speak LMTP (RFC 2033): LHLO, one reply per recipient after the data
  --maildir DIR          store each message in DIR/new (tmp/ new/ cur/ are created)
  --mbox FILE            append each message to FILE under a lock (From_ lines quoted)
  --tls-cert F --tls-key F   offer STARTTLS with this certificate and key
  --tls-implicit         TLS from the first byte (port 465 style) instead of STARTTLS
  --auth USER:PASS       require AUTH (PLAIN/LOGIN) with these credentials
  --auth-env VAR         the same, USER:PASS taken from environment variable VAR
  --auth-file FILE       the same, USER:PASS taken from FILE (one final line end ignored),
                         so the password is not in the process's arguments
  --lock-wait SECONDS    how long a message waits for an mbox locked by another process
                         (default 10; other sessions go on meanwhile), then 451 4.3.0; a
                         delete in the web inbox waits as long
  --max-size BYTES       largest message accepted (552 beyond)
  --max-recipients N     recipients per message (452 beyond)
  --hostname NAME        name in the greeting and EHLO reply
  --reject-rcpt PATTERN  answer 550 5.1.1 to recipients matching PATTERN (a glob: * and ?,
                         case-insensitive), to test bounces; may be given more than once
  --timeout SECONDS      idle timeout per session (default 300)
  --fail AT[:ITEM]...    a fault on demand (smtp.faults; repeatable): AT is connect, ehlo,
                         mail, rcpt, data, data_end, starttls or auth; items: a code (452), an
                         enhanced code, a glob on the address (full@*), drop, refuse, delay=S,
                         times=N, hide=K1,K2, advertise=K1,K2, text=... (e.g. rcpt:452:full@*,
                         data_end:451, connect:drop, ehlo:hide=STARTTLS, mail:delay=5)
  --no-received          store the data without the Received header the sink adds
  --proxy-trusted NET    read a PROXY protocol header (v1 or v2: HAProxy's send-proxy) from
                         peers in NET (an address or CIDR network; repeatable); the client it
                         names is the one logged and written in Received. Other peers are closed
  --xclient-trusted NET  accept XCLIENT (Postfix's) from peers in NET (repeatable)
  --http HOST:PORT       serve the web inbox and its JSON API (/api/v1, Mailpit's shape) there;
                         loopback addresses only unless --http-public (needs lua-http)
  --http-public          let --http listen on an address other hosts can reach
  --memory               keep messages in memory only (with or without --http)
  --max-messages N       with --memory: keep the newest N, the oldest dropped (default 1000)
  -v, --verbose          print each session's conversation on stderr ("<-" from the client,
                         "->" the replies, "*" connections and TLS), prefixed by its connection
                         id; AUTH data shown as [redacted], message data by its size
Without --maildir, --mbox or --memory messages are counted and printed, not stored.
Each stored message is the data as received (CRLF line ends) after a `Return-Path: <sender>` line,
one `Delivered-To: <recipient>` line per recipient and a `Received:` header in Postfix's form. In
the printed line each envelope address is written <addr> with space, ", \, <, >, comma and
control bytes as \xHH; client= is the client's address.]]

local function glob_to_pattern(g)
  local p = g:lower():gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", ".*"):gsub("%?", ".")
  return "^" .. p .. "$"
end

local function parse(args)
  local o = { reject = {}, proxy = {}, xclient = {} }
  local i = 1
  local function val(name)
    i = i + 1
    local v = args[i]
    -- a flag is never taken as a value (--listen -v)
    if v == nil or args_mod.is_option(v) then error({ usage = name .. " needs a value" }) end
    return v
  end
  while i <= #args do
    local a = args[i]
    if a == "--help" or a == "-h" then o.help = true
    elseif a == "-v" or a == "--verbose" then o.verbose = true
    elseif a == "--lmtp" then o.lmtp = true
    elseif a == "--http" then o.http = val(a)
    elseif a == "--http-public" then o.http_public = true
    elseif a == "--memory" then o.memory = true
    elseif a == "--max-messages" then
      o.max_messages = tonumber(val(a))
      if not o.max_messages or o.max_messages < 1 then error({ usage = "--max-messages: a positive number expected" }) end
    elseif a == "--listen" then o.listen = val(a)
    elseif a == "--maildir" then o.maildir = val(a)
    elseif a == "--mbox" then o.mbox = val(a)
    elseif a == "--tls-cert" then o.cert = val(a)
    elseif a == "--tls-key" then o.key = val(a)
    elseif a == "--tls-implicit" then o.implicit = true
    elseif a == "--auth" or a == "--auth-env" or a == "--auth-file" then
      if o.auth_from then error({ usage = a .. ": give one of --auth, --auth-env, --auth-file" }) end
      o.auth_from, o.auth = a, val(a)
    elseif a == "--lock-wait" then
      o.lock_wait = tonumber(val(a))
      if not o.lock_wait or o.lock_wait < 0 then error({ usage = "--lock-wait: seconds expected" }) end
    elseif a == "--max-size" then o.max_size = tonumber(val(a)) or error({ usage = "--max-size: number expected" })
    elseif a == "--max-recipients" then o.max_rcpt = tonumber(val(a)) or error({ usage = "--max-recipients: number expected" })
    elseif a == "--hostname" then o.hostname = val(a)
    elseif a == "--reject-rcpt" then o.reject[#o.reject + 1] = glob_to_pattern(val(a))
    elseif a == "--no-received" then o.no_received = true
    elseif a == "--fail" then
      local faults = require "smtp.faults"
      o.faults = o.faults or faults.new()
      local rule, ferr = faults.parse(val(a))
      if not rule then error({ usage = "--fail: " .. ferr.text }) end
      o.faults:add(rule)
    elseif a == "--proxy-trusted" then o.proxy[#o.proxy + 1] = val(a)
    elseif a == "--xclient-trusted" then o.xclient[#o.xclient + 1] = val(a)
    elseif a == "--timeout" then o.timeout = tonumber(val(a)) or error({ usage = "--timeout: number expected" })
    else error({ usage = "unknown option " .. a }) end
    i = i + 1
  end
  for _, k in ipairs { "proxy", "xclient" } do
    local _, why = require("smtp.cidr").list(o[k])
    if why then error({ usage = "--" .. k .. "-trusted: " .. why }) end
  end
  if o.maildir and o.mbox then error({ usage = "--maildir and --mbox exclude each other" }) end
  if o.memory and (o.maildir or o.mbox) then error({ usage = "--memory excludes --maildir and --mbox" }) end
  -- the inbox needs the messages: without a Maildir or mbox they are kept in memory
  if o.http and not (o.maildir or o.mbox) then o.memory = true end
  if o.max_messages and not o.memory then error({ usage = "--max-messages goes with --memory" }) end
  if o.http_public and not o.http then error({ usage = "--http-public goes with --http" }) end
  if o.http then
    local h, p = o.http:match("^%[(.+)%]:(%d+)$")
    if not h then h, p = o.http:match("^(.+):(%d+)$") end
    if not h and o.http:match("^%d+$") then h, p = "127.0.0.1", o.http end
    if not h then error({ usage = "--http HOST:PORT" }) end
    if not o.http_public and not require("smtp.inbox.http").is_loopback(h) then
      error({ usage = "--http " .. o.http .. " is not a loopback address: add --http-public to serve other hosts" })
    end
    o.http_host, o.http_port = h, tonumber(p)
  end
  if (o.cert == nil) ~= (o.key == nil) then error({ usage = "--tls-cert and --tls-key go together" }) end
  if o.implicit and not o.cert then error({ usage = "--tls-implicit needs --tls-cert and --tls-key" }) end
  if o.auth_from == "--auth-env" then
    local v = os.getenv(o.auth)
    if not v then error({ usage = "--auth-env: " .. o.auth .. " is not set" }) end
    o.auth = v
  elseif o.auth_from == "--auth-file" then
    local f = io.open(o.auth, "rb")
    if not f then error({ usage = "--auth-file: cannot read " .. o.auth }) end
    o.auth = (f:read("*a") or ""):gsub("\r?\n$", "")
    f:close()
  end
  if o.auth and not o.auth:find(":", 1, true) then error({ usage = o.auth_from .. ": USER:PASS expected" }) end
  local l = o.listen or "127.0.0.1:2525"
  if l:sub(1, 1) == "/" then o.path = l; return o end
  local host, port = l:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = l:match("^(.+):(%d+)$") end
  if not host then error({ usage = "--listen HOST:PORT" }) end
  o.host, o.port = host, tonumber(port)
  return o
end

local function pid()
  local f = io.open("/proc/self/stat", "r")
  local p = f and f:read("*n")
  if f then f:close() end
  return p or math.random(1, 1e6)
end

local function hostname()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local h = f and f:read("*l")
  if f then f:close() end
  return ((h or "localhost"):gsub("[/:]", "_"))
end

local function mkdir_p(dir)
  local ok = os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "'")
  return ok == true or ok == 0
end

-- An envelope address for the printed line. A quoted local part may hold spaces, quotes and
-- "to=<...>": every byte that could end the field or start another is written \xHH, so one line
-- always parses as one message's from, to, size, subject and file.
local function logaddr(a)
  return "<" .. a:gsub('[%c%s"\\<>,\127]', function(c) return ("\\x%02X"):format(c:byte()) end) .. ">"
end

-- The Subject header, unfolded, from the start of the message (headers kept at most 64 KB).
local function subject_of(head)
  local hdrs = head:match("^(.-)\r\n\r\n") or head
  hdrs = hdrs:gsub("\r\n[ \t]+", " ")
  for line in (hdrs .. "\r\n"):gmatch("(.-)\r\n") do
    local v = line:match("^[Ss][Uu][Bb][Jj][Ee][Cc][Tt]:%s*(.*)$")
    if v then return v end
  end
  return ""
end

-- mboxrd quoting of ">*From " at line starts, across chunk boundaries.
local function from_quoter(write)
  local carry, bol = "", true
  local function could_grow(t) -- t starts a line: can more bytes still make it ">*From "?
    local rest = t:match("^>*(.*)$")
    return #rest < 5 and ("From "):sub(1, #rest) == rest
  end
  return function(chunk)
    if chunk == nil then
      if carry ~= "" then write(carry) end
      carry = ""
      return
    end
    local s = carry .. chunk
    carry = ""
    local last = s:match(".*()\n")
    local done, tail
    if last then
      done, tail = s:sub(1, last), s:sub(last + 1)
      local t = (bol and "\n" or "") .. done
      t = t:gsub("\n(>*From )", "\n>%1")
      if bol then t = t:sub(2) end
      write(t)
      bol = true
    else
      tail = s
    end
    if tail ~= "" then
      if bol and tail:match("^>*From ") then
        write(">" .. tail)
        bol = false
      elseif bol and could_grow(tail) then
        carry = tail
      else
        write(tail)
        bol = false
      end
    end
  end
end

function M.main(args)
  local ok, o = pcall(parse, args or {})
  if not ok then
    if type(o) == "table" and o.usage then
      io.stderr:write("lua-smtp sink: ", o.usage, "\n", usage, "\n")
      return 2
    end
    error(o, 0)
  end
  if o.help then
    io.stdout:write(usage, "\n")
    return 0
  end
  io.stdout:setvbuf("line")
  local host = hostname()
  local mypid = pid()
  local counter = 0
  local function unique()
    counter = counter + 1
    local t = core.now()
    return ("%d.M%dP%dQ%d.%s"):format(os.time(), math.floor((t % 1) * 1e6), mypid, counter, host)
  end

  local store_dir
  if o.maildir then
    for _, d in ipairs { "tmp", "new", "cur" } do
      if not mkdir_p(o.maildir .. "/" .. d) then
        io.stderr:write("lua-smtp sink: cannot create ", o.maildir, "/", d, "\n")
        return 1
      end
    end
    store_dir = o.maildir .. "/tmp"
  elseif o.mbox then
    store_dir = (o.mbox:match("^(.*)/[^/]*$") or ".")
  end

  -- the index the web inbox reads (--http), or the memory store alone (--memory)
  local inbox
  if o.http or o.memory then
    inbox = require("smtp.inbox.store").new {
      kind = o.memory and "memory" or o.maildir and "maildir" or o.mbox and "mbox" or "none",
      max = o.memory and (o.max_messages or 1000) or nil, maildir = o.maildir, mbox = o.mbox,
      lock_wait = o.lock_wait }
    -- the mail there already is listed too, oldest first
    inbox:load()
  end

  local user, pass
  if o.auth then user, pass = o.auth:match("^([^:]*):(.*)$") end

  -- Receives one message into a temporary file: the header lines then the data as received.
  -- Returns the path and the facts to print, or nil when the data did not arrive whole.
  local function receive(session, env, reader)
    local tmp, f, err
    if store_dir then
      for _ = 1, 5 do
        tmp = store_dir .. "/" .. (o.mbox and ".sink-" or "") .. unique()
        f, err = core.sink_file(tmp, "create")
        if f then break end
      end
      if not f then return nil, "cannot create a file in " .. store_dir .. ": " .. tostring(err) end
    end
    local head = {}
    head[1] = "Return-Path: <" .. env.from .. ">\r\n"
    for _, r in ipairs(env.to) do head[#head + 1] = "Delivered-To: " .. r .. "\r\n" end
    if not o.no_received then head[#head + 1] = session:received(env) end
    local wok, werr = true, nil
    if f then wok, werr = f:write(table.concat(head)) end
    local size, hbuf, hlen = 0, {}, 0
    local all = o.memory and { table.concat(head) } or nil
    while true do
      local chunk, rerr = reader:read(65536)
      if not chunk then
        if rerr then
          if f then f:close(); os.remove(tmp) end
          return nil, nil -- refused by the engine or the client left: nothing stored
        end
        break
      end
      size = size + #chunk
      if hlen < 65536 then hbuf[#hbuf + 1] = chunk; hlen = hlen + #chunk end
      if f and wok then wok, werr = f:write(chunk) end
      if all then all[#all + 1] = chunk end
    end
    if f then
      if wok then wok, werr = f:sync() end
      f:close()
      if not wok then os.remove(tmp); return nil, werr end
    end
    -- without a store there is no file, but the message arrived whole: "" (true) for on_message
    return tmp or "", size, subject_of(table.concat(hbuf)), all and table.concat(all)
  end

  -- The mbox under its lock. Waiting must not stop the loop (other sessions, other messages):
  -- the lock is tried without blocking and again every 50 ms until --lock-wait runs out.
  local lock_wait = o.lock_wait or 10
  local function open_mbox()
    local deadline = core.now() + lock_wait
    local said
    while true do
      local mb, err, locked = core.sink_file(o.mbox, "append")
      if mb or not locked then return mb, err end
      if core.now() >= deadline then return nil, "mailbox locked by another process" end
      if not said then
        said = true
        io.stderr:write(("lua-smtp sink: %s is locked, waiting up to %g s\n"):format(o.mbox, lock_wait))
      end
      loop.sleep(math.min(0.05, math.max(deadline - core.now(), 0)))
    end
  end

  local function deliver_mbox(tmp, env)
    local mb, err = open_mbox()
    if not mb then return nil, err end
    local start = mb:size()
    local okw, werr = true, nil
    local written = 0
    local function w(s) if okw then okw, werr = mb:write(s); written = written + #s end end
    local sender = env.from ~= "" and env.from or "MAILER-DAEMON"
    w("From " .. sender:gsub("%s", "_") .. " " .. os.date("!%a %b %e %H:%M:%S %Y") .. "\r\n")
    local q = from_quoter(w)
    local src = io.open(tmp, "rb")
    if not src then mb:close(); return nil, "cannot reopen " .. tmp end
    -- header lines are ours: copy them unquoted up to the data, then quote the message
    while true do
      local block = src:read(65536)
      if not block then break end
      q(block)
    end
    q(nil)
    src:close()
    w("\r\n")
    if okw then okw, werr = mb:sync() end
    if not okw then mb:truncate(start) end
    mb:close()
    os.remove(tmp)
    if not okw then return nil, werr end
    return o.mbox, start, start + written
  end

  local function on_message(session, env, reader)
    local tmp, size, subject, raw = receive(session, env, reader)
    if not tmp then
      if size then return false, 451, "4.3.0 " .. tostring(size) end
      return false
    end
    local file
    local entry = inbox and { size = size, from = env.from, to = env.to, raw = raw }
    if o.maildir then
      local name = tmp:match("([^/]+)$")
      file = o.maildir .. "/new/" .. name
      local rok, rerr = os.rename(tmp, file)
      if not rok then os.remove(tmp); return false, 451, "4.3.0 " .. tostring(rerr) end
      -- the rename is only durable once the directory is: no 250 before that
      local sok, serr = core.fsync_dir(o.maildir .. "/new")
      if not sok then os.remove(file); return false, 451, "4.3.0 " .. tostring(serr) end
      if entry then entry.file = file end
    elseif o.mbox then
      local mok, merr, stop = deliver_mbox(tmp, env)
      if not mok then os.remove(tmp); return false, 451, "4.3.0 " .. tostring(merr) end
      file = o.mbox
      if entry then entry.mbox = { path = o.mbox, start = merr, stop = stop } end
    elseif o.memory then
      file = "memory"
    else
      file = "-"
    end
    local to = {}
    for i, r in ipairs(env.to) do to[i] = logaddr(r) end
    io.stdout:write(("from=%s to=%s size=%d subject=%q file=%s client=[%s]\n"):format(
      logaddr(env.from), table.concat(to, ","), size, (subject:gsub("[%c]", " ")), file,
      tostring(session.address)))
    if entry then inbox:add(entry) end
    return true
  end

  local on_rcpt
  if #o.reject > 0 then
    on_rcpt = function(_, rcpt)
      local l = rcpt:lower()
      for _, p in ipairs(o.reject) do
        if l:match(p) then return false, 550, "5.1.1", "Recipient address rejected" end
      end
      return true
    end
  end

  local lopts = {
    host = o.host, port = o.port, path = o.path, lmtp = o.lmtp, hostname = o.hostname or "localhost",
    tls = o.cert and { cert = o.cert, key = o.key, implicit = o.implicit } or nil,
    auth = user and function(_, _, u, p) return u == user and p == pass end or nil,
    require_auth = user ~= nil,
    max_message_size = o.max_size, max_recipients = o.max_rcpt, timeout = o.timeout,
    on_rcpt = on_rcpt, on_message = on_message, received = not o.no_received or nil,
    proxy_protocol = #o.proxy > 0 and { trusted = o.proxy } or nil,
    xclient = #o.xclient > 0 and { trusted = o.xclient } or nil,
    log = function(msg) io.stderr:write("lua-smtp sink: ", msg, "\n") end,
    transcript = o.verbose and args_mod.transcript_printer(io.stderr, "server") or nil,
  }
  -- faults on demand (smtp.faults): the --fail rules, and with --http the ones its API sets
  local faults = o.faults
  if not faults and o.http then faults = require("smtp.faults").new() end
  local srv, err = server.listen(faults and faults:hooks(lopts) or lopts)
  if not srv then
    io.stderr:write("lua-smtp sink: ", tostring(err), "\n")
    return 1
  end
  if o.path then io.stderr:write(("lua-smtp sink: listening on %s\n"):format(o.path))
  else io.stderr:write(("lua-smtp sink: listening on %s port %d\n"):format(o.host, srv.port)) end
  local web
  if o.http then
    -- the index and lua-http's modules are a heap that lives as long as the process: Lua 5.4's
    -- generational collector leaves it alone in its minor cycles, where the incremental one
    -- would mark all of it again every cycle, for each message's few short-lived strings
    if _VERSION == "Lua 5.4" then collectgarbage("generational") end
    local werr
    web, werr = require("smtp.inbox.http").start {
      host = o.http_host, port = o.http_port, store = inbox, faults = faults, public = o.http_public,
      log = function(msg) io.stderr:write("lua-smtp sink: ", msg, "\n") end }
    if not web then
      io.stderr:write("lua-smtp sink: --http: ", tostring(werr), "\n")
      srv:close()
      return 1
    end
    io.stderr:write(("lua-smtp sink: web inbox on http://%s:%d/\n"):format(
      o.http_host:find(":", 1, true) and "[" .. o.http_host .. "]" or o.http_host, web.port))
  end
  io.stderr:flush()
  srv:serve()
  return 0
end

return M
