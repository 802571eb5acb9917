-- DANE in smtp.deliver (RFC 7672) end to end on loopback: zones signed at test time and served by
-- NSD, validated by a private unbound (spec/support/dnssec.lua); MX hosts are aiosmtpd servers on
-- 127.0.0.x with certificates made at test time, matching their TLSA records or not; one MX is a
-- man in the middle that deletes STARTTLS from the EHLO reply.
local helper = require "helper"
local dnssec = require "support.dnssec"

local mx_py = [[
import asyncio, json, ssl, sys, time
from aiosmtpd.controller import Controller
port, conf = int(sys.argv[1]), json.loads(sys.argv[2])

class Handler:
    def __init__(self, ip):
        self.ip = ip
    async def handle_DATA(self, server, session, envelope):
        print("TX " + json.dumps({"ip": self.ip, "tls": session.ssl is not None,
                                  "to": envelope.rcpt_tos}), flush=True)
        return "250 2.0.0 queued"

controllers = []
for h in conf["hosts"]:
    ctx = None
    if "cert" in h:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(h["cert"], h["key"])
    try:
        c = Controller(Handler(h["ip"]), hostname=h["ip"], port=h.get("port", port), ready_timeout=10,
                       tls_context=ctx)
        c.start()
    except Exception as e:
        print("failed", h["ip"], e, flush=True)
        sys.exit(1)
    controllers.append(c)

# The stripper: relays to its backend, dropping the STARTTLS line of every EHLO reply.
async def strip(reader, writer, backend):
    br, bw = await asyncio.open_connection(backend, port)
    async def up():
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    break
                bw.write(data)
                await bw.drain()
        finally:
            bw.close()
    async def down():
        try:
            while True:
                line = await br.readline()
                if not line:
                    break
                if line.upper().startswith(b"250-STARTTLS"):
                    continue
                writer.write(line)
                await writer.drain()
        finally:
            writer.close()
    await asyncio.gather(up(), down(), return_exceptions=True)

async def main():
    servers = []
    for s in conf["strippers"]:
        servers.append(await asyncio.start_server(
            lambda r, w, b=s["backend"]: strip(r, w, b), s["ip"], port))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
]]

local function sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1")
  local out = p:read("*a")
  p:close()
  return out
end

describe("DANE (smtp.deliver, dane = true)", function()
  local deliver = require("smtp.deliver").deliver
  local bed, mxproc, port, certs, plain25

  setup(function()
    certs = helper.certs()
    local dir = helper.tmpdir()
    -- A leaf for mx-ta.dane.test issued by the test CA, sent with the CA (DANE-TA matches the CA).
    local q = helper.quote
    helper.write(dir .. "/ta.ext", "subjectAltName=DNS:mx-ta.dane.test\nextendedKeyUsage=serverAuth\n")
    sh(("cd %s && openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ta.key -out ta.csr " ..
        "-subj /CN=mx-ta.dane.test && openssl x509 -req -in ta.csr -CA %s -CAkey %s -set_serial 4242 " ..
        "-out ta.pem -days 2 -extfile ta.ext && cat ta.pem %s > ta-chain.pem"):format(q(dir), q(certs.ca),
        q(certs.ca_key), q(certs.ca)))
    assert(helper.read(dir .. "/ta-chain.pem"), "test leaf for DANE-TA not made")

    -- The MX hosts start while the zone is signed. The CLI dials port 25 only: its host (no
    -- STARTTLS, while its TLSA records demand it) is on port 25 of an address of its own.
    port = helper.free_port("127.0.0.11")
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
    plain25 = ("127.%d.%d.%d"):format(math.random(100, 250), math.random(1, 250), math.random(2, 250))
    local hosts = {
      { ip = "127.0.0.11", cert = certs.server, key = certs.server_key },
      { ip = "127.0.0.12", cert = certs.expired, key = certs.expired_key },
      { ip = "127.0.0.13", cert = dir .. "/ta-chain.pem", key = dir .. "/ta.key" },
    }
    local list = {}
    for i, h in ipairs(hosts) do list[i] = ('{"ip":"%s","cert":"%s","key":"%s"}'):format(h.ip, h.cert, h.key) end
    list[#list + 1] = ('{"ip":"%s","port":25}'):format(plain25)
    local json = ('{"hosts":[%s],"strippers":[{"ip":"127.0.0.14","backend":"127.0.0.11"}]}'):format(
      table.concat(list, ","))
    helper.need("aiosmtpd")
    helper.write(dir .. "/mx.py", mx_py)
    mxproc = helper.spawn({ helper.python, "-u", dir .. "/mx.py", tostring(port), json }, { limit = 300 })

    local spki = dnssec.tlsa_data(certs.server, 1, 1)
    local other = dnssec.tlsa_data(certs.other_ca, 1, 1)
    local ca_cert = dnssec.tlsa_data(certs.ca, 0, 1)
    bed = dnssec.start {
      signed = { ["dane.test"] = {
        -- 127.0.0.11: certs.server (a certificate for "localhost": DANE-EE checks no names)
        "ee MX 10 mx-ee", "mx-ee A 127.0.0.11", "_25._tcp.mx-ee TLSA 3 1 1 " .. spki,
        "ee-cert MX 10 mx-ee-cert", "mx-ee-cert A 127.0.0.11",
        "_25._tcp.mx-ee-cert TLSA 3 0 1 " .. dnssec.tlsa_data(certs.server, 0, 1),
        "ee-512 MX 10 mx-ee-512", "mx-ee-512 A 127.0.0.11",
        "_25._tcp.mx-ee-512 TLSA 3 1 2 " .. dnssec.tlsa_data(certs.server, 1, 2),
        "ee-exact MX 10 mx-ee-exact", "mx-ee-exact A 127.0.0.11",
        "_25._tcp.mx-ee-exact TLSA 3 1 0 " .. dnssec.tlsa_data(certs.server, 1, 0),
        "ee-bad MX 10 mx-ee-bad", "mx-ee-bad A 127.0.0.11", "_25._tcp.mx-ee-bad TLSA 3 1 1 " .. other,
        -- the first MX fails DANE, the second passes
        "two MX 10 mx-ee-bad", "two MX 20 mx-ee",
        -- 127.0.0.12: an expired certificate (DANE-EE checks no dates)
        "expired MX 10 mx-expired", "mx-expired A 127.0.0.12",
        "_25._tcp.mx-expired TLSA 3 1 1 " .. dnssec.tlsa_data(certs.expired, 1, 1),
        -- 127.0.0.13: a leaf for mx-ta.dane.test and the CA
        "ta MX 10 mx-ta", "mx-ta A 127.0.0.13", "_25._tcp.mx-ta TLSA 2 0 1 " .. ca_cert,
        "ta-spki MX 10 mx-ta", -- same host, reached through another domain
        "ta-bad MX 10 mx-ta-bad", "mx-ta-bad A 127.0.0.13",
        "_25._tcp.mx-ta-bad TLSA 2 0 1 " .. dnssec.tlsa_data(certs.other_ca, 0, 1),
        "ta-name MX 10 mx-ta-name", "mx-ta-name A 127.0.0.13", "_25._tcp.mx-ta-name TLSA 2 0 1 " .. ca_cert,
        -- 127.0.0.14: strips STARTTLS, relays to 127.0.0.11
        "strip MX 10 mx-strip", "mx-strip A 127.0.0.14", "_25._tcp.mx-strip TLSA 3 1 1 " .. spki,
        "strip-none MX 10 mx-strip-none", "mx-strip-none A 127.0.0.14",
        -- PKIX usages and a digest of the wrong length: nothing usable
        "unusable MX 10 mx-unusable", "mx-unusable A 127.0.0.11",
        "_25._tcp.mx-unusable TLSA 1 1 1 " .. other, "_25._tcp.mx-unusable TLSA 0 0 1 " .. ca_cert,
        "_25._tcp.mx-unusable TLSA 3 1 1 " .. spki:sub(1, 62),
        "bogus MX 10 mx-bogus", "mx-bogus A 127.0.0.11", "_25._tcp.mx-bogus TLSA 3 1 1 " .. spki,
        "none MX 10 mx-none", "mx-none A 127.0.0.11",
        -- the host's AAAA fails validation: its A answer alone must not make it "insecure"
        "aaaa-bogus MX 10 mx-aaaa-bogus", "mx-aaaa-bogus A 127.0.0.11", "mx-aaaa-bogus AAAA ::1",
        "cli MX 10 mx-cli", "mx-cli A " .. plain25, "_25._tcp.mx-cli TLSA 3 1 1 " .. spki,
      } },
      unsigned = { ["plain.test"] = {
        -- TLSA records that would fail, in a zone nobody signed: not DANE
        "@ MX 10 mx", "mx A 127.0.0.11", "_25._tcp.mx TLSA 3 1 1 " .. other,
        -- an unsigned MX RRset pointing at a signed host whose TLSA would fail
        "insecure-mx MX 10 mx-ee-bad.dane.test.",
      } },
      bogus = { { owner = "_25._tcp.mx-bogus.dane.test.", type = "TLSA" },
                { owner = "mx-aaaa-bogus.dane.test.", type = "AAAA" } },
    }

    for _ = 1, 300 do
      local out = mxproc:output()
      if out:match("ready") or out:match("failed") or not mxproc:alive() then break end
      helper.sleep(0.05)
    end
    assert(mxproc:output():match("ready"), "MX hosts did not start: " .. mxproc:output())
  end)

  teardown(function()
    if mxproc then mxproc:stop() end
    if bed then bed.stop() end
  end)

  -- The transactions the MX hosts logged: { ip=, tls=, to={...} } in arrival order.
  local function transactions()
    local out = {}
    for line in mxproc:output():gmatch("[^\n]+") do
      local j = line:match("^TX (.*)$")
      if j then
        out[#out + 1] = { ip = j:match('"ip": "([^"]+)"'), tls = j:match('"tls": (%a+)') == "true",
                          to = j:match('"to": %["([^"]+)"') }
      end
    end
    return out
  end
  -- The host logs a transaction before it answers the data with 250, so once deliver has
  -- returned, a transaction that happened is in the log: no waiting.
  local function last_for(rcpt)
    local t = transactions()
    for i = #t, 1, -1 do if t[i].to == rcpt then return t[i] end end
  end

  local n = 0
  local function send(domain, dane, extra)
    n = n + 1
    local rcpt = ("r%d@%s"):format(n, domain)
    local o = { message = "From: a@sender.test\r\nSubject: dane\r\n\r\nhello\r\n", from = "a@sender.test",
                to = { rcpt }, helo = "client.test", nameservers = { bed.nameserver }, port = port,
                timeout = 10, destinations = "any", dane = dane == nil and true or dane }
    for k, v in pairs(extra or {}) do o[k] = v end
    local res, err = deliver(o)
    assert(res, tostring(err))
    return res[1], rcpt
  end

  local function sent_verified(domain, usage, ip)
    local r, rcpt = send(domain)
    assert.are.equal("sent", r.status, r.text)
    assert.are.equal("dane", r.tls_policy)
    assert.is_true(r.dane.verified)
    assert.are.equal(usage, r.dane.usage)
    local t = last_for(rcpt)
    assert.truthy(t, "the MX host logged no transaction")
    assert.is_true(t.tls)
    assert.are.equal(ip, t.ip)
    return r
  end

  it("DANE-EE(3) SPKI SHA-256 match: sent over TLS verified by the TLSA record (names ignored)", function()
    local r = sent_verified("ee.dane.test", 3, "127.0.0.11")
    assert.are.equal(1, r.dane.selector)
    assert.are.equal(1, r.dane.mtype)
    assert.are.equal(0, r.dane.depth)
  end)

  it("never resumes a TLS session with a DANE host: the TLSA match is made on every handshake", function()
    local lines = {}
    for _ = 1, 2 do
      local r = send("ee.dane.test", nil, {
        transcript = function(l) if l.dir == "tls" then lines[#lines + 1] = l.line end end })
      assert.are.equal("sent", r.status, r.text)
      assert.is_true(r.dane.verified)
    end
    assert.is_true(#lines >= 2, table.concat(lines, "\n"))
    for _, l in ipairs(lines) do assert.is_nil(l:find("resumed", 1, true), l) end
  end)

  it("DANE-EE(3) with selector 0 (full certificate), SHA-512 and exact matching", function()
    assert.are.equal(0, sent_verified("ee-cert.dane.test", 3, "127.0.0.11").dane.selector)
    assert.are.equal(2, sent_verified("ee-512.dane.test", 3, "127.0.0.11").dane.mtype)
    assert.are.equal(0, sent_verified("ee-exact.dane.test", 3, "127.0.0.11").dane.mtype)
  end)

  it("DANE-EE(3) ignores the certificate's expiry", function()
    sent_verified("expired.dane.test", 3, "127.0.0.12")
  end)

  it("DANE-EE(3) mismatch: deferred with the reason, nothing sent", function()
    local r, rcpt = send("ee-bad.dane.test")
    assert.are.equal("deferred", r.status)
    assert.are.equal("dane", r.tls_policy)
    assert.matches("^DANE: certificate verify failed: no matching DANE TLSA records", r.text)
    assert.is_nil(last_for(rcpt))
  end)

  it("a DANE failure at the first MX host moves on to the next, which passes", function()
    local r = send("two.dane.test")
    assert.are.equal("sent", r.status, r.text)
    assert.are.equal("mx-ee.dane.test", r.host)
    assert.is_true(r.dane.verified)
  end)

  it("DANE-TA(2) match: the chain ends at the TLSA CA and the leaf names the MX host", function()
    local r = sent_verified("ta.dane.test", 2, "127.0.0.13")
    assert.are.equal(1, r.dane.depth)
  end)

  it("DANE-TA(2) mismatch (another CA): deferred", function()
    local r = send("ta-bad.dane.test")
    assert.are.equal("deferred", r.status)
    assert.matches("TLSA", r.text)
  end)

  it("DANE-TA(2) with a certificate for another name: deferred", function()
    local r = send("ta-name.dane.test")
    assert.are.equal("deferred", r.status)
    assert.matches("mx%-ta%-name%.dane%.test", r.text)
  end)

  it("STARTTLS stripped by a man in the middle with TLSA present: deferred, nothing sent", function()
    local r, rcpt = send("strip.dane.test")
    assert.are.equal("deferred", r.status)
    assert.are.equal("dane", r.tls_policy)
    assert.matches("^DANE: .*STARTTLS", r.text)
    assert.is_nil(last_for(rcpt))
  end)

  it("STARTTLS stripped where there is no TLSA: sent in plaintext, as opportunistic TLS does", function()
    local r, rcpt = send("strip-none.dane.test")
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.are.equal("none", r.dane.state)
    assert.is_false(last_for(rcpt).tls)
  end)

  it("unusable TLSA records (PKIX usages, a bad digest length): opportunistic", function()
    local r, rcpt = send("unusable.dane.test")
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.are.equal("unusable", r.dane.state)
    assert.is_true(last_for(rcpt).tls)
  end)

  it("a bogus TLSA answer (broken RRSIG): deferred, the reason says validation failed", function()
    local r, rcpt = send("bogus.dane.test")
    assert.are.equal("deferred", r.status)
    assert.are.equal("dane", r.tls_policy)
    assert.are.equal("defer", r.dane.state)
    assert.matches("^DANE: .*bogus", r.text)
    assert.is_nil(last_for(rcpt))
  end)

  it("a failed address lookup is not an insecure one: the host is not used", function()
    local r, rcpt = send("aaaa-bogus.dane.test")
    assert.are.equal("deferred", r.status)
    assert.are.equal("defer", r.dane.state)
    assert.matches("^DANE: address lookup of mx%-aaaa%-bogus%.dane%.test", r.text)
    assert.is_nil(last_for(rcpt))
  end)

  it("no TLSA records (validated denial): opportunistic", function()
    local r, rcpt = send("none.dane.test")
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.are.equal("none", r.dane.state)
    assert.is_true(last_for(rcpt).tls)
  end)

  it("an unsigned zone: its TLSA records do not count, opportunistic", function()
    local r = send("plain.test")
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.are.equal("insecure", r.dane.state)
  end)

  it("an unsigned MX RRset: no DANE even for a signed MX host with TLSA records", function()
    local r = send("insecure-mx.plain.test")
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.matches("MX RRset", r.dane.reason)
  end)

  it("dane = \"required\": hosts without usable TLSA records are not used", function()
    local r = send("none.dane.test", "required")
    assert.are.equal("deferred", r.status)
    assert.matches("required", r.text)
    assert.are.equal("sent", send("ee.dane.test", "required").status)
  end)

  it("dane = false (the default): the TLSA records are not looked at", function()
    local r = send("ee-bad.dane.test", false)
    assert.are.equal("sent", r.status, r.text)
    assert.is_nil(r.tls_policy)
    assert.is_nil(r.dane)
  end)

  it("the queue runner: via = { mx = true, dane = true } keeps a DANE failure queued", function()
    local q = assert(require("smtp.queue").open(helper.tmpdir() .. "/spool", { via = {
      mx = true, dane = true, port = port, nameservers = { bed.nameserver }, destinations = "any",
      helo = "client.test", timeout = 10 } }))
    local bad = assert(q:submit { message = "Subject: q\r\n\r\nhi\r\n", from = "a@sender.test",
                                  to = { "q1@ee-bad.dane.test" } })
    assert(q:submit { message = "Subject: q\r\n\r\nhi\r\n", from = "a@sender.test", to = { "q2@ee.dane.test" } })
    local counts = q:run_once()
    assert.are.equal(1, counts.sent)
    assert.are.equal(1, counts.deferred)
    local st = assert(q:show(bad))
    assert.are.equal("deferred", st.recipients[1].state)
    assert.matches("^DANE: ", st.recipients[1].text)
    assert.is_true(last_for("q2@ee.dane.test").tls)
  end)

  it("the resolver binding: TLSA only with the AD bit asked for, servers() lists what it asks", function()
    local core = require "smtp.core"
    local r = core.resolver { nameservers = { bed.nameserver } }
    assert.has_error(function() r:query("_25._tcp.mx-ee.dane.test", "TLSA") end)
    assert.has_error(function() r:query("mx-ee.dane.test", "A", "xx") end)
    assert.are.same({ "127.0.0.1" }, r:servers())
    local id = r:query("_25._tcp.mx-ee.dane.test", "TLSA", "ad")
    while r:process() > 0 do r:wait(1) end
    local a = assert(r:result(id))
    assert.is_true(a.secure)
    assert.are.equal(3, a[1].usage)
    assert.are.equal(32, #a[1].data)
    r:close()
  end)

  it("dane takes true, \"required\" or false", function()
    assert.has_error(function() deliver { message = "x", from = "a@b.test", to = { "c@d.test" }, dane = "yes" } end,
      "bad argument #1 to 'deliver' (dane: true, \"required\" or false expected)")
  end)

  it("an AD bit from a resolver off loopback is not believed", function()
    local policy = require("smtp.dane").domain("ee.dane.test", { { host = "mx-ee.dane.test" } },
      { mode = "opportunistic", nameservers = { "192.0.2.1" }, timeout = 1 })
    assert.is_nil(policy.active)
    assert.are.equal("untrusted", policy.hosts["mx-ee.dane.test"].state)
  end)

  it("lua-smtp mx --tls prints each host's TLSA state", function()
    local out = sh(("%s %s/bin/lua-smtp mx ee.dane.test --tls --nameserver %s"):format(
      os.getenv("SMTP_TEST_LUA") or "lua5.4", helper.root, bed.nameserver))
    assert.matches("dane: TLSA _25%._tcp%.mx%-ee%.dane%.test: 3 1 1 ", out)
    assert.matches("dane: MX RRset of ee%.dane%.test: secure", out)
    assert.matches("dane: mx%-ee%.dane%.test: dane %(1 usable TLSA record for", out)
  end)

  it("lua-smtp send --dane defers where TLSA records demand STARTTLS and the host has none", function()
    local cmd = "%s %s/bin/lua-smtp send %s --from a@sender.test --to x@cli.dane.test --subject t " ..
      "--body hi --nameserver %s --destinations any --timeout 10 --helo client.test 2>&1; echo status=$?"
    local lua = os.getenv("SMTP_TEST_LUA") or "lua5.4"
    local out = sh(cmd:format(lua, helper.root, "--dane -v", bed.nameserver))
    assert.matches("deferred", out)
    assert.matches("DANE: the server does not offer STARTTLS, which its TLSA records require", out)
    -- -v shows the TLSA records and the host's state before the connection
    assert.matches("%* dane: TLSA _25%._tcp%.mx%-cli%.dane%.test: 3 1 1 %x+%.%.%.\n", out)
    assert.matches("%* dane: mx%-cli%.dane%.test: dane %(1 usable TLSA record", out)
    assert.matches("dane: dane", out)
    assert.matches("status=1", out)
    local function count()
      local c = 0
      for _, t in ipairs(transactions()) do if t.ip == plain25 then c = c + 1 end end
      return c
    end
    assert.are.equal(0, count())
    -- without --dane the same host gets the message in plaintext, as before
    out = sh(cmd:format(lua, helper.root, "", bed.nameserver))
    assert.matches("status=0", out)
    assert.are.equal(1, count())
  end)
end)
