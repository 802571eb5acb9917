-- conn:send_many over PIPELINING + CHUNKING: a window of transactions (RSET, MAIL, RCPTs,
-- BDAT n LAST) in flight at once, against our smtp.server (which offers CHUNKING; smtp-sink and
-- aiosmtpd do not), with refusals in the middle of a window: per-message results exact, and no
-- refused transaction leaks into the next one's envelope.
local smtp = require "smtp"
local loop = require "smtp.loop"
local server = require "smtp.server"
local helper = require "helper"

-- Runs fn(conn) against a recording smtp.server inside one smtp.loop; returns what fn returned,
-- the messages the server took, and the number of writes the client made.
local function with_server(opts, fn)
  local got = {}
  local o = {
    port = 0, hostname = "mx.test", timeout = 10,
    on_message = function(_, env, reader)
      local data = helper.read_message(reader, 65536)
      if not data then return false end
      local to = {}
      for i, r in ipairs(env.to) do to[i] = r end
      got[#got + 1] = { from = env.from, to = to, data = data }
      if opts.on_data then return opts.on_data(got[#got]) end
      return true
    end,
    on_mail = opts.on_mail, on_rcpt = opts.on_rcpt,
  }
  local srv = assert(server.listen(o))
  local out, writes, ext
  loop.spawn(function()
    assert(srv:serve())
    local conn = assert(smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none",
      helo = "c.test", timeout = 10 })
    ext = conn:extensions()
    -- the writes of strings and of the engine's buffer (the native transport's usual path)
    local w, we = conn.sock.write, conn.sock.write_engine
    writes = 0
    conn.sock.write = function(...) writes = writes + 1; return w(...) end
    if we then conn.sock.write_engine = function(...) writes = writes + 1; return we(...) end end
    out = fn(conn)
    conn:close()
    srv:close()
  end)
  loop.run()
  return out, got, writes, ext
end

local function batch(n, to_of)
  local list = {}
  for i = 1, n do
    list[i] = { from = "s" .. i .. "@x.test", to = to_of and to_of(i) or { "r" .. i .. "@y.test" },
      message = "Message-ID: <" .. i .. "@x>\nSubject: " .. i .. "\n\nbody " .. i .. "\n.dot\n" }
  end
  return list
end

describe("send_many with PIPELINING and CHUNKING (smtp.server)", function()
  it("keeps a window of transactions in flight: 100 messages in a few writes, exact data", function()
    local res, got, writes, ext = with_server({}, function(conn) return conn:send_many(batch(100)) end)
    assert.is_not_nil(ext.CHUNKING)
    assert.is_not_nil(ext.PIPELINING)
    assert.equal(100, #res)
    for i, r in ipairs(res) do
      assert.is_nil(r.kind, tostring(r.text))
      assert.equal(250, r.reply.code)
      assert.same({ "r" .. i .. "@y.test" }, r.accepted)
      assert.same({}, r.rejected)
      assert.equal("<" .. i .. "@x>", r.message_id)
    end
    assert.equal(100, #got)
    for i, m in ipairs(got) do
      assert.equal("s" .. i .. "@x.test", m.from)
      assert.same({ "r" .. i .. "@y.test" }, m.to)
      -- BDAT: CRLF-normalized, no dot-stuffing
      assert.equal("Message-ID: <" .. i .. "@x>\r\nSubject: " .. i .. "\r\n\r\nbody " .. i .. "\r\n.dot\r\n", m.data)
    end
    assert.is_true(writes <= 12, "writes: " .. writes)
  end)

  it("a refused recipient, sender or message mid-window fails only that message", function()
    local list = batch(40, function(i)
      if i == 5 then return { "reject5@y.test" } end            -- every recipient refused
      if i == 7 then return { "r7@y.test", "reject7@y.test" } end  -- one of two refused
      return { "r" .. i .. "@y.test" }
    end)
    list[12].from = "spam@x.test"                               -- MAIL refused
    list[20].message = "Subject: bad\r\n\r\nrefuse me\r\n"       -- data refused
    local res, got = with_server({
      on_rcpt = function(_, rcpt) if rcpt:match("^reject") then return false, 550, "5.1.1 No such user" end return true end,
      on_mail = function(_, from) return from ~= "spam@x.test", 550, "5.7.1 Go away" end,
      on_data = function(m) if m.data:find("refuse me", 1, true) then return false, 554, "5.6.0 Not today" end return true end,
    }, function(conn) return conn:send_many(list) end)
    assert.equal(40, #res)
    local r5 = res[5]
    assert.equal("rejected", r5.kind)
    assert.equal("rcpt", r5.phase)
    assert.equal(550, r5.code)
    assert.equal("5.1.1", r5.enhanced)
    assert.same({ { recipient = "reject5@y.test", code = 550, enhanced = "5.1.1", text = "No such user" } }, r5.rejected)
    assert.equal(250, res[7].reply.code)
    assert.same({ "r7@y.test" }, res[7].accepted)
    assert.same({ { recipient = "reject7@y.test", code = 550, enhanced = "5.1.1", text = "No such user" } }, res[7].rejected)
    assert.equal("rejected", res[12].kind)
    assert.equal("mail", res[12].phase)
    assert.equal(550, res[12].code)
    assert.equal("5.7.1", res[12].enhanced)
    assert.equal("rejected", res[20].kind)
    assert.equal("data_end", res[20].phase)
    assert.equal(554, res[20].code)
    assert.equal("5.6.0", res[20].enhanced)
    local delivered = {}
    for i, r in ipairs(res) do
      if i ~= 5 and i ~= 12 and i ~= 20 then
        assert.is_nil(r.kind, i .. ": " .. tostring(r.text))
        assert.equal(250, r.reply.code)
        delivered[#delivered + 1] = i
      end
    end
    -- the server took exactly the others (plus the refused data it saw), each with its own envelope
    local seen = {}
    for _, m in ipairs(got) do
      local i = tonumber(m.from:match("^s(%d+)@"))
      assert.is_not_nil(i, m.from)
      seen[#seen + 1] = i
      assert.same(i == 7 and { "r7@y.test" } or { "r" .. i .. "@y.test" }, m.to)
    end
    -- message 20 reached on_message, which refused it
    local want = {}
    for i = 1, 40 do if i ~= 5 and i ~= 12 then want[#want + 1] = i end end
    assert.equal(37, #delivered)
    assert.same(want, seen)
  end)

  it("after a window whose last message lost every recipient, the next send starts clean", function()
    local list = batch(5, function(i) return { (i == 5 and "reject" or "r") .. i .. "@y.test" } end)
    local res, got = with_server({
      on_rcpt = function(_, rcpt) if rcpt:match("^reject") then return false, 550, "5.1.1 No such user" end return true end,
    }, function(conn)
      local out = conn:send_many(list)
      out.after = { conn:send { from = "late@x.test", to = { "r9@y.test" }, message = "Subject: late\r\n\r\nx\r\n" } }
      return out
    end)
    assert.equal("rejected", res[5].kind)
    assert.equal("rcpt", res[5].phase)
    assert.is_table(res.after[1], tostring(res.after[2]))
    assert.equal(250, res.after[1].reply.code)
    assert.equal(5, #got)
    assert.equal("late@x.test", got[5].from)
    assert.same({ "r9@y.test" }, got[5].to)
  end)

  it("bounds the window by bytes: 40 messages of 100 KB arrive whole", function()
    local big = ("z"):rep(98) .. "\r\n"
    big = "Subject: big\r\n\r\n" .. big:rep(1000)
    local list = batch(40)
    for i = 1, 40 do list[i].message = big end
    local res, got, writes = with_server({}, function(conn) return conn:send_many(list) end)
    for _, r in ipairs(res) do assert.equal(250, r.reply and r.reply.code) end
    assert.equal(40, #got)
    for _, m in ipairs(got) do assert.equal(big, m.data) end
    assert.is_true(writes >= 10, "writes: " .. writes)  -- not one 4 MB write
  end)

  it("mixes non-string messages in: they go on their own once the window has drained", function()
    local list = batch(10)
    local body = "Subject: f\r\n\r\nfrom a function\r\n"
    local done = false
    list[4].message = function() if done then return nil end done = true return body end
    local res, got = with_server({}, function(conn) return conn:send_many(list) end)
    for _, r in ipairs(res) do assert.equal(250, r.reply and r.reply.code) end
    assert.equal(10, #got)
    assert.equal(body, got[4].data)
    assert.equal("s4@x.test", got[4].from)
  end)
end)
