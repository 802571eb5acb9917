-- AUTH secrets do not outlive their exchange in the server engine's memory: spec/support/server_wipe.c,
-- built here against the plain C engine with free() redirected to a checker (and every growth
-- going through the engine's realloc_fn seam), runs AUTH PLAIN/LOGIN sessions (initial response,
-- after 334, split lines, over-long lines, pipelined behind STARTTLS, left unread) in 1-, 3- and
-- whole-input pieces and fails when any block the engine frees, grows or keeps holds the secret.
local helper = require "helper"

-- os.execute says success as true (Lua 5.4) or 0 (LuaJIT)
local function succeeded(r) return r == true or r == 0 end

local function build(dir)
  local cc = os.getenv("CC") or "cc"
  local top = helper.root
  local flags = " -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -g -I" .. top .. "/csrc"
  local function with(san)
    return succeeded(os.execute(cc .. san .. flags .. " -Dfree=wipe_checked_free -c -o " .. dir ..
      "/server.o " .. top .. "/csrc/server.c 2>/dev/null")) and
      succeeded(os.execute(cc .. san .. flags .. " -o " .. dir .. "/server_wipe " .. top ..
        "/spec/support/server_wipe.c " .. dir .. "/server.o " .. top .. "/csrc/text.c -lcrypto 2>/dev/null"))
  end
  -- with the sanitizers when the compiler has them, plain otherwise
  return with(" -fsanitize=address,undefined") or with("")
end

describe("server engine AUTH data", function()
  it("is wiped from every buffer the engine frees, grows or keeps once the exchange is decided", function()
    local dir = helper.tmpdir()
    assert.is_true(build(dir), "the driver does not build")
    -- the driver gets a clean environment: the spec runner may preload the ASan runtime
    local p = assert(io.popen("env -u LD_PRELOAD " .. dir .. "/server_wipe 2>&1"))
    local out = p:read("a") or p:read("*a")
    p:close()
    local sessions, blocks = out:match("^ok (%d+) (%d+)\n$")
    assert.is_string(sessions, out)
    assert.equal(66, tonumber(sessions))
    assert.is_true(tonumber(blocks) > 1000)
  end)
end)
