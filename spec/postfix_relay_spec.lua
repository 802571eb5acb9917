-- The path beyond one machine (docs/delivery.md): lua-smtp hands mail to a private Postfix as its
-- smarthost (examples/postfix-relay/send.lua, smtp.send over STARTTLS), Postfix relays onward to
-- a sink on loopback (relayhost = [127.0.0.1]:PORT). With the sink down the mail waits in
-- Postfix's deferred queue; Postfix is stopped (by its master's PID) and started again, the sink
-- comes up (lua-smtp's own, on the relayhost port), `postqueue -f` flushes, and every message
-- arrives, once. The Postfix instance is spec/support/postfix.lua's.
local helper = require "helper"
local postfix = require "support.postfix"
local q = helper.quote

local MASTER = "/usr/lib/postfix/sbin/master"
local N = 25

local function wait_for(pred, timeout)
  local deadline = os.time() + timeout
  while os.time() <= deadline do
    if pred() then return true end
    helper.sleep(0.1)
  end
  return pred()
end

local function count(text, pat)
  local _, n = text:gsub(pat, "")
  return n
end

describe("relaying through a real Postfix", function()
  local pf, why
  setup(function() pf, why = postfix.start() end)
  teardown(function() if pf then pf.stop() end end)

  it("loses nothing across a deferral and a Postfix restart: every message arrives once", function()
    if not pf then
      if tostring(why):match("^missing peer") then error(why) end
      return pending(why)
    end
    local d = pf.dir
    -- the onward hop is down: Postfix accepts, tries, defers
    pf.sink:stop()
    local mark = pf.mark()
    local out, ok = helper.sh(("cd %s && env RELAY_HOST=127.0.0.1 RELAY_PORT=%d RELAY_CAFILE=%s COUNT=%d "
      .. "MAIL_FROM=app@example.com MAIL_TO=you@example.org timeout 60 %s examples/postfix-relay/send.lua 2>&1")
      :format(q(helper.root), pf.port, q(pf.ca), N, helper.lua_cmd()))
    assert(ok, out)
    local qids, mids = {}, {}
    for mid, qid in out:gmatch("queued (<[^>]+>) (%w+)\n") do qids[#qids + 1] = qid; mids[#mids + 1] = mid end
    assert.are.equal(N, #qids, out)
    -- counted, not matched with N lazy repeats: that pattern backtracks exponentially while fewer
    -- than N are logged (20 of 25: 13 s a look), and the wait ran out on a loaded machine
    assert(wait_for(function()
      return select(2, pf.log(mark):gsub("status=deferred", "")) >= N
    end, 30), pf.log(mark))
    local log = pf.log(mark)
    for _, id in ipairs(qids) do
      assert.truthy(log:find(id .. ": to=<you@example.org>, relay=none, [^\n]*status=deferred %([^\n]-connect to 127%.0%.0%.1%[127%.0%.0%.1%]:"
        .. pf.sink_port .. ": Connection refused%)"), id .. "\n" .. log)
    end

    -- Postfix stops (TERM to its master, by the PID it wrote) with the mail in its queue
    local pid = assert(tonumber((helper.read(d .. "/queue/pid/master.pid") or ""):match("%d+")))
    helper.sh("kill -TERM " .. pid)
    assert(wait_for(function() return not helper.alive(pid) end, 10), "the Postfix master did not stop")
    pf.master:stop()
    local files = helper.sh("find " .. q(d .. "/queue/deferred") .. " -type f | wc -l")
    assert.are.equal(N, tonumber(files))
    assert.is_false(helper.wait_port("127.0.0.1", pf.port, 0.5))

    -- and starts again, the sink comes up on the relayhost port, and the queue is flushed
    pf.master = helper.spawn({ MASTER, "-c", d .. "/etc", "-s", "-e", tostring(postfix.LIFETIME) },
      { limit = postfix.LIFETIME + 10, log = d .. "/master2.out" })
    assert(helper.wait_port("127.0.0.1", pf.port, 15), pf.master:output())
    local md = helper.tmpdir() .. "/Maildir"
    local sink = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "sink", "--listen",
      "127.0.0.1:" .. pf.sink_port, "--maildir", md, "--hostname", "sink.test" }, { limit = 120 })
    local okf, err = pcall(function()
      assert(helper.wait_port("127.0.0.1", pf.sink_port, 10), sink:output())
      local mark2 = #pf.log()
      local fout, fok = helper.sh("/usr/sbin/postqueue -c " .. q(d .. "/etc") .. " -f 2>&1")
      assert(fok, fout)
      assert(wait_for(function()
        return tonumber((helper.sh("ls " .. q(md .. "/new") .. " 2>/dev/null | wc -l"))) >= N
      end, 40), pf.log(mark2))
      helper.sleep(1)
      local got = helper.sh("ls " .. q(md .. "/new") .. " | wc -l")
      assert.are.equal(N, tonumber(got))
      local all = helper.sh("cat " .. q(md) .. "/new/*")
      local seen, dups = {}, 0
      for mid in all:gmatch("\nMessage%-ID: (<[^>\r\n]+>)") do
        if seen[mid] then dups = dups + 1 end
        seen[mid] = true
      end
      assert.are.equal(0, dups)
      for _, mid in ipairs(mids) do assert(seen[mid], mid .. " never arrived") end
      -- each one relayed by Postfix under the queue ID it gave lua-smtp, after the restart
      local log2 = pf.log(mark2)
      for _, id in ipairs(qids) do
        assert.truthy(log2:find(id .. ": to=<you@example.org>, relay=127%.0%.0%.1%[127%.0%.0%.1%]:"
          .. pf.sink_port .. ", [^\n]*status=sent %(250 "), id .. "\n" .. log2)
      end
      assert.are.equal(N, count(log2, "status=sent"))
      assert.are.equal("0", helper.sh("find " .. q(d .. "/queue/deferred") .. " " .. q(d .. "/queue/active")
        .. " -type f | wc -l"):match("%d+"))
      io.stderr:write(("\n[postfix-relay] %d messages queued in Postfix while the sink was down, Postfix "
        .. "restarted, %d delivered after postqueue -f, %d duplicates\n"):format(N, N, dups))
    end)
    sink:stop()
    assert(okf, err)
  end)
end)
