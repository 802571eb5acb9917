-- The client against small scripted servers that do what no real peer does: STARTTLS missing,
-- refused or with lines injected after its 220, malformed and oversized replies, 421 at every
-- phase, a connection dropped mid-DATA, a server that stops answering; and invalid input, which
-- must never open a connection at all.
local peers = require "support.client_peers"
local core = require "smtp.core"

local smtp = require "smtp"

local EHLO = { "send", "250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n" }
local EHLO_PLAIN = { "send", "250-fake.test\r\n250 8BITMIME\r\n" }
local BODY = "Subject: t\r\n\r\nhello\r\n"

local f
local function run(steps, o)
  f.script(steps)
  local opts = { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5,
    from = "a@example.com", to = { "b@example.org" }, message = BODY }
  for k, v in pairs(o or {}) do opts[k] = v end
  local t0 = core.now and core.now() or os.time()
  local res, err = smtp.send(opts)
  local took = (core.now and core.now() or os.time()) - t0
  local got = f.received(1) -- once the server has written down the last bytes

  return res, err, got, took
end

describe("against misbehaving servers", function()
  setup(function() f = peers.fake() end)
  teardown(function() f.stop() end)

  it("fails closed when STARTTLS is required and not offered: no AUTH, no MAIL in clear", function()
    local res, err, got = run({ { "send", "220 fake ESMTP\r\n" }, { "line" },
      { "send", "250-fake.test\r\n250 AUTH PLAIN LOGIN\r\n" } },
      { tls = "starttls", auth = { user = "u", password = "p" } })
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.equal("tls", err.phase)
    assert.equal("#CONNECT\nEHLO client.test\r\nQUIT\r\n", got)
  end)

  it("fails closed when STARTTLS is refused", function()
    local res, err, got = run({ { "send", "220 fake ESMTP\r\n" }, { "line" },
      { "send", "250-fake.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n" }, { "line" },
      { "send", "454 4.7.0 TLS not available\r\n" } }, { tls = "starttls", auth = { user = "u", password = "p" } })
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.equal(454, err.code)
    assert.equal("4.7.0", err.enhanced)
    assert.equal("#CONNECT\nEHLO client.test\r\nSTARTTLS\r\nQUIT\r\n", got)
  end)

  it("goes on in clear when STARTTLS is refused and tls is opportunistic", function()
    local res, err, got = run({ { "send", "220 fake ESMTP\r\n" }, { "line" },
      { "send", "250-fake.test\r\n250 STARTTLS\r\n" }, { "line" },
      { "send", "454 4.7.0 TLS not available\r\n" }, { "line" }, { "send", "250 ok\r\n" },
      { "line" }, { "send", "250 ok\r\n" }, { "line" }, { "send", "354 go\r\n" }, { "data" },
      { "send", "250 2.0.0 queued\r\n" }, { "line" }, { "send", "221 bye\r\n" } }, { tls = "opportunistic" })
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.is_false(res.server.tls)
    assert.equal("#CONNECT\nEHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<a@example.com>\r\n" ..
      "RCPT TO:<b@example.org>\r\nDATA\r\n" .. BODY .. ".\r\nQUIT\r\n", got)
  end)

  it("never reads lines glued to the STARTTLS 220 as the EHLO reply (response injection)", function()
    local res, err, got = run({ { "send", "220 fake ESMTP\r\n" }, { "line" },
      { "send", "250-fake.test\r\n250 STARTTLS\r\n" }, { "line" },
      { "send", "220 2.0.0 go ahead\r\n250-fake.test\r\n250 AUTH PLAIN\r\n" } },
      { tls = "starttls", auth = { user = "u", password = "p" } })
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.truthy(err.text:find("response injection", 1, true))
    assert.equal("#CONNECT\nEHLO client.test\r\nSTARTTLS\r\n", got)
  end)

  local malformed = {
    { "22X OK\r\n", "greeting", "malformed reply code" },
    { "220OK\r\n", "greeting", "malformed reply line: no space or '-' after the code" },
    { "220-fake\r\n250 mixed\r\n", "greeting", "multi-line reply whose codes disagree" },
  }
  for _, case in ipairs(malformed) do
    it("treats " .. ("%q"):format(case[1]):gsub("\\\n", "\\n") .. " as a protocol error", function()
      local res, err, got = run({ { "send", case[1] } })
      assert.is_nil(res)
      assert.equal("protocol", err.kind)
      assert.equal(case[2], err.phase)
      assert.equal(case[3], err.text)
      assert.equal("#CONNECT\n", got)
    end)
  end

  it("treats a 1 MB EHLO reply as a protocol error", function()
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, { "sendbig", "250-" .. ("x"):rep(94) .. "\r\n", 10486 } })
    assert.is_nil(res)
    assert.equal("protocol", err.kind)
    assert.equal("ehlo", err.phase)
    assert.equal("reply over 65536 bytes", err.text)
    assert.equal("#CONNECT\nEHLO client.test\r\n", got)
  end)

  local prefix = {
    greeting = {},
    ehlo = { { "send", "220 fake\r\n" }, { "line" } },
    mail = { { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" } },
    rcpt = { { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" }, { "send", "250 ok\r\n" }, { "line" } },
    data = { { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "250 ok\r\n" }, { "line" } },
    data_end = { { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "250 ok\r\n" }, { "line" }, { "send", "354 go\r\n" }, { "data" } },
  }
  for _, phase in ipairs { "greeting", "ehlo", "mail", "rcpt", "data", "data_end" } do
    it("ends the session on 421 in phase " .. phase .. " with a temporary kind closed", function()
      local steps = {}
      for i, s in ipairs(prefix[phase]) do steps[i] = s end
      steps[#steps + 1] = { "send", "421 4.3.2 shutting down\r\n" }
      local res, err, got = run(steps)
      assert.is_nil(res)
      assert.equal("closed", err.kind)
      assert.equal(421, err.code)
      assert.equal("4.3.2", err.enhanced)
      assert.is_true(err.temporary)
      assert.equal(phase, err.phase)
      assert.is_nil(got:find("QUIT", 1, true))
    end)
  end

  it("never reports a message as sent when the connection closes mid-DATA", function()
    local big = "Subject: big\r\n\r\n" .. (("y"):rep(998) .. "\r\n"):rep(4000)
    local res, err = run({ { "send", "220 fake\r\n" }, { "line" }, EHLO, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "bytes", 1000 }, { "close" } }, { message = big })
    assert.is_nil(res)
    assert.equal("closed", err.kind)
    assert.is_true(err.temporary)
  end)

  it("falls back to HELO when EHLO is refused", function()
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, { "send", "502 5.5.1 what?\r\n" },
      { "line" }, { "send", "250 fake\r\n" }, { "line" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "250 ok\r\n" }, { "line" }, { "send", "354 go\r\n" }, { "data" }, { "send", "250 ok\r\n" },
      { "line" }, { "send", "221 bye\r\n" } })
    assert.is_nil(err)
    assert.same({}, res.server.extensions)
    assert.equal("#CONNECT\nEHLO client.test\r\nHELO client.test\r\nMAIL FROM:<a@example.com>\r\n" ..
      "RCPT TO:<b@example.org>\r\nDATA\r\n" .. BODY .. ".\r\nQUIT\r\n", got)
  end)

  it("never ends the data when the message source fails midway", function()
    local n = 0
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, EHLO, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n250 ok\r\n354 go\r\n" } },
      { message = function() n = n + 1; if n == 1 then return "Subject: x\r\n\r\npart\r\n" end error("disk on fire") end })
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.equal("message source failed: disk on fire", err.text:gsub("^.-:%d+: ", "message source failed: "))
    assert.is_nil(got:find("\r\n.\r\n", 1, true))
  end)

  it("honours the phase timeout when the server stops answering, and sends no QUIT", function()
    local res, err, got, took = run({ { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" }, { "sleep", 30 } },
      { timeout = { mail = 1 } })
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.equal("mail", err.phase)
    assert.is_true(err.temporary)
    assert.is_true(took < 3)
    assert.equal("#CONNECT\nEHLO client.test\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\n", got)
  end)

  it("puts DSN, SIZE and 8BITMIME parameters on the wire, with xtext", function()
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250-DSN\r\n250-SIZE 1000\r\n250 8BITMIME\r\n" },
      { "line" }, { "line" }, { "line" }, { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" },
      { "send", "250 2.0.0 ok\r\n" }, { "line" }, { "send", "221 bye\r\n" } },
      { to = { "b+x=y@example.org" }, dsn = { notify = { "FAILURE", "DELAY" }, ret = "HDRS", envid = "id+1=2" } })
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.equal("#CONNECT\nEHLO client.test\r\n" ..
      "MAIL FROM:<a@example.com> SIZE=" .. #BODY .. " BODY=8BITMIME RET=HDRS ENVID=id+2B1+3D2\r\n" ..
      "RCPT TO:<b+x=y@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bx+3Dy@example.org\r\n" ..
      "DATA\r\n" .. BODY .. ".\r\nQUIT\r\n", got)
  end)

  it("gives a UTF-8 recipient an RFC 6533 utf-8 ORCPT and SMTPUTF8 on MAIL", function()
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250-DSN\r\n250 SMTPUTF8\r\n" },
      { "line" }, { "line" }, { "line" }, { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" },
      { "send", "250 2.0.0 ok\r\n" }, { "line" }, { "send", "221 bye\r\n" } },
      { to = { "jö+x@exämple.org" }, dsn = { notify = "never" } })
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.truthy(got:find("MAIL FROM:<a@example.com> SMTPUTF8\r\n" ..
      "RCPT TO:<jö+x@exämple.org> NOTIFY=NEVER ORCPT=utf-8;jö\\x{2B}x@exämple.org\r\n", 1, true))
  end)

  it("refuses locally a message over the server's SIZE, and one needing SMTPUTF8 it lacks", function()
    local steps = { { "send", "220 fake\r\n" }, { "line" }, { "send", "250-fake\r\n250 SIZE 10\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }
    local res, err, got = run(steps)
    assert.is_nil(res)
    assert.equal("rejected", err.kind)
    assert.equal(552, err.code)
    assert.equal("5.3.4", err.enhanced)
    assert.equal("#CONNECT\nEHLO client.test\r\nQUIT\r\n", got)
    res, err, got = run(steps, { to = { "bö@example.org" }, message = "x" })
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.equal("#CONNECT\nEHLO client.test\r\nQUIT\r\n", got)
  end)

  it("send_many pipelines the next transaction behind the end-of-data and RSETs after a failed one", function()
    f.script { { "send", "220 fake\r\n" }, { "line" }, EHLO, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n" },
      { "line" }, { "line" }, { "line" }, { "line" }, { "send", "250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n" },
      { "data" }, { "line" }, { "line" }, { "line" },
      { "send", "250 2.0.0 first\r\n250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" },
      { "send", "250 2.0.0 second\r\n" }, { "line" }, { "send", "221 bye\r\n" } }
    local conn = assert(smtp.connect { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5 })
    local results = conn:send_many {
      { from = "a@example.com", to = "bad@example.org", message = "one\r\n" },
      { from = "a@example.com", to = "b@example.org", message = "two\r\n" },
      { from = "a@example.com", to = "\r\nbad", message = "never" },
      { from = "a@example.com", to = "c@example.org", message = "three" },
    }
    conn:close()
    assert.equal("rejected", results[1].kind)
    assert.equal(550, results[1].code)
    assert.equal("2.0.0", results[2].reply.enhanced)
    assert.equal("first", results[2].reply.text)
    assert.equal("invalid", results[3].kind)
    assert.equal("second", results[4].reply.text)
    assert.equal("#CONNECT\nEHLO client.test\r\n" ..
      "MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<bad@example.org>\r\nDATA\r\n" ..
      "RSET\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" ..
      "two\r\n.\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<c@example.org>\r\nDATA\r\n" ..
      "three\r\n.\r\nQUIT\r\n", f.received(1))
  end)

  it("sends the whole small message as one pipelined BDAT LAST when CHUNKING is offered, DATA when opted out", function()
    local body = "Subject: b\n\n.line\r\n"
    local wire = "Subject: b\r\n\r\n.line\r\n"
    local steps = { { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250 CHUNKING\r\n" }, { "line" }, { "line" }, { "line" },
      { "bytes", #wire }, { "send", "250 ok\r\n250 ok\r\n250 2.0.0 chunked\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }
    local res, err, got = run(steps, { message = body })
    assert.is_nil(err)
    assert.equal("chunked", res.reply.text)
    assert.equal("#CONNECT\nEHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n" ..
      "BDAT " .. #wire .. " LAST\r\n" .. wire .. "QUIT\r\n", got)
    steps = { { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250 CHUNKING\r\n" }, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" }, { "send", "250 2.0.0 data\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }
    res, err, got = run(steps, { message = body, chunking = false })
    assert.is_nil(err)
    assert.equal("data", res.reply.text)
    assert.equal("#CONNECT\nEHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n" ..
      "DATA\r\nSubject: b\r\n\r\n..line\r\n.\r\nQUIT\r\n", got)
  end)

  -- A message of several BDAT chunks, from what the scripted server recorded: the chunks' sizes
  -- and LAST flags, and the bytes they carried joined.
  local function chunks_of(got)
    local sizes, data, pos = {}, {}, 1
    while true do
      local s, e, n, last = got:find("BDAT (%d+)( ?L?A?S?T?)\r\n", pos)
      if not s then break end
      sizes[#sizes + 1] = tonumber(n) .. last
      data[#data + 1] = got:sub(e + 1, e + tonumber(n))
      pos = e + tonumber(n) + 1
    end
    return sizes, table.concat(data), got:sub(pos)
  end
  -- A message stopped after two chunks: neither had LAST, then RSET and QUIT.
  local function cut_short(got)
    local sizes, _, rest = chunks_of(got)
    assert.equal(2, #sizes)
    assert.is_nil(table.concat(sizes, ","):find("LAST"))
    assert.equal("RSET\r\nQUIT\r\n", rest)
  end
  local CHUNKING = { "send", "250-fake\r\n250-PIPELINING\r\n250 CHUNKING\r\n" }
  local BIG = "Subject: big\r\n\r\n" .. (("x"):rep(1022) .. "\r\n"):rep(2560)   -- 2.5 MB: 3 chunks

  it("with PIPELINING puts the next BDAT chunk on the wire before the reply to the one before", function()
    -- the server answers MAIL and RCPT, then holds the first chunk's reply until the second chunk
    -- is in: a client that waited for it would time out
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, CHUNKING, { "line" }, { "line" },
      { "bdat" }, { "send", "250 ok\r\n250 ok\r\n" }, { "bdat" }, { "send", "250 2.0.0 chunk 1\r\n" },
      { "bdat" }, { "send", "250 2.0.0 chunk 2\r\n250 2.0.0 all of it\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }, { message = BIG })
    assert.is_nil(err)
    assert.equal("all of it", res.reply.text)
    local sizes, data, rest = chunks_of(got)
    assert.equal(3, #sizes)
    assert.truthy(sizes[3]:find(" LAST$"))
    assert.is_nil(sizes[1]:find("LAST")); assert.is_nil(sizes[2]:find("LAST"))
    assert.equal(BIG, data)
    assert.equal("QUIT\r\n", rest)
  end)

  it("after a refused BDAT chunk reads the reply to the chunk in flight, sends no more, and RSETs", function()
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, CHUNKING, { "line" }, { "line" },
      { "bdat" }, { "send", "250 ok\r\n250 ok\r\n" }, { "bdat" }, { "send", "552 5.3.4 too much\r\n" },
      { "send", "503 5.5.1 discarded\r\n" }, { "line" }, { "send", "250 reset\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }, { message = BIG })
    assert.is_nil(res)
    assert.equal("rejected", err.kind)
    assert.equal(552, err.code)
    assert.equal("5.3.4", err.enhanced)
    cut_short(got)
  end)

  it("when the message source fails between BDAT chunks: no LAST, the replies in flight read, RSET, kind invalid", function()
    local block, n = ("y"):rep(65534) .. "\r\n", 0
    local source = function()
      n = n + 1
      if n == 1 then return "Subject: cut\r\n\r\n" end
      if n > 40 then error("disk gone") end
      return block
    end
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" }, CHUNKING, { "line" }, { "line" },
      { "bdat" }, { "send", "250 ok\r\n250 ok\r\n" }, { "bdat" }, { "send", "250 chunk 1\r\n250 chunk 2\r\n" },
      { "line" }, { "send", "250 reset\r\n" }, { "line" }, { "send", "221 bye\r\n" } }, { message = source })
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.matches("disk gone", err.text)
    cut_short(got)
  end)

  it("calls auth.token for a fresh token and prefers OAUTHBEARER; plaintext AUTH only to loopback", function()
    local b64 = function(x)
      local out = require("helper").sh("printf %s " .. require("helper").quote(x) .. " | base64 -w0")
      return out
    end
    local calls = 0
    local res, err, got = run({ { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n" }, { "line" },
      { "send", "235 2.7.0 ok\r\n" }, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "221 bye\r\n" } },
      { auth = { user = "u@example.com", token = function() calls = calls + 1; return "tok" .. calls end } })
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.equal(1, calls)
    assert.equal("OAUTHBEARER", res.server.auth)
    assert.truthy(got:find("AUTH OAUTHBEARER " .. b64("n,a=u@example.com,\1auth=Bearer tok1\1\1") .. "\r\n", 1, true))
  end)

  it("on the native transport never makes a Lua string of what it writes: AUTH secrets stay in C", function()
    -- every write goes from the engine's buffer to the socket (e:write_to), where the secret is
    -- wiped once sent; e:take() would copy it onto the Lua heap until the next collection
    local methods = debug.getregistry()["smtp.client_engine"].__index
    local take, takes = methods.take, 0
    methods.take = function(...) takes = takes + 1; return take(...) end
    local ok, res, err = pcall(run, { { "send", "220 fake\r\n" }, { "line" },
      { "send", "250-fake\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n" }, { "line" },
      { "send", "235 2.7.0 ok\r\n" }, { "line" }, { "line" }, { "line" },
      { "send", "250 ok\r\n250 ok\r\n354 go\r\n" }, { "data" }, { "send", "250 ok\r\n" }, { "line" },
      { "send", "221 bye\r\n" } }, { auth = { user = "u@example.com", password = "s3cret-pass" } })
    methods.take = take
    assert(ok, res)
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.equal(0, takes)
  end)

  it("refuses CR/LF in low-level command parameters without writing them", function()
    f.script { { "send", "220 fake\r\n" }, { "line" }, EHLO_PLAIN, { "line" }, { "send", "221 bye\r\n" } }
    local conn = assert(smtp.connect { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5 })
    local r, err = conn:mail("a@example.com", "X=1\r\nRSET")
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
    r, err = conn:rcpt("b@example.org\r\nDATA")
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
    conn:close()
    assert.equal("#CONNECT\nEHLO client.test\r\nQUIT\r\n", f.received(1))
  end)

  describe("invalid input opens no connection", function()
    local long_local = ("l"):rep(65) .. "@example.org"
    local long_domain = "a@" .. ("d"):rep(256)
    local long_path = ("l"):rep(60) .. "@" .. (("d"):rep(60) .. "."):rep(3) .. ("d"):rep(20)
    local cases = {
      { "CRLF in from", { from = "a@example.com>\r\nRCPT TO:<x@evil.test" } },
      { "LF in to", { to = { "b@example.org\nRSET" } } },
      { "CR in to", { to = { "b@example.org\rX" } } },
      { "NUL in to", { to = { "b\0@example.org" } } },
      { "CRLF in helo", { helo = "client\r\nMAIL FROM:<x@y>" } },
      { "CRLF in DSN envid", { dsn = { envid = "x\r\nQUIT" } } },
      { "bad DSN notify", { dsn = { notify = { "NEVER", "DELAY" } } } },
      { "bad DSN ret", { dsn = { ret = "ALL" } } },
      { "CRLF in AUTH user", { auth = { user = "u\r\nQUIT", password = "p" } } },
      { "NUL in AUTH password", { auth = { user = "u", password = "p\0q" } } },
      { "CRLF in AUTH token", { auth = { user = "u", token = "t\r\nQUIT" } } },
      { "unknown AUTH mechanism", { auth = { user = "u", password = "p", mechanism = "NTLM" } } },
      { "local part over 64", { to = { long_local } } },
      { "domain over 255", { to = { long_domain } } },
      { "path over 256", { from = long_path } },
      { "empty recipient list", { to = {} } },
      { "no envelope for a raw message", { from = false } },
      { "AUTH over plaintext to a remote host", { server = "mail.example.invalid", auth = { user = "u", password = "p" } } },
    }
    for _, case in ipairs(cases) do
      it(case[1], function()
        f.script({ { "send", "220 fake\r\n" } })
        local opts = { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5,
          from = "a@example.com", to = { "b@example.org" }, message = BODY }
        for k, v in pairs(case[2]) do opts[k] = v end
        if opts.from == false then opts.from = nil end
        local res, err = smtp.send(opts)
        local got = f.received()
        assert.is_nil(res)
        assert.equal("invalid", err.kind)
        assert.is_false(err.temporary)
        assert.equal("", got)
        if case[2].helo or case[2].auth or case[2].server then
          local conn, cerr = smtp.connect(opts)
          assert.is_nil(conn)
          assert.equal("invalid", cerr.kind)
          assert.equal("", f.received())
        end
      end)
    end

    it("raises on misuse", function()
      assert.has_error(function() smtp.send(42) end)
      assert.has_error(function() smtp.send { server = "x", message = 42, from = "a@b", to = "c@d" } end)
      assert.has_error(function() smtp.send { server = "x", message = "m", from = "a@b", to = "c@d", tls = "maybe" } end)
    end)
  end)
end)
