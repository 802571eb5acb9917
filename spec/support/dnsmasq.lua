-- Test DNS peers for the dns/mx/deliver specs: dnsmasq serving a zone the spec describes (as in
-- PEERS.md), and, for answers no real server gives on request (SERVFAIL, control bytes in host
-- names), a small dnspython responder. Both on 127.0.0.1, on a free port, stopped by PID.
local helper = require "helper"

local M = {}

-- Peers run without the sanitizer runtime that `make test-asan` preloads into the interpreter
-- (dnsmasq exits silently under it).
local clean_env = { "/usr/bin/env", "-u", "LD_PRELOAD", "-u", "ASAN_OPTIONS", "-u", "UBSAN_OPTIONS" }
M.clean_env = clean_env

local function argv_clean(argv)
  local out = {}
  for _, a in ipairs(clean_env) do out[#out + 1] = a end
  for _, a in ipairs(argv) do out[#out + 1] = a end
  return out
end
M.argv_clean = argv_clean

-- M.start{ "--mx-host=...", "--host-record=...", ... } -> { port=, nameserver="127.0.0.1:P", proc= }
-- The zone is everything under .test; names without records answer NXDOMAIN (--local=/test/).
function M.start(records)
  helper.need("dnsmasq")
  local port = helper.free_port("127.0.0.1")
  local argv = {
    "/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
    "--port=" .. port, "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
    "--local=/test/", "--local-ttl=300",
  }
  for _, a in ipairs(records or {}) do argv[#argv + 1] = a end
  local proc = helper.spawn(argv_clean(argv), { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 10), "dnsmasq did not start: " .. proc:output())
  return { port = port, nameserver = "127.0.0.1:" .. port, proc = proc,
           stop = function(self) self.proc:stop() end }
end

local fake_py = [[
import socket, sys
import dns.message, dns.rcode, dns.rrset, dns.name, dns.rdatatype, dns.rdataclass
import dns.rdtypes.ANY.MX, dns.rdtypes.IN.A
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    try:
        q = dns.message.from_wire(data)
    except Exception:
        continue
    r = dns.message.make_response(q)
    qn = q.question[0].name
    first = qn.labels[0].decode("latin-1") if qn.labels else ""
    if first == "servfail":
        r.set_rcode(dns.rcode.SERVFAIL)
    elif first == "refused":
        r.set_rcode(dns.rcode.REFUSED)
    elif first == "ctl" and q.question[0].rdtype == dns.rdatatype.MX:
        rrs = r.find_rrset(r.answer, qn, dns.rdataclass.IN, dns.rdatatype.MX, create=True)
        bad = [b"mx\x01evil", b"mx\nevil", b"mx evil", b"mx\x00evil", b"-lead", b"mx_u", b"\xc3\xa9t\xc3\xa9"]
        for i, lab in enumerate(bad):
            rrs.add(dns.rdtypes.ANY.MX.MX(dns.rdataclass.IN, dns.rdatatype.MX, 1 + i,
                    dns.name.Name([lab, b"test", b""])), 60)
        rrs.add(dns.rdtypes.ANY.MX.MX(dns.rdataclass.IN, dns.rdatatype.MX, 50,
                dns.name.from_text("good.ctl.test.")), 60)
    elif q.question[0].rdtype == dns.rdatatype.A and str(qn) == "good.ctl.test.":
        rrs = r.find_rrset(r.answer, qn, dns.rdataclass.IN, dns.rdatatype.A, create=True)
        rrs.add(dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, "127.0.0.9"), 60)
    s.sendto(r.to_wire(), peer)
]]

-- M.fake() -> { nameserver=, proc= }: "servfail.*" answers SERVFAIL, "refused.*" REFUSED,
-- "ctl.test" MX answers hosts with control and other non-hostname bytes plus good.ctl.test (50).
function M.fake()
  helper.need("dnspython")
  local port = helper.free_port("127.0.0.1")
  local dir = helper.tmpdir()
  helper.write(dir .. "/fake_dns.py", fake_py)
  local proc = helper.spawn(argv_clean { helper.python, "-u", dir .. "/fake_dns.py", tostring(port) },
    { limit = 300 })
  for _ = 1, 100 do
    if proc:output():match("ready") then break end
    helper.sleep(0.05)
  end
  assert(proc:output():match("ready"), "fake dns did not start: " .. proc:output())
  return { port = port, nameserver = "127.0.0.1:" .. port, proc = proc,
           stop = function(self) self.proc:stop() end }
end

return M
