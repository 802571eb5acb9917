-- The MTA-STS test bed: certificates made at test time (signed by helper.certs()'s CA), dnsmasq
-- publishing the _mta-sts TXT, MX and address records of the test domains, and
-- mtasts_peers.py (HTTPS policy server, MX hosts with STARTTLS, a STARTTLS-stripping man in the
-- middle), all on 127.0.19.x and stopped by PID.
local helper = require "helper"
local dnsmasq = require "support.dnsmasq"

local M = {}

local function run(cmd)
  local p = io.popen(cmd .. " 2>&1; echo rc=$?")
  local out = p:read("*a")
  p:close()
  assert(out:match("rc=0%s*$"), cmd .. ": " .. out)
end

-- A key and a certificate for `names` (DNS SANs) signed by the test CA: cert, key paths.
function M.cert(dir, base, names, ca)
  local san = {}
  for i, n in ipairs(names) do san[i] = "DNS:" .. n end
  local q = helper.quote
  helper.write(dir .. "/" .. base .. ".cnf", "[e]\nsubjectAltName = " .. table.concat(san, ", ") ..
    "\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n")
  run(("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s -out %s -subj /CN=%s"):format(
    q(dir .. "/" .. base .. ".key"), q(dir .. "/" .. base .. ".csr"), names[1]))
  run(("openssl x509 -req -in %s -CA %s -CAkey %s -CAcreateserial -out %s -days 2 -extfile %s -extensions e"):format(
    q(dir .. "/" .. base .. ".csr"), q(ca.ca), q(ca.ca_key), q(dir .. "/" .. base .. ".pem"),
    q(dir .. "/" .. base .. ".cnf")))
  return dir .. "/" .. base .. ".pem", dir .. "/" .. base .. ".key"
end

local function json(v)
  local t = type(v)
  if t == "string" then return '"' .. v:gsub('[\\"]', "\\%0") .. '"' end
  if t == "number" then return tostring(v) end
  if v[1] ~= nil or next(v) == nil then
    local o = {}
    for i, x in ipairs(v) do o[i] = json(x) end
    return "[" .. table.concat(o, ",") .. "]"
  end
  local o = {}
  for k, x in pairs(v) do o[#o + 1] = json(k) .. ":" .. json(x) end
  return "{" .. table.concat(o, ",") .. "}"
end

-- M.start{ domains = { [name] = { txt = "v=STSv1; id=1;" | nil, policy = text | nil,
--   mx = { "host" ... } } }, hosts = { [name] = ip }, mx = { { name=, ip=, good = bool } },
--   strip = { { ip=, to= } } } -> bed with nameserver, port (SMTP), web_port, cafile, dir,
--   :policy(domain, text), :gets(), :messages(), :dns(records) (a new dnsmasq), :stop()
function M.start(o)
  helper.need("dnsmasq")
  helper.need("aiosmtpd")
  local ca = helper.certs()
  local dir = helper.tmpdir()
  local policies = dir .. "/policies"
  os.execute("mkdir -p " .. helper.quote(policies))
  local web_names, good_names = {}, {}
  for d in pairs(o.domains) do web_names[#web_names + 1] = "mta-sts." .. d end
  table.sort(web_names)
  for _, m in ipairs(o.mx) do if m.good then good_names[#good_names + 1] = m.name end end
  local web_cert, web_key = M.cert(dir, "web", web_names, ca)
  local bed = { dir = dir, cafile = ca.ca, policies = policies }
  local mxconf = {}
  for _, m in ipairs(o.mx) do
    local cert, key
    if m.good then
      cert, key = M.cert(dir, "mx-" .. m.name, { m.name }, ca)
    else
      cert, key = ca.wrong, ca.wrong_key   -- a certificate for wrong.example
    end
    mxconf[#mxconf + 1] = { name = m.name, ip = m.ip, cert = cert, key = key }
  end
  local port = helper.free_port("127.0.19.2")
  local web_port = helper.free_port("127.0.19.10")
  bed.port, bed.web_port = port, web_port
  function bed:policy(domain, text)
    local path = self.policies .. "/mta-sts." .. domain
    if text then helper.write(path, text) else os.remove(path) end
  end
  local records = {}
  function bed.records_for(domains)
    local r = {}
    for d, spec in pairs(domains) do
      if spec.txt then r[#r + 1] = ("--txt-record=_mta-sts.%s,%s"):format(d, spec.txt) end
      r[#r + 1] = ("--host-record=mta-sts.%s,127.0.19.10"):format(d)
      for i, h in ipairs(spec.mx or {}) do r[#r + 1] = ("--mx-host=%s,%s,%d"):format(d, h, i * 10) end
    end
    for h, ip in pairs(o.hosts) do r[#r + 1] = ("--host-record=%s,%s"):format(h, ip) end
    return r
  end
  records = bed.records_for(o.domains)
  for d, spec in pairs(o.domains) do if spec.policy then bed:policy(d, spec.policy) end end
  bed.zone = dnsmasq.start(records)
  bed.nameserver = bed.zone.nameserver
  local conf = { port = port, mx = mxconf, strip = o.strip or {}, policies = policies,
    web = { ip = "127.0.19.10", port = web_port, cert = web_cert, key = web_key } }
  helper.write(dir .. "/peers.json", json(conf))
  bed.proc = helper.spawn(dnsmasq.argv_clean { helper.python, "-u", helper.root .. "/spec/support/mtasts_peers.py",
    dir .. "/peers.json" }, { limit = 300 })
  for _ = 1, 200 do
    if bed.proc:output():match("ready") or not bed.proc:alive() then break end
    helper.sleep(0.05)
  end
  assert(bed.proc:output():match("ready"), "MTA-STS peers did not start: " .. bed.proc:output())
  -- A second zone with other records (a changed TXT id): its nameserver.
  function bed:dns(domains)
    local z = dnsmasq.start(bed.records_for(domains))
    self.extra = self.extra or {}
    self.extra[#self.extra + 1] = z
    return z.nameserver
  end
  function bed:gets(host)
    local n = 0
    for h in self.proc:output():gmatch("GET (%S+)") do if not host or h == host then n = n + 1 end end
    return n
  end
  function bed:messages()
    local list = {}
    for line in self.proc:output():gmatch("[^\n]+") do
      if line:sub(1, 1) == "{" then
        list[#list + 1] = { mx = line:match('"mx": "([^"]*)"'), tls = line:match('"tls": true') ~= nil,
          to = line:match('"to": %["([^"]*)"') }
      end
    end
    return list
  end
  function bed:stop()
    self.proc:stop()
    self.zone:stop()
    for _, z in ipairs(self.extra or {}) do z:stop() end
  end
  return bed
end

return M
