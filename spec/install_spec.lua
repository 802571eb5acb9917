-- `make install PREFIX=<tmp>` and `luarocks --lua-version=5.4 --tree=<tmp> make` (offline) each
-- install a module and a command that work from any directory: run from / with LUA_PATH and
-- LUA_CPATH pointing at the install tree only (never the checkout), they answer --help, load
-- smtp and smtp.core from the tree, and send a message to a sink; the installed core.so exports
-- nothing but luaopen_* (hidden visibility, as `make` builds it). Both builds are for Lua 5.4,
-- so this spec runs once, under Lua 5.4.
local helper = require "helper"
local N = require "support.newcomer"
local q = helper.quote

if helper.lua ~= "lua5.4" or os.getenv("SMTP_BUILD") == "asan" then
  describe("installation", function() pending("runs once, under Lua 5.4 without the sanitizer build") end)
  return
end

-- Every module file in lua/smtp, as a module name.
local function modules()
  local out = {}
  for f in helper.sh("cd " .. q(helper.root .. "/lua") .. " && find smtp -name '*.lua' | sort"):gmatch("[^\n]+") do
    local name = f:gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
    out[#out + 1] = name
  end
  return out
end

local function check_tree(tree, bin)
  -- only luaopen_* exported (scripts/check-exports.sh), and luaopen_smtp_core among them
  local so = tree .. "/lib/lua/5.4/smtp/core.so"
  local out, rc = N.run("sh " .. q(helper.root .. "/scripts/check-exports.sh") .. " " .. q(so))
  assert(rc == 0, out)
  assert.equal("luaopen_smtp_core\n", helper.sh("nm -D --defined-only " .. q(so) ..
    " | awk '{print $3}' | grep -v '^_' | sort"))

  local env = "cd / && env -u LUA_PATH -u LUA_CPATH LUA_PATH=" .. q(tree .. "/share/lua/5.4/?.lua;" .. tree ..
    "/share/lua/5.4/?/init.lua;;") .. " LUA_CPATH=" .. q(tree .. "/lib/lua/5.4/?.so;;") .. " "

  out, rc = N.run(env .. q(bin) .. " mx --help")
  assert(rc == 0, out)
  assert.matches("^usage: lua%-smtp mx DOMAIN", out)
  for _, cmd in ipairs { "send", "sink" } do
    out, rc = N.run(env .. q(bin) .. " " .. cmd .. " --help")
    assert(rc == 0, out)
    assert.matches("^usage: lua%-smtp " .. cmd, out)
  end

  -- every module loads from the tree, not from the checkout
  local probe = "local s = require 'smtp'; local c = require 'smtp.core'; " ..
    "for m in ([[" .. table.concat(modules(), " ") .. "]]):gmatch('%S+') do " ..
    "  if not m:match('ngx') then require(m) end end " ..
    "print(package.searchpath('smtp', package.path)); print(package.searchpath('smtp.core', package.cpath)); " ..
    "print(s._VERSION, type(c.client_engine))"
  out, rc = N.run(env .. "lua5.4 -e " .. q(probe))
  assert(rc == 0, out)
  assert.equal(tree .. "/share/lua/5.4/smtp/init.lua\n" .. tree .. "/lib/lua/5.4/smtp/core.so\n0.1.0\tfunction\n", out)

  -- the installed command sends through the installed module to a sink (the checkout's sink)
  local port = helper.free_port()
  local dir = helper.tmpdir()
  local sink = helper.spawn({ helper.lua, helper.root .. "/bin/lua-smtp", "sink", "--listen",
    "127.0.0.1:" .. port, "--maildir", dir .. "/Maildir" }, { limit = 120 })
  assert(helper.wait_port("127.0.0.1", port, 10), sink:output())
  out, rc = N.run(env .. q(bin) .. " send --server 127.0.0.1:" .. port .. " --tls none --from a@example.com" ..
    " --to b@example.org --subject installed --body 'from the installed command'")
  sink:stop()
  assert(rc == 0, out)
  assert.matches("^sent: 250 ", out)
  local stored = helper.sh("cat " .. q(dir) .. "/Maildir/new/*")
  assert.truthy(stored:find("Subject: installed\r\n", 1, true))
  assert.truthy(stored:find("from the installed command", 1, true))
end

describe("installation", function()
  it("the rockspec lists every module in lua/smtp and every C source", function()
    local spec = helper.read(helper.root .. "/rockspec/lua-smtp-scm-1.rockspec")
    for _, m in ipairs(modules()) do
      local path = "lua/" .. m:gsub("%.", "/")
      -- an init.lua is listed as "<module>.init", so that it is installed as <module>/init.lua
      local key, file = m, path .. ".lua"
      if not helper.read(helper.root .. "/" .. file) then key, file = m .. ".init", path .. "/init.lua" end
      assert.truthy(spec:find('["' .. key .. '"] = "' .. file .. '"', 1, true), m .. " missing from the rockspec")
    end
    for f in helper.sh("cd " .. q(helper.root) .. " && ls csrc/*.c"):gmatch("[^\n]+") do
      assert.truthy(spec:find('"' .. f .. '"', 1, true), f .. " missing from the rockspec")
    end
  end)

  it("make install PREFIX=<tmp> gives a working module and command", function()
    local tree = helper.tmpdir()
    local out, rc = N.run("cd " .. q(helper.root) .. " && make -s install PREFIX=" .. q(tree))
    assert(rc == 0, out)
    check_tree(tree, tree .. "/bin/lua-smtp")
  end)

  it("luarocks --lua-version=5.4 make (offline) gives a working module and command", function()
    helper.need("luarocks")
    -- build in a copy: LuaRocks leaves objects beside the sources
    local src = helper.tmpdir()
    local tree = helper.tmpdir()
    local out, rc = N.run("cd " .. q(helper.root) .. " && cp -r lua csrc bin rockspec " .. q(src) ..
      " && cd " .. q(src) .. " && luarocks --lua-version=5.4 --tree=" .. q(tree) ..
      " make rockspec/lua-smtp-scm-1.rockspec")
    assert(rc == 0, out)
    check_tree(tree, tree .. "/bin/lua-smtp")
  end)
end)
