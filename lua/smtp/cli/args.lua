-- The command-line conventions and option values shared by the lua-smtp commands (`send`,
-- `sink`, `mx`): one parser, so every command reads its arguments the same way, and the value
-- checks, so they accept the same spellings and refuse bad ones with the same words, before any
-- connection or query is made.
local util = require "smtp.dnsutil"

local M = {}

-- The resolver takes at most this many name servers (csrc/dns.c).
M.max_nameservers = 8

-- One --nameserver value, HOST[:PORT] where HOST is an IP address (the resolver asks servers by
-- address: naming one by a name would need a resolver first): "192.0.2.1", "192.0.2.1:5353",
-- "::1", "[::1]", "[::1]:5353". Returns the value as the resolver takes it ("ip" or "ip:port",
-- IPv6 with a port in brackets) | nil, reason.
function M.nameserver(v)
  if type(v) ~= "string" or v == "" then return nil, "an IP address expected" end
  if v:find(",", 1, true) then return nil, "one address per --nameserver (repeat the option)" end
  local host, port = v:match("^%[(.+)%]:(%d+)$")
  if host then
    if not util.is_ipv6(host) then return nil, "not an IPv6 address in brackets" end
  else
    host = v:match("^%[(.+)%]$")
    if host then
      if not util.is_ipv6(host) then return nil, "not an IPv6 address in brackets" end
    elseif util.is_ipv6(v) then
      host = v
    else
      host, port = v:match("^([^:]+):(%d+)$")
      host = host or v
      if not util.is_ipv4(host) then return nil, "HOST must be an IP address" end
    end
  end
  if port then
    local n = tonumber(port)
    if #port > 5 or n < 1 or n > 65535 then return nil, "port must be 1 to 65535" end
    return (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. n
  end
  return host
end

-- Appends the checked --nameserver value `v` to `list`: true | nil, message for the user.
function M.add_nameserver(list, v)
  local ns, why = M.nameserver(v)
  if not ns then return nil, "bad --nameserver '" .. tostring(v) .. "': " .. why end
  if #list >= M.max_nameservers then
    return nil, "at most " .. M.max_nameservers .. " --nameserver options"
  end
  list[#list + 1] = ns
  return true
end

-- True when `a` is an option rather than a value ("-v", "--to"; "-" alone is a value).
local function is_option(a)
  return a:sub(1, 1) == "-" and #a > 1
end
M.is_option = is_option

-- Parses `argv` by `spec`:
--   spec.single   = { name = true }  options that take one value and may be given once
--   spec.repeated = { name = true }  options that take one value each time and may be repeated
--                                    (swaks, curl, msmtp: --to a --to b), gathered in a list
--   spec.flags    = { name = true }  options without a value
--   spec.short    = { v = "verbose" } one-letter spellings of flags
-- A value is `--name VALUE` or `--name=VALUE`. The word after an option is its value unless it
-- is an option itself, so a flag is never taken as a value, wherever it stands (a value that
-- starts with "-" is written --name=VALUE). Returns the options (lists for repeated ones, true
-- for flags) | nil, message for the user; the message is "help" for -h and --help.
function M.parse(argv, spec)
  local single, repeated = spec.single or {}, spec.repeated or {}
  local flags, short = spec.flags or {}, spec.short or {}
  local o = {}
  for name in pairs(repeated) do o[name] = {} end
  local i, last = 1, nil
  while i <= #argv do
    local a = argv[i]
    if a == "-h" or a == "--help" then return nil, "help" end
    local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
    name = name or a:match("^%-%-([%w%-]+)$")
    if not name and a:match("^%-%w$") then
      name = short[a:sub(2)]
      if not name then return nil, "unknown option " .. a end
    end
    if not name then
      if last and repeated[last] then
        return nil, ("unexpected argument '%s' (one value per --%s: repeat the option, --%s A --%s B)"):format(
          a, last, last, last)
      end
      return nil, "unexpected argument '" .. a .. "'"
    end
    if flags[name] then
      if inline then return nil, "--" .. name .. " takes no value" end
      o[name] = true
    elseif single[name] or repeated[name] then
      local v = inline
      if not v then
        v = argv[i + 1]
        if v == nil then return nil, "--" .. name .. " needs a value" end
        if is_option(v) then
          return nil, "--" .. name .. " needs a value (write --" .. name .. "=VALUE for one that starts with '-')"
        end
        i = i + 1
      end
      if single[name] then
        if o[name] ~= nil then return nil, "--" .. name .. " given twice" end
        o[name] = v
      else
        local list = o[name]
        list[#list + 1] = v
      end
    else
      return nil, "unknown option --" .. name
    end
    last = name
    i = i + 1
  end
  return o
end

-- The transcript function of -v / --verbose: one line per event on `stream`, as swaks and
-- curl -v print them. `side` is "client" (received lines "<-", sent "->") or "server" (the
-- sink: what the client sent "<-", the replies "->"); TLS, DNS and connection notes start with
-- "*". Once a second connection shows up, each line starts with its connection id.
function M.transcript_printer(stream, side)
  local first, many = nil, side == "server"
  local marks = { send = "-> ", recv = "<- " }
  return function(ev)
    if ev.conn then
      if first == nil then first = ev.conn elseif ev.conn ~= first then many = true end
    end
    local prefix = (many and ev.conn) and ("[" .. ev.conn .. "] ") or ""
    stream:write(prefix, marks[ev.dir] or "* ", ev.line, "\n")
    if stream.flush then stream:flush() end
  end
end

-- A --timeout value: seconds > 0 | nil, message for the user.
function M.timeout(v)
  local t = tonumber(v)
  if not t or t <= 0 or t ~= t then return nil, "bad --timeout '" .. tostring(v) .. "'" end
  return t
end

return M
