-- smtp.testing from a busted spec, in the three ways a test runs: inside smtp.loop (the sink
-- in-process), inside a cqueues controller and in plain blocking code (the sink a child
-- `lua-smtp sink`); wait_for, the assertions and their failure messages, faults on the sink.
local helper = require "helper"

if not pcall(require, "smtp.transport.native") then
  describe("smtp.testing", function() pending("needs smtp.transport.native") end)
  return
end
local smtp = require "smtp"
local loop = require "smtp.loop"
local testing = require "smtp.testing"

local function msg(subject, to)
  return ("From: a@example.com\r\nTo: %s\r\nSubject: %s\r\n\r\nHello %s\r\n"):format(to, subject, subject)
end

local function send(sink, o)
  local opts = { server = sink.host, port = sink.port, tls = "none", helo = "client.test", timeout = 5,
    from = "a@example.com", to = { "bob@example.org" }, message = msg("hi", "bob@example.org") }
  for k, v in pairs(o or {}) do opts[k] = v end
  return smtp.send(opts)
end

-- Runs fn(sink) inside an smtp.loop task with an in-process sink, closed however fn ends (an open
-- server would keep loop.run() going); an error in fn fails the spec.
local function in_loop(fn)
  local failure
  loop.spawn(function()
    local sink = assert(testing.sink())
    local ok, err = pcall(fn, sink)
    sink:close()
    if not ok then failure = err end
  end)
  loop.run()
  if failure then error(failure, 0) end
end

describe("smtp.testing inside smtp.loop (in-process sink)", function()
  it("waits for a message and returns it parsed, with its envelope", function()
    in_loop(function(sink)
      assert.is_true(sink.in_process)
      assert.equal(("smtp://127.0.0.1:%d"):format(sink.port), sink.url)
      loop.spawn(function()
        loop.sleep(0.2) -- arrives while wait_for waits
        assert(send(sink, { to = { "bob@example.org", "carol@example.org" }, message = msg("Report", "bob@example.org") }))
      end)
      local m = sink:wait_for { to = "carol@example.org", subject = "Report", timeout = 5 }
      assert.equal("a@example.com", m.envelope.from)
      assert.same({ "bob@example.org", "carol@example.org" }, m.envelope.to)
      assert.equal("Hello Report\r\n", m.text)
      assert.equal(msg("Report", "bob@example.org"), m.raw)
      assert.equal(m, sink:wait_for { match = function(x) return x.text:find("Hello") end })
      assert.equal(1, #sink:messages())
      sink:clear()
      assert.same({}, sink:messages())
    end)
  end)

  it("fails wait_for with what was asked and what arrived", function()
    in_loop(function(sink)
      assert(send(sink, { message = msg("First", "bob@example.org") }))
      assert(send(sink, { to = { "dave@example.org" }, message = msg("Second", "dave@example.org") }))
      local ok, err = pcall(sink.wait_for, sink, { to = "carol@example.org", subject = "Report", timeout = 0.3 })
      assert.is_false(ok)
      assert.matches('no message matching { to = "carol@example.org", subject = "Report" } arrived within 0.3 s; 2 arrived:\n' ..
        '  1. from=<a@example.com> to=<bob@example.org> subject="First"\n' ..
        '  2. from=<a@example.com> to=<dave@example.org> subject="Second"', err, 1, true)
    end)
  end)

  it("takes faults: sink:fail for RCPT by pattern, and expires them", function()
    in_loop(function(sink)
      assert(sink:fail { at = "rcpt", code = 452, match = "full@", times = 1 })
      local res = assert(send(sink, { to = { "bob@example.org", "full@example.org" } }))
      assert.same({ "bob@example.org" }, res.accepted)
      assert.equal(452, res.rejected[1].code)
      res = assert(send(sink, { to = { "full@example.org" } }))
      assert.same({ "full@example.org" }, res.accepted)
      local id = assert(sink:fail { at = "data_end", code = 554 })
      local _, err = send(sink)
      assert.equal(554, err.code)
      sink:unfail(id)
      assert(send(sink))
      assert.equal(3, #sink:messages())
    end)
  end)

  it("has assert_sent and assert.received with readable failures", function()
    in_loop(function(sink)
      assert(send(sink, { message = msg("Welcome", "bob@example.org") }))
      local m = testing.assert_sent { sink = sink, to = "bob@example.org", subject = "Welcome" }
      assert.equal("Welcome", m:header("subject"))
      assert.received(sink, { to = "bob@*", subject = "Wel*" })
      local ok, err = pcall(testing.assert_sent, { sink = sink, to = "eve@example.org", timeout = 0.2 })
      assert.is_false(ok)
      assert.matches('no message matching { to = "eve@example.org" } arrived within 0.2 s; 1 arrived:\n' ..
        '  1. from=<a@example.com> to=<bob@example.org> subject="Welcome"', tostring(err), 1, true)
      ok, err = pcall(assert.received, sink, { subject = "Nope", timeout = 0.2 })
      assert.is_false(ok)
      err = type(err) == "table" and err.message or tostring(err)
      assert.matches('subject="Welcome"', err, 1, true)
      assert.matches('Expected a message matching { subject = "Nope" } to arrive', err, 1, true)
    end)
  end)

  it("refuses misuse", function()
    assert.has_error(function() testing.sink { in_process = true } end)
    in_loop(function(sink)
      assert.has_error(function() sink:wait_for { too = "x" } end, "bad argument #1 to 'wait_for' (unknown field 'too')")
      assert.has_error(function() sink:fail("rcpt:452") end, "bad argument #1 to 'fail' (table expected, got string)")
      local id, err = sink:fail { at = "rcpt", code = 250 }
      assert.is_nil(id)
      assert.equal("invalid", err.kind)
    end)
  end)
end)

describe("smtp.testing in plain blocking code (child sink)", function()
  it("starts a child sink, waits for what a blocking client sent, stops it by PID", function()
    local sink = assert(testing.sink())
    assert.is_false(sink.in_process)
    local pid = sink.pid
    assert.is_true(helper.alive(pid))
    assert(send(sink, { to = { "bob@example.org", "carol@example.org" }, message = msg("Blocking", "bob@example.org") }))
    local m = sink:wait_for { to = "carol@example.org", subject = "Blocking" }
    assert.same({ "bob@example.org", "carol@example.org" }, m.envelope.to)
    assert.equal(msg("Blocking", "bob@example.org"), m.raw)
    local ok, err = pcall(sink.wait_for, sink, { subject = "Other", timeout = 0.2 })
    assert.is_false(ok)
    assert.matches('no message matching { subject = "Other" } arrived within 0.2 s; 1 arrived:\n' ..
      '  1. from=<a@example.com> to=<bob@example.org>,<carol@example.org> subject="Blocking"', err, 1, true)
    -- a fault restarts the child on the same port
    local port = sink.port
    assert(sink:fail { at = "rcpt", code = 452, match = "full@*" })
    assert.equal(port, sink.port)
    local res = assert(send(sink, { to = { "bob@example.org", "full@example.org" } }))
    assert.equal(452, res.rejected[1].code)
    sink:clear()
    assert.same({}, sink:messages())
    sink:close()
    assert.is_false(helper.alive(pid))
  end)

  it("speaks STARTTLS and AUTH when asked", function()
    local c = helper.certs()
    local sink = assert(testing.sink { tls = { cert = c.server, key = c.server_key }, auth = { user = "u", password = "p" } })
    local _, err = send(sink, { tls = "starttls", server = "localhost", cafile = c.ca })
    assert.equal(530, err.code)
    assert(send(sink, { tls = "starttls", server = "localhost", cafile = c.ca, auth = { user = "u", password = "p" } }))
    assert.received(sink, { to = "bob@example.org" })
    sink:close()
  end)
end)

describe("smtp.testing inside cqueues (child sink)", function()
  it("waits without blocking the controller", function()
    helper.need("cqueues")
    local cqueues = require "cqueues"
    local cq = cqueues.new()
    local failure, got, ticks = nil, nil, 0
    cq:wrap(function()
      local ok, err = pcall(function()
        local sink = assert(testing.sink())
        assert.is_false(sink.in_process)
        cq:wrap(function()
          cqueues.sleep(0.2)
          assert(send(sink, { message = msg("Cqueues", "bob@example.org") }))
        end)
        cq:wrap(function()
          for _ = 1, 5 do cqueues.sleep(0.05); ticks = ticks + 1 end
        end)
        got = sink:wait_for { subject = "Cqueues", timeout = 10 }
        local fok, ferr = pcall(sink.wait_for, sink, { subject = "Missing", timeout = 0.2 })
        assert.is_false(fok)
        assert.matches('1. from=<a@example.com> to=<bob@example.org> subject="Cqueues"', ferr, 1, true)
        sink:close()
      end)
      if not ok then failure = err end
    end)
    assert(cq:loop(30))
    if failure then error(failure, 0) end
    assert.equal("Hello Cqueues\r\n", got.text)
    -- the other task ran while wait_for waited
    assert.equal(5, ticks)
  end)
end)
