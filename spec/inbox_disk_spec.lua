-- `lua-smtp sink --http` over a Maildir or an mbox that already holds mail: what an earlier sink
-- run stored (sent with swaks) and what another program wrote is listed at start, oldest first,
-- with its envelope and exact bytes; new mail goes on top; a file that goes away drops out;
-- deleting from an mbox takes the bytes out of the file (the rest unchanged, still readable by
-- Python's mailbox module, new mail appended after it), deleting all empties it, and a delete
-- waits for the lock another process holds on the mbox.
local helper = require "helper"
local W = require "support.webinbox"
local sink, swaks, http, get_json, json = W.sink, W.swaks, W.http, W.get_json, W.json

local function raw_of(hport, id)
  local code, body = http(hport, "GET", "/api/v1/message/" .. id .. "/raw")
  assert.equal(200, code, body)
  return body
end

local function ls(dir)   -- dot files too
  local out = {}
  for name in helper.sh("ls -A " .. helper.quote(dir)):gmatch("[^\n]+") do out[#out + 1] = name end
  return out
end

local function touch(path, epoch)
  assert(helper.sh("touch -d @" .. epoch .. " " .. helper.quote(path) .. " && echo ok"):match("ok"))
end

local function subjects(list)
  local out = {}
  for i, m in ipairs(list.messages) do out[i] = m.Subject end
  return out
end

-- The subjects of an mbox's messages as Python's mailbox module reads them.
local function python_subjects(path)
  local out = helper.sh(helper.python .. " -c " .. helper.quote(
    "import mailbox,sys\nfor m in mailbox.mbox(sys.argv[1]): print(m['subject'])") .. " " .. helper.quote(path) .. " 2>&1")
  local l = {}
  for s in out:gmatch("[^\n]+") do l[#l + 1] = s end
  return l
end

-- What another program wrote: no Return-Path, no Delivered-To, LF line ends.
local HAND = "From: Hand Writer <hand@other.test>\nTo: Reader <reader@other.test>\nCc: copy@other.test\n"
  .. "Subject: written by hand\nMessage-ID: <hand-1@other.test>\n\nNot from the sink.\n"

describe("lua-smtp sink --http over mail stored before it started", function()
  setup(W.need_http)
  after_each(function() helper.stop_all() end)

  it("lists a Maildir's new/ and cur/ oldest first, reads them back, and drops a vanished file", function()
    local dir = helper.tmpdir()
    local md = dir .. "/md"
    -- an earlier run stores two messages; what its inbox said about them is the reference
    local _, port, hport = sink({ "--maildir", md })
    swaks(port, { "--to", "bob@y.test", "--header", "Subject: first from sink", "--body", "one" })
    swaks(port, { "--to", "carol@y.test,hidden@y.test", "--header", "To: Carol <carol@y.test>",
                  "--header", "Subject: second from sink", "--body", "two" })
    local before = get_json(hport, "/api/v1/messages").messages
    assert.same({ "second from sink", "first from sink" }, subjects { messages = before })
    helper.stop_all()

    local new = ls(md .. "/new")
    assert.equal(2, #new)
    -- the same mtime for both: their names (seconds, pid, counter) order them
    for _, n in ipairs(new) do touch(md .. "/new/" .. n, 1700000100) end
    local hand = md .. "/cur/1600000000.M5P7.other:2,S"
    helper.write(hand, HAND)
    touch(hand, 1700000000)
    -- two of the sink's names with one mtime, whose microseconds (a monotonic clock's) disagree
    -- with their counter: the counter orders them
    for i, n in ipairs { "1700000050.M999999P42Q1.h", "1700000050.M7P42Q2.h" } do
      helper.write(md .. "/new/" .. n, "Return-Path: <tie@x.test>\r\nDelivered-To: t@y.test\r\nSubject: tie "
        .. i .. "\r\n\r\nx\r\n")
      touch(md .. "/new/" .. n, 1700000050)
    end

    local _, port2, hport2 = sink({ "--maildir", md })
    local l = get_json(hport2, "/api/v1/messages")
    assert.equal(5, l.total)
    assert.same({ "second from sink", "first from sink", "tie 2", "tie 1", "written by hand" }, subjects(l))
    -- the sink's messages as the earlier run listed them: envelope, size, headers
    for i = 1, 2 do
      local a, b = l.messages[i], before[i]
      for _, k in ipairs { "From", "To", "Cc", "Bcc", "Subject", "Size", "MessageID", "Snippet" } do
        assert.same(b[k], a[k], k)
      end
    end
    assert.same({ { Name = "", Address = "hidden@y.test" } }, l.messages[1].Bcc)
    assert.equal("2023-11-14T22:15:00Z", l.messages[1].Created)
    assert.same({ { Name = "", Address = "t@y.test" } }, l.messages[4].Bcc)
    assert.same({ Name = "", Address = "tie@x.test" }, l.messages[4].From)
    local h = l.messages[5]
    assert.same({ Name = "Hand Writer", Address = "hand@other.test" }, h.From)
    assert.same({ { Name = "Reader", Address = "reader@other.test" } }, h.To)
    assert.same({ { Name = "", Address = "copy@other.test" } }, h.Cc)
    assert.same({}, h.Bcc)
    assert.equal("2023-11-14T22:13:20Z", h.Created)
    assert.equal(#HAND, h.Size)
    local full = get_json(hport2, "/api/v1/message/" .. h.ID)
    assert.equal("hand@other.test", full.ReturnPath)
    assert.matches("Not from the sink.", full.Text, 1, true)
    assert.equal(HAND, raw_of(hport2, h.ID))
    -- the sink's own files, byte for byte
    local files = {}
    for _, n in ipairs(new) do files[helper.read(md .. "/new/" .. n)] = true end
    assert.is_true(files[raw_of(hport2, l.messages[1].ID)])
    assert.is_true(files[raw_of(hport2, l.messages[2].ID)])
    assert.equal("ann@x.test", get_json(hport2, "/api/v1/message/" .. l.messages[2].ID).ReturnPath)

    -- new mail on top
    swaks(port2, { "--to", "dave@y.test", "--header", "Subject: after start" })
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "after start", "second from sink", "first from sink", "tie 2", "tie 1", "written by hand" }, subjects(l))

    -- the hand-written one in cur/ is deleted with its file
    assert.equal(200, (http(hport2, "DELETE", "/api/v1/messages", json.encode { IDs = { h.ID } })))
    assert.same({}, ls(md .. "/cur"))
    -- a file removed behind the inbox's back: 404, then gone from the list
    local first = l.messages[3]
    local first_raw = raw_of(hport2, first.ID)
    for _, n in ipairs(new) do
      if helper.read(md .. "/new/" .. n) == first_raw then os.remove(md .. "/new/" .. n) end
    end
    assert.equal(404, (http(hport2, "GET", "/api/v1/message/" .. first.ID)))
    assert.equal(404, (http(hport2, "GET", "/api/v1/message/" .. first.ID .. "/raw")))
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "after start", "second from sink", "tie 2", "tie 1" }, subjects(l))
    assert.equal(4, l.total)
  end)

  it("indexes an mbox in file order, deletes bytes from it, and empties it", function()
    local dir = helper.tmpdir()
    local mbox = dir .. "/mbox"
    -- another program's message first (LF line ends, a quoted From line), then an earlier run's
    local hand = "From hand@other.test Mon Jan  2 03:04:05 2023\n"
      .. HAND:gsub("Not from the sink.\n", "Not from the sink.\n>From the body\n>>From deeper\n") .. "\n"
    helper.write(mbox, hand)
    local _, port, hport = sink({ "--mbox", mbox })
    swaks(port, { "--to", "bob@y.test", "--header", "Subject: one", "--body", "From here\r\n>From there\r\nend" })
    swaks(port, { "--to", "carol@y.test,hidden@y.test", "--header", "To: carol@y.test", "--header", "Subject: two" })
    swaks(port, { "--to", "dave@y.test", "--header", "Subject: three" })
    local before = get_json(hport, "/api/v1/messages").messages
    -- (that run started on the hand-written message too)
    assert.same({ "three", "two", "one", "written by hand" }, subjects { messages = before })
    local raw = {}
    for _, m in ipairs(before) do raw[m.Subject] = raw_of(hport, m.ID) end
    helper.stop_all()

    local _, port2, hport2 = sink({ "--mbox", mbox })
    local l = get_json(hport2, "/api/v1/messages")
    assert.same({ "three", "two", "one", "written by hand" }, subjects(l))
    local id = {}
    for i, m in ipairs(l.messages) do
      id[m.Subject] = m.ID
      for _, k in ipairs { "From", "To", "Cc", "Bcc", "Size", "MessageID", "Snippet" } do
        assert.same(before[i][k], m[k], k)
      end
      assert.equal(raw[m.Subject], raw_of(hport2, m.ID))
    end
    assert.matches("\r\n\r\nFrom here\r\n>From there\r\nend\r\n", raw.one, 1, true)
    assert.equal(HAND:gsub("Not from the sink.\n", "Not from the sink.\nFrom the body\n>From deeper\n"), raw["written by hand"])
    assert.equal("2023-01-02T03:04:05Z", l.messages[4].Created)
    assert.equal("hand@other.test", get_json(hport2, "/api/v1/message/" .. id["written by hand"]).ReturnPath)
    assert.same({ { Name = "", Address = "hidden@y.test" } }, l.messages[2].Bcc)

    swaks(port2, { "--to", "erin@y.test", "--header", "Subject: four" })
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "four", "three", "two", "one", "written by hand" }, subjects(l))
    id.four = l.messages[1].ID
    raw.four = raw_of(hport2, id.four)

    -- one out of the middle: its bytes leave the file, the others read back unchanged
    assert.equal(200, (http(hport2, "DELETE", "/api/v1/messages", json.encode { IDs = { id.two } })))
    local file = helper.read(mbox)
    assert.is_nil(file:find("Subject: two", 1, true))
    assert.is_nil(file:find("hidden@y.test", 1, true))
    assert.same({ "written by hand", "one", "three", "four" }, python_subjects(mbox))
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "four", "three", "one", "written by hand" }, subjects(l))
    for _, s in ipairs { "four", "three", "one", "written by hand" } do
      assert.equal(raw[s], raw_of(hport2, id[s]))
    end
    assert.equal(404, (http(hport2, "GET", "/api/v1/message/" .. id.two)))
    -- the first and the last too
    assert.equal(200, (http(hport2, "DELETE", "/api/v1/messages",
      json.encode { IDs = { id["written by hand"], id.four } })))
    assert.same({ "one", "three" }, python_subjects(mbox))
    for _, s in ipairs { "three", "one" } do assert.equal(raw[s], raw_of(hport2, id[s])) end

    -- mail received after the deletes is appended and read back whole
    swaks(port2, { "--to", "fay@y.test", "--header", "Subject: five", "--body", "From five" })
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "five", "three", "one" }, subjects(l))
    assert.matches("\r\n\r\nFrom five\r\n", raw_of(hport2, l.messages[1].ID), 1, true)
    assert.same({ "one", "three", "five" }, python_subjects(mbox))
    assert.equal(raw.one, raw_of(hport2, id.one))

    -- all: the file is emptied, and the next message starts it again
    assert.equal(200, (http(hport2, "DELETE", "/api/v1/messages")))
    assert.equal("", helper.read(mbox))
    assert.equal(0, get_json(hport2, "/api/v1/messages").total)
    swaks(port2, { "--to", "gil@y.test", "--header", "Subject: six" })
    l = get_json(hport2, "/api/v1/messages")
    assert.same({ "six" }, subjects(l))
    assert.same({ "six" }, python_subjects(mbox))
    assert.matches("^Return%-Path: <ann@x%.test>\r\n", raw_of(hport2, l.messages[1].ID))
    -- no temporary files left beside it
    assert.same({ "mbox" }, ls(dir))
  end)

  it("deletes from an mbox under the lock other sinks take, waiting for it (--lock-wait)", function()
    assert(helper.sh("command -v flock") ~= "", "needs flock (util-linux)")
    local dir = helper.tmpdir()
    local mbox = dir .. "/mbox"
    local _, port, hport = sink({ "--mbox", mbox, "--lock-wait", "0.5" })
    swaks(port, { "--to", "bob@y.test", "--header", "Subject: one" })
    swaks(port, { "--to", "bob@y.test", "--header", "Subject: two" })
    local l = get_json(hport, "/api/v1/messages")
    local file = helper.read(mbox)
    -- another process holds the mbox's flock: the delete gives up after --lock-wait, nothing changed
    local holder = helper.spawn({ "flock", mbox, "sh", "-c", "touch " .. helper.quote(dir .. "/held") .. "; exec sleep 30" },
      { limit = 60 })
    for _ = 1, 200 do if helper.read(dir .. "/held") then break end helper.sleep(0.05) end
    assert.is_not_nil(helper.read(dir .. "/held"))
    local code, body = http(hport, "DELETE", "/api/v1/messages", json.encode { IDs = { l.messages[2].ID } })
    assert.equal(500, code)
    assert.matches("locked", body)
    assert.equal(file, helper.read(mbox))
    assert.equal(2, get_json(hport, "/api/v1/messages").total)
    -- released: the delete goes through
    holder:stop()
    os.remove(dir .. "/held")
    assert.equal(200, (http(hport, "DELETE", "/api/v1/messages", json.encode { IDs = { l.messages[2].ID } })))
    assert.same({ "two" }, python_subjects(mbox))
    assert.same({ "two" }, subjects(get_json(hport, "/api/v1/messages")))
    -- a second sink appending to the same mbox writes to the rewritten file; what it stored is
    -- not this inbox's, and deleting all this inbox lists keeps it
    local port2 = helper.free_port()
    local other = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "sink", "--listen",
      "127.0.0.1:" .. port2, "--mbox", mbox }, { limit = 60 })
    assert(helper.wait_port("127.0.0.1", port2, 10), "second sink did not start: " .. other:output())
    swaks(port2, { "--to", "bob@y.test", "--header", "Subject: from the other sink" })
    swaks(port, { "--to", "bob@y.test", "--header", "Subject: three" })
    assert.same({ "two", "from the other sink", "three" }, python_subjects(mbox))
    assert.same({ "three", "two" }, subjects(get_json(hport, "/api/v1/messages")))
    assert.equal(200, (http(hport, "DELETE", "/api/v1/messages")))
    assert.same({ "from the other sink" }, python_subjects(mbox))
    assert.same({ "mbox" }, ls(dir))
  end)
end)
