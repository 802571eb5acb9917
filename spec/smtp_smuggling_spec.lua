-- SMTP smuggling (CVE-2023-51764/51765/51766, CVE-2024-27305): every end-of-data look-alike made
-- of CR, LF, NUL and "." inside DATA and BDAT, against our server over TCP (never two messages,
-- never a reply before the real end), once refusing bare CR/LF and once with normalize_newlines,
-- and inside bodies given to our client (exactly one end-of-data on the wire, no bare CR or LF).
local helper = require "helper"
local hard = require "support.hardening"
local client_peers = require "support.client_peers"

if not pcall(require, "smtp.transport.native") then
  describe("smtp smuggling", function() pending("needs smtp.transport.native") end)
  return
end
local smtp = require "smtp"
local loop = require "smtp.loop"

local REAL_END = "\r\n.\r\n"
local TAIL = "MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nsmuggled\r\n"

-- The named look-alikes of the advisories, then every string of 1 to 4 bytes over CR, LF, NUL, "."
-- that holds a ".", then every CR/LF/NUL pair, ".", CR/LF/NUL pair.
local NAMED = {
  "\n.\n", "\r.\r", "\n.\r", "\r.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r", "\r\n.\r\r\n",
  "\r\n\0.\r\n", "\r\n.\0\r\n", "\r\n.\r\0\n", "\r\n.\n\r\n", "\r\n\r.\r\n", "\r\n.\r\r\n\n",
  "\0\r\n.\n\0", "\r\n \r\n.\r \n", "\r\n..\r\n", "\r\n.\r\n.\n",
}
local function all_sequences()
  local seen, list = {}, {}
  local function add(s)
    -- a sequence holding the real end is not a look-alike
    if not s:find(REAL_END, 1, true) and not seen[s] then seen[s] = true; list[#list + 1] = s end
  end
  for _, s in ipairs(NAMED) do add(s) end
  local alpha = { "\r", "\n", "\0", "." }
  local function gen(prefix, n)
    if n == 0 then
      if prefix:find(".", 1, true) then add(prefix) end
      return
    end
    for _, c in ipairs(alpha) do gen(prefix .. c, n - 1) end
  end
  for n = 1, 4 do gen("", n) end
  local sides = { "\r", "\n", "\0" }
  for _, a in ipairs(sides) do for _, b in ipairs(sides) do
    for _, c in ipairs(sides) do for _, d in ipairs(sides) do add(a .. b .. "." .. c .. d) end end
  end end
  return list
end
local SEQS = all_sequences()

local function show(s)
  return (s:gsub(".", { ["\r"] = "CR", ["\n"] = "LF", ["\0"] = "NUL" }))
end

-- What the server must hand to on_message for a DATA body without bare CR/LF: lines unstuffed.
local function unstuff(body)
  local out = {}
  for line in (body .. "\r\n"):gmatch("(.-)\r\n") do out[#out + 1] = (line:gsub("^%.", "")) end
  out[#out] = nil
  return table.concat(out, "\r\n") .. "\r\n"
end

-- Bare CR and LF as CRLF: what normalize_newlines makes of a body, and what the client sends.
local function normalize(s)
  return (s:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n"))
end

local function finals(out)
  local list = {}
  for code, text in ("\n" .. out):gmatch("\n(%d%d%d) ([^\r\n]*)") do list[#list + 1] = { tonumber(code), text } end
  return list
end

-- normalize: false, bare CR/LF refuse the message (550 5.6.11); true, they are line ends, a dot
-- after them is unstuffed, and the message is still one message that only CRLF.CRLF ends.
for _, normalize_mode in ipairs { false, true } do
describe(("SMTP smuggling against smtp.server over TCP (normalize_newlines = %s)"):format(normalize_mode), function()
  it(("DATA: %d look-alikes, one transaction each, never a second message or an early reply"):format(#SEQS), function()
    local srv, got = hard.recording { max_errors = 100000, normalize_newlines = normalize_mode }
    local named = {}
    for _, s in ipairs(NAMED) do named[s] = true end
    local steps = { { "replies", 1 }, { "send", "EHLO c.test\r\n" }, { "replies", 2 } }
    local n = 2
    for _, seq in ipairs(SEQS) do
      steps[#steps + 1] = { "send", "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n" }
      n = n + 3
      steps[#steps + 1] = { "replies", n }
      steps[#steps + 1] = { "send", "x" .. seq .. TAIL }
      -- for the named ones, prove the server stays silent until the real end arrives
      if named[seq] then steps[#steps + 1] = { "quiet", 0.05 } end
      steps[#steps + 1] = { "send", ".\r\n" }
      n = n + 1
      steps[#steps + 1] = { "replies", n }
    end
    steps[#steps + 1] = { "send", "QUIT\r\n" }
    steps[#steps + 1] = { "eof" }
    local out = hard.raw(srv, steps, 120)
    assert.not_matches("<EARLY>", out)
    local f = finals(out)
    assert.equal(n + 1, #f, out:sub(-400))
    local accepted = 0
    for i, seq in ipairs(SEQS) do
      local base = 2 + (i - 1) * 4
      assert.same({ 250, 250, 354 }, { f[base + 1][1], f[base + 2][1], f[base + 3][1] }, show(seq))
      local body = "x" .. seq .. TAIL
      local final = f[base + 4]
      if normalize_mode then
        -- one message, bare line ends as CRLF, every line's leading dot unstuffed
        assert.equal(250, final[1], show(seq))
        accepted = accepted + 1
        local m = got.msgs[accepted]
        assert.equal("a@x.test", m.env.from, show(seq))
        assert.equal(unstuff(normalize(body)), m.data, show(seq))
      elseif not hard.only_crlf(body) then
        assert.same({ 550, "5.6.11 Bare CR or LF in message data not allowed" }, final, show(seq))
      else
        assert.equal(250, final[1], show(seq))
        accepted = accepted + 1
        local m = got.msgs[accepted]
        assert.equal("a@x.test", m.env.from, show(seq))
        assert.equal(unstuff(body), m.data, show(seq))
      end
    end
    assert.equal(221, f[#f][1])
    assert.equal(accepted, #got.msgs)
    for _, m in ipairs(got.msgs) do assert.same({ "b@y.test" }, m.env.to) end
  end)

  it("BDAT: look-alikes (and CRLF.CRLF itself) are data; chunk boundaries inside them change nothing", function()
    local srv, got = hard.recording { max_errors = 100000, normalize_newlines = normalize_mode }
    local list = { REAL_END }
    for _, s in ipairs(NAMED) do list[#list + 1] = s end
    local steps = { { "replies", 1 }, { "send", "EHLO c.test\r\n" }, { "replies", 2 } }
    local n, cases = 2, {}
    for _, seq in ipairs(list) do
      local body = "x" .. seq .. TAIL
      -- one BDAT LAST, with the last byte held back to prove no reply comes before it
      steps[#steps + 1] = { "send", "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT " .. #body ..
        " LAST\r\n" .. body:sub(1, -2) }
      n = n + 2
      steps[#steps + 1] = { "replies", n }
      steps[#steps + 1] = { "quiet", 0.05 }
      steps[#steps + 1] = { "send", body:sub(-1) }
      n = n + 1
      steps[#steps + 1] = { "replies", n }
      cases[#cases + 1] = { seq = seq, body = body, chunks = 1 }
      -- the same split in two chunks right inside the look-alike
      local cut = 1 + math.ceil(#seq / 2)
      steps[#steps + 1] = { "send", "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT " .. cut .. "\r\n" ..
        body:sub(1, cut) .. "BDAT " .. (#body - cut) .. " LAST\r\n" .. body:sub(cut + 1) }
      n = n + 4
      steps[#steps + 1] = { "replies", n }
      cases[#cases + 1] = { seq = seq, body = body, chunks = 2 }
    end
    steps[#steps + 1] = { "send", "QUIT\r\n" }
    steps[#steps + 1] = { "eof" }
    local out = hard.raw(srv, steps, 60)
    assert.not_matches("<EARLY>", out)
    local f = finals(out)
    assert.equal(n + 1, #f, out:sub(-400))
    local i, accepted = 3, 0
    for _, c in ipairs(cases) do
      local want = { 250, 250 }
      for _ = 1, c.chunks do want[#want + 1] = 250 end
      local have = {}
      for k = 1, #want do have[k] = f[i + k - 1][1] end
      local final = f[i + #want - 1]
      i = i + #want
      -- BDAT data is counted, not scanned, so a bare CR/LF ends nothing; the server takes it as
      -- data (one message, byte for byte) or refuses the whole message: never anything else;
      -- with normalize_newlines it takes every message, its bare CR/LF as CRLF
      if normalize_mode then
        assert.same(want, have, show(c.seq))
        accepted = accepted + 1
        assert.equal(normalize(c.body), got.msgs[accepted].data, show(c.seq))
      elseif hard.only_crlf(c.body) or final[1] == 250 then
        assert.same(want, have, show(c.seq))
        accepted = accepted + 1
        assert.equal(c.body, got.msgs[accepted].data, show(c.seq))
      else
        -- a bare CR/LF in BDAT data is refused like in DATA, at the end, for the whole message
        have[#have] = nil
        want[#want] = nil
        assert.same(want, have, show(c.seq))
        assert.same({ 550, "5.6.11 Bare CR or LF in message data not allowed" }, final, show(c.seq))
      end
    end
    assert.equal(accepted, #got.msgs)
  end)
end)
end

describe("SMTP smuggling through smtp.send bodies", function()
  local f
  setup(function() f = client_peers.fake() end)
  teardown(function() f.stop() end)

  -- Dot-unstuffs a wire DATA body (without its end line).
  local function wire_unstuff(s) return unstuff(s) end

  it(("puts exactly one end-of-data on the wire for each of %d look-alike bodies, never a bare CR or LF"):format(#SEQS), function()
    local steps = { { "send", "220 fake\r\n" }, { "line" }, { "send", "250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n" } }
    local bodies = {}
    for _, seq in ipairs(SEQS) do
      if not seq:find("\0", 1, true) then bodies[#bodies + 1] = "x" .. seq .. TAIL end
    end
    for _ = 1, #bodies do
      -- the client pipelines MAIL, RCPT and DATA: one write of three replies
      for _, s in ipairs { { "line" }, { "line" }, { "line" }, { "send", "250 ok\r\n250 ok\r\n354 go\r\n" },
        { "data" }, { "send", "250 2.0.0 queued\r\n" } } do
        steps[#steps + 1] = s
      end
    end
    steps[#steps + 1] = { "line" }
    steps[#steps + 1] = { "send", "221 bye\r\n" }
    f.script(steps)
    local conn = assert(smtp.connect { server = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", timeout = 10 })
    for i, body in ipairs(bodies) do
      local res, err = conn:send { from = "a@x.test", to = { "b@y.test" }, message = body }
      assert.is_nil(err, show(body))
      assert.equal(250, res.reply.code, i)
    end
    conn:close()
    local got = f.received(1)
    assert.matches("QUIT\r\n$", got)
    assert.is_true(hard.only_crlf((got:gsub("^#CONNECT\n", ""))))
    local n = 0
    for data in got:gmatch("DATA\r\n(.-)\r\n%.\r\n") do
      n = n + 1
      local body = bodies[n]
      -- bare CR and LF become CRLF, then the data is dot-stuffed
      local norm = body:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
      assert.equal(norm, wire_unstuff(data .. "\r\n"), show(body))
    end
    assert.equal(#bodies, n)
    local ends = 0
    for _ in got:gmatch("\r\n%.\r\n") do ends = ends + 1 end
    assert.equal(#bodies, ends)
  end)

  it("aiosmtpd (a real server) receives each look-alike body as one message, normalized", function()
    local peer = client_peers.aiosmtpd()
    local ok, e = pcall(function()
      local bodies = {}
      for _, seq in ipairs(NAMED) do
        if not seq:find("\0", 1, true) then bodies[#bodies + 1] = "x" .. seq .. TAIL end
      end
      local conn = assert(smtp.connect { server = "localhost", port = peer.port, cafile = peer.ca, helo = "client.test", timeout = 10 })
      for _, body in ipairs(bodies) do
        local res, err = conn:send { from = "a@x.test", to = { "b@y.test" }, message = body }
        assert.is_nil(err)
        assert.equal(250, res.reply.code)
      end
      conn:close()
      local msgs = peer.messages()
      assert.equal(#bodies, #msgs)
      for i, m in ipairs(msgs) do
        assert.equal("a@x.test", m.from)
        local norm = bodies[i]:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
        assert.equal(norm, m.data, show(bodies[i]))
      end
    end)
    peer.stop()
    assert(ok, e)
  end)

  it("our own server (BDAT, CHUNKING offered) gets each look-alike body as one message", function()
    local srv, got = hard.recording()
    local bodies = {}
    for _, seq in ipairs(NAMED) do
      if not seq:find("\0", 1, true) then bodies[#bodies + 1] = "x" .. seq .. TAIL end
    end
    local errs = {}
    loop.spawn(function()
      local conn, err = smtp.connect { server = "127.0.0.1", port = srv.port, tls = "none", helo = "client.test", timeout = 10 }
      if not conn then errs[#errs + 1] = tostring(err) end
      for _, body in ipairs(conn and bodies or {}) do
        local res, serr = conn:send { from = "a@x.test", to = { "b@y.test" }, message = body }
        if not res then errs[#errs + 1] = tostring(serr) end
      end
      if conn then
        assert(conn:extensions().CHUNKING, "CHUNKING offered")
        conn:close()
      end
      srv:close()
    end)
    srv:serve()
    assert.same({}, errs)
    assert.equal(#bodies, #got.msgs)
    for i, m in ipairs(got.msgs) do
      local norm = bodies[i]:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "\r\n")
      assert.equal(norm, m.data, show(bodies[i]))
    end
  end)
end)
