-- `lua-smtp send -v` and `lua-smtp sink -v` as real processes: the conversation on stderr as
-- swaks and curl -v print it ("<-", "->", "*"), the password and AUTH data as [redacted], and
-- -v read as a flag wherever it stands; options that take several values are repeated, one
-- value each (--to a --to b), and an option never takes the next flag as its value.
local helper = require "helper"
local core = require "smtp.core"

if not pcall(require, "smtp.transport.native") then
  describe("lua-smtp -v", function() pending("needs smtp.transport.native") end)
  return
end

local BIN = helper.root .. "/bin/lua-smtp"
local SECRET = "v3rbose+Secret/pw="

local function quote_all(argv)
  local q = {}
  for i, x in ipairs(argv) do q[i] = helper.quote(x) end
  return table.concat(q, " ")
end

-- Runs `lua-smtp send ARGS` to the end: exit status, stdout, stderr.
local function send(args, env)
  local dir = helper.tmpdir()
  local cmd = quote_all { helper.lua, BIN, "send" } .. " " .. quote_all(args) ..
    " >" .. dir .. "/out 2>" .. dir .. "/err; echo EXIT:$?"
  if env then cmd = "env " .. env .. " " .. cmd end
  local res = helper.sh(cmd)
  return tonumber(res:match("EXIT:(%d+)")), helper.read(dir .. "/out") or "", helper.read(dir .. "/err") or ""
end

local function forbidden(secret)
  local out = { secret, core.xtext_encode(secret) }
  for k = 0, 2 do out[#out + 1] = core.b64encode(("\0"):rep(k) .. secret):sub(5, -5) end
  return out
end

local function assert_clean(text)
  for _, f in ipairs(forbidden(SECRET)) do
    assert.is_nil(text:find(f, 1, true), ("%q in:\n%s"):format(f, text))
  end
end

describe("lua-smtp -v", function()
  local sink, port, certs
  setup(function()
    certs = helper.certs()
    port = helper.free_port()
    sink = helper.spawn({ helper.lua, BIN, "sink", "-v", "--listen", "127.0.0.1:" .. port,
      "--tls-cert", certs.server, "--tls-key", certs.server_key, "--auth-env", "SINK_AUTH" },
      { limit = 300, env = { SINK_AUTH = "alice:" .. SECRET } })
    assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. sink:output())
  end)
  teardown(function() if sink then sink:stop() end end)

  local function base()
    return { "--server", "localhost:" .. port, "--cafile", certs.ca, "--user", "alice", "--password-env", "PW",
      "--from", "a@x.test", "--body", "a body line", "--timeout", "10" }
  end

  for _, where in ipairs { "first", "between recipients", "last" } do
    it("send -v " .. where .. ": the conversation on stderr, the secret never", function()
      local args = base()
      if where == "first" then
        table.insert(args, 1, "-v")
        args[#args + 1] = "--to"; args[#args + 1] = "b@y.test"; args[#args + 1] = "--to"; args[#args + 1] = "c@y.test"
      elseif where == "between recipients" then
        for _, a in ipairs { "--to", "b@y.test", "-v", "--to", "c@y.test" } do args[#args + 1] = a end
      else
        for _, a in ipairs { "--to", "b@y.test", "--to", "c@y.test", "--verbose" } do args[#args + 1] = a end
      end
      local code, out, err = send(args, "PW=" .. helper.quote(SECRET))
      assert.equal(0, code, err)
      -- exactly the two recipients: -v was read as the flag, not as an address
      assert.equal("sent: 250 2.0.0 Ok: queued\n  accepted: b@y.test\n  accepted: c@y.test\n", out)
      assert.truthy(err:find("^%* connected to localhost %[127%.0%.0%.1%]:" .. port .. "\n<%- 220 localhost ESMTP"), err)
      assert.truthy(err:find("\n%-> EHLO [^\n]+\n<%- 250%-localhost\n"), err)
      assert.truthy(err:find("\n%-> STARTTLS\n<%- 220 [^\n]+\n%* TLS TLSv1%.[23], [^\n]+, verify ok\n"), err)
      assert.truthy(err:find("\n-> AUTH PLAIN [redacted]\n<- 235 2.7.0 Authentication successful\n", 1, true), err)
      assert.truthy(err:find("\n-> RCPT TO:<b@y.test>\n-> RCPT TO:<c@y.test>\n", 1, true), err)
      assert.truthy(err:find("\n%-> %[message data: %d+ bytes%]\n"), err)
      assert.is_nil(err:find("a body line", 1, true), err)
      assert.truthy(err:find("\n-> QUIT\n<- 221 2.0.0 Bye\n", 1, true), err)
      assert_clean(err)
      -- the sink printed its side, each line with the session's id
      local log
      for _ = 1, 50 do
        log = sink:output()
        if log:find("%* connection closed\n[^\n]*$") then break end
        helper.sleep(0.1)
      end
      assert.truthy(log:find("%[%d+%] <%- AUTH PLAIN %[redacted%]\n%[%d+%] %-> 235 2%.7%.0"), log)
      assert.truthy(log:find("%[%d+%] %* TLS TLSv1%.[23], "), log)
      assert.truthy(log:find("%[%d+%] <%- RCPT TO:<c@y%.test>"), log)
      assert_clean(log)
    end)
  end

  it("a transcript without -v: none", function()
    local args = base()
    args[#args + 1] = "--to"; args[#args + 1] = "b@y.test"
    local code, _, err = send(args, "PW=" .. helper.quote(SECRET))
    assert.equal(0, code, err)
    assert.equal("", err)
  end)

  it("one value per option: a second word is refused, a flag is never a value", function()
    local args = base()
    for _, a in ipairs { "--to", "b@y.test", "c@y.test" } do args[#args + 1] = a end
    local code, _, err = send(args, "PW=x")
    assert.equal(2, code)
    assert.truthy(err:find("unexpected argument 'c@y.test' (one value per --to: repeat the option, --to A --to B)", 1, true), err)
    args = base()
    for _, a in ipairs { "--to", "-v" } do args[#args + 1] = a end
    code, _, err = send(args, "PW=x")
    assert.equal(2, code)
    assert.truthy(err:find("--to needs a value (write --to=VALUE for one that starts with '-')", 1, true), err)
    -- --name=VALUE takes a value that starts with a dash
    args = base()
    args[#args + 1] = "--to=b@y.test"
    args[#args + 1] = "--subject=-- dashed"
    code, _, err = send(args, "PW=" .. helper.quote(SECRET))
    assert.equal(0, code, err)
    -- the sink refuses a flag as a value too
    local res = helper.sh(quote_all { helper.lua, BIN, "sink", "--listen", "-v" } .. " 2>&1; echo EXIT:$?")
    assert.matches("%-%-listen needs a value", res)
    assert.matches("EXIT:2", res)
  end)
end)
