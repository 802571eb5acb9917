-- `lua-smtp sink --http`: the web inbox's JSON API (Mailpit's shape) against a sink process fed by
-- swaks, on the memory, Maildir and mbox stores; the long-poll wait and the event stream; the
-- faults endpoints (through smtp.faults); the loopback guards; and Mailpit's own npm
-- client (mailpit-api, installed at test time) listing, reading, fetching a part and deleting.
local helper = require "helper"

local BIN = helper.root .. "/bin/lua-smtp"
local W = require "support.webinbox"
local need_http, sink, swaks, http, get_json, json = W.need_http, W.sink, W.swaks, W.http, W.get_json, W.json

local ATT = "bytes\0\1\2\255 of the attachment\r\n"

local function send_rich(port, subject, to)
  local dir = helper.tmpdir()
  helper.write(dir .. "/report.bin", ATT)
  return swaks(port, { "--to", to or "bob@y.test", "--header", "Subject: " .. subject,
    "--header", "Cc: Carol <carol@y.test>",
    "--attach-type", "text/plain", "--attach-body", "Plain words for " .. subject,
    "--attach-type", "text/html", "--attach-body", "<p>Hello <b>" .. subject .. "</b></p><script>document.title='ran'</script>",
    "--attach-type", "application/octet-stream", "--attach-name", "report.bin", "--attach", "@" .. dir .. "/report.bin" })
end

describe("lua-smtp sink --http (web inbox API)", function()
  setup(need_http)
  after_each(function() helper.stop_all() end)

  it("lists, reads, searches, serves parts and deletes, in Mailpit's shape (memory store)", function()
    local _, port, hport = sink({ "--memory", "--max-messages", "3" })
    send_rich(port, "first one")
    send_rich(port, "second one", "dave@z.test")
    local l = get_json(hport, "/api/v1/messages")
    assert.equal(2, l.total); assert.equal(2, l.messages_count); assert.equal(0, l.start)
    local m = l.messages[1]
    assert.equal("second one", m.Subject)                      -- newest first
    assert.same({ Name = "", Address = "ann@x.test" }, m.From)
    assert.same({ { Name = "", Address = "dave@z.test" } }, m.To)
    assert.same({ { Name = "Carol", Address = "carol@y.test" } }, m.Cc)
    assert.equal(1, m.Attachments)
    assert.matches("Plain words for second one", m.Snippet, 1, true)
    assert.is_string(m.Created); assert.is_true(m.Size > 0); assert.is_string(m.MessageID)

    -- search by recipient, sender, subject and free words
    assert.equal(1, get_json(hport, "/api/v1/search?query=to%3Adave").messages_count)
    assert.equal(2, get_json(hport, "/api/v1/search?query=from%3Aann%40x.test").messages_count)
    assert.equal(1, get_json(hport, "/api/v1/search?query=subject%3A%22first%20one%22").messages_count)
    assert.equal(0, get_json(hport, "/api/v1/search?query=nobody").messages_count)

    local full = get_json(hport, "/api/v1/message/" .. m.ID)
    assert.equal(m.ID, full.ID)
    assert.matches("Plain words for second one", full.Text, 1, true)
    assert.matches("<b>second one</b>", full.HTML, 1, true)
    assert.equal(1, #full.Attachments)
    local a = full.Attachments[1]
    assert.equal("report.bin", a.FileName); assert.equal("application/octet-stream", a.ContentType)
    assert.equal(#ATT, a.Size); assert.is_string(a.PartID)

    local code, bytes = http(hport, "GET", "/api/v1/message/" .. m.ID .. "/part/" .. a.PartID)
    assert.equal(200, code); assert.equal(ATT, bytes)
    local h = get_json(hport, "/api/v1/message/" .. m.ID .. "/headers")
    assert.same({ "second one" }, h.Subject)
    local _, raw = http(hport, "GET", "/api/v1/message/" .. m.ID .. "/raw")
    assert.matches("^Return%-Path: <ann@x%.test>\r\n", raw)
    assert.matches("\r\nSubject: second one\r\n", raw)

    -- the HTML view: no scripts, nothing remote, unless remote images are asked for
    local dir = helper.tmpdir()
    local hdrs = helper.sh("curl -s -D - -o /dev/null http://127.0.0.1:" .. hport .. "/view/" .. m.ID .. ".html")
    assert.matches("content%-security%-policy: default%-src 'none';[^\r\n]*img%-src 'self' data:; sandbox", hdrs)
    hdrs = helper.sh("curl -s -D - -o /dev/null 'http://127.0.0.1:" .. hport .. "/view/" .. m.ID .. ".html?remote=1'")
    assert.matches("img%-src 'self' data: http: https:; sandbox", hdrs)
    _ = dir

    -- the oldest goes past --max-messages
    send_rich(port, "third"); send_rich(port, "fourth")
    l = get_json(hport, "/api/v1/messages")
    assert.equal(3, l.total)
    assert.equal("second one", l.messages[3].Subject)

    -- delete one, then all
    assert.equal(200, (http(hport, "DELETE", "/api/v1/messages", json.encode { IDs = { m.ID } })))
    assert.equal(404, (http(hport, "GET", "/api/v1/message/" .. m.ID)))
    assert.equal(2, get_json(hport, "/api/v1/messages").total)
    assert.equal(200, (http(hport, "DELETE", "/api/v1/messages")))
    assert.equal(0, get_json(hport, "/api/v1/messages").total)
  end)

  it("waits for a matching message (long-poll) and streams new ones (server-sent events)", function()
    local _, port, hport = sink({})
    send_rich(port, "already here")
    -- an existing match answers at once; new=1 waits for one that arrives later
    local w = get_json(hport, "/api/v1/wait?query=subject%3Aalready&timeout=10")
    assert.equal("already here", w.Subject)
    local code = http(hport, "GET", "/api/v1/wait?query=subject%3Anever&timeout=0.5")
    assert.equal(408, code)
    local dir = helper.tmpdir()
    -- started in the background, then the message: the wait and the stream both see it
    helper.sh("(curl -s -m 20 'http://127.0.0.1:" .. hport .. "/api/v1/wait?new=1&timeout=15&query=to%3Alate' > "
      .. dir .. "/wait.json; echo done > " .. dir .. "/wait.done) >/dev/null 2>&1 &")
    helper.sh("(curl -s -N -m 10 http://127.0.0.1:" .. hport .. "/api/v1/events > " .. dir .. "/events.txt) >/dev/null 2>&1 &")
    helper.sleep(0.5)
    assert.is_nil(helper.read(dir .. "/wait.done"))   -- still waiting
    send_rich(port, "not this one", "other@y.test")
    send_rich(port, "came late", "late@y.test")
    for _ = 1, 100 do if helper.read(dir .. "/wait.done") then break end helper.sleep(0.1) end
    w = json.decode(helper.read(dir .. "/wait.json") or "")
    assert.equal("came late", w and w.Subject)
    for _ = 1, 60 do
      local ev = helper.read(dir .. "/events.txt") or ""
      if ev:find(w.ID, 1, true) then break end
      helper.sleep(0.1)
    end
    local ev = helper.read(dir .. "/events.txt") or ""
    assert.matches('event: new\ndata: {"ID":"' .. w.ID .. '","Size":%d+}\n\n', ev)
    -- a delete is announced with the ids, a JSON array
    assert.equal(200, (http(hport, "DELETE", "/api/v1/messages", json.encode { IDs = { w.ID } })))
    local want = 'event: delete\ndata: ["' .. w.ID .. '"]\n\n'
    for _ = 1, 20 do
      if (helper.read(dir .. "/events.txt") or ""):find(want, 1, true) then break end
      helper.sleep(0.1)
    end
    ev = helper.read(dir .. "/events.txt") or ""
    assert.truthy(ev:find(want, 1, true), ev)
    assert.same({ w.ID }, json.decode(ev:match('event: delete\ndata: (%[[^\n]*%])')))
  end)

  it("adds, lists and removes faults through smtp.faults, which the SMTP side obeys", function()
    local _, port, hport = sink({})
    local code, body = http(hport, "POST", "/api/v1/faults", json.encode { at = "rcpt", code = 452, match = "full@",
      text = "mailbox full" })
    assert.equal(200, code, body)
    local id = json.decode(body).ID
    assert.is_not_nil(id)
    local l = get_json(hport, "/api/v1/faults")
    assert.equal(1, #l); assert.equal("rcpt", l[1].at)
    assert.matches("452 [%d.]+ *mailbox full", swaks(port, { "--to", "full@y.test" }))
    assert.matches("250 ", swaks(port, { "--to", "ok@y.test" }))
    assert.equal(200, (http(hport, "DELETE", "/api/v1/faults/" .. id)))
    assert.equal(0, #get_json(hport, "/api/v1/faults"))
    assert.matches("250 2.0.0 Ok: queued", swaks(port, { "--to", "full@y.test" }))
    -- a POST that is not JSON (a form on another site) is refused
    assert.equal(415, (http(hport, "POST", "/api/v1/faults", nil, { "content-type: text/plain" })))
  end)

  it("reads back from a Maildir and an mbox, and a delete removes the Maildir file", function()
    local dir = helper.tmpdir()
    local _, port, hport = sink({ "--maildir", dir .. "/md" })
    send_rich(port, "in maildir")
    local m = get_json(hport, "/api/v1/messages").messages[1]
    local _, raw = http(hport, "GET", "/api/v1/message/" .. m.ID .. "/raw")
    local files = helper.sh("ls " .. helper.quote(dir .. "/md/new"))
    local file = files:match("[^\n]+")
    assert.equal(helper.read(dir .. "/md/new/" .. file), raw)
    http(hport, "DELETE", "/api/v1/messages", json.encode { IDs = { m.ID } })
    assert.equal("", helper.sh("ls " .. helper.quote(dir .. "/md/new")))
    helper.stop_all()

    local _, port2, hport2 = sink({ "--mbox", dir .. "/mbox" })
    swaks(port2, { "--to", "b@y.test", "--body", "From here\r\n>From there\r\nend" })
    send_rich(port2, "second in mbox")
    local l = get_json(hport2, "/api/v1/messages")
    assert.equal(2, l.total)
    local _, raw2 = http(hport2, "GET", "/api/v1/message/" .. l.messages[2].ID .. "/raw")
    assert.matches("\r\n\r\nFrom here\r\n>From there\r\nend\r\n", raw2, 1, true)
    assert.equal("second in mbox", get_json(hport2, "/api/v1/message/" .. l.messages[1].ID).Subject)
  end)

  it("keeps to loopback unless told, and answers only to loopback host names", function()
    local out = helper.sh(helper.lua .. " " .. BIN .. " sink --http 192.0.2.1:8025 2>&1; echo EXIT:$?")
    assert.matches("not a loopback address: add %-%-http%-public", out)
    assert.matches("EXIT:2", out)
    local _, _, hport = sink({})
    assert.equal(403, (http(hport, "GET", "/api/v1/messages", nil, { "Host: attacker.example" })))
    assert.equal(200, (http(hport, "GET", "/api/v1/messages", nil, { "Host: localhost:" .. hport })))
  end)

  -- a big peer (npm, node): once, in the lua5.4 run
  local it_54 = helper.lua:match("luajit") and pending or it
  it_54("works with Mailpit's npm client (mailpit-api): list, read, part, headers, source, search, delete", function()
    assert(helper.sh("command -v node") ~= "", "needs nodejs (Debian package nodejs)")
    local dir = helper.tmpdir()
    -- npm: the system's, else npm's own package from the registry, run by node (Debian's nodejs
    -- comes without it)
    local npm = "npm"
    if helper.sh("command -v npm") == "" then
      local got = helper.sh("cd " .. helper.quote(dir) .. " && curl -fsSL --retry 3 --max-time 120 -o npm.tgz "
        .. "https://registry.npmjs.org/npm/-/npm-10.9.2.tgz 2>&1 && tar xzf npm.tgz 2>&1; echo EXIT:$?")
      assert(got:match("EXIT:0"), "fetching npm from the registry failed: " .. got)
      npm = "node " .. helper.quote(dir .. "/package/bin/npm-cli.js")
    end
    -- node trusts the system's certificate authorities too, as curl does
    local bundle = "/etc/ssl/certs/ca-certificates.crt"
    if helper.read(bundle) then npm = "NODE_EXTRA_CA_CERTS=" .. bundle .. " " .. npm end
    local out = helper.sh("cd " .. helper.quote(dir) .. " && " .. npm .. " init -y >/dev/null 2>&1 && " .. npm
      .. " install --no-audit --no-fund mailpit-api@2 2>&1; echo EXIT:$?")
    assert(out:match("EXIT:0"), "npm install mailpit-api failed: " .. out)
    local _, port, hport = sink({})
    send_rich(port, "for mailpit client")
    helper.write(dir .. "/t.mjs", [[
import { MailpitClient } from "mailpit-api";
const m = new MailpitClient("http://127.0.0.1:" + process.argv[2]);
const out = {};
const list = await m.listMessages();
out.total = list.total; out.subject = list.messages[0].Subject; out.from = list.messages[0].From.Address;
const msg = await m.getMessageSummary(list.messages[0].ID);
out.attachments = msg.Attachments.map(a => a.FileName);
const blob = await m.getMessageAttachment(msg.ID, msg.Attachments[0].PartID);
out.part = Buffer.from(await blob.arrayBuffer()).toString("hex");
out.headerSubject = (await m.getMessageHeaders(msg.ID)).Subject[0];
out.latest = (await m.getMessageSummary()).ID === msg.ID;
out.source = (await m.getMessageSource(msg.ID)).includes("Subject: for mailpit client");
out.found = (await m.searchMessages({ query: "subject:mailpit" })).messages_count;
out.waited = (await m.waitForMessage({ query: "to:bob@y.test" }, { timeout: 5000 })).Subject;
out.deleted = await m.deleteMessages({ IDs: [msg.ID] });
out.after = (await m.listMessages()).total;
console.log(JSON.stringify(out));
]])
    local res = helper.sh("cd " .. helper.quote(dir) .. " && node t.mjs " .. hport .. " 2>&1")
    local r = json.decode(res:match("{.*}") or "") or error("client failed: " .. res)
    assert.equal(1, r.total)
    assert.equal("for mailpit client", r.subject)
    assert.equal("ann@x.test", r.from)
    assert.same({ "report.bin" }, r.attachments)
    assert.equal((ATT:gsub(".", function(c) return ("%02x"):format(c:byte()) end)), r.part)
    assert.equal("for mailpit client", r.headerSubject)
    assert.is_true(r.latest); assert.is_true(r.source)
    assert.equal(1, r.found)
    assert.equal("for mailpit client", r.waited)
    assert.equal("ok", r.deleted)
    assert.equal(0, r.after)
  end)
end)
