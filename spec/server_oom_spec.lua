-- The server engine runs out of memory without aborting: spec/support/server_oom.c, built here
-- against the plain C engine (csrc/server.c and csrc/text.c: no Lua), replays one session once per
-- allocation with that allocation failing, and checks the session ends with "421 4.3.0", closed,
-- in state "failed" (core.server_engine reports it as e:next() -> "close", "out of memory").
local helper = require "helper"

-- os.execute says success as true (Lua 5.4) or 0 (LuaJIT)
local function succeeded(r) return r == true or r == 0 end

local function build(dir)
  local cc = os.getenv("CC") or "cc"
  local top = helper.root
  local common = " -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -g -I" ..
    top .. "/csrc -o " .. dir .. "/server_oom " .. top .. "/spec/support/server_oom.c " .. top ..
    "/csrc/server.c " .. top .. "/csrc/text.c -lcrypto"
  -- with the sanitizers when the compiler has them (leaks, overflows), plain otherwise
  return succeeded(os.execute(cc .. " -fsanitize=address,undefined" .. common .. " 2>/dev/null"))
    or succeeded(os.execute(cc .. common))
end

describe("server engine out of memory", function()
  it("answers 421 4.3.0 and closes at every failing allocation of a whole session", function()
    local dir = helper.tmpdir()
    assert.is_true(build(dir), "the driver does not build")
    -- the driver gets a clean environment: the spec runner may preload the ASan runtime
    local p = assert(io.popen("env -u LD_PRELOAD " .. dir .. "/server_oom 2>&1"))
    local out = p:read("a") or p:read("*a")
    p:close()
    local runs, allocs = out:match("^ok (%d+) (%d+)\n$")
    assert.is_string(runs, out)
    -- one run per allocation, then one that completes the session with nothing failing
    assert.equal(tonumber(allocs) + 1, tonumber(runs))
    assert.is_true(tonumber(allocs) >= 10)
  end)
end)
