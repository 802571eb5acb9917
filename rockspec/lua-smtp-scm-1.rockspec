-- LuaRocks build of lua-smtp: `luarocks --lua-version=5.4 make rockspec/lua-smtp-scm-1.rockspec`
-- (offline; the C libraries come from Debian: libssl-dev, libc-ares-dev).
rockspec_format = "3.0"
package = "lua-smtp"
version = "scm-1"
source = { url = "git+https://example.invalid/lua-smtp.git" }
description = {
  summary = "SMTP client, server, MX lookup and MIME/DKIM for Lua, with a C core",
  detailed = [[
A C core that speaks SMTP (client with STARTTLS, AUTH, PIPELINING, CHUNKING, DSN, SMTPUTF8;
a strict embeddable server; MX lookup with c-ares) with coroutine-friendly non-blocking calls,
plus pure-Lua MIME composition and DKIM signing.]],
  license = "MIT",
}
dependencies = { "lua >= 5.1" }
external_dependencies = {
  OPENSSL = { header = "openssl/ssl.h" },
  CARES = { header = "ares.h" },
}
build = {
  type = "builtin",
  modules = {
    ["smtp"] = "lua/smtp/init.lua",
    ["smtp.errors"] = "lua/smtp/errors.lua",
    ["smtp.wait"] = "lua/smtp/wait.lua",
    ["smtp.loop"] = "lua/smtp/loop.lua",
    ["smtp.dns"] = "lua/smtp/dns.lua",
    ["smtp.mx"] = "lua/smtp/mx.lua",
    ["smtp.deliver"] = "lua/smtp/deliver.lua",
    ["smtp.message"] = "lua/smtp/message.lua",
    ["smtp.dkim"] = "lua/smtp/dkim.lua",
    ["smtp.server"] = "lua/smtp/server.lua",
    ["smtp.transport"] = "lua/smtp/transport/init.lua",
    ["smtp.transport.native"] = "lua/smtp/transport/native.lua",
    ["smtp.transport.ngx"] = "lua/smtp/transport/ngx.lua",
    ["smtp.transport.ngx_dns"] = "lua/smtp/transport/ngx_dns.lua",
    ["smtp.cli.send"] = "lua/smtp/cli/send.lua",
    ["smtp.cli.sink"] = "lua/smtp/cli/sink.lua",
    ["smtp.cli.mx"] = "lua/smtp/cli/mx.lua",
    ["smtp.cli.args"] = "lua/smtp/cli/args.lua",
    ["smtp.core"] = {
      sources = {
        "csrc/core.c", "csrc/net.c", "csrc/tls.c", "csrc/poll.c", "csrc/dns.c",
        "csrc/reply.c", "csrc/client.c", "csrc/server.c", "csrc/codec.c",
      },
      defines = { "_GNU_SOURCE" },
      incdirs = { "csrc", "$(OPENSSL_INCDIR)", "$(CARES_INCDIR)" },
      libdirs = { "$(OPENSSL_LIBDIR)", "$(CARES_LIBDIR)" },
      libraries = { "ssl", "crypto", "cares" },
    },
  },
  install = { bin = { ["lua-smtp"] = "bin/lua-smtp" } },
}
