-- Direct delivery (smtp.deliver): groups recipients by domain, looks up each domain's MX hosts and
-- walks them in order (RFC 5321 §5), one transaction per domain with all its recipients, the
-- domains concurrently inside smtp.loop. Results are per recipient; "sent" only when a host
-- accepted that recipient and the message.
local errors = require "smtp.errors"
local check = require "smtp.check"
local dns = require("smtp.transport").dns()
local mx = require "smtp.mx"
local dnsutil = require "smtp.dnsutil"
local observe = require "smtp.observe"
local mtasts = require "smtp.mtasts"

local M = {}

M.max_attempts = 10     -- addresses tried per domain, across its MX hosts

local tls_modes = { opportunistic = true, starttls = true, implicit = true, none = true }

-- Plain address of a recipient or sender: "a@b", "<a@b>" or "Name <a@b>" -> "a@b".
local function bare(addr)
  return addr:match("<([^<>]*)>%s*$") or addr:match("^%s*(.-)%s*$")
end

-- The domain part used for routing, lower-cased: "example.org" or "[192.0.2.1]".
local function domain_of(addr)
  local d = addr:match("@([^@]+)$")
  if not d then return nil end
  return d:lower()
end

-- "[127.0.0.1]" / "[IPv6:::1]" -> the address, else nil.
local function literal_of(domain)
  local inner = domain:match("^%[(.*)%]$")
  if not inner then return nil end
  inner = inner:gsub("^[Ii][Pp][Vv]6:", "")
  if dns.is_ipv4(inner) or dns.is_ipv6(inner) then return inner end
  return false
end

-- A message source that can be sent more than once (several domains, several hosts).
local function replayable(message)
  local t = type(message)
  if t == "string" or t == "table" then return message end
  if t == "function" then
    local parts = {}
    for chunk in message do parts[#parts + 1] = chunk end
    return table.concat(parts)
  end
  if io.type(message) == "file" then
    return message:read("*a")
  end
  return nil
end

local function envelope(opts, message)
  local from, to = opts.from, opts.to
  if (from == nil or to == nil) and type(message) == "table" and message.envelope then
    local mfrom, mto = message:envelope()
    if from == nil then from = mfrom end
    if to == nil then to = mto end
  end
  if type(to) == "string" then to = { to } end
  return from, to
end

-- How a domain whose lookup failed is reported for each of its recipients.
local function dns_result(err)
  if err.enhanced == "5.1.10" then
    return "failed", err.code or 556, "5.1.10"
  elseif err.temporary then
    return "deferred", 451, "4.4.3"
  else
    return "failed", 550, "5.1.2"
  end
end

local function status_of(code)
  if code and code >= 200 and code < 300 then return "sent" end
  if code and code >= 500 then return "failed" end
  return "deferred"
end

-- The answers of an MX lookup as transcript lines (dir "dns").
local function dns_lines(fn, domain, hosts, err)
  if not hosts then
    observe.line(fn, nil, "dns", ("MX %s: %s"):format(domain, tostring(err)))
    return
  end
  for _, h in ipairs(hosts) do
    observe.line(fn, nil, "dns", ("MX %s: %s%d %s [%s]"):format(domain, h.implicit and "no MX, implicit " or "",
      h.preference or 0, h.host, table.concat(h.addresses or {}, " ")))
  end
end

-- Delivers one domain's recipients; fills results[i] for each index in `idx`.
local function deliver_domain(job, results, ctx)
  local opts, smtp = ctx.opts, ctx.smtp
  local function set_all(fields)
    for _, i in ipairs(job.idx) do
      local r = { recipient = ctx.to[i] }
      for k, v in pairs(fields) do r[k] = v end
      results[i] = r
    end
  end

  local hosts
  local lit = literal_of(job.domain)
  if lit then
    hosts = { { host = job.domain, preference = 0, addresses = { lit } } }
  else
    local err
    hosts, err = mx.lookup(job.domain, { nameservers = opts.nameservers, timeout = ctx.dns_timeout,
                                          random = opts.random })
    if ctx.tr then dns_lines(ctx.tr, job.domain, hosts, err) end
    if not hosts then
      local status, code, enhanced = dns_result(err)
      set_all { status = status, code = code, enhanced = enhanced, text = err.text }
      return
    end
  end

  -- DANE (smtp.dane): an active policy governs this domain, and MTA-STS is then not consulted
  -- (RFC 8461 §2: DANE takes precedence).
  local dane = ctx.dane and require("smtp.dane").domain(job.domain, hosts,
    { mode = ctx.dane, nameservers = opts.nameservers, timeout = ctx.dns_timeout })
  if dane and ctx.tr then
    for _, l in ipairs(dane:describe(hosts)) do observe.line(ctx.tr, nil, "dns", "dane: " .. l) end
  end
  -- Transport security policy (RFC 8461) where DANE does not govern the domain.
  local sts = ctx.mta_sts and not lit and not (dane and dane.active)
    and mtasts.plan(job.domain, ctx.mta_sts, ctx.tlsrpt) or nil
  job.sts = sts
  if ctx.requiretls and not ((sts and sts:strict()) or (dane and dane.active)) then
    -- RFC 8689 §4.2.1: the MX hosts must be authenticated (MTA-STS or DANE) for REQUIRETLS
    set_all { status = "failed", code = 550, enhanced = "5.7.10", text = ("REQUIRETLS: neither DANE "
      .. "nor an MTA-STS policy authenticates the MX hosts of %s"):format(job.domain) }
    return
  end

  -- Where the policy lets us connect, in delivery order. The address checked is the address
  -- connected to: `server` below is this numeric address, so nothing resolves it again between
  -- the check and the connect.
  local targets, refused, refused_sts = {}, nil, nil
  for _, h in ipairs(hosts) do
    for _, address in ipairs(h.addresses) do
      local why = dnsutil.destination_refused(address, ctx.destinations)
      local sts_why = not why and sts and sts:refuses(h, address)
      if sts_why then
        refused_sts = refused_sts or sts_why
      elseif not why then
        targets[#targets + 1] = { host = h, address = address }
      elseif not refused then
        refused = { host = h.host, address = address, why = why }
      end
    end
  end
  if refused and ctx.tr then
    observe.line(ctx.tr, nil, "info", ("not connecting to %s (%s) of %s: destinations = %q"):format(
      refused.address, refused.why, refused.host, ctx.destinations))
  end
  if #targets == 0 and refused then
    -- Every address the lookup gave is one this policy refuses: final, and it says why.
    set_all {
      status = "failed", code = 550, enhanced = "5.4.4", host = refused.host, address = refused.address,
      text = ("refusing to deliver to %s (%s) of %s: destinations = %q allows %s"):format(refused.address,
        refused.why, refused.host, ctx.destinations, ctx.destinations == "public"
          and "public addresses only" or "no loopback, link-local, multicast or reserved address"),
    }
    return
  end
  if #targets == 0 and refused_sts then
    set_all { status = "deferred", code = 451, enhanced = "4.7.5", text = refused_sts }
    return
  end

  local last = nil
  for attempt, target in ipairs(targets) do
    if attempt > M.max_attempts then break end
    local h, address = target.host, target.address
    if last then
      -- the previous address failed in a way the next one may not: that is a retry
      observe.counters.retries = observe.counters.retries + 1
      if ctx.tr then
        observe.line(ctx.tr, nil, "info", ("trying %s [%s] after %s [%s]: %s"):format(h.host, address,
          last.host, last.address, tostring(last.err)))
      end
      if ctx.ev then
        observe.event(ctx.ev, "retry", nil, { domain = job.domain, host = h.host, address = address,
          previous_host = last.host, previous_address = last.address, error = last.err, attempt = attempt })
      end
    end
    local copts = {
      server = address, port = ctx.port, tls = ctx.tls, helo = opts.helo,
      timeout = opts.timeout, bind = ctx.bind, proxy = ctx.proxy,
      transcript = ctx.tr, transcript_body = opts.transcript_body, on_event = ctx.ev,
    }
    if ctx.tls == "starttls" or ctx.tls == "implicit" then
      -- Required TLS is verified as in smtp.send, against the MX host's name.
      copts.verify = opts.verify ~= false
      copts.cafile = opts.cafile
      if not h.host:match("^%[") then copts.servername = h.host end
    else
      copts.verify = false
    end
    -- opts.limits: a slot of the recipient domain for the session, a rate token for the message
    local lim = ctx.limits
    if lim then lim:wait(job.domain, "connection") end
    local relaxed
    if sts or ctx.requiretls then
      relaxed = {}
      for k, v in pairs(copts) do relaxed[k] = v end
      if (sts and sts:tighten(copts, h)) or ctx.requiretls then
        copts.tls, copts.verify, copts.servername = "starttls", true, h.host
        copts.cafile = opts.cafile
      end
      if ctx.requiretls then relaxed = nil end   -- never a second, weaker try
    end
    -- a DANE host's options are DANE's (its TLSA records, not the CA store, authenticate it)
    local conn, err
    if dane then conn, err = dane:connect(h, copts, smtp.connect) else conn, err = smtp.connect(copts) end
    if sts then conn, err = sts:after_connect(conn, err, h, address, smtp, relaxed) end
    if conn then
      local rcpts = {}
      for k, i in ipairs(job.idx) do rcpts[k] = ctx.bare_to[i] end
      local res
      if lim then lim:wait(job.domain, "message") end
      res, err = conn:send { message = ctx.message, from = ctx.from, to = rcpts, dsn = opts.dsn,
                             requiretls = ctx.requiretls }
      if res then
        conn:close()
        if lim then lim:release(job.domain, "ok") end
        local rejected, accepted = {}, {}
        for _, rj in ipairs(res.rejected or {}) do rejected[bare(rj.recipient)] = rj end
        for _, a in ipairs(res.accepted or {}) do accepted[bare(a)] = true end
        local reply = res.reply or {}
        for k, i in ipairs(job.idx) do
          local rj = rejected[rcpts[k]]
          local r = { recipient = ctx.to[i], host = h.host, address = address }
          if rj then
            r.code, r.enhanced, r.text = rj.code, rj.enhanced, rj.text
            r.status = (rj.code and rj.code >= 500) and "failed" or "deferred"
          else
            r.code, r.enhanced, r.text = reply.code, reply.enhanced, reply.text
            r.status = status_of(reply.code)
            -- Only what the host named as accepted counts as sent.
            if r.status == "sent" and not accepted[rcpts[k]] then r.status = "deferred" end
          end
          if dane then for k2, v in pairs(dane:fields(h.host, conn)) do r[k2] = v end end
          results[i] = r
        end
        return
      end
      conn:close()
    end
    if lim then lim:release(job.domain, require("smtp.limits").outcome(err)) end
    last = { err = err, host = h.host, address = address }
    -- A 5xx (greeting, MAIL, DATA, every recipient refused) is final; the same goes for input
    -- the client refused to send. Anything else may work at the next address.
    if errors.is(err) and (err.kind == "invalid" or (err.code and err.code >= 500)) then
      if err.rejected then
        local by = {}
        for _, rj in ipairs(err.rejected) do by[bare(rj.recipient)] = rj end
        for _, i in ipairs(job.idx) do
          local rj = by[ctx.bare_to[i]] or err
          results[i] = { recipient = ctx.to[i], status = status_of(rj.code) == "sent" and "failed"
                         or status_of(rj.code), code = rj.code, enhanced = rj.enhanced,
                         text = rj.text, host = h.host, address = address }
        end
      else
        set_all { status = "failed", code = err.code, enhanced = err.enhanced, text = err.text,
                  host = h.host, address = address }
      end
      return
    end
  end
  local e = last and last.err
  set_all {
    status = "deferred",
    code = errors.is(e) and e.code or nil,
    enhanced = errors.is(e) and e.enhanced or nil,
    text = e and (errors.is(e) and e.text or tostring(e)) or "no MX host could be reached",
    host = last and last.host, address = last and last.address,
  }
  if dane and last then
    for _, i in ipairs(job.idx) do
      for k, v in pairs(dane:fields(last.host)) do results[i][k] = v end
    end
  end
end

-- Runs fns concurrently in smtp.loop; one after the other inside a cqueues controller (each wait
-- there yields to cqueues already) or when there is a single domain.
local function run_all(fns)
  local cq = package.loaded.cqueues
  local in_cqueues = type(cq) == "table" and cq.running and cq.running()
  -- Inside nginx: one light thread per domain (cosockets wait by themselves).
  if #fns > 1 and require("smtp.transport").run_concurrently(fns) then return end
  local ok, loop = pcall(require, "smtp.loop")
  if #fns == 1 or in_cqueues or not ok or type(loop) ~= "table" or not loop.spawn then
    for _, f in ipairs(fns) do f() end
    return
  end
  local left = #fns
  local failure
  for _, f in ipairs(fns) do
    loop.spawn(function()
      local fine, e = pcall(f)
      if not fine then failure = failure or e end
      left = left - 1
    end)
  end
  if loop.current and loop.current() then
    -- Already a loop task: the others run beside us; look again now and then.
    while left > 0 do loop.sleep(0.005) end
  else
    loop.run()
  end
  if failure then error(failure, 0) end
end

-- deliver{ message=, from=, to=, helo=, tls="opportunistic", nameservers=, port=25, timeout=30,
--          dns_timeout=, random=, verify=, cafile=, dsn=, destinations="remote", bind=, proxy=,
--          limits=, dane=false, mta_sts=true, tlsrpt=, requiretls=false }
--   -> results | nil, err (invalid input)
-- Recipient domains often come from users; `destinations` keeps their MX records and address
-- literals from steering connections into this host or its networks (request forgery).
function M.deliver(opts)
  if type(opts) ~= "table" then error("bad argument #1 to 'deliver' (table expected)", 2) end
  local destinations = opts.destinations or "remote"
  if not dnsutil.DESTINATIONS[destinations] then
    error("bad argument #1 to 'deliver' (destinations: \"remote\", \"public\" or \"any\" expected)", 2)
  end
  local tls = opts.tls or "opportunistic"
  if not tls_modes[tls] then
    error("bad argument #1 to 'deliver' (tls: \"opportunistic\", \"starttls\", \"implicit\" or \"none\" expected)", 2)
  end
  if opts.port ~= nil and (type(opts.port) ~= "number" or opts.port % 1 ~= 0) then
    error("bad argument #1 to 'deliver' (port: integer expected)", 2)
  end
  if opts.port ~= nil and (opts.port < 1 or opts.port > 65535) then
    return errors.invalid("port out of range: " .. tostring(opts.port))
  end
  if opts.message == nil then error("bad argument #1 to 'deliver' (message: message expected)", 2) end
  if opts.limits ~= nil and not require("smtp.limits").is(opts.limits) then
    error("bad argument #1 to 'deliver' (limits: smtp.limits expected)", 2)
  end
  observe.check(opts, "deliver")
  local message = replayable(opts.message)
  if message == nil then error("bad argument #1 to 'deliver' (message: string, smtp.message, file or function expected)", 2) end

  local from, to = envelope(opts, opts.message)
  if type(from) ~= "string" then return errors.invalid("from: an envelope sender is required") end
  if type(to) ~= "table" or #to == 0 then return errors.invalid("to: no recipients") end

  local bare_to, jobs, by_domain = {}, {}, {}
  for i, addr in ipairs(to) do
    if type(addr) ~= "string" then return errors.invalid("to[" .. i .. "]: string expected") end
    -- An international domain is looked up and sent as its A-label; results name `addr`.
    local ok, aerr, b = check.address(bare(addr), "to[" .. i .. "]")
    if not ok then return nil, aerr end
    local d = domain_of(b)
    if not d then return errors.invalid("to[" .. i .. "]: no domain in " .. ("%q"):format(addr)) end
    if check.has_8bit(d) then d = check.idna_domain(d) end   -- checked valid just above
    if literal_of(d) == false or (not literal_of(d) and not dns.normalize(d)) then
      return errors.invalid("to[" .. i .. "]: bad domain in " .. ("%q"):format(addr))
    end
    d = literal_of(d) and d or dns.normalize(d)
    bare_to[i] = b
    local job = by_domain[d]
    if not job then
      job = { domain = d, idx = {} }
      by_domain[d] = job
      jobs[#jobs + 1] = job
    end
    job.idx[#job.idx + 1] = i
  end

  local smtp = require "smtp"
  if type(smtp.connect) ~= "function" then
    error("smtp.connect is not available", 2)
  end
  -- The client's own checks (EHLO name, addresses, timeouts), so that bad input opens nothing.
  local config = require "smtp.config"
  local cfg, cerr = config.connection({ server = "127.0.0.1", port = opts.port or 25, tls = tls,
    helo = opts.helo, timeout = opts.timeout, cafile = opts.cafile, bind = opts.bind,
    proxy = opts.proxy }, "deliver")
  if not cfg then return nil, cerr end
  local tx, terr = config.message({ message = message, from = from, to = to, dsn = opts.dsn }, "deliver")
  if not tx then return nil, terr end
  local timeout = opts.timeout
  local dane_mode = require("smtp.dane").mode(opts.dane, "deliver")
  -- MTA-STS is on unless turned off: discovery failures never block a delivery (RFC 8461 §5),
  -- so it costs a TXT lookup per domain and makes STARTTLS stripping fail for published domains.
  local sts_opts
  if opts.mta_sts ~= false then
    local m = type(opts.mta_sts) == "table" and opts.mta_sts or {}
    if opts.mta_sts ~= nil and opts.mta_sts ~= true and type(opts.mta_sts) ~= "table" then
      error("bad argument #1 to 'deliver' (mta_sts: boolean or table expected)", 2)
    end
    sts_opts = { nameservers = opts.nameservers, timeout = m.timeout, dns_timeout = opts.dns_timeout,
      cafile = m.cafile or opts.cafile, port = m.port, cache_dir = m.cache_dir, cache = m.cache,
      destinations = destinations, now = m.now, background = m.background,
      bind = cfg.bind, proxy = cfg.proxy }   -- the fetch leaves the way deliveries do
  end
  if opts.tlsrpt ~= nil and type(opts.tlsrpt) ~= "table" then
    error("bad argument #1 to 'deliver' (tlsrpt: smtp.tlsrpt report expected)", 2)
  end
  local ctx = {
    dane = dane_mode,
    opts = opts, smtp = smtp, message = message, from = bare(from), to = to, bare_to = bare_to,
    tls = tls, port = opts.port or 25, destinations = destinations, bind = cfg.bind, proxy = cfg.proxy,
    dns_timeout = opts.dns_timeout or (type(timeout) == "number" and timeout) or nil,
    tr = opts.transcript, ev = opts.on_event, limits = opts.limits,
    mta_sts = sts_opts, tlsrpt = opts.tlsrpt, requiretls = opts.requiretls == true,
  }
  local results = {}
  local fns = {}
  for _, job in ipairs(jobs) do
    fns[#fns + 1] = function()
      deliver_domain(job, results, ctx)
      if job.sts then job.sts:annotate(results, job.idx) end
    end
  end
  run_all(fns)
  local c, ev = observe.counters, opts.on_event
  for _, r in ipairs(results) do
    local k = "deliver_" .. r.status
    c[k] = (c[k] or 0) + 1
    if ev then
      observe.event(ev, "deliver", nil, { recipient = r.recipient, status = r.status, code = r.code,
        enhanced = r.enhanced, text = r.text, host = r.host, address = r.address })
    end
  end
  return results
end

return M
