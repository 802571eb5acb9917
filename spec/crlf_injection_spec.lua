-- Command and header injection through API values (bpo-43124, PHPMailer CVE-2015-8476 and kin):
-- CR, LF or NUL in any public input that reaches a command or a header is kind "invalid", and not
-- one byte goes on the wire (the listener sees no connection at all).
local helper = require "helper"
local hard = require "support.hardening"
local client_peers = require "support.client_peers"

if not pcall(require, "smtp.transport.native") then
  describe("crlf injection", function() pending("needs smtp.transport.native") end)
  return
end
local smtp = require "smtp"
local message = require "smtp.message"
local dkim = require "smtp.dkim"

local BADS = { { "CRLF", "\r\nRSET" }, { "CR", "\rX" }, { "LF", "\nX" }, { "NUL", "\0X" } }
local BODY = "Subject: t\r\n\r\nhi\r\n"

-- Puts the bad bytes in the middle of a value.
local function inject(v, bad)
  local at = math.max(1, math.floor(#v / 2))
  return v:sub(1, at) .. bad .. v:sub(at + 1)
end

describe("CRLF injection through smtp.send", function()
  local f
  setup(function() f = client_peers.fake() end)
  teardown(function() f.stop() end)

  -- Each entry builds the options that carry the bad value.
  local inputs = {
    { "from", function(b) return { from = inject("a@example.com", b) } end },
    { "to", function(b) return { to = { inject("b@example.org", b) } } end },
    { "second to", function(b) return { to = { "b@example.org", inject("c@example.org", b) } } end },
    { "helo", session = true, function(b) return { helo = inject("client.test", b) } end },
    { "dsn.envid", function(b) return { dsn = { envid = inject("envid42", b) } } end },
    { "dsn.notify", function(b) return { dsn = { notify = { inject("FAILURE", b) } } } end },
    { "dsn.ret", function(b) return { dsn = { ret = inject("HDRS", b) } } end },
    { "auth.user", session = true, function(b) return { auth = { user = inject("user", b), password = "p" } } end },
    { "auth.password", session = true, function(b) return { auth = { user = "u", password = inject("pass", b) } } end },
    { "auth.token", session = true, function(b) return { auth = { user = "u", token = inject("token", b) } } end },
    { "auth.mechanism", session = true, function(b) return { auth = { user = "u", password = "p", mechanism = inject("PLAIN", b) } } end },
    { "servername", session = true, function(b) return { servername = inject("localhost", b), tls = "starttls" } end },
    { "server", session = true, function(b) return { server = inject("127.0.0.1", b) } end },
  }
  for _, input in ipairs(inputs) do
    for _, bad in ipairs(BADS) do
      it(input[1] .. " with " .. bad[1] .. ": kind invalid, no connection", function()
        f.script({ { "send", "220 fake\r\n" } })
        local opts = { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5,
          from = "a@example.com", to = { "b@example.org" }, message = BODY }
        for k, v in pairs(input[#input](bad[2])) do opts[k] = v end
        local res, err = smtp.send(opts)
        assert.is_nil(res)
        assert.equal("invalid", err.kind)
        assert.is_false(err.temporary)
        if input.session then -- smtp.connect takes it too
          local conn, cerr = smtp.connect(opts)
          assert.is_nil(conn)
          assert.equal("invalid", cerr.kind)
        end
        assert.equal("", f.received())
      end)
    end
  end

  it("an auth.token function that returns CR/LF sends no AUTH line and ends with kind invalid", function()
    f.script({ { "send", "220 fake\r\n" }, { "line" }, { "send", "250-fake.test\r\n250 AUTH XOAUTH2 OAUTHBEARER PLAIN\r\n" },
      { "line" }, { "send", "221 bye\r\n" } })
    local res, err = smtp.send { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5,
      from = "a@example.com", to = { "b@example.org" }, message = BODY,
      auth = { user = "u", token = function() return "tok\r\nMAIL FROM:<evil@x.test>" end } }
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    local got = f.received(1)
    assert.not_matches("AUTH", got)
    assert.not_matches("MAIL", got)
  end)

  for _, bad in ipairs(BADS) do
    it("conn:mail and conn:rcpt addresses and parameters with " .. bad[1] .. " are never written", function()
      f.script { { "send", "220 fake\r\n" }, { "line" }, { "send", "250-fake.test\r\n250 8BITMIME\r\n" },
        { "line" }, { "send", "221 bye\r\n" } }
      local conn = assert(smtp.connect { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 5 })
      for _, call in ipairs {
        function() return conn:mail(inject("a@example.com", bad[2])) end,
        function() return conn:mail("a@example.com", inject("BODY=8BITMIME", bad[2])) end,
        function() return conn:mail("a@example.com", { inject("BODY=8BITMIME", bad[2]) }) end,
        function() return conn:rcpt(inject("b@example.org", bad[2])) end,
        function() return conn:rcpt("b@example.org", inject("NOTIFY=NEVER", bad[2])) end,
        function() return conn:rcpt("b@example.org", { inject("NOTIFY=NEVER", bad[2]) }) end,
      } do
        local ok, r, err = pcall(call)
        -- a table where a string belongs may be misuse (raises); a bad string is kind invalid
        if ok then
          assert.is_nil(r)
          assert.equal("invalid", err.kind)
        end
      end
      conn:close()
      assert.equal("#CONNECT\nEHLO client.test\r\nQUIT\r\n", f.received(1))
    end)
  end
end)

describe("CRLF injection through smtp.message", function()
  local base = { from = "Alice <alice@example.com>", to = { "bob@example.org" }, subject = "hi", text = "body" }
  local function with(t)
    local o = {}
    for k, v in pairs(base) do o[k] = v end
    for k, v in pairs(t) do o[k] = v end
    return o
  end
  local fields = {
    { "from address", function(b) return { from = inject("alice@example.com", b) } end },
    { "from display name", function(b) return { from = inject("Alice", b) .. " <alice@example.com>" } end },
    { "to", function(b) return { to = { inject("bob@example.org", b) } } end },
    { "to display name", function(b) return { to = { inject("Bob", b) .. " <bob@example.org>" } } end },
    { "cc", function(b) return { cc = { inject("carol@example.org", b) } } end },
    { "bcc", function(b) return { bcc = { inject("dave@example.org", b) } } end },
    { "reply_to", function(b) return { reply_to = inject("r@example.org", b) } end },
    { "subject", function(b) return { subject = inject("hello there", b) } end },
    { "header value", function(b) return { headers = { { "X-Campaign", inject("42", b) } } } end },
    { "header name", function(b) return { headers = { { inject("X-Campaign", b), "42" } } } end },
    { "attachment filename", function(b) return { attachments = { { filename = inject("a.csv", b), content = "x" } } } end },
    { "attachment content_type", function(b) return { attachments = { { filename = "a.csv", content = "x", content_type = inject("text/csv", b) } } } end },
    { "inline cid", function(b) return { html = "<p>x</p>", inline = { { cid = inject("logo", b), content = "x", content_type = "image/png", filename = "l.png" } } } end },
    { "dkim domain", function(b) return { dkim = { domain = inject("example.com", b), selector = "s1", key = "k" } } end },
    { "dkim selector", function(b) return { dkim = { domain = "example.com", selector = inject("s1", b), key = "k" } } end },
  }
  for _, fld in ipairs(fields) do
    for _, bad in ipairs(BADS) do
      it(fld[1] .. " with " .. bad[1] .. " is kind invalid", function()
        local ok, msg, err = pcall(message.new, with(fld[2](bad[2])))
        assert.is_true(ok, msg)
        assert.is_nil(msg)
        assert.equal("invalid", err.kind)
      end)
    end
  end
end)

describe("CRLF injection through smtp.dkim", function()
  local pem
  setup(function()
    local dir = helper.tmpdir()
    helper.sh("openssl genpkey -algorithm ed25519 -out " .. dir .. "/k.pem 2>/dev/null")
    pem = helper.read(dir .. "/k.pem")
  end)
  local raw = "From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n"
  for _, opt in ipairs { "domain", "selector" } do
    for _, bad in ipairs(BADS) do
      it(opt .. " with " .. bad[1] .. " is kind invalid", function()
        local o = { domain = "example.com", selector = "s1", key = pem, algorithm = "ed25519-sha256" }
        o[opt] = inject(o[opt], bad[2])
        local ok, signed, err = pcall(dkim.sign, raw, o)
        assert.is_true(ok, signed)
        assert.is_nil(signed)
        assert.equal("invalid", err.kind)
      end)
    end
  end
  it("a header list entry with CRLF is kind invalid", function()
    local ok, signed, err = pcall(dkim.sign, raw, { domain = "example.com", selector = "s1", key = pem,
      algorithm = "ed25519-sha256", headers = { "from", "subject\r\nX-Evil" } })
    assert.is_true(ok, signed)
    assert.is_nil(signed)
    assert.equal("invalid", err.kind)
  end)
end)

describe("CRLF injection through smtp.server hook replies", function()
  it("hook text and codes with CR/LF/NUL give one reply line each, nothing injected", function()
    local answers = {
      { false, 550, "no\r\n250 2.1.5 injected" },
      { false, 550, "5.1.1\r\n250 x", "text" },
      { false, "550\r\n250", "no" },
      { false, 451, "a\rb\nc\0d" },
      { false, 553, "5.1.3", "x\r\n250 ok" },
    }
    local n = 0
    local srv, got = hard.recording {
      on_rcpt = function()
        n = n + 1
        return table.unpack(answers[n], 1, 4)
      end,
    }
    local steps = { { "replies", 1 }, { "send", "EHLO c\r\nMAIL FROM:<a@x.test>\r\n" }, { "replies", 3 } }
    for i = 1, #answers do
      steps[#steps + 1] = { "send", "RCPT TO:<b@y.test>\r\n" }
      steps[#steps + 1] = { "replies", 3 + i }
    end
    steps[#steps + 1] = { "send", "QUIT\r\n" }
    steps[#steps + 1] = { "eof" }
    local out = hard.raw(srv, steps)
    local lines = {}
    for l in out:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
    -- greeting, EHLO (multi-line), MAIL, 5 RCPT replies, 221, <EOF>
    local rcpts = {}
    for _, l in ipairs(lines) do if l:match("^[45]%d%d ") then rcpts[#rcpts + 1] = l end end
    assert.equal(#answers, #rcpts, out)
    for _, l in ipairs(rcpts) do
      assert.matches("^%d%d%d %d%.%d+%.%d+ [^\r\n%z]*\r$", l)
    end
    assert.not_matches("\n250 2%.1%.5 injected", out)
    assert.not_matches("\n250 x", out)
    assert.not_matches("\n250 ok", out)
    assert.matches("221 2%.0%.0 Bye\r\n<EOF>\r\n$", out)
    assert.equal(0, #got.msgs)
  end)

  it("a hostname with CR/LF is misuse", function()
    local server = require "smtp.server"
    for _, bad in ipairs(BADS) do
      assert.has_error(function() server.listen { port = 0, hostname = inject("mx.test", bad[2]) } end)
    end
  end)
end)

describe("CRLF injection through lua-smtp send arguments", function()
  local f
  setup(function() f = client_peers.fake() end)
  teardown(function() f.stop() end)
  local cli = helper.root .. "/bin/lua-smtp"
  local cases = {
    { "--from", "a@example.com\r\nRCPT TO:<x@evil.test>" },
    { "--to", "b@example.org\r\nRSET" },
    { "--cc", "c@example.org\nX" },
    { "--subject", "hi\r\nBcc: evil@x.test" },
    { "--helo", "c.test\r\nMAIL FROM:<x@y>" },
    { "--user", "u\r\nQUIT", "--password", "p" },
  }
  for _, case in ipairs(cases) do
    it(case[1] .. " with CR/LF: exit 1 or 2, no connection", function()
      f.script({ { "send", "220 fake\r\n" } })
      local argv = { helper.lua, cli, "send", "--server", "127.0.0.1:" .. f.port, "--tls", "none", "--timeout", "5" }
      local has = {}
      for i = 1, #case, 2 do argv[#argv + 1] = case[i]; argv[#argv + 1] = case[i + 1]; has[case[i]] = true end
      if not has["--from"] then argv[#argv + 1] = "--from"; argv[#argv + 1] = "a@example.com" end
      if not has["--to"] then argv[#argv + 1] = "--to"; argv[#argv + 1] = "b@example.org" end
      if not has["--subject"] then argv[#argv + 1] = "--subject"; argv[#argv + 1] = "s" end
      argv[#argv + 1] = "--body"; argv[#argv + 1] = "hi"
      local parts = {}
      for i, a in ipairs(argv) do parts[i] = helper.quote(a) end
      local out, _, code = helper.sh(table.concat(parts, " ") .. " 2>&1; echo EXIT:$?")
      code = tonumber(out:match("EXIT:(%d+)"))
      assert.is_true(code == 1 or code == 2, out)
      assert.equal("", f.received())
    end)
  end
end)
