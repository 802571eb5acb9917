-- The web inbox in a real browser: headless Chromium (driven by python3-selenium through
-- chromedriver, spec/support/webinbox_browser.py) sees a message sent during the test appear
-- without a reload, opens it with the keyboard, shows its HTML sandboxed (its script does not run,
-- its remote image is not fetched until asked), downloads the attachment and deletes it. It also
-- takes the screenshots docs/inbox-list.png and docs/inbox-message.png. Slow: lua5.4 run only.
local helper = require "helper"

local BIN = helper.root .. "/bin/lua-smtp"
local it_54 = helper.lua:match("luajit") and pending or it

describe("web inbox in Chromium", function()
  after_each(function() helper.stop_all() end)

  it_54("shows new mail live, sandboxes its HTML, downloads and deletes, by keyboard", function()
    for _, need in ipairs {
      { "test -x /usr/bin/chromium", "chromium" },
      { "test -x /usr/bin/chromedriver", "chromium-driver" },
      { "/usr/bin/python3 -c 'import selenium'", "python3-selenium" },
    } do
      assert(os.execute(need[1] .. " >/dev/null 2>&1"), "needs " .. need[2] .. " (apt-get install " .. need[2] .. ")")
    end
    local port, hport = helper.free_port(), helper.free_port()
    local p = helper.spawn({ helper.lua, BIN, "sink", "--listen", "127.0.0.1:" .. port,
                             "--http", "127.0.0.1:" .. hport, "--memory" }, { limit = 180 })
    assert(helper.wait_port("127.0.0.1", port, 10), "sink did not start: " .. p:output())
    assert(helper.wait_port("127.0.0.1", hport, 10), "web inbox did not start: " .. p:output())
    local dl = helper.tmpdir()
    -- screenshots go to docs/ when asked (WEBINBOX_SCREENSHOTS=1), elsewhere a temporary folder
    local shots = os.getenv("WEBINBOX_SCREENSHOTS") and (helper.root .. "/docs") or helper.tmpdir()
    local out = helper.sh("timeout 150 " .. helper.python .. " " .. helper.quote(helper.root .. "/spec/support/webinbox_browser.py")
      .. " " .. port .. " " .. hport .. " " .. helper.quote(dl) .. " " .. helper.quote(shots) .. " 2>&1")
    local json = require "dkjson"
    local r = json.decode(out:match("\n?({\"[^\n]*})%s*$") or "")
    assert(type(r) == "table", "browser run failed:\n" .. out)
    assert.is_true(r.live, "the new message came with a reload")
    assert.is_true(r.search_focused, "/ does not focus the search")
    assert.is_true(r.list_focused, "Esc does not go back to the list")
    assert.equal("allow-popups allow-popups-to-escape-sandbox", r.sandbox)  -- no allow-scripts, no allow-same-origin
    assert.equal("Hello sandboxed world", r.html_text)
    assert.is_nil(r.script_ran)
    assert.same({}, r.hits_before)                                -- neither the image nor the script's request
    assert.same({ "/remote.png" }, r.hits_after)                  -- the image once asked, the script still not
    assert.matches("multipart/mixed", r.mime, 1, true)
    assert.matches("report.bin", r.mime, 1, true)
    assert.is_true(r.download_ok, "the downloaded attachment differs")
    assert.is_true(r.deleted)
    assert.equal(2, r.api_total)
    assert.equal(8, #r.steps)
  end)
end)
