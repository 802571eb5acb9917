-- International domain names: core.idna_to_ascii checked case by case against libidn2's own `idn2`
-- command and Python's `idna` (IDNA2008 + UTS #46) and `encodings.idna` (IDNA2003) where they
-- agree; then addresses with such domains sent to aiosmtpd without SMTPUTF8 (envelope and header
-- as A-labels), delivered through an MX found in dnsmasq under the A-label, and the command line.
local helper = require "helper"
local peers = require "support.client_peers"
local dnsmasq = require "support.dnsmasq"
local core = require "smtp.core"
local smtp = require "smtp"
local check = require "smtp.check"
local message = require "smtp.message"

-- input, expected A-label form (or false: refused), whether Python's idna module agrees (it
-- refuses "_" and agrees elsewhere here), whether IDNA2003 (encodings.idna) gives the same.
local LONG = "ü" .. string.rep("a", 62)
local CASES = {
  { "bücher.example", "xn--bcher-kva.example", py = true, idna2003 = true },
  { "Bücher.EXAMPLE", "xn--bcher-kva.example", py = true, idna2003 = true },       -- case folded
  { "bu\204\136cher.example", "xn--bcher-kva.example", py = true, idna2003 = true }, -- NFC first
  { "faß.de", "xn--fa-hia.de", py = true, idna2003 = false },   -- non-transitional: not fass.de
  { "ﬁ.example", "fi.example", py = true, idna2003 = true },     -- compatibility mapping
  { "ⅷ.example", "viii.example", py = true, idna2003 = true },
  { "Ωmega.test", "xn--mega-fpd.test", py = true, idna2003 = true },
  { "例え.テスト", "xn--r8jz45g.xn--zckzah", py = true, idna2003 = true },
  { "ドメイン名例.jp", "xn--eckwd4c7cu47r2wf.jp", py = true, idna2003 = true },
  { "مثال.إختبار", "xn--mgbh0fb.xn--kgbechtv", py = true, idna2003 = true },
  { "ü" .. string.rep("a", 50) .. ".example", "xn--" .. string.rep("a", 50) .. "-yff.example", py = true, idna2003 = true },
  { "_dmarc.bücher.example", "_dmarc.xn--bcher-kva.example", py = false, idna2003 = true },
  -- refused: a symbol IDNA2008 disallows, a joiner out of context, the bidi rule broken twice, a
  -- hyphen at either end or in the 3rd and 4th places, a label over 63 octets as an A-label
  { "☃.net", false, py = true, idna2003 = false },
  { "√.com", false, py = true, idna2003 = false },
  { "a\226\128\140b.example", false, py = true, idna2003 = false },
  { "aא.example", false, py = true, idna2003 = true },
  { "١٢.com", false, py = true, idna2003 = false },
  { "-ü.example", false, py = true, idna2003 = false },
  { "üb--c.example", false, py = true, idna2003 = false },
  { LONG .. ".example", false, py = true, idna2003 = true },
}

-- What `idn2` (libidn2's command) and Python make of each input: a list of { idn2, py, py2003 },
-- each the A-label form or false.
local function reference()
  helper.need("idn2")
  helper.need("python3 idna")
  local dir = helper.tmpdir()
  local lines = {}
  for _, c in ipairs(CASES) do lines[#lines + 1] = c[1] end
  helper.write(dir .. "/in.txt", table.concat(lines, "\n") .. "\n")
  helper.write(dir .. "/ref.py", [[
import sys, subprocess, idna
def lua(v): return 'false' if v is None else '"' + ''.join('\\%d' % b for b in v.encode()) + '"'
out = []
for d in open(sys.argv[1], encoding='utf-8').read().split('\n')[:-1]:
    p = subprocess.run(['idn2', '--quiet', '--', d], capture_output=True, env={'LC_ALL': 'C.UTF-8', 'PATH': '/usr/bin:/bin'})
    i2 = p.stdout.decode().strip() if p.returncode == 0 else None
    try: py = idna.encode(d, uts46=True).decode()
    except Exception: py = None
    try: p3 = d.encode('idna').decode()
    except Exception: p3 = None
    out.append('{' + ','.join(lua(x) for x in (i2, py, p3)) + '}')
print('return {' + ','.join(out) + '}')
]])
  local text = helper.sh(helper.python .. " " .. dir .. "/ref.py " .. dir .. "/in.txt")
  return assert((loadstring or load)(text))()
end

describe("core.idna_to_ascii", function()
  it("converts as libidn2's idn2 command and Python's idna module do, refusing what IDNA2008 refuses", function()
    local ref = reference()
    for i, c in ipairs(CASES) do
      local got, why = core.idna_to_ascii(c[1])
      local want = c[2]
      assert.equal(want or nil, got, c[1])
      if not want then assert.is_string(why) end
      assert.equal(want, ref[i][1], "idn2 on " .. c[1])
      if c.py then assert.equal(want, ref[i][2], "Python idna on " .. c[1]) end
      -- IDNA2003 keeps ASCII labels' case; compare without it
      local p3 = ref[i][3] and ref[i][3]:lower()
      if c.idna2003 then assert.equal(want and want:lower(), p3, "encodings.idna on " .. c[1])
      else assert.are_not.equal(want, p3, "encodings.idna on " .. c[1]) end
    end
  end)

  it("decodes A-labels for display and refuses a NUL", function()
    assert.equal("bücher.example", core.idna_to_unicode("xn--bcher-kva.example"))
    local r, why = core.idna_to_ascii("b\0ü.example")
    assert.is_nil(r)
    assert.equal("NUL in domain", why)
  end)
end)

describe("smtp.check_address with international domains", function()
  it("gives the A-label form, and SMTPUTF8 only for a local part that is not ASCII", function()
    assert.same({ true, false, "user@xn--bcher-kva.example" }, { smtp.check_address("user@bücher.example", "to") })
    assert.same({ true, true, "δοκιμή@παράδειγμα.test" }, { smtp.check_address("δοκιμή@παράδειγμα.test", "to") })
    assert.same({ true, false, "a@example.org" }, { smtp.check_address("a@example.org", "to") })
    assert.same({ true, false, "a@[192.0.2.1]" }, { smtp.check_address("a@[192.0.2.1]", "to") })
  end)

  it("refuses an invalid international domain as kind invalid, naming the address", function()
    for _, a in ipairs { "a@☃.net", "a@aא.example", "a@" .. LONG .. ".example", "δ@-ü.example" } do
      local ok, err = smtp.check_address(a, "to")
      assert.is_nil(ok)
      assert.equal("invalid", err.kind)
      assert.truthy(err.text:find("to: bad international domain name in " .. a, 1, true), err.text)
    end
  end)
end)

describe("international domains on the wire", function()
  local peer, zone
  setup(function()
    peer = peers.aiosmtpd { smtputf8 = false }
    zone = dnsmasq.start {
      "--mx-host=xn--bcher-kva.test,mx.xn--bcher-kva.test,10",
      "--host-record=mx.xn--bcher-kva.test,127.0.0.1",
      "--host-record=mail.xn--bcher-kva.test,127.0.0.1",
    }
  end)
  teardown(function()
    if peer then peer.stop() end
    if zone then zone:stop() end
  end)

  local function last() local m = peer.messages(); return m[#m], #m end

  it("sends the envelope as A-labels to a server without SMTPUTF8; results name the addresses as given", function()
    local msg = assert(message.new { from = "Zoë <zoe@bücher.test>", to = "Bob <bob@Bücher.test>",
      cc = "carol@straße.test", reply_to = "help@bücher.test", subject = "Grüße", text = "hi" })
    assert.is_false(msg:needs().smtputf8)
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, timeout = 10,
      message = msg }
    assert.is_nil(err)
    assert.same({ "bob@Bücher.test", "carol@straße.test" }, res.accepted)
    local m = last()
    assert.equal("zoe@xn--bcher-kva.test", m.from)
    assert.same({ "bob@xn--bcher-kva.test", "carol@xn--strae-oqa.test" }, m.to)
    assert.is_nil(table.concat(m.mail_options, " "):find("SMTPUTF8", 1, true))
    -- the header too: domains as A-labels, display names as RFC 2047 words, all ASCII
    assert.truthy(m.data:find("From: =?UTF-8?B?Wm/Dqw==?= <zoe@xn--bcher-kva.test>\r\n", 1, true))
    assert.truthy(m.data:find("To: Bob <bob@xn--bcher-kva.test>\r\n", 1, true))
    assert.truthy(m.data:find("Cc: carol@xn--strae-oqa.test\r\n", 1, true))
    assert.truthy(m.data:find("Reply-To: help@xn--bcher-kva.test\r\n", 1, true))
    assert.truthy(m.data:find("Message%-ID: <%x+@xn%-%-bcher%-kva%.test>\r\n"))
    assert.is_false(core.has_8bit(m.data))
  end)

  it("converts the low-level mail and rcpt, and a raw message's from and to", function()
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, timeout = 10,
      from = "a@bücher.test", to = { "b@bücher.test", "reject1@bücher.test" },
      message = "Subject: raw\r\n\r\nbody\r\n" }
    assert.is_nil(err)
    assert.same({ "b@bücher.test" }, res.accepted)
    assert.equal("reject1@bücher.test", res.rejected[1].recipient)
    assert.same({ "b@xn--bcher-kva.test" }, last().to)
    local conn = assert(smtp.connect { server = "localhost", port = peer.port, cafile = peer.ca, timeout = 10 })
    assert.equal(250, conn:mail("a@bücher.test").code)
    assert.equal(250, conn:rcpt("c@bücher.test").code)
    assert.equal(250, conn:data("Subject: low\r\n\r\nx\r\n").code)
    conn:close()
    local m = last()
    assert.equal("a@xn--bcher-kva.test", m.from)
    assert.same({ "c@xn--bcher-kva.test" }, m.to)
  end)

  it("still needs SMTPUTF8 for a local part that is not ASCII", function()
    local before = select(2, last())
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, timeout = 10,
      from = "a@bücher.test", to = "δοκιμή@bücher.test", message = "Subject: u\r\n\r\nx\r\n" }
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.truthy(err.text:find("SMTPUTF8", 1, true))
    assert.equal(before, select(2, last()))
  end)

  it("refuses an invalid international domain before connecting", function()
    local before = select(2, last())
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, timeout = 10,
      from = "a@bücher.test", to = { "b@bücher.test", "c@☃.test" }, message = "Subject: u\r\n\r\nx\r\n" }
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.truthy(err.text:find("c@☃.test", 1, true))
    local m, merr = message.new { from = "a@aא.test", to = "b@bücher.test" }
    assert.is_nil(m)
    assert.equal("invalid", merr.kind)
    assert.truthy(merr.text:find("a@aא.test", 1, true))
    assert.equal(before, select(2, last()))
  end)

  it("resolves and checks an international server name as its A-label", function()
    -- mail.bücher.test is mail.xn--bcher-kva.test in dnsmasq; the certificate names localhost
    local res, err = smtp.send { server = "mail.bücher.test", port = peer.port, cafile = peer.ca,
      servername = "localhost", nameservers = { zone.nameserver }, timeout = 10,
      from = "a@bücher.test", to = "b@bücher.test", message = "Subject: s\r\n\r\nx\r\n" }
    assert.is_nil(err)
    assert.equal("mail.xn--bcher-kva.test", res.server.host)
    local _, berr = smtp.send { server = "mail.☃.test", port = peer.port, message = "x", from = "a@b.test", to = "c@d.test" }
    assert.equal("invalid", berr.kind)
  end)

  it("delivers through the MX of the A-label, naming the recipient as given", function()
    local res = assert(smtp.deliver { message = "Subject: d\r\n\r\nx\r\n", from = "a@bücher.test",
      to = { "bob@Bücher.test" }, helo = "client.test", nameservers = { zone.nameserver },
      port = peer.port, timeout = 10, destinations = "any" })
    assert.equal("sent", res[1].status, res[1].text)
    assert.equal("bob@Bücher.test", res[1].recipient)
    assert.equal("mx.xn--bcher-kva.test", res[1].host)
    local m = last()
    assert.equal("a@xn--bcher-kva.test", m.from)
    assert.same({ "bob@xn--bcher-kva.test" }, m.to)
    local hosts = assert(require("smtp.mx").lookup("BÜCHER.test", { nameservers = { zone.nameserver } }))
    assert.equal("mx.xn--bcher-kva.test", hosts[1].host)
    local bad = smtp.deliver { message = "x", from = "a@b.test", to = { "c@☃.test" } }
    assert.is_nil(bad)
  end)

  local function cli(cmd, args)
    local function sink()
      local t = {}
      return { write = function(self, ...) for _, v in ipairs { ... } do t[#t + 1] = v end return self end,
        text = function() return table.concat(t) end }
    end
    local out, err = sink(), sink()
    local code = require("smtp.cli." .. cmd).main(args, out, err)
    return code, out.text(), err.text()
  end

  it("works from the command line: send and mx", function()
    local code, out, err = cli("send", { "--server", "localhost:" .. peer.port, "--cafile", peer.ca,
      "--from", "Zoë <zoe@bücher.test>", "--to", "bob@bücher.test", "--subject", "cli", "--body", "x",
      "--timeout", "10" })
    assert.equal(0, code, err)
    assert.equal("sent: 250 2.0.0 OK queued as X1\n  accepted: bob@bücher.test\n", out)
    local m = last()
    assert.equal("zoe@xn--bcher-kva.test", m.from)
    assert.same({ "bob@xn--bcher-kva.test" }, m.to)
    code, out = cli("mx", { "bücher.test", "--nameserver", zone.nameserver })
    assert.equal(0, code)
    assert.equal("10 mx.xn--bcher-kva.test 127.0.0.1\n", out)
    code, _, err = cli("send", { "--server", "localhost:" .. peer.port, "--from", "a@b.test", "--to", "c@☃.test" })
    assert.equal(2, code)
    assert.truthy(err:find("c@☃.test", 1, true))
  end)
end)
