-- AUTH secrets leave no copy in freed memory: spec/support/client_secrets.c, built here against
-- the plain C client engine (csrc/client.c, reply.c, text.c: no Lua) with malloc, calloc,
-- realloc and free wrapped, searches every block the engine frees or has realloc move for the
-- secret, raw or base64, across every SASL mechanism, pipelined commands, short writes and a
-- rollback.
local helper = require "helper"

-- os.execute says success as true (Lua 5.4) or 0 (LuaJIT)
local function succeeded(r) return r == true or r == 0 end

describe("client engine secrets", function()
  it("no freed or moved block holds the secret, for every mechanism", function()
    local dir = helper.tmpdir()
    local cc = os.getenv("CC") or "cc"
    local top = helper.root
    -- no sanitizers: they replace the allocator the driver wraps
    local cmd = cc .. " -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter -g -I" ..
      top .. "/csrc -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc,--wrap=free -o " .. dir ..
      "/client_secrets " .. top .. "/spec/support/client_secrets.c " .. top .. "/csrc/client.c " ..
      top .. "/csrc/reply.c " .. top .. "/csrc/text.c -lcrypto"
    assert.is_true(succeeded(os.execute(cmd)), "the driver does not build")
    -- a clean environment: the spec runner may preload the ASan runtime
    local p = assert(io.popen("env -u LD_PRELOAD " .. dir .. "/client_secrets 2>&1"))
    local out = p:read("a") or p:read("*a")
    p:close()
    local n = out:match("^ok (%d+)\n$")
    assert.is_string(n, out)
    -- every session frees its buffers: hundreds of blocks were searched
    assert.is_true(tonumber(n) >= 100, out)
  end)
end)
