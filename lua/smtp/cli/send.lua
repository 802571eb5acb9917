-- `lua-smtp send`: one message from the command line, through --server (smtp.send) or, without
-- it, by direct delivery (smtp.deliver). Exit status 0 when every recipient accepted it, 1 when
-- some or all did not (the reasons on stderr), 2 for usage errors.
local args_mod = require "smtp.cli.args"

local M = {}

local usage = [==[
usage: lua-smtp send --server HOST[:PORT] [--tls starttls|implicit|opportunistic|none]
                     [--user U --password P | --password-env VAR | --password-file F]
                     [--allow-plaintext-auth]
                     --from ADDR --to ADDR [--to ADDR]... [--cc ADDR]... [--bcc ADDR]...
                     [--subject S] [--body TEXT | --body-file F] [--html-file F] [--attach FILE]...
                     [--raw FILE] [--helo NAME] [--cafile F] [--insecure] [--timeout SECONDS]
                     [--to-file FILE [--concurrency N] [--rate N/SECONDS] [--max-connections N]
                      [--messages-per-connection N]] [--json] [--nameserver HOST[:PORT]]...
                     [--destinations remote|public|any] [--dane | --dane-required]
                     [--mta-sts | --no-mta-sts] [--mta-sts-cache DIR] [--requiretls]
                     [--url URL] [--source ADDR] [--proxy URL]
                     [--message-id ID] [--in-reply-to ID] [--references ID]...
                     [--list-id ID] [--list-unsubscribe URL]... [--calendar FILE] [-v | --verbose]
--to, --cc, --bcc, --attach, --nameserver, --references and --list-unsubscribe take one value
each and may be repeated
(--to a@x --to b@y). A value that starts with '-' is written --option=VALUE.
-v, --verbose prints the SMTP conversation on stderr ("<-" received, "->" sent, "*" TLS, DNS
and connections), passwords and AUTH data replaced by [redacted], message data by its size.
Without --server the message goes straight to each recipient domain's MX hosts.
--destinations says where that may connect: remote (default) refuses this host, link-local,
multicast and reserved addresses; public allows public Internet addresses only; any allows all.
--dane checks MX hosts against their DNSSEC-validated TLSA records (DANE, RFC 7672): the
resolver (--nameserver or the system's) must be a validating one on loopback; --dane-required
delivers only to hosts with usable TLSA records.
Direct delivery applies the recipient domains' MTA-STS policies (RFC 8461; --mta-sts, the
default): under mode enforce only the policy's MX hosts, over STARTTLS with a verified certificate.
--no-mta-sts turns that off; --mta-sts-cache DIR keeps fetched policies in DIR between runs.
--requiretls (RFC 8689) sends only over TLS with a verified certificate to servers that offer
REQUIRETLS, and asks each next hop to do the same; it is refused rather than sent otherwise.
--nameserver asks that DNS server (an IP address, port 53 unless given; repeat for more)
instead of the system's resolver, for MX lookups and for the --server name.
--password-env VAR and --password-file F take the password from an environment variable or
from a file (one final line end ignored), so it is not in the process's arguments.
--raw sends FILE as it is (line ends normalized); --from and --to are then the envelope.
--to-file sends the message to each address in FILE (one a line, # comments) in its own
transaction, over N sessions at once (--concurrency, default 1): a progress bar on a terminal, one
line per recipient otherwise, then a summary "sent N, failed N, deferred N".
--rate N/SECONDS (at most N messages in any SECONDS), --max-connections N and
--messages-per-connection N keep --to-file within a provider's limits (smtp.limits), per server
or, without --server, per recipient domain: a server that answers 421 or a "too many"-style 4xx
is left alone for a while with fewer connections; through --server the messages it refused or
never saw go again on a new session (up to 5 times each).
--url smtps://USER:PASS@HOST:PORT?verify=false... names the server by URL (smtp://, smtp+starttls://,
smtps://, and for LMTP lmtp://HOST:PORT or lmtp:///path/to/socket; the SMTP_URL environment variable is the default when neither --url nor --server is
given); options also given as flags must agree with it.
--source ADDR sends from that local address (IP, or [IPv6]); --proxy socks5://, socks5h:// or
http:// (CONNECT) reaches the server through that proxy.
--json prints the results as one JSON array instead, one object per recipient (recipient, status
sent|failed|deferred, code, enhanced, text, host), also for a single message.
--message-id, --in-reply-to and --references (repeat for more) set the threading fields;
--list-id and --list-unsubscribe (an https: URL, which adds one-click unsubscribe, and/or a
mailto: URL) the mailing list fields; --calendar FILE sends the iCalendar invitation in FILE
(METHOD:REQUEST, CANCEL, ...) as text/calendar and invite.ics. Addresses and --server may use
international domain names: they are sent as A-labels (xn--...).
Exit status: 0 accepted, 1 not accepted (reason on stderr), 2 usage error.]==]

-- Options that take one value, options that take one value each time and may be repeated
-- (--to a --to b), and flags (args.parse).
local spec = {
  single = {
    server = true, tls = true, user = true, password = true, ["password-env"] = true,
    ["password-file"] = true, from = true, subject = true, body = true,
    ["body-file"] = true, ["html-file"] = true, raw = true, cafile = true, timeout = true, helo = true,
    ["to-file"] = true, concurrency = true, destinations = true, ["mta-sts-cache"] = true,
    rate = true, ["max-connections"] = true, ["messages-per-connection"] = true,
    url = true, source = true, proxy = true,
    -- what a composed message may carry besides its bodies (not with --raw)
    ["message-id"] = true, ["in-reply-to"] = true, ["list-id"] = true, calendar = true,
  },
  repeated = { to = true, cc = true, bcc = true, attach = true, nameserver = true,
    references = true, ["list-unsubscribe"] = true },
  flags = { insecure = true, ["allow-plaintext-auth"] = true, json = true, verbose = true,
    dane = true, ["dane-required"] = true,
    ["mta-sts"] = true, ["no-mta-sts"] = true, requiretls = true },
  short = { v = "verbose" },
}

-- What a composed message may carry besides its bodies: --raw refuses them.
local compose_single = { "message-id", "in-reply-to", "list-id", "calendar" }
local compose_repeated = { "references", "list-unsubscribe" }

local function parse(args)
  return args_mod.parse(args, spec)
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local d = f:read("*a")
  f:close()
  return d
end

-- The bare address of "Name <addr>" or "addr".
local function bare(a)
  return a:match("<([^>]*)>%s*$") or a
end

local json_string = require("smtp.json").string

local function json_results(results)
  local items = {}
  for i, r in ipairs(results) do
    local f = { '"recipient":' .. json_string(r.recipient), '"status":' .. json_string(r.status) }
    if r.code then f[#f + 1] = '"code":' .. tostring(r.code) end
    if r.enhanced then f[#f + 1] = '"enhanced":' .. json_string(r.enhanced) end
    if r.text then f[#f + 1] = '"text":' .. json_string(r.text) end
    if r.host then f[#f + 1] = '"host":' .. json_string(r.host) end
    if r.tls_policy then f[#f + 1] = '"tls_policy":' .. json_string(r.tls_policy) end
    if r.dane then f[#f + 1] = '"dane":' .. json_string(r.dane.state) end
    items[i] = "{" .. table.concat(f, ",") .. "}"
  end
  return "[" .. table.concat(items, ",") .. "]\n"
end

-- True when `stream` is this process's stdout and that is a terminal.
local function is_tty(stream)
  if stream ~= io.stdout or os.getenv("TERM") == "dumb" then return false end
  local r = os.execute("test -t 1")
  return r == true or r == 0
end

-- A progress bar redrawn in place: "[#####.....] 12/100  sent 10  failed 1  deferred 1".
local function progress(out, err, total)
  local count, done = { sent = 0, failed = 0, deferred = 0 }, 0
  local function draw()
    local width = 30
    local fill = math.floor(width * done / total)
    out:write(("\r[%s%s] %d/%d  sent %d  failed %d  deferred %d"):format(string.rep("#", fill),
      string.rep(".", width - fill), done, total, count.sent, count.failed, count.deferred))
    out:flush()
  end
  draw()
  return function(r)
    done = done + 1
    count[r.status] = (count[r.status] or 0) + 1
    if r.status ~= "sent" then
      -- a failure stays on the screen above the bar
      out:write("\r\27[K"); out:flush()
      err:write(("%s: %s %s %s %s\n"):format(r.recipient, r.status, tostring(r.code or ""), r.enhanced or "", r.text or ""))
    end
    draw()
    if done == total then out:write("\n") end
  end
end

local function status_of(e)
  return e.temporary and "deferred" or "failed"
end

-- The same under smtp.limits (--rate, --max-connections, --messages-per-connection): entries
-- the server refused for load or never saw go again on a later session.
-- One recipient's line of the bulk results, from its send's result or error.
local function bulk_result(rcpt, res, e)
  if res then
    return { recipient = rcpt, status = "sent", code = res.reply.code, enhanced = res.reply.enhanced,
      text = res.reply.text }
  end
  local rej = e.rejected and e.rejected[1]
  local r = { recipient = rcpt, status = status_of(rej or e), code = rej and rej.code or e.code,
    enhanced = rej and rej.enhanced or e.enhanced, text = rej and rej.text or e.text or tostring(e) }
  if rej then r.status = rej.code < 500 and "deferred" or "failed" end
  return r
end

local function limited_bulk(lim, copts, message, from, rcpts, n, line, requiretls)
  local entries = {}
  for i, rcpt in ipairs(rcpts) do
    entries[i] = { message = message, from = from, to = { rcpt }, requiretls = requiretls }
  end
  local results, errors = {}, require "smtp.errors"
  require("smtp.batch").bulk { connect = copts, entries = entries, limits = lim, concurrency = n,
    on_result = function(i, res)
      local r = errors.is(res) and bulk_result(rcpts[i], nil, res) or bulk_result(rcpts[i], res)
      results[i] = r
      line(r)
    end }
  return results
end

-- One message to many recipients, one transaction each, over `n` sessions in smtp.loop.
local function bulk(smtp, copts, message, from, rcpts, n, line, requiretls)
  local results, nexti = {}, 1
  local function worker()
    local conn
    while nexti <= #rcpts do
      local i = nexti
      nexti = nexti + 1
      local rcpt = rcpts[i]
      local res, e
      if not conn then conn, e = smtp.connect(copts) end
      if conn then
        res, e = conn:send { message = message, from = from, to = { rcpt }, requiretls = requiretls }
        if not res and (e.kind == "closed" or e.kind == "timeout" or e.kind == "protocol") then
          conn:close(); conn = nil
        end
      end
      local r = bulk_result(rcpt, res, e)
      results[i] = r
      line(r)
    end
    if conn then conn:close() end
  end
  local loop = require "smtp.loop"
  for _ = 1, math.min(n, #rcpts) do loop.spawn(worker) end
  loop.run()
  return results
end

function M.main(args, out, err)
  out, err = out or io.stdout, err or io.stderr
  local o, perr = parse(args or {})
  if not o then
    if perr == "help" then out:write(usage, "\n"); return 0 end
    err:write("lua-smtp send: ", perr, "\n", usage, "\n")
    return 2
  end
  local function usage_error(msg)
    err:write("lua-smtp send: ", msg, "\n", usage, "\n")
    return 2
  end
  if not o.from then return usage_error("--from is required") end
  local listed = {}
  if o["to-file"] then
    local text, ferr = read_file(o["to-file"])
    if not text then err:write("lua-smtp send: ", tostring(ferr), "\n"); return 2 end
    for l in text:gmatch("[^\r\n]+") do
      l = l:match("^%s*(.-)%s*$")
      if l ~= "" and l:sub(1, 1) ~= "#" then listed[#listed + 1] = l end
    end
    if #listed == 0 then return usage_error("--to-file lists no recipient") end
  end
  local concurrency = 1
  if o.concurrency then
    concurrency = tonumber(o.concurrency)
    if not concurrency or concurrency < 1 or concurrency % 1 ~= 0 then
      return usage_error("bad --concurrency '" .. o.concurrency .. "'")
    end
    if not o["to-file"] then return usage_error("--concurrency goes with --to-file") end
  end
  -- --rate, --max-connections, --messages-per-connection: a limiter for the bulk run
  local lim, why = require("smtp.limits").from_flags(o)
  if lim == false then return usage_error(why) end
  if lim then
    if not o["to-file"] then
      return usage_error("--rate, --max-connections and --messages-per-connection go with --to-file")
    end
    -- without --concurrency, as many sessions as the limit allows
    if not o.concurrency and o["max-connections"] then concurrency = tonumber(o["max-connections"]) end
  end
  if #o.to + #o.cc + #o.bcc + #listed == 0 then return usage_error("--to is required") end
  if o.body and o["body-file"] then return usage_error("--body and --body-file exclude each other") end
  if o.raw and (o.body or o["body-file"] or o["html-file"] or #o.attach > 0 or o.subject) then
    return usage_error("--raw excludes --subject, --body, --body-file, --html-file and --attach")
  end
  if o.raw then
    for _, k in ipairs(compose_single) do if o[k] then return usage_error("--raw excludes --" .. k) end end
    for _, k in ipairs(compose_repeated) do if #o[k] > 0 then return usage_error("--raw excludes --" .. k) end end
  end
  local given = (o.password and 1 or 0) + (o["password-env"] and 1 or 0) + (o["password-file"] and 1 or 0)
  if given > 1 then return usage_error("give one of --password, --password-env, --password-file") end
  if o["password-env"] then
    o.password = os.getenv(o["password-env"])
    if not o.password then return usage_error("--password-env: " .. o["password-env"] .. " is not set") end
  elseif o["password-file"] then
    local d = read_file(o["password-file"])
    if not d then return usage_error("--password-file: cannot read " .. o["password-file"]) end
    o.password = d:gsub("\r?\n$", "")
  end
  if (o.user == nil) ~= (o.password == nil) then return usage_error("--user and --password go together") end
  local timeout
  if o.timeout then
    local why
    timeout, why = args_mod.timeout(o.timeout)
    if not timeout then return usage_error(why) end
  end
  local nameservers
  if #o.nameserver > 0 then
    nameservers = {}
    for _, v in ipairs(o.nameserver) do
      local ok, why = args_mod.add_nameserver(nameservers, v)
      if not ok then return usage_error(why) end
    end
  end
  local tls = o.tls
  if tls and not ({ starttls = true, implicit = true, opportunistic = true, none = true })[tls] then
    return usage_error("bad --tls '" .. tls .. "'")
  end
  if o.destinations and not ({ remote = true, public = true, any = true })[o.destinations] then
    return usage_error("bad --destinations '" .. o.destinations .. "' (remote, public or any)")
  end
  if o.destinations and o.server then return usage_error("--destinations is for direct delivery (no --server)") end
  local dane = o["dane-required"] and "required" or o.dane or nil
  if dane and (o.server or o.url) then return usage_error("--dane is for direct delivery (no --server or --url)") end
  if o["mta-sts"] and o["no-mta-sts"] then return usage_error("--mta-sts and --no-mta-sts exclude each other") end
  if (o["mta-sts"] or o["no-mta-sts"] or o["mta-sts-cache"]) and (o.server or o.url) then
    return usage_error("--mta-sts, --no-mta-sts and --mta-sts-cache are for direct delivery (no --server)")
  end
  local mta_sts = not o["no-mta-sts"] and { cache_dir = o["mta-sts-cache"] } or false
  local requiretls = o.requiretls or nil
  -- --url (or SMTP_URL) names the server; --source and --proxy are checked here, so a bad value
  -- is a usage error found before any connection.
  if o.url and o.server then return usage_error("--url and --server exclude each other") end
  if not o.url and not o.server and not o.destinations then
    local env = os.getenv("SMTP_URL")
    if env and env ~= "" then o.url = env end
  end
  local url_mod = require "smtp.url"
  if o.url then
    local _, uerr = url_mod.parse(o.url)
    if uerr then return usage_error("bad --url: " .. tostring(uerr.text)) end
    if o.destinations then return usage_error("--destinations is for direct delivery (no --url)") end
  end
  if o.source then
    local _, berr = url_mod.bind(o.source)
    if berr then return usage_error("bad --source: " .. tostring(berr.text)) end
  end
  if o.proxy then
    local _, perr = url_mod.proxy(o.proxy)
    if perr then return usage_error("bad --proxy: " .. tostring(perr.text)) end
  end
  -- nil unless --insecure: a URL's ?verify= must not meet a second opinion nobody gave
  local verify
  if o.insecure then verify = false end
  local host, port
  if o.server then
    host, port = o.server:match("^%[(.+)%]:(%d+)$")
    if not host then host, port = o.server:match("^([^:]+):(%d+)$") end
    if not host then host = o.server:match("^%[(.+)%]$") or o.server end
    port = port and tonumber(port)
    if host == "" or (port and (port < 1 or port > 65535)) then return usage_error("bad --server '" .. o.server .. "'") end
  end

  local message, from, to
  local envelope_to = {}
  for _, list in ipairs { o.to, o.cc, o.bcc } do
    for _, a in ipairs(list) do envelope_to[#envelope_to + 1] = bare(a) end
  end
  if o.raw then
    local f, ferr = io.open(o.raw, "rb")
    if not f then err:write("lua-smtp send: ", tostring(ferr), "\n"); return 2 end
    message, from, to = f, bare(o.from), envelope_to
  else
    local text = o.body
    if o["body-file"] then
      local ferr
      text, ferr = read_file(o["body-file"])
      if not text then err:write("lua-smtp send: ", tostring(ferr), "\n"); return 2 end
    end
    local html
    if o["html-file"] then
      local ferr
      html, ferr = read_file(o["html-file"])
      if not html then err:write("lua-smtp send: ", tostring(ferr), "\n"); return 2 end
    end
    local attachments = {}
    for _, p in ipairs(o.attach) do attachments[#attachments + 1] = { path = p } end
    local calendar
    if o.calendar then
      local ferr
      calendar, ferr = read_file(o.calendar)
      if not calendar then err:write("lua-smtp send: ", tostring(ferr), "\n"); return 2 end
    end
    local list
    if o["list-id"] or #o["list-unsubscribe"] > 0 then
      list = { id = o["list-id"] }
      for _, u in ipairs(o["list-unsubscribe"]) do
        list.unsubscribe = list.unsubscribe or {}
        local key = u:lower():match("^mailto:") and "mailto" or "url"
        if list.unsubscribe[key] then return usage_error("--list-unsubscribe: at most one http(s) URL and one mailto: URL") end
        list.unsubscribe[key] = u
      end
    end
    local mmod = require "smtp.message"
    local merr
    message, merr = mmod.new {
      from = o.from, to = o.to, cc = o.cc, bcc = o.bcc, subject = o.subject or "",
      text = text or (html == nil and "" or nil), html = html,
      attachments = #attachments > 0 and attachments or nil,
      message_id = o["message-id"], in_reply_to = o["in-reply-to"],
      references = #o.references > 0 and o.references or nil, list = list, calendar = calendar,
    }
    if not message then
      err:write("lua-smtp send: ", tostring(merr), "\n")
      return (type(merr) == "table" and merr.kind == "invalid") and 2 or 1
    end
  end

  local smtp = require "smtp"
  local transcript = o.verbose and args_mod.transcript_printer(err, "client") or nil
  if #listed > 0 then
    local all = {}
    for _, a in ipairs(envelope_to) do all[#all + 1] = a end
    for _, a in ipairs(listed) do all[#all + 1] = bare(a) end
    local env_from = from or bare(o.from)
    local results
    local function line(r)
      if o.json then return end
      local w = r.status == "sent" and out or err
      w:write(("%s: %s %s %s %s\n"):format(r.recipient, r.status, tostring(r.code or ""), r.enhanced or "", r.text or ""))
    end
    -- on a terminal a progress bar instead of a line per sent message
    if not o.json and is_tty(out) then line = progress(out, err, #all) end
    if o.server or o.url then
      if io.type(message) == "file" then
        -- the same bytes go out once per recipient
        local data = message:read("*a"); message:close(); message = data
      end
      local copts = {
        url = o.url, server = host, port = port, tls = tls,
        auth = o.user and { user = o.user, password = o.password } or nil,
        helo = o.helo, cafile = o.cafile, verify = verify, timeout = timeout,
        allow_plaintext_auth = o["allow-plaintext-auth"] or nil, nameservers = nameservers,
        bind = o.source, proxy = o.proxy,
        transcript = transcript,
      }
      if lim then
        results = limited_bulk(lim, copts, message, env_from, all, concurrency, line, requiretls)
      else
        results = bulk(smtp, copts, message, env_from, all, concurrency, line, requiretls)
      end
    else
      local derr
      results, derr = smtp.deliver { message = message, from = env_from, to = all, helo = o.helo,
        tls = tls or "opportunistic", timeout = timeout, cafile = o.cafile, verify = not o.insecure,
        nameservers = nameservers, destinations = o.destinations, bind = o.source, proxy = o.proxy,
        transcript = transcript, limits = lim, dane = dane, mta_sts = mta_sts, requiretls = requiretls }
      if not results then
        err:write("lua-smtp send: not sent: ", tostring(derr), "\n")
        return 1
      end
      for _, r in ipairs(results) do line(r) end
    end
    local count = { sent = 0, failed = 0, deferred = 0 }
    for _, r in ipairs(results) do count[r.status] = (count[r.status] or 0) + 1 end
    if o.json then out:write(json_results(results)) else
      out:write(("sent %d, failed %d, deferred %d\n"):format(count.sent, count.failed, count.deferred))
    end
    return count.sent == #results and 0 or 1
  end
  if o.server or o.url then
    local auth = o.user and { user = o.user, password = o.password } or nil
    local res, serr = smtp.send {
      url = o.url, server = host, port = port, tls = tls, auth = auth, helo = o.helo, message = message,
      from = from, to = to, cafile = o.cafile, verify = verify, timeout = timeout,
      allow_plaintext_auth = o["allow-plaintext-auth"] or nil, nameservers = nameservers,
      bind = o.source, proxy = o.proxy, transcript = transcript, requiretls = requiretls,
    }
    if io.type(message) == "file" then message:close() end
    if o.json then
      -- one entry per envelope recipient, as for --to-file
      local results, by = {}, {}
      if res then
        for _, a in ipairs(res.accepted) do
          by[a] = { status = "sent", code = res.reply.code, enhanced = res.reply.enhanced, text = res.reply.text }
        end
        -- LMTP: each recipient's own reply after the data
        for _, r in ipairs(res.recipients or {}) do
          if r.status == "accepted" then by[r.recipient] = { status = "sent", code = r.code, enhanced = r.enhanced, text = r.text } end
        end
      end
      for _, r in ipairs((res and res.rejected) or (serr and serr.rejected) or {}) do
        by[r.recipient] = { status = r.code < 500 and "deferred" or "failed", code = r.code, enhanced = r.enhanced, text = r.text }
      end
      local env_to = to
      if not env_to then env_to = select(2, message:envelope()) end
      for i, a in ipairs(env_to) do
        local r = by[a] or (serr and { status = status_of(serr), code = serr.code, enhanced = serr.enhanced,
          text = tostring(serr) }) or { status = "sent", code = res.reply.code, enhanced = res.reply.enhanced,
          text = res.reply.text }
        r.recipient = a
        results[i] = r
      end
      out:write(json_results(results))
      if not res then return serr.kind == "invalid" and 2 or 1 end
      return #res.rejected == 0 and 0 or 1
    end
    if not res then
      err:write("lua-smtp send: not sent: ", tostring(serr), "\n")
      if serr.rejected then
        for _, r in ipairs(serr.rejected) do
          err:write("  ", r.recipient, ": ", tostring(r.code), " ", r.enhanced or "", " ", r.text or "", "\n")
        end
      end
      return serr.kind == "invalid" and 2 or 1
    end
    out:write(("sent: %d %s %s\n"):format(res.reply.code, res.reply.enhanced or "", res.reply.text or ""))
    for _, a in ipairs(res.accepted) do out:write("  accepted: ", a, "\n") end
    for _, r in ipairs(res.rejected) do
      err:write("  rejected: ", r.recipient, ": ", tostring(r.code), " ", r.enhanced or "", " ", r.text or "", "\n")
    end
    return #res.rejected == 0 and 0 or 1
  end

  local results, derr = smtp.deliver {
    message = message, from = from, to = to, helo = o.helo, tls = tls or "opportunistic",
    timeout = timeout, cafile = o.cafile, verify = not o.insecure, nameservers = nameservers,
    destinations = o.destinations, bind = o.source, proxy = o.proxy, transcript = transcript,
    dane = dane,
    mta_sts = mta_sts, requiretls = requiretls,
  }
  if io.type(message) == "file" then message:close() end
  if not results then
    err:write("lua-smtp send: not sent: ", tostring(derr), "\n")
    return (type(derr) == "table" and derr.kind == "invalid") and 2 or 1
  end
  if o.json then
    out:write(json_results(results))
    for _, r in ipairs(results) do if r.status ~= "sent" then return 1 end end
    return 0
  end
  local status = 0
  for _, r in ipairs(results) do
    local line = ("%s: %s %s %s %s%s%s"):format(r.recipient, r.status, tostring(r.code or ""), r.enhanced or "",
      r.text or "", r.host and (" (" .. r.host .. ")") or "",
      r.dane and (" dane: " .. r.dane.state .. (r.dane.verified and " verified" or "")) or "")
    if r.status == "sent" then out:write(line, "\n") else err:write(line, "\n"); status = 1 end
  end
  return status
end

return M
