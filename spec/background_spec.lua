-- smtp.background inside a real nginx (two workers): requests that queue mail return at once
-- while the SMTP server is down, every message arrives exactly once when it is back; a full queue
-- is a clear error to the handler; permanent failures are recorded by id; the shipped example's
-- queueing handler. Runs once, under the lua5.4 run of busted (nginx brings its own LuaJIT).
local helper = require "helper"

local asan = os.getenv("SMTP_BUILD") == "asan"
local run = helper.lua == "lua5.4" and not asan
local nginx_support = run and require("support.nginx")
if run and not nginx_support.available() then
  describe("smtp.background inside nginx", function() it("needs nginx with its Lua module", function() helper.need("nginx lua") end) end)
  return
end
local describe_or_skip = run and describe or function(name)
  describe(name, function()
    pending(asan and "not under ASan (nginx runs its own LuaJIT with the plain LuaJIT build)"
      or "runs once, in the lua5.4 run (nginx brings its own LuaJIT)")
  end)
end

local q = helper.quote

local LOCATIONS = [[
    location = /queue { content_by_lua_block { require("support.background_handlers").queue() } }
    location = /status { content_by_lua_block { require("support.background_handlers").status() } }
    location = /stats { content_by_lua_block { require("support.background_handlers").stats() } }
]]

-- nginx with `workers` workers, a queue dict of `size` and the loop sending to 127.0.0.1:port.
local function start_nginx(dict, size, port, workers, extra)
  local srv = nginx_support.start {
    workers = workers,
    http = ("  lua_shared_dict %s %s;\n  init_worker_by_lua_block { require(\"support.background_handlers\").init(%q, %d, %s) }\n")
      :format(dict, size, dict, port, extra or "nil"),
    locations = LOCATIONS,
  }
  -- the workers are up (the master alone would accept and never answer)
  local status, body = nginx_support.request(srv:url("/stats"), nil, 5)
  if status ~= 200 then
    local log = srv.error_log()
    srv.stop()
    error("nginx workers do not answer: " .. tostring(body) .. "\n" .. log)
  end
  return srv
end

-- Requests in parallel over keep-alive connections (curl --parallel): the status and time of
-- each, in the order of `first..last`, and the bodies by number.
local function load(srv, first, last, dir, extra)
  local out = helper.sh("curl -s --no-progress-meter --parallel --parallel-max 16 -m 10 -o " .. q(dir .. "/r#1")
    .. " -w '%{http_code} %{time_total} %{url_effective}\\n' "
    .. q(srv:url("/queue?n=[" .. first .. "-" .. last .. "]" .. (extra or ""))) .. " 2>&1")
  local rows = {}
  for code, t, n in out:gmatch("(%d+) ([%d.]+) [^\n]-n=(%d+)[^\n]*\n") do
    rows[tonumber(n)] = { code = tonumber(code), time = tonumber(t), body = helper.read(dir .. "/r" .. n) }
  end
  return rows, out
end

local function get(srv, path)
  local status, body = nginx_support.request(srv:url(path))
  return body, status
end

local function wait_for(pred, timeout)
  local core = require "smtp.core"
  local deadline = core.now() + timeout
  while core.now() < deadline do
    if pred() then return true end
    helper.sleep(0.1)
  end
  return pred()
end

describe_or_skip("smtp.background inside nginx", function()
  local now = require("smtp.core").now

  it("1,000 requests return at once while the server is down for the first half; each message arrives once", function()
    local port = helper.free_port()
    local srv = start_nginx("smtpq", "32m", port, 2)
    local dir = helper.tmpdir()
    local smtpd
    local ok, err = pcall(function()
      local t0 = now()
      local rows1, out1 = load(srv, 1, 500, dir)
      local first_half = now() - t0
      -- every message is tried, and fails, a few times while nothing listens
      helper.sleep(2.5)
      local status_down = get(srv, "/status?id=" .. (rows1[1] and rows1[1].body or ""):match("queued (%S+)"))
      local down_for = now() - t0
      smtpd = nginx_support.smtpd { tls = true, port = port }
      local t1 = now()
      local rows2, out2 = load(srv, 501, 1000, dir)
      local second_half = now() - t1
      local all = {}
      for i = 1, 1000 do all[i] = rows1[i] or rows2[i] end
      local times = {}
      for i = 1, 1000 do
        local r = all[i]
        assert(r, "request " .. i .. " has no answer: " .. (i <= 500 and out1 or out2):sub(1, 2000))
        assert.are.equal(200, r.code, r.body)
        assert.truthy(r.body:match("^queued %x+%-%d+\n$"), r.body)
        times[#times + 1] = r.time
      end
      table.sort(times)
      assert.truthy(status_down:match("^queued attempts=%d+ error=connect"), status_down)
      assert(wait_for(function() return smtpd.messages() >= 1000 end, 60),
        "delivered " .. smtpd.messages() .. " of 1000\n" .. srv.error_log():sub(-3000))
      local delivered_at = now()
      -- anything sent twice would arrive in this time too
      helper.sleep(2)
      local n = smtpd.messages()
      local seen, dups, distinct = {}, 0, 0
      for i = 1, n do
        local id = assert(smtpd.message(i)):match("Message%-ID: <bg%-(%d+)@client%.test>")
        if seen[id] then dups = dups + 1 else seen[id] = true; distinct = distinct + 1 end
      end
      local stats = get(srv, "/stats")
      io.stderr:write(("\n[background] %d requests in %.2f s (the first 500 in %.2f s with the server down, "
        .. "the last 500 in %.2f s); response time median %.4f s, max %.4f s; server down for the first %.2f s "
        .. "of the run; %d messages delivered (%d distinct, %d duplicates), the last %.2f s after the server "
        .. "came up; %s"):format(#times, first_half + second_half, first_half, second_half, times[500],
        times[1000], down_for, n, distinct, dups, delivered_at - t1, stats))
      assert.are.equal(1000, n)
      assert.are.equal(0, dups)
      for i = 1, 1000 do assert(seen[tostring(i)], "message " .. i .. " never arrived") end
      assert.are.equal("queued=0 accepted=1000 low=1001\n", stats)
      -- generous: a request that waited for SMTP would take far longer than this on any machine
      assert.is_true(times[1000] < 2, "slowest response " .. times[1000] .. " s")
      -- both workers sent (the claims are shared, the sends are not)
      local status_one = get(srv, "/status?id=" .. rows1[1].body:match("queued (%S+)"))
      assert.truthy(status_one:match("^sent attempts=%d+ error=nil sent=b@smtpd%.test failed=\n$"), status_one)
    end)
    srv.stop()
    if smtpd then smtpd.stop() end
    assert(ok, err)
  end)

  it("refuses with a clear error when the queue is full, and loses none of what it accepted", function()
    local port = helper.free_port()
    -- by count: max_messages = 3
    local srv = start_nginx("smallq", "1m", port, 1, "{ max_messages = 3 }")
    local dir = helper.tmpdir()
    local smtpd
    local ok, err = pcall(function()
      local answers = {}
      for i = 1, 4 do
        local body, status = get(srv, "/queue?n=" .. i)
        answers[i] = status .. " " .. body
      end
      for i = 1, 3 do assert.truthy(answers[i]:match("^200 queued %x+%-" .. i .. "\n$"), answers[i]) end
      assert.are.equal("503 error full full: smtp.background: queue 'smallq' is full (it holds 3 messages, "
        .. "its max_messages): message not accepted (temporary)\n", answers[4])
      srv.stop()
      -- by room: a 256 KB dict, 30 KB messages, 16 KB kept free for claims and outcomes
      srv = start_nginx("tinyq", "256k", port, 1, "{ headroom = 16384 }")
      local rows = load(srv, 1, 20, dir, "&size=30000")
      local accepted, refused = {}, 0
      for i = 1, 20 do
        local r = rows[i]
        if r.code == 200 then
          accepted[#accepted + 1] = r.body:match("queued (%S+)")
        else
          refused = refused + 1
          assert.are.equal(503, r.code)
          assert.are.equal("error full full: smtp.background: queue 'tinyq' is full (the lua_shared_dict has no "
            .. "room left): message not accepted (temporary)\n", r.body)
        end
      end
      assert.is_true(#accepted >= 2 and refused >= 5, #accepted .. " accepted, " .. refused .. " refused")
      for _, id in ipairs(accepted) do
        -- held: waiting, or claimed by a worker trying the server that is not up yet
        local st = get(srv, "/status?id=" .. id)
        assert.truthy(st:match("^queued ") or st:match("^sending "), st)
      end
      -- the server comes up: everything accepted arrives
      smtpd = nginx_support.smtpd { tls = true, port = port }
      assert(wait_for(function() return smtpd.messages() >= #accepted end, 30), srv.error_log():sub(-2000))
      helper.sleep(1)
      assert.are.equal(#accepted, smtpd.messages())
      for _, id in ipairs(accepted) do
        local st = get(srv, "/status?id=" .. id)
        assert.truthy(st:match("^sent "), st)
      end
      -- and there is room again
      local body, status = get(srv, "/queue?n=99&size=30000")
      assert.are.equal(200, status, body)
    end)
    srv.stop()
    if smtpd then smtpd.stop() end
    assert(ok, err)
  end)

  it("records permanent failures by id (and through on_failure), retrying only what may succeed", function()
    local c = helper.certs()
    local port = helper.free_port()
    local md = helper.tmpdir() .. "/Maildir"
    local sink = helper.spawn({ "lua5.4", helper.root .. "/bin/lua-smtp", "sink", "--listen", "127.0.0.1:" .. port,
      "--maildir", md, "--tls-cert", c.server, "--tls-key", c.server_key, "--hostname", "sink.test",
      "--reject-rcpt", "gone@*" }, { limit = 120 })
    assert(helper.wait_port("127.0.0.1", port, 10), sink:output())
    local srv = start_nginx("failq", "1m", port, 1)
    local ok, err = pcall(function()
      local b1 = get(srv, "/queue?n=1&to=gone@smtpd.test")
      local b2 = get(srv, "/queue?n=2&to=b@smtpd.test,gone@smtpd.test")
      local id1, id2 = b1:match("queued (%S+)"), b2:match("queued (%S+)")
      assert(id1 and id2, b1 .. b2)
      local s1, s2
      assert(wait_for(function()
        s1, s2 = get(srv, "/status?id=" .. id1), get(srv, "/status?id=" .. id2)
        return not s1:match("^queued") and not s2:match("^queued") and not s1:match("^sending") and not s2:match("^sending")
      end, 20), s1 .. s2)
      assert.truthy(s1:match("^failed attempts=1 error=[^\n]*sent= failed=gone@smtpd%.test\n$"), s1)
      assert.are.equal("partial attempts=1 error=nil sent=b@smtpd.test failed=gone@smtpd.test\n", s2)
      local log = srv.error_log()
      assert.truthy(log:find("BGFAILED " .. id1 .. " failed ", 1, true), log:sub(-2000))
      assert.truthy(log:find("BGFAILED " .. id2 .. " partial ", 1, true), log:sub(-2000))
      assert.truthy(get(srv, "/status?id=0123-1"):match("^none unknown id"))
    end)
    srv.stop()
    nginx_support.stop(sink)
    assert(ok, err)
  end)

  it("a worker killed mid-send: its claim expires and another worker sends the message, once", function()
    local port = helper.free_port()
    -- a server that greets after 3 s: the send is surely under way when the worker is killed
    local slow = nginx_support.smtpd { tls = true, port = port, greeting_delay = 3 }
    local srv = start_nginx("crashq", "1m", port, 2, "{ claim_ttl = 2 }")
    local ok, err = pcall(function()
      local id = get(srv, "/queue?n=1"):match("queued (%S+)")
      local st
      assert(wait_for(function()
        st = get(srv, "/status?id=" .. id)
        return st:match("^sending ") ~= nil
      end, 10), tostring(st))
      local pid = assert(tonumber(st:match(" by=(%d+)")), st)
      helper.sh("kill -KILL " .. pid)
      assert(wait_for(function() return slow.messages() >= 1 end, 20), srv.error_log():sub(-2000))
      helper.sleep(1)
      assert.are.equal(1, slow.messages())
      -- the controller's own check, the killed worker's connection, the retry's
      assert.are.equal(3, slow.connections())
      st = get(srv, "/status?id=" .. id)
      assert.truthy(st:match("^sent "), st)
      assert.truthy(slow.message(1):find("Message-ID: <bg-1@client.test>", 1, true))
    end)
    srv.stop()
    slow.stop()
    assert(ok, err)
  end)

  it("keeps queued messages through a reload (HUP), and the new workers send them", function()
    local port = helper.free_port()
    local srv = start_nginx("reloadq", "4m", port, 2)
    local smtpd
    local ok, err = pcall(function()
      local ids = {}
      for i = 1, 20 do ids[i] = assert(get(srv, "/queue?n=" .. i):match("queued (%S+)")) end
      local master = assert(tonumber(helper.read(srv.prefix .. "/logs/nginx.pid")))
      local before = select(2, srv.error_log():gsub("start worker process", ""))
      helper.sh("kill -HUP " .. master)
      assert(wait_for(function()
        return select(2, srv.error_log():gsub("start worker process", "")) >= before + 2
      end, 10), srv.error_log():sub(-2000))
      assert.are.equal("queued=20 accepted=20 low=1\n", get(srv, "/stats"))
      smtpd = nginx_support.smtpd { tls = true, port = port }
      assert(wait_for(function() return smtpd.messages() >= 20 end, 20), srv.error_log():sub(-2000))
      helper.sleep(1)
      assert.are.equal(20, smtpd.messages())
      local seen = {}
      for i = 1, 20 do seen[smtpd.message(i):match("Message%-ID: <bg%-(%d+)@")] = true end
      for i = 1, 20 do assert(seen[tostring(i)], "message " .. i .. " missing") end
      for i = 1, 20 do assert.truthy(get(srv, "/status?id=" .. ids[i]):match("^sent ")) end
    end)
    srv.stop()
    if smtpd then smtpd.stop() end
    assert(ok, err)
  end)

  it("with spool = DIR keeps accepted messages through a stop and a new nginx (not a reload)", function()
    local port = helper.free_port()
    local dir = helper.tmpdir() .. "/spool"
    local extra = ("{ spool = %q }"):format(dir)
    local srv = start_nginx("spoolq", "1m", port, 2, extra)
    local smtpd
    local ok, err = pcall(function()
      local ids = {}
      for i = 1, 20 do ids[i] = assert(get(srv, "/queue?n=" .. i):match("queued (spool%-%x+)")) end
      srv.stop()          -- the shared dict dies with nginx: only the spool holds the messages now
      smtpd = nginx_support.smtpd { tls = true, port = port }
      srv = start_nginx("spoolq", "1m", port, 2, extra)
      assert(wait_for(function() return smtpd.messages() >= 20 end, 30), srv.error_log():sub(-2000))
      helper.sleep(1)
      assert.are.equal(20, smtpd.messages())
      local seen = {}
      for i = 1, 20 do seen[smtpd.message(i):match("Message%-ID: <bg%-(%d+)@")] = true end
      for i = 1, 20 do assert(seen[tostring(i)], "message " .. i .. " missing") end
      for i = 1, 20 do assert.truthy(get(srv, "/status?id=" .. ids[i]):match("^sent "), ids[i]) end
    end)
    srv.stop()
    if smtpd then smtpd.stop() end
    assert(ok, err)
  end)

  it("runs the shipped example: POST /signup answers 202 at once, the welcome mail follows", function()
    local smtpd = nginx_support.smtpd { tls = true }
    local ex = nginx_support.start {
      example = helper.root .. "/examples/openresty/nginx.conf",
      env = { SMTP_SERVER = "localhost", SMTP_PORT = tostring(smtpd.port), MAIL_FROM = "nginx@client.test" },
    }
    local ok, err = pcall(function()
      local status, body = nginx_support.request(ex:url("/signup?email=new@smtpd.test"), "")
      assert.are.equal(202, status, body .. ex.error_log())
      local id = assert(body:match("^queued (%S+)\n$"), body)
      assert(wait_for(function() return smtpd.messages() >= 1 end, 20), ex.error_log():sub(-2000))
      assert.are.equal("nginx@client.test\nnew@smtpd.test\n", smtpd.envelope(1))
      assert.truthy(smtpd.message(1):find("Subject: Welcome\r\n", 1, true))
      local st
      assert(wait_for(function()
        st = select(2, nginx_support.request(ex:url("/mail-status?id=" .. id)))
        return st == "sent after 1 attempt(s)\n"
      end, 10), st)
      status, body = nginx_support.request(ex:url("/signup?email=bad%0D%0Aaddress"), "")
      assert.are.equal(400, status, body)
      assert.truthy(body:match("^bad address: invalid"), body)
    end)
    ex.stop()
    smtpd.stop()
    assert(ok, err)
  end)
end)
