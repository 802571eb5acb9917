-- OpenResty: a private nginx with the Lua module sends mail through the cosocket transport and
-- smtp.send to aiosmtpd (STARTTLS verified against the test CA). nginx runs its own LuaJIT with the
-- LuaJIT build, so this spec runs once, under the lua5.4 run of busted.
local helper = require "helper"

local run = helper.lua == "lua5.4"
local nginx_support = run and require("support.nginx")
if run and not nginx_support.available() then run = false end

local describe_or_skip = run and describe or function(name, fn)
  describe(name, function() pending("runs once, in the lua5.4 run (nginx brings its own LuaJIT), and needs nginx with libnginx-mod-http-lua") end)
end

describe_or_skip("smtp inside nginx", function()
  local ngx_srv, smtpd

  setup(function()
    smtpd = nginx_support.smtpd { tls = true }
    ngx_srv = nginx_support.start {
      locations = [[
    location = /transport { content_by_lua_block { require("support.openresty_handlers").transport() } }
    location = /ping { content_by_lua_block { ngx.say("pong") } }
    location = /logphase {
      content_by_lua_block { ngx.say("ok") }
      log_by_lua_block {
        local s, err = require("support.openresty_handlers").phase_error()
        ngx.log(ngx.ERR, "LOGPHASE ", tostring(s), " ", tostring(err), " kind=", err and err.kind)
      }
    }
]],
    }
  end)

  teardown(function()
    if ngx_srv then ngx_srv.stop() end
    if smtpd then smtpd.stop() end
  end)

  it("runs a whole STARTTLS session over the cosocket transport, verified against the test CA", function()
    local before = smtpd.messages()
    local status, body = nginx_support.request(ngx_srv:url("/transport?port=" .. smtpd.port))
    assert.are.equal(200, status, body)
    assert.truthy(body:match("^220 smtpd%.test "), body)
    assert.truthy(body:find("250%-STARTTLS\r\n"), body)
    assert.truthy(body:find("220 Ready to start TLS\r\n", 1, true), body)
    assert.truthy(body:find("TLS TLSv1.3 TLS_", 1, true), body)
    assert.truthy(body:find("250 2.0.0 stored " .. (before + 1) .. "\r\n", 1, true), body)
    assert.truthy(body:find("221 Bye\r\n", 1, true), body)
    assert.are.equal("Subject: by hand\r\n\r\nline one\r\n.dot line\r\n", smtpd.message(before + 1))
    assert.are.equal("a@client.test\nb@smtpd.test\n", smtpd.envelope(before + 1))
  end)

  it("refuses a certificate that does not match the server name", function()
    local status, body = nginx_support.request(ngx_srv:url("/transport?port=" .. smtpd.port
      .. "&servername=wrong.example"))
    assert.are.equal(500, status)
    assert.truthy(body:match("^starttls: tls %(tls%): TLS handshake with wrong%.example failed: certificate host mismatch"), body)
  end)

  it("fails at once in the log phase with an error that points to ngx.timer.at", function()
    local status = nginx_support.request(ngx_srv:url("/logphase"))
    assert.are.equal(200, status)
    local line
    for _ = 1, 40 do
      line = ngx_srv.error_log():match("(LOGPHASE [^\n]-) while logging")
      if line then break end
      helper.sleep(0.05)
    end
    assert.are.equal("LOGPHASE nil invalid (connect): nginx has no cosockets in the 'log' phase, "
      .. "and a blocking socket would stall the worker: send from a timer instead, "
      .. "ngx.timer.at(0, function(premature) smtp.send{...} end) kind=invalid", line)
  end)
end)
