-- A DNSSEC test bed on loopback for the DANE specs: zones signed at test time with ldns-signzone,
-- served by NSD, and validated by a private unbound whose only trust anchor is the signed zone's
-- DS. Names outside a signed zone (an unsigned zone beside it) are insecure, as on the Internet
-- below an unsigned delegation. Everything runs in a temp dir, on free ports, stopped by PID.
local helper = require "helper"

local M = {}

local q = helper.quote
-- a string in nsd.conf / unbound.conf
local function cq(s) return '"' .. s .. '"' end

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"exit=$?\"")
  local out = p:read("*a")
  p:close()
  local body, code = out:match("^(.-)exit=(%d+)%s*$")
  return body or out, tonumber(code)
end

local function run(cmd)
  local out, code = sh(cmd)
  assert(code == 0, cmd .. " failed: " .. out)
  return out
end

-- The zone file text for `origin` with `records` (lines relative to the origin), SOA and NS added.
local function zone_text(origin, records)
  local lines = {
    "$ORIGIN " .. origin .. ".",
    "$TTL 300",
    "@ IN SOA ns." .. origin .. ". hostmaster." .. origin .. ". 1 3600 600 86400 300",
    "@ IN NS ns." .. origin .. ".",
    "ns IN A 127.0.0.1",
  }
  for _, r in ipairs(records) do lines[#lines + 1] = r end
  return table.concat(lines, "\n") .. "\n"
end

-- Signs dir/<origin> into dir/<origin>.signed with a fresh KSK and ZSK (ECDSA P-256); returns
-- the path of the KSK's DS file (unbound's trust anchor).
local function sign(dir, origin)
  local ksk = run("cd " .. q(dir) .. " && ldns-keygen -a ECDSAP256SHA256 -k " .. q(origin)):match("(K%S+)")
  local zsk = run("cd " .. q(dir) .. " && ldns-keygen -a ECDSAP256SHA256 " .. q(origin)):match("(K%S+)")
  assert(ksk and zsk, "ldns-keygen gave no key names")
  run("cd " .. q(dir) .. " && ldns-signzone " .. q(origin) .. " " .. q(ksk) .. " " .. q(zsk))
  return dir .. "/" .. ksk .. ".ds"
end

-- Breaks the signature over the RRset (owner, type) in a signed zone file: one character of the
-- RRSIG's base64 is changed, so the record stays well-formed and only validation fails.
local function break_rrsig(path, owner, rtype)
  local text = assert(helper.read(path))
  local out, done = {}, false
  for line in text:gmatch("[^\n]+") do
    local fields = {}
    for f in line:gmatch("%S+") do fields[#fields + 1] = f end
    if not done and fields[1] == owner and fields[4] == "RRSIG" and fields[5] == rtype then
      local sig = fields[#fields]
      local c = sig:sub(10, 10)
      fields[#fields] = sig:sub(1, 9) .. (c == "A" and "B" or "A") .. sig:sub(11)
      line = table.concat(fields, "\t")
      done = true
    end
    out[#out + 1] = line
  end
  assert(done, "no RRSIG " .. rtype .. " for " .. owner .. " in " .. path)
  helper.write(path, table.concat(out, "\n") .. "\n")
end

local function need()
  for _, p in ipairs { "/usr/sbin/nsd", "/usr/sbin/unbound", "/usr/bin/ldns-signzone", "/usr/bin/ldns-keygen" } do
    local f = io.open(p)
    if not f then
      error(("missing peer: %s (install the Debian packages nsd unbound ldnsutils; `make deps` does)"):format(p), 3)
    end
    f:close()
  end
end

-- M.start{ signed = { origin = { records... } }, unsigned = { origin = { records... } },
--          bogus = { { owner = "name.", type = "TLSA" }, ... } }
--   -> { nameserver = "127.0.0.1:P" (unbound), nsd = "127.0.0.1:P", stop = fn, dir = }
function M.start(o)
  need()
  local dir = helper.tmpdir()
  local anchors, zones = {}, {}
  for origin, records in pairs(o.signed or {}) do
    helper.write(dir .. "/" .. origin, zone_text(origin, records))
    anchors[#anchors + 1] = sign(dir, origin)
    zones[#zones + 1] = { origin, origin .. ".signed" }
  end
  for origin, records in pairs(o.unsigned or {}) do
    helper.write(dir .. "/" .. origin, zone_text(origin, records))
    zones[#zones + 1] = { origin, origin }
  end
  for _, b in ipairs(o.bogus or {}) do
    local found
    for _, z in ipairs(zones) do
      if b.owner:sub(-#z[1] - 1) == z[1] .. "." then
        break_rrsig(dir .. "/" .. z[2], b.owner, b.type)
        found = true
      end
    end
    assert(found, "bogus: no zone holds " .. b.owner .. " (a fully qualified name)")
  end

  local nport = helper.free_port("127.0.0.1")
  local nsd_conf = {
    "server:", "  ip-address: 127.0.0.1@" .. nport, "  username: \"\"", "  chroot: \"\"",
    "  zonesdir: " .. cq(dir), "  database: \"\"", "  pidfile: " .. cq(dir .. "/nsd.pid"),
    "  logfile: " .. cq(dir .. "/nsd.log"), "  xfrdfile: " .. cq(dir .. "/xfrd.state"),
    "  zonelistfile: " .. cq(dir .. "/zone.list"), "  xfrdir: " .. cq(dir),
    "  server-count: 1", "  verbosity: 1", "  tcp-count: 10",
    "remote-control:", "  control-enable: no",
  }
  for _, z in ipairs(zones) do
    nsd_conf[#nsd_conf + 1] = "zone:"
    nsd_conf[#nsd_conf + 1] = "  name: " .. z[1]
    nsd_conf[#nsd_conf + 1] = "  zonefile: " .. cq(dir .. "/" .. z[2])
  end
  helper.write(dir .. "/nsd.conf", table.concat(nsd_conf, "\n") .. "\n")
  local nsd = helper.spawn({ "/usr/bin/env", "-u", "LD_PRELOAD", "-u", "ASAN_OPTIONS", "-u", "UBSAN_OPTIONS",
    "/usr/sbin/nsd", "-d", "-c", dir .. "/nsd.conf" }, { limit = 300, log = dir .. "/nsd.out" })

  local uport = helper.free_port("127.0.0.1")
  local ub = {
    "server:", "  interface: 127.0.0.1", "  port: " .. uport, "  do-daemonize: no",
    "  username: \"\"", "  chroot: \"\"", "  directory: " .. cq(dir), "  pidfile: \"\"",
    "  use-syslog: no", "  logfile: \"\"", "  verbosity: 1", "  val-log-level: 2",
    "  num-threads: 1", "  so-reuseport: no", "  outgoing-range: 64", "  incoming-num-tcp: 10",
    "  access-control: 127.0.0.0/8 allow",
    -- the authoritative server is on loopback; "test." is a default local zone otherwise
    "  do-not-query-localhost: no", "  local-zone: \"test.\" nodefault",
    "  module-config: \"validator iterator\"", "  qname-minimisation: no",
    "  target-fetch-policy: \"0 0 0 0 0\"", "  prefetch: no", "  minimal-responses: yes",
    "  auto-trust-anchor-file: \"\"",
  }
  for _, a in ipairs(anchors) do ub[#ub + 1] = "  trust-anchor-file: " .. cq(a) end
  ub[#ub + 1] = "remote-control:"
  ub[#ub + 1] = "  control-enable: no"
  for _, z in ipairs(zones) do
    ub[#ub + 1] = "stub-zone:"
    ub[#ub + 1] = "  name: \"" .. z[1] .. ".\""
    ub[#ub + 1] = "  stub-addr: 127.0.0.1@" .. nport
  end
  helper.write(dir .. "/unbound.conf", table.concat(ub, "\n") .. "\n")
  local unbound = helper.spawn({ "/usr/bin/env", "-u", "LD_PRELOAD", "-u", "ASAN_OPTIONS", "-u", "UBSAN_OPTIONS",
    "/usr/sbin/unbound", "-d", "-c", dir .. "/unbound.conf" }, { limit = 300, log = dir .. "/unbound.out" })

  -- Ready when unbound gives a validated answer from the first signed zone (or any answer when
  -- none is signed): both servers are up and the trust anchor works.
  local core = require "smtp.core"
  local probe = (next(o.signed or {})) or (next(o.unsigned or {}))
  local ready, last = false, nil
  local deadline = core.now() + 15
  while not ready and core.now() < deadline do
    local r = core.resolver { nameservers = { "127.0.0.1:" .. uport }, timeout = 0.3, tries = 1 }
    local id = r:query("ns." .. probe, "A", "ad")
    while r:process() > 0 do r:wait(0.3) end
    local a, e = r:result(id)
    r:close()
    ready = a and #a > 0 and (a.secure or not (o.signed and next(o.signed)))
    last = a and ("secure=" .. tostring(a.secure)) or e
    if not ready then helper.sleep(0.05) end
  end
  if not ready then
    local log = "nsd: " .. nsd:output() .. (helper.read(dir .. "/nsd.log") or "") .. "\nunbound: " .. unbound:output()
    unbound:stop(); nsd:stop()
    error("the DNSSEC bed did not answer (" .. tostring(last) .. "): " .. log)
  end
  return {
    dir = dir, nameserver = "127.0.0.1:" .. uport, nsd = "127.0.0.1:" .. nport,
    log = function() return "nsd: " .. nsd:output() .. (helper.read(dir .. "/nsd.log") or "") ..
      "\nunbound: " .. unbound:output() end,
    stop = function() unbound:stop(); nsd:stop() end,
  }
end

-- A DER item at byte i of s: its tag, first content byte, the byte after it.
local function der_item(s, i)
  local tag, len, hdr = s:byte(i), s:byte(i + 1), 2
  if len >= 0x80 then
    local n = len - 0x80
    len = 0
    for k = 1, n do len = len * 256 + s:byte(i + 1 + k) end
    hdr = 2 + n
  end
  return tag, i + hdr, i + hdr + len
end

-- The first certificate of a PEM file as DER, and its SubjectPublicKeyInfo (RFC 5280 §4.1:
-- tbsCertificate's fields after [0] version, serial, signature, issuer, validity, subject).
local function der_and_spki(pem)
  local text = assert(helper.read(pem), pem)
  local b64 = assert(text:match("%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-(.-)%-%-%-%-%-END"), pem)
  local der = assert(require("smtp.core").b64decode((b64:gsub("%s", ""))))
  local _, cert = der_item(der, 1)
  local _, pos = der_item(der, cert)
  local tag, _, nxt = der_item(der, pos)
  if tag == 0xa0 then pos = nxt end
  for _ = 1, 5 do pos = select(3, der_item(der, pos)) end
  return der, der:sub(pos, select(3, der_item(der, pos)) - 1)
end

local function hex(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end

-- TLSA association data (hex) for a PEM certificate: selector 0 (the certificate) or 1 (its
-- SubjectPublicKeyInfo), matching 0 (exact), 1 (SHA-256) or 2 (SHA-512, by openssl: the core
-- has SHA-256 only).
function M.tlsa_data(pem, selector, mtype)
  local der, spki = der_and_spki(pem)
  local data = selector == 0 and der or spki
  if mtype == 0 then return hex(data) end
  if mtype == 1 then return hex(require("smtp.core").sha256(data)) end
  local path = helper.tmpdir() .. "/data.der"
  helper.write(path, data)
  local out = run("openssl dgst -sha512 -r " .. q(path))
  return (assert(out:match("^(%x+)"), "openssl dgst: " .. out))
end

return M
