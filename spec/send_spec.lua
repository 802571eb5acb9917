-- smtp.send and smtp.connect against real servers: aiosmtpd (STARTTLS verified against the test
-- CA, implicit TLS, AUTH PLAIN and LOGIN, partial and total rejection, SMTPUTF8) and Postfix's
-- smtp-sink (1,000 messages on one connection).
local helper = require "helper"
local peers = require "support.client_peers"
local core = require "smtp.core"

local smtp = require "smtp"

local BODY = "From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\nMessage-ID: <m1@example.com>\r\n\r\nline\r\n.dot line\r\n"

describe("smtp.send with aiosmtpd", function()
  local peer
  setup(function() peer = peers.aiosmtpd() end)
  teardown(function() if peer then peer.stop() end end)

  local function opts(t)
    local o = { server = "localhost", port = peer.port, cafile = peer.ca, helo = "client.test", timeout = 10,
      from = "a@example.com", to = { "b@example.org" }, message = BODY }
    for k, v in pairs(t or {}) do o[k] = v end
    return o
  end

  it("sends over STARTTLS with the certificate verified, dot-stuffed, with exact results", function()
    local before = #peer.messages()
    local res, err = smtp.send(opts())
    assert.is_nil(err)
    assert.same({ "b@example.org" }, res.accepted)
    assert.same({}, res.rejected)
    assert.same({ code = 250, enhanced = "2.0.0", text = "OK queued as X1" }, res.reply)
    assert.equal("<m1@example.com>", res.message_id)
    assert.equal("localhost", res.server.host)
    assert.is_string(res.server.tls)
    assert.is_not_nil(res.server.extensions.SMTPUTF8)
    local msgs = peer.messages()
    assert.equal(before + 1, #msgs)
    local m = msgs[#msgs]
    assert.equal("a@example.com", m.from)
    assert.same({ "b@example.org" }, m.to)
    assert.is_true(m.tls)
    assert.equal(BODY, m.data)
  end)

  it("fails closed when the certificate is not signed by the given CA", function()
    local res, err = smtp.send(opts { cafile = helper.certs().other_ca })
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.equal("tls", err.phase)
  end)

  it("speaks implicit TLS on a second port", function()
    local res, err = smtp.send(opts { port = peer.tls_port, tls = "implicit" })
    assert.is_nil(err)
    assert.same({ code = 250, enhanced = "2.0.0", text = "OK queued as X1" }, res.reply)
    assert.is_true(peer.messages()[#peer.messages()].tls)
  end)

  for _, mech in ipairs { "PLAIN", "LOGIN" } do
    it("authenticates with AUTH " .. mech .. " after STARTTLS", function()
      local res, err = smtp.send(opts { auth = { user = "user", password = "secret pass", mechanism = mech } })
      assert.is_nil(err)
      assert.equal(250, res.reply.code)
      local auths = peer.auths()
      assert.same({ mechanism = mech, ok = true }, auths[#auths])
      assert.is_true(peer.messages()[#peer.messages()].auth)
    end)
  end

  it("reports bad credentials as kind auth with the server's reply", function()
    local res, err = smtp.send(opts { auth = { user = "user", password = "wrong" } })
    assert.is_nil(res)
    assert.equal("auth", err.kind)
    assert.equal(535, err.code)
    assert.equal("5.7.8", err.enhanced)
    assert.is_false(err.temporary)
  end)

  it("sends to the accepted recipients and lists each rejection", function()
    local res, err = smtp.send(opts { to = { "ok@example.org", "reject1@example.org", "later@example.org" } })
    assert.is_nil(err)
    assert.same({ "ok@example.org" }, res.accepted)
    assert.same({
      { recipient = "reject1@example.org", code = 550, enhanced = "5.1.1", text = "no such user here" },
      { recipient = "later@example.org", code = 450, enhanced = "4.2.1", text = "try again later" },
    }, res.rejected)
    assert.same({ "ok@example.org" }, peer.messages()[#peer.messages()].to)
  end)

  it("returns kind rejected with the list when every recipient is refused, and the session stays usable", function()
    local conn = assert(smtp.connect(opts()))
    local before = #peer.messages()
    local res, err = conn:send { from = "a@example.com", to = { "reject1@x.test", "reject2@x.test" }, message = BODY }
    assert.is_nil(res)
    assert.equal("rejected", err.kind)
    assert.equal(550, err.code)
    assert.equal(2, #err.rejected)
    assert.equal("reject2@x.test", err.rejected[2].recipient)
    res, err = conn:send { from = "a@example.com", to = "c@x.test", message = BODY }
    assert.is_nil(err)
    assert.same({ "c@x.test" }, res.accepted)
    conn:close()
    assert.equal(before + 1, #peer.messages())
  end)

  it("uses SMTPUTF8 for non-ASCII addresses", function()
    local res, err = smtp.send(opts { from = "zoë@exämple.test", to = { "δοκιμή@παράδειγμα.test" } })
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    local m = peer.messages()[#peer.messages()]
    assert.equal("zoë@exämple.test", m.from)
    assert.same({ "δοκιμή@παράδειγμα.test" }, m.to)
    assert.truthy(table.concat(m.mail_options, " "):find("SMTPUTF8", 1, true))
  end)

  it("streams a file handle and a chunk function, normalizing line ends", function()
    local path = helper.tmpdir() .. "/msg.eml"
    helper.write(path, "Subject: file\n\nbare LF\n.\nend")
    local f = assert(io.open(path, "rb"))
    local res, err = smtp.send(opts { message = f })
    f:close()
    assert.is_nil(err)
    assert.equal("Subject: file\r\n\r\nbare LF\r\n.\r\nend\r\n", peer.messages()[#peer.messages()].data)
    local chunks = { "Subject: fn\r", "\n\r\n", "a\rb", "" }
    local i = 0
    res, err = smtp.send(opts { message = function() i = i + 1; return chunks[i] ~= "" and chunks[i] or nil end })
    assert.is_nil(err)
    assert.equal("Subject: fn\r\n\r\na\r\nb\r\n", peer.messages()[#peer.messages()].data)
  end)

  it("sends a real smtp.message: envelope from its headers, Bcc only in the envelope, Message-ID in the result", function()
    local message = require "smtp.message"
    local msg = assert(message.new { from = "Alice <alice@example.com>", to = { "bob@example.org" },
      bcc = { "hidden@example.org" }, subject = "Grüße", text = "hello\n.\nbye\n" })
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, message = msg, timeout = 10 }
    assert.is_nil(err)
    assert.same({ "bob@example.org", "hidden@example.org" }, res.accepted)
    assert.equal(msg.message_id, res.message_id)
    local m = peer.messages()[#peer.messages()]
    assert.equal("alice@example.com", m.from)
    assert.equal(msg:tostring(), m.data)
    assert.is_nil(m.data:find("hidden@", 1, true))
  end)

  it("sends an smtp.message-like object with its envelope", function()
    local msg = {
      envelope = function() return "env@example.com", { "r1@example.org", "r2@example.org" } end,
      source = function()
        local parts, i = { "Subject: obj\r\n", "\r\nbody\r\n" }, 0
        return function() i = i + 1; return parts[i] end
      end,
      needs = function() return { smtputf8 = false } end,
    }
    local res, err = smtp.send { server = "localhost", port = peer.port, cafile = peer.ca, message = msg, timeout = 10 }
    assert.is_nil(err)
    assert.same({ "r1@example.org", "r2@example.org" }, res.accepted)
    local m = peer.messages()[#peer.messages()]
    assert.equal("env@example.com", m.from)
    assert.equal("Subject: obj\r\n\r\nbody\r\n", m.data)
  end)
end)

describe("lua-smtp send", function()
  local peer
  setup(function() peer = peers.aiosmtpd() end)
  teardown(function() if peer then peer.stop() end end)

  local function cli(args)
    local function sink()
      local t = {}
      return { write = function(self, ...) for _, v in ipairs { ... } do t[#t + 1] = v end return self end,
        text = function() return table.concat(t) end }
    end
    local out, err = sink(), sink()
    local code = require("smtp.cli.send").main(args, out, err)
    return code, out.text(), err.text()
  end

  it("exits 2 on usage errors", function()
    local code, _, err = cli { "--server", "localhost:1", "--to", "b@example.org" }
    assert.equal(2, code)
    assert.truthy(err:find("--from is required", 1, true))
    assert.equal(2, (cli { "--bogus" }))
    assert.equal(2, (cli { "--server", "localhost:1", "--from", "a@b.test", "--to", "x\r\n@y" }))
  end)

  it("sends a raw file with STARTTLS and exits 0", function()
    local path = helper.tmpdir() .. "/raw.eml"
    helper.write(path, "Subject: cli\n\nraw body\n")
    local code, out = cli { "--server", "localhost:" .. peer.port, "--cafile", peer.ca, "--from", "a@example.com",
      "--to", "b@example.org", "--to", "c@example.org", "--raw", path, "--timeout", "10" }
    assert.equal(0, code)
    assert.equal("sent: 250 2.0.0 OK queued as X1\n  accepted: b@example.org\n  accepted: c@example.org\n", out)
    local m = peer.messages()[#peer.messages()]
    assert.same({ "b@example.org", "c@example.org" }, m.to)
    assert.equal("Subject: cli\r\n\r\nraw body\r\n", m.data)
  end)

  it("sends to every address of --to-file in its own transaction over several sessions, with --json", function()
    local path = helper.tmpdir() .. "/rcpts"
    helper.write(path, "r1@example.org\n# comment\n\nreject9@example.org\nr2@example.org\nlater@example.org\n")
    local before = #peer.messages()
    local code, out, err = cli { "--server", "localhost:" .. peer.port, "--cafile", peer.ca, "--from", "a@example.com",
      "--to-file", path, "--concurrency", "3", "--subject", "bulk", "--body", "hi", "--timeout", "10" }
    assert.equal(1, code)
    assert.truthy(out:find("r1@example.org: sent 250 2.0.0 OK queued as X1\n", 1, true))
    assert.truthy(err:find("reject9@example.org: failed 550 5.1.1 no such user here\n", 1, true))
    assert.truthy(err:find("later@example.org: deferred 450 4.2.1 try again later\n", 1, true))
    assert.truthy(out:find("sent 2, failed 1, deferred 1\n", 1, true))
    assert.equal(before + 2, #peer.messages())
    helper.write(path, "r1@example.org\n")
    code, out = cli { "--server", "localhost:" .. peer.port, "--cafile", peer.ca, "--from", "a@example.com",
      "--to-file", path, "--json", "--subject", "bulk", "--body", "hi", "--timeout", "10" }
    assert.equal(0, code)
    assert.equal('[{"recipient":"r1@example.org","status":"sent","code":250,"enhanced":"2.0.0","text":"OK queued as X1"}]\n', out)
  end)

  it("composes a message and exits 1 with the reason when a recipient is refused", function()
    local code, _, err = cli { "--server", "localhost:" .. peer.port, "--cafile", peer.ca, "--from", "a@example.com",
      "--to", "reject@example.org", "--subject", "s", "--body", "hello", "--timeout", "10" }
    assert.equal(1, code)
    assert.truthy(err:find("reject@example.org: 550 5.1.1 no such user here", 1, true))
  end)
end)

describe("smtp.connect with smtp-sink", function()
  local sink
  setup(function() sink = peers.sink() end)
  teardown(function() if sink then sink.stop() end end)

  it("sends 1,000 messages on one connection", function()
    local conn = assert(smtp.connect { server = "127.0.0.1", port = sink.port, tls = "none", timeout = 10 })
    assert.is_not_nil(conn:extensions().PIPELINING)
    local body = "Subject: n\r\n\r\n" .. ("x"):rep(1000) .. "\r\n"
    local ok = 0
    for _ = 1, 1000 do
      local res = conn:send { from = "a@example.com", to = { "b@example.org" }, message = body }
      if res and res.reply.code == 250 then ok = ok + 1 end
    end
    assert.equal(1000, ok)
    conn:close()
  end)

  it("sends a batch with send_many, one result per message", function()
    local conn = assert(smtp.connect { server = "127.0.0.1", port = sink.port, tls = "none", timeout = 10 })
    local batch = {}
    for i = 1, 50 do
      batch[i] = { from = "a@example.com", to = { "b@example.org", "c@example.org" },
        message = "Message-ID: <" .. i .. "@x>\r\n\r\nbody " .. i .. "\r\n" }
    end
    local results = conn:send_many(batch)
    assert.equal(50, #results)
    for i, r in ipairs(results) do
      assert.is_nil(r.kind)
      assert.equal(250, r.reply.code)
      assert.same({ "b@example.org", "c@example.org" }, r.accepted)
      assert.equal("<" .. i .. "@x>", r.message_id)
    end
    conn:close()
  end)

  it("offers the lower-level session methods", function()
    local conn = assert(smtp.connect { server = "127.0.0.1", port = sink.port, tls = "none", timeout = 10 })
    assert.equal(250, conn:noop().code)
    assert.equal(250, conn:mail("a@example.com").code)
    assert.equal(250, conn:rcpt("b@example.org").code)
    local r = conn:data("Subject: x\r\n\r\nhi\r\n")
    assert.equal(250, r.code)
    assert.equal(250, conn:rset().code)
    assert.is_table(conn:ehlo())
    assert.is_true(conn:quit())
    local res, err = conn:send { from = "a@b.test", to = "c@d.test", message = "x" }
    assert.is_nil(res)
    assert.equal("closed", err.kind)
  end)
end)
