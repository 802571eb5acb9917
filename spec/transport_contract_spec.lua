-- The transport contract against smtp.transport.native: the same checks (spec/support/transport_contract.lua)
-- run against smtp.transport.ngx inside nginx in spec/openresty_spec.lua.
local helper = require "helper"
local nginx_support = require "support.nginx"
local contract = require "support.transport_contract"

describe("the transport contract", function()
  local smtpd, slow

  setup(function()
    smtpd = nginx_support.smtpd { tls = true }
    slow = nginx_support.smtpd { tls = false, greeting_delay = 2 }
  end)
  teardown(function()
    if smtpd then smtpd.stop() end
    if slow then slow.stop() end
  end)

  it("holds for smtp.transport.native: misuse, error kinds and phases, write_engine, info()", function()
    local lines = contract.run(require "smtp.transport.native", {
      smtp = smtpd.port, slow = slow.port, closed = helper.free_port(), core = require "smtp.core",
      tls = { servername = "localhost", cafile = helper.certs().ca, timeout = 5 },
    })
    local failed, info = {}, nil
    for _, l in ipairs(lines) do
      if l:match("^FAIL ") then failed[#failed + 1] = l end
      if l:match("^info ") then info = l end
    end
    assert.are.same({}, failed)
    assert.truthy(#lines > 40, #lines)
    assert.are.equal("info tls=TLSv1.3 version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256 "
      .. "peer_subject=CN=server peer_issuer=CN=lua-smtp test CA reused=0", info)
  end)
end)
