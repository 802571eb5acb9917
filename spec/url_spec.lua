-- smtp.url: connection URLs, proxy URLs and bind addresses, table-driven; `url =` in smtp.send
-- and smtp.connect (precedence against the table's options); and the rule that a password in a
-- URL never shows in an error or in tostring of the config.
local helper = require "helper"
local url = require "smtp.url"
local config = require "smtp.config"
local smtp = require "smtp"
local errors = require "smtp.errors"

local PW = "Pw-s3cr3t"

-- A table without metatables, for assert.same.
local function plain(t)
  if type(t) ~= "table" then return t end
  local o = {}
  for k, v in pairs(t) do o[k] = plain(v) end
  return o
end

describe("smtp.url.parse", function()
  local good = {
    { "smtp://mail.example.com", { server = "mail.example.com", tls = "opportunistic" } },
    { "smtp://mail.example.com:2525/", { server = "mail.example.com", port = 2525, tls = "opportunistic" } },
    { "smtp+starttls://mail.example.com", { server = "mail.example.com", tls = "starttls" } },
    { "SMTPS://mail.example.com", { server = "mail.example.com", tls = "implicit" } },
    { "smtps://alice:" .. PW .. "@mail.example.com:465",
      { server = "mail.example.com", port = 465, tls = "implicit", auth = { user = "alice", password = PW } } },
    { "smtps://alice%40example.com:p%40ss%3Aw%2Fo%25rd@h.example",
      { server = "h.example", tls = "implicit", auth = { user = "alice@example.com", password = "p@ss:w/o%rd" } } },
    -- a raw '@' in the password: the last '@' ends the user information
    { "smtps://alice:p@ss@h.example", { server = "h.example", tls = "implicit", auth = { user = "alice", password = "p@ss" } } },
    { "smtps://alice@h.example", { server = "h.example", tls = "implicit", auth = { user = "alice" } } },
    { "smtp://[::1]:2525", { server = "[::1]", port = 2525, tls = "opportunistic" } },
    { "smtp://[2001:db8::25]", { server = "[2001:db8::25]", tls = "opportunistic" } },
    { "smtp://192.0.2.25", { server = "192.0.2.25", tls = "opportunistic" } },
    { "smtp://h.example?tls=none", { server = "h.example", tls = "none" } },
    { "smtps://h.example?verify=false&verify_name=0&helo=me.example&timeout=7.5&servername=mx.example",
      { server = "h.example", tls = "implicit", verify = false, verify_name = false, helo = "me.example",
        timeout = 7.5, servername = "mx.example" } },
    { "smtp+starttls://u:tok@h.example?auth=xoauth2",
      { server = "h.example", tls = "starttls", auth = { user = "u", token = "tok", mechanism = "XOAUTH2" } } },
    { "smtps://u:pw@h.example?auth=Plain", { server = "h.example", tls = "implicit",
      auth = { user = "u", password = "pw", mechanism = "PLAIN" } } },
    { "smtps://h.example?cafile=%2Fetc%2Fca.pem&pipelining=no&chunking=yes&allow_plaintext_auth=true",
      { server = "h.example", tls = "implicit", cafile = "/etc/ca.pem", pipelining = false, chunking = true,
        allow_plaintext_auth = true } },
    { "smtps://h.example?bind=192.0.2.1", { server = "h.example", tls = "implicit",
      bind = { ip = "192.0.2.1", port = 0, text = "192.0.2.1" } } },
    { "smtps://h.example?proxy=socks5h://pu:" .. PW .. "@127.0.0.1:1080", { server = "h.example", tls = "implicit",
      proxy = { scheme = "socks5h", kind = "socks5", remote_dns = true, host = "127.0.0.1", port = 1080,
        user = "pu", password = PW } } },
    { "smtps://h.example?proxy=http%3A%2F%2Fproxy.example%3A3128", { server = "h.example", tls = "implicit",
      proxy = { scheme = "http", kind = "http", host = "proxy.example", port = 3128 } } },
  }
  for _, c in ipairs(good) do
    it("parses " .. c[1]:gsub(PW, "PW"), function()
      local o, err = url.parse(c[1])
      assert.is_nil(err)
      assert.same(c[2], plain(o))
    end)
  end

  -- Each bad URL: the words its error must hold. Every one carries a password, which must not
  -- show in the error in any form (nor the pieces a stray '/', '?' or '#' cut it into).
  local bad = {
    { "mailto://u:" .. PW .. "@h", "unknown scheme 'mailto'" },
    { "u:" .. PW .. "@h", "not a URL" },
    { "smtp://u:" .. PW .. "@h:0", "port is not a number" },
    { "smtp://u:" .. PW .. "@h:65536", "port is not a number" },
    { "smtp://u:" .. PW .. "@h:", "port is not a number" },
    { "smtp://u:" .. PW .. "@h:25x", "port is not a number" },
    { "smtp://u:" .. PW .. "@", "host is not" },
    { "smtp://u:" .. PW .. "@[::1", "not closed with ']'" },
    { "smtp://u:" .. PW .. "@[nothex]", "host is not" },
    { "smtp://u:" .. PW .. "@h..example", "host is not" },
    { "smtp://u:" .. PW .. "@h_%41", "host is not" },
    { "smtp://u:" .. PW .. "@h/inbox", "a path is not allowed" },
    { "smtp://u:" .. PW .. "@h#frag", "fragment" },
    { "smtp://u:" .. PW .. "@h?bogus=1", "unknown query option 'bogus'" },
    { "smtp://u:" .. PW .. "@h?verify=maybe", "query option 'verify'" },
    { "smtp://u:" .. PW .. "@h?verify", "needs a value" },
    { "smtp://u:" .. PW .. "@h?verify=", "needs a value" },
    { "smtp://u:" .. PW .. "@h?verify=1&verify=0", "given twice" },
    { "smtp://u:" .. PW .. "@h?timeout=-1", "query option 'timeout'" },
    { "smtp://u:" .. PW .. "@h?auth=digest-md5", "query option 'auth'" },
    { "smtps://u:" .. PW .. "@h?tls=none", "'tls' goes with smtp:// only" },
    { "smtp://u:" .. PW .. "@h?tls=maybe", "query option 'tls'" },
    { "smtp://u:" .. PW .. "@h?bind=h.example", "query option 'bind'" },
    { "smtp://u:" .. PW .. "@h?proxy=ftp://p:" .. PW .. "@x", "query option 'proxy'" },
    { "smtp://u:" .. PW .. "@h?proxy=socks5://p:" .. PW .. "@x:99999", "query option 'proxy'" },
    { "smtp://u:" .. PW .. "%zz@h", "percent-encoding in the password" },
    { "smtp://u%zz:" .. PW .. "@h", "percent-encoding in the user name" },
    { "smtp://:" .. PW .. "@h", "empty user name" },
    { "smtp://u:" .. PW .. "@h ", "space or control character" },
    -- a password with a raw '/', '?' or '#' cuts the authority short
    { "smtp://u:12/" .. PW .. "@h", "an '@' after the host" },
    { "smtp://u:12?" .. PW .. "=1@h", "an '@' after the host" },
    { "smtp://u:12?x=" .. PW .. "@h", "an '@' after the host" },
    { "smtp://u:ab#" .. PW .. "@h", "an '@' after the host" },
    { 42, "string expected" },
  }
  for _, c in ipairs(bad) do
    it("refuses " .. tostring(c[1]):gsub(PW, "PW") .. " (" .. c[2] .. "), without the password", function()
      local o, err = url.parse(c[1])
      assert.is_nil(o)
      assert.is_true(errors.is(err, "invalid"))
      local s = tostring(err)
      assert.truthy(s:find(c[2], 1, true), s)
      assert.is_nil(s:find(PW, 1, true), s)
      assert.is_nil(s:find("s3cr3t", 1, true), s)
      assert.is_nil(("failed: " .. err):find(PW, 1, true))
      -- and the same through smtp.send, smtp.connect and smtp.deliver's config
      if type(c[1]) == "string" then
        local r, e = smtp.send { url = c[1], from = "a@example.com", to = "b@example.org", message = "x" }
        assert.is_nil(r)
        assert.equal("invalid", e.kind)
        assert.is_nil(tostring(e):find(PW, 1, true))
        r, e = smtp.connect(c[1])
        assert.is_nil(r)
        assert.equal("invalid", e.kind)
        assert.is_nil(tostring(e):find(PW, 1, true))
      end
    end)
  end
end)

describe("smtp.url.proxy and smtp.url.bind", function()
  it("parses proxies with their defaults, and prints them without credentials", function()
    assert.same({ scheme = "socks5", kind = "socks5", remote_dns = false, host = "127.0.0.1", port = 1080 },
      plain(url.proxy("socks5://127.0.0.1")))
    assert.same({ scheme = "http", kind = "http", host = "[::1]", port = 80, user = "a b", password = "c:d" },
      plain(url.proxy("http://a%20b:c%3Ad@[::1]")))
    local p = url.proxy("socks5h://u:" .. PW .. "@proxy.example:9050")
    assert.equal("socks5h://***@proxy.example:9050", tostring(p))
  end)

  local bad = {
    { "socks4://u:" .. PW .. "@h", "unknown scheme 'socks4'" },
    { "socks5://u:" .. PW .. "@h:0", "port" },
    { "socks5://u:" .. PW .. "@h?x=1", "query" },
    { "socks5://u:" .. PW .. "@h/x", "path" },
    { "socks5://u@h", "without a password" },
    { "socks5://" .. ("u"):rep(256) .. ":" .. PW .. "@h", "at most 255 bytes" },
    { "http://a%3Ab:" .. PW .. "@h", "cannot hold ':'" },
    { "http://a:" .. PW .. "%0A@h", "control character" },
  }
  for _, c in ipairs(bad) do
    it("refuses the proxy " .. c[1]:gsub(PW, "PW"):sub(1, 40) .. " without showing the password", function()
      local p, err = url.proxy(c[1])
      assert.is_nil(p)
      local s = tostring(err)
      assert.truthy(s:find(c[2], 1, true), s)
      assert.is_nil(s:find(PW, 1, true), s)
      local r, e = smtp.send { server = "h.example", proxy = c[1], from = "a@example.com", to = "b@example.org", message = "x" }
      assert.is_nil(r)
      assert.equal("invalid", e.kind)
      assert.is_nil(tostring(e):find(PW, 1, true))
    end)
  end

  it("parses bind addresses, numeric only", function()
    assert.same({ ip = "192.0.2.1", port = 0, text = "192.0.2.1" }, url.bind("192.0.2.1"))
    assert.same({ ip = "192.0.2.1", port = 2525, text = "192.0.2.1:2525" }, url.bind("192.0.2.1:2525"))
    assert.same({ ip = "::1", port = 0, text = "::1" }, url.bind("::1"))
    assert.same({ ip = "::1", port = 0, text = "[::1]" }, url.bind("[::1]"))
    assert.same({ ip = "2001:db8::1", port = 25, text = "[2001:db8::1]:25" }, url.bind("[2001:db8::1]:25"))
    for _, b in ipairs { "host.example", "", "192.0.2.1:70000", "[::1", "300.1.1.1" } do
      local r, e = url.bind(b)
      assert.is_nil(r)
      assert.equal("invalid", e.kind)
    end
  end)

  it("redacts passwords for printing", function()
    assert.equal("smtps://alice:***@h:465?proxy=socks5://bob:***@127.0.0.1:1080&verify=false",
      url.redact("smtps://alice:" .. PW .. "@h:465?proxy=socks5://bob:" .. PW .. "@127.0.0.1:1080&verify=false"))
    assert.equal("smtps://alice@h", url.redact("smtps://alice@h"))
  end)
end)

describe("url = ... and the table's options", function()
  local function cfg(o) return config.connection(o, "send") end

  it("fills in what the table leaves out, with the scheme's port", function()
    local c = assert(cfg { url = "smtps://alice:" .. PW .. "@mail.example.com", helo = "me.example" })
    assert.equal("mail.example.com", c.server)
    assert.equal(465, c.port)
    assert.equal("implicit", c.tls)
    assert.equal("me.example", c.helo)
    assert.same({ user = "alice", password = PW }, c.auth)
    c = assert(cfg { url = "smtp+starttls://h.example" })
    assert.equal(587, c.port)
    c = assert(cfg { url = "smtp://h.example" })
    assert.equal(25, c.port)
    assert.equal("opportunistic", c.tls)
  end)

  it("takes an option given both ways when both say the same, and refuses it when they differ", function()
    assert(cfg { url = "smtps://h.example:465", port = 465, tls = "implicit", server = "h.example" })
    for _, o in ipairs {
      { url = "smtps://h.example", server = "other.example" },
      { url = "smtps://h.example:465", port = 2465 },
      { url = "smtps://h.example", tls = "starttls" },
      { url = "smtps://h.example?verify=false", verify = true },
      { url = "smtps://u:" .. PW .. "@h.example", auth = { user = "u", password = "other" } },
      { url = "smtps://u:" .. PW .. "@h.example", auth = { user = "v" } },
      { url = "smtps://h.example?proxy=socks5://127.0.0.1:1080", proxy = "socks5://127.0.0.1:1081" },
      { url = "smtps://h.example?bind=127.0.0.2", bind = "127.0.0.3" },
    } do
      local c, err = cfg(o)
      assert.is_nil(c)
      assert.equal("invalid", err.kind)
      assert.truthy(tostring(err):find("given both in the URL and in the options", 1, true), tostring(err))
      assert.is_nil(tostring(err):find(PW, 1, true))
    end
  end)

  it("lets the URL name the user and the table give a token function", function()
    local tok = function() return "t" end
    local c = assert(cfg { url = "smtps://alice@h.example?auth=xoauth2", auth = { token = tok } })
    assert.same({ user = "alice", token = tok, mechanism = "XOAUTH2" }, c.auth)
    local none, err = cfg { url = "smtps://h.example?auth=xoauth2", auth = { token = tok } }
    assert.is_nil(none)
    assert.truthy(tostring(err):find("needs a user name", 1, true))
    none, err = cfg { url = "smtps://alice@h.example" }
    assert.is_nil(none)
    assert.truthy(tostring(err):find("a user name without a password", 1, true))
  end)

  it("prints the config without the password or the proxy's", function()
    local c = assert(cfg { url = "smtps://alice:" .. PW .. "@h.example?proxy=socks5h://p:" .. PW .. "@127.0.0.1:1080&bind=127.0.0.1" })
    local s = tostring(c)
    assert.equal("smtp.config (smtps://alice:***@h.example:465 via socks5h://***@127.0.0.1:1080 from 127.0.0.1)", s)
  end)

  it("raises for a url that is not a string, as for other options", function()
    assert.has_error(function() smtp.send { url = 42, message = "x" } end,
      "bad argument #1 to 'send' (url: string expected)")
    assert.has_error(function() smtp.connect { url = {} } end,
      "bad argument #1 to 'connect' (url: string expected)")
  end)
end)

describe("url = ... against a server", function()
  local server = require "smtp.server"
  local loop = require "smtp.loop"

  it("sends with smtp.send{ url = } and smtp.connect(url), AUTH from the URL's percent-encoded user", function()
    local got = {}
    local srv = assert(server.listen { host = "127.0.0.1", port = 0,
      auth_plaintext = true,
      auth = function(_, _, user, pass) got.user, got.pass = user, pass; return true end,
      on_message = function(_, env, reader)
        for _ in reader:chunks() do end
        got[#got + 1] = env.from
        return true
      end })
    local res, err, conn
    loop.spawn(function()
      srv:serve()
      res, err = smtp.send { url = ("smtp://alice%%40example.com:p%%40ss@127.0.0.1:%d?tls=none&helo=url.example&timeout=5"):format(srv.port),
        from = "a@example.com", to = "b@example.org", message = "Subject: u\r\n\r\nx\r\n" }
      conn = smtp.connect(("smtp://127.0.0.1:%d?tls=none"):format(srv.port))
      if conn then conn:close() end
      srv:close()
    end)
    loop.run()
    assert.is_nil(err)
    assert.equal(250, res.reply.code)
    assert.equal("alice@example.com", got.user)
    assert.equal("p@ss", got.pass)
    assert.same({ "a@example.com" }, { got[1] })
    assert.is_not_nil(conn)
  end)
end)

describe("lua-smtp send --url and SMTP_URL", function()
  local server = require "smtp.server"
  local loop = require "smtp.loop"
  local bin = helper.root .. "/bin/lua-smtp"

  -- Runs the command (argv after `lua-smtp send`) beside a server, with `env`; returns its output
  -- and the users the server saw log in.
  local function run(args, env)
    local users = {}
    local srv = assert(server.listen { host = "127.0.0.1", port = 0, auth_plaintext = true,
      auth = function(_, _, user, pass) users[#users + 1] = user .. "/" .. pass; return true end,
      on_message = function(_, _, reader) for _ in reader:chunks() do end return true end })
    local out
    loop.spawn(function()
      srv:serve()
      local argv = { helper.lua, bin, "send", "--from", "a@example.com", "--to", "b@example.org", "--subject", "u" }
      for _, a in ipairs(args) do argv[#argv + 1] = (a:gsub("PORT", tostring(srv.port))) end
      local e = {}
      for k, v in pairs(env or {}) do e[k] = v:gsub("PORT", tostring(srv.port)) end
      local p = helper.spawn(argv, { env = e })
      local t0 = loop.now()
      while p:alive() and loop.now() - t0 < 20 do loop.sleep(0.05) end
      out = p:output()
      srv:close()
    end)
    loop.run()
    return out, users
  end

  it("sends to --url, and to SMTP_URL when neither --url nor --server is given", function()
    local out, users = run({ "--url", "smtp://al%40ice:" .. PW .. "@127.0.0.1:PORT?tls=none" })
    assert.truthy(out:find("sent: 250", 1, true), out)
    assert.same({ "al@ice/" .. PW }, users)
    out, users = run({}, { SMTP_URL = "smtp://bob:" .. PW .. "@127.0.0.1:PORT?tls=none" })
    assert.truthy(out:find("sent: 250", 1, true), out)
    assert.same({ "bob/" .. PW }, users)
  end)

  it("refuses a bad URL or a conflicting flag as a usage error, without the password", function()
    for _, c in ipairs {
      { { "--url", "smtp://u:" .. PW .. "@127.0.0.1:PORT?nope=1" }, "bad --url: url: unknown query option 'nope'" },
      { { "--url", "smtps://u:" .. PW .. "@127.0.0.1:PORT", "--tls", "starttls" }, "tls is given both in the URL" },
      { { "--url", "smtps://u:" .. PW .. "@127.0.0.1:PORT", "--server", "127.0.0.1" }, "--url and --server exclude each other" },
    } do
      local out = run(c[1])
      assert.truthy(out:find(c[2], 1, true), out)
      assert.is_nil(out:find(PW, 1, true), out)
    end
  end)
end)
