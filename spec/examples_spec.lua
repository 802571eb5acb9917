-- Every script in examples/ runs as it is (on this interpreter) against `lua-smtp sink` started
-- here: one with STARTTLS (test CA) and AUTH for the submission examples, one plain for direct
-- delivery; the scripts that start their own sink (demo.lua, sink_in_tests.lua) run alone.
-- examples/openresty/ is run inside nginx by spec/openresty_spec.lua.
local helper = require "helper"
local N = require "support.newcomer"
local q = helper.quote

if not pcall(require, "smtp.transport.native") then
  describe("examples", function() pending("needs smtp.transport.native") end)
  return
end

local BIN = helper.root .. "/bin/lua-smtp"
local EX = helper.root .. "/examples/"

local function sink(args)
  local port = helper.free_port()
  local dir = helper.tmpdir()
  local argv = { helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port, "--maildir", dir .. "/Maildir" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local p = helper.spawn(argv, { limit = 300 })
  assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
  return { proc = p, port = port, maildir = dir .. "/Maildir" }
end

local function stored(s)
  local out = helper.sh("cat " .. q(s.maildir) .. "/new/* 2>/dev/null")
  return out
end

local function example(name, env, args)
  local cmd = N.env(env) .. "timeout 60 " .. helper.lua .. " " .. q(EX .. name) .. " " .. (args or "")
  return N.run("cd / && " .. cmd)
end

describe("examples", function()
  local c, tls, plain
  setup(function()
    c = helper.certs()
    tls = sink { "--tls-cert", c.server, "--tls-key", c.server_key, "--auth", "demo:secret",
      "--hostname", "sink.example.test", "--reject-rcpt", "nobody@*" }
    plain = sink {}
  end)
  teardown(function()
    if tls then tls.proc:stop() end
    if plain then plain.proc:stop() end
  end)

  local function submission_env(extra)
    local e = { SMTP_HOST = "localhost", SMTP_PORT = tostring(tls.port), SMTP_CAFILE = c.ca,
      SMTP_USER = "demo", SMTP_PASSWORD = "secret" }
    for k, v in pairs(extra or {}) do e[k] = v end
    return e
  end

  it("every script in examples/ is covered here", function()
    local covered = { ["demo.lua"] = true, ["send_starttls_auth.lua"] = true, ["send_many.lua"] = true,
      ["deliver_literal.lua"] = true, ["dkim_sign.lua"] = true, ["sink_in_tests.lua"] = true,
      ["send_invitation.lua"] = true }
    for name in helper.sh("ls -1 " .. q(EX)):gmatch("[^\n]+") do
      if name:match("%.lua$") then assert(covered[name], "examples/" .. name .. " is not run by a spec") end
    end
  end)

  it("send_starttls_auth.lua: verified STARTTLS, AUTH, UTF-8 subject, text, HTML, attachment", function()
    local out, rc = example("send_starttls_auth.lua", submission_env())
    assert(rc == 0, out)
    assert.matches("^sent <[%x]+@example%.com> over TLSv1%.[23]: 250 ", out)
    local m = stored(tls)
    assert.truthy(m:find("Subject: =?UTF-8?", 1, true))
    assert.truthy(m:find("multipart/alternative", 1, true))
    assert.truthy(m:find('filename="report.csv"', 1, true))
  end)

  it("send_starttls_auth.lua: a wrong password fails with exit 1 and an auth error", function()
    local out, rc = example("send_starttls_auth.lua", submission_env { SMTP_PASSWORD = "nope" })
    assert.equal(1, rc)
    assert.matches("not sent: auth %(auth%): 535 5%.7%.8", out)
  end)

  it("send_starttls_auth.lua: a certificate from an unknown CA fails closed", function()
    local out, rc = example("send_starttls_auth.lua", submission_env { SMTP_CAFILE = c.other_ca })
    assert.equal(1, rc)
    assert.matches("not sent: tls %(tls%):", out)
  end)

  it("send_invitation.lua: an invitation to an international domain, with one-click unsubscribe", function()
    local out, rc = example("send_invitation.lua", submission_env())
    assert(rc == 0, out)
    assert.matches("^sent <design%-review%-2024%-01%-02%.invite@example%.com> to bob@bücher%.example: 250 ", out)
    local m = stored(tls)
    assert.truthy(m:find("Delivered-To: bob@xn--bcher-kva.example\r\n", 1, true))
    assert.truthy(m:find("To: bob@xn--bcher-kva.example\r\n", 1, true))
    assert.truthy(m:find("Content-Type: text/calendar; charset=UTF-8; method=REQUEST\r\n", 1, true))
    assert.truthy(m:find('Content-Disposition: attachment; filename="invite.ics"', 1, true))
    assert.truthy(m:find("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", 1, true))
  end)

  it("send_many.lua: five messages over one session, one line each", function()
    local before = #helper.sh("ls -1 " .. q(tls.maildir .. "/new"))
    local out, rc = example("send_many.lua", submission_env(), "5")
    assert(rc == 0, out)
    assert.matches("session: TLSv1%.[23], extensions: PIPELINING CHUNKING", out)
    for i = 1, 5 do assert.matches(("\n%d: reader%d@example%%.org 250 "):format(i, i), out) end
    local n = 0
    for _ in helper.sh("ls -1 " .. q(tls.maildir .. "/new")):gmatch("[^\n]+") do n = n + 1 end
    assert.is_true(n >= 5 and before >= 0)
  end)

  it("deliver_literal.lua: direct delivery to user@[127.0.0.1] on the given port", function()
    local out, rc = example("deliver_literal.lua", {}, tostring(plain.port))
    assert(rc == 0, out)
    assert.matches("ops@%[127%.0%.0%.1%]: sent 250 2%.0%.0 .*%(host %[127%.0%.0%.1%], address 127%.0%.0%.1%)", out)
    assert.matches("backup@%[127%.0%.0%.1%]: sent 250", out)
    local m = stored(plain)
    assert.truthy(m:find("Delivered-To: ops@[127.0.0.1]\r\nDelivered-To: backup@[127.0.0.1]\r\n", 1, true))
  end)

  it("deliver_literal.lua: nothing listening is deferred, exit 1", function()
    local out, rc = example("deliver_literal.lua", {}, tostring(helper.free_port()))
    assert.equal(1, rc)
    assert.matches("ops@%[127%.0%.0%.1%]: deferred", out)
  end)

  it("dkim_sign.lua: signs with a fresh Ed25519 key and sends it", function()
    local out, rc = example("dkim_sign.lua", submission_env())
    assert(rc == 0, out)
    assert.matches('publish: s1%._domainkey%.example%.com TXT "v=DKIM1; k=ed25519; p=[%w+/=]+"', out)
    assert.matches("DKIM%-Signature: v=1; a=ed25519%-sha256; c=relaxed/relaxed; d=example%.com; s=s1;", out)
    assert.matches("sent: 250", out)
    assert.truthy(stored(tls):find("\r\nDKIM-Signature: v=1; a=ed25519-sha256;", 1, true))
  end)

  it("sink_in_tests.lua: starts its own sink, checks what it stored and a bounce", function()
    local out, rc = example("sink_in_tests.lua", {})
    assert(rc == 0, out)
    assert.matches("ok: bounce@example%.org refused with 550 5%.1%.1", out)
    assert.matches("ok: stored with Return%-Path and Delivered%-To", out)
  end)

  it("demo.lua (make demo): STARTTLS + AUTH to a sink, the stored message decoded, in seconds", function()
    local t0 = os.time()
    local out, rc = example("demo.lua", {})
    assert(rc == 0, out)
    assert.is_true(os.time() - t0 < 30)
    assert.matches("sent over TLSv1%.[23], certificate verified", out)
    assert.matches("Subject:%s+Grüße from lua%-smtp ✉", out)
    assert.matches("multipart/mixed\n%s+multipart/alternative\n%s+text/plain %(7bit", out)
    assert.matches('text/csv "report%.csv" %(base64', out)
  end)
end)

-- The command line of the README quick starts: --help, --to-file with --concurrency (a line per
-- message on a pipe, a progress bar on a terminal), --json; against a sink that stores nothing.
describe("lua-smtp send (README quick starts)", function()
  local s, list
  setup(function()
    local port = helper.free_port()
    local p = helper.spawn({ helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port, "--reject-rcpt", "bad*" },
      { limit = 300 })
    assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
    s = { proc = p, port = port }
    list = helper.tmpdir() .. "/list"
    helper.write(list, "a1@x.test\nbad1@x.test\n# a comment\n\na2@x.test\na3@x.test\n")
  end)
  teardown(function() if s then s.proc:stop() end end)

  local function send(args)
    return N.run("cd / && " .. N.env() .. helper.lua .. " " .. q(BIN) .. " send --server 127.0.0.1:" .. s.port ..
      " --tls none --from me@x.test --subject hi --body yo " .. args)
  end

  it("every subcommand answers --help with its usage, exit 0", function()
    for _, cmd in ipairs { "send", "sink", "mx" } do
      local out, rc = N.run(N.env() .. helper.lua .. " " .. q(BIN) .. " " .. cmd .. " --help")
      assert.equal(0, rc)
      assert.matches("^usage: lua%-smtp " .. cmd, out)
    end
    local out, rc = N.run(N.env() .. helper.lua .. " " .. q(BIN) .. " frobnicate")
    assert.equal(2, rc)
    assert.matches("unknown command 'frobnicate'", out)
  end)

  it("--to-file --concurrency 2: one transaction per recipient, a line each, a summary, exit 1 on a failure", function()
    local out, rc = send("--to-file " .. q(list) .. " --concurrency 2")
    assert.equal(1, rc)
    for _, a in ipairs { "a1", "a2", "a3" } do
      assert.matches("\n?" .. a .. "@x%.test: sent 250 2%.0%.0 ", out)
    end
    assert.matches("bad1@x%.test: failed 550 5%.1%.1 Recipient address rejected", out)
    assert.matches("sent 3, failed 1, deferred 0\n", out)
  end)

  it("--to-file on a terminal: a progress bar, failures above it, the summary", function()
    helper.need("script")
    local cmd = N.env() .. helper.lua .. " " .. q(BIN) .. " send --server 127.0.0.1:" .. s.port ..
      " --tls none --from me@x.test --subject hi --body yo --to-file " .. q(list)
    -- a terminal that draws: the caller's TERM may be unset or "dumb" (CI, a container)
    local out = helper.sh("TERM=xterm script -qec " .. q(cmd) .. " /dev/null")
    assert.truthy(out:find("\r[..............................] 0/4  sent 0  failed 0  deferred 0", 1, true), out)
    assert.truthy(out:find("\r[##############################] 4/4  sent 3  failed 1  deferred 0", 1, true), out)
    assert.truthy(out:find("\r\27[Kbad1@x.test: failed 550 5.1.1", 1, true), out)
    assert.falsy(out:find("a1@x.test: sent", 1, true))
    assert.truthy(out:find("sent 3, failed 1, deferred 0", 1, true))
  end)

  it("--json: one object per recipient, with --to-file and for a single message", function()
    local out, rc = send("--to-file " .. q(list) .. " --concurrency 3 --json")
    assert.equal(1, rc)
    assert.matches('^%[{"recipient":"a1@x%.test","status":"sent","code":250,"enhanced":"2%.0%.0","text":"[^"]*"},' ..
      '{"recipient":"bad1@x%.test","status":"failed","code":550,"enhanced":"5%.1%.1","text":"Recipient address rejected"},', out)
    out, rc = send("--to a@x.test --json")
    assert.equal(0, rc)
    assert.matches('^%[{"recipient":"a@x%.test","status":"sent","code":250,"enhanced":"2%.0%.0","text":"[^"]*"}%]\n$', out)
    out, rc = send("--to bad@x.test --json")
    assert.equal(1, rc)
    assert.equal('[{"recipient":"bad@x.test","status":"failed","code":550,"enhanced":"5.1.1","text":"Recipient address rejected"}]\n', out)
  end)
end)
