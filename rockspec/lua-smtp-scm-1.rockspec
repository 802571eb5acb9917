-- LuaRocks build of lua-smtp: `luarocks --lua-version=5.4 make rockspec/lua-smtp-scm-1.rockspec`
-- (offline; the C libraries come from Debian: libssl-dev, libc-ares-dev, libidn2-dev).
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
  IDN2 = { header = "idn2.h" },
}
-- The C core needs -fvisibility=hidden (only luaopen_smtp_core exported, as `make` builds it), and
-- LuaRocks's "builtin" type has no way to add a compiler flag: it takes CFLAGS from the LuaRocks
-- configuration only and ignores build.variables (that is read by the "make" type). So the core is
-- built by one command over LuaRocks's own variables, and the files are installed by the
-- build.install tables, which every build type honours.
-- The C sources: the plain C engines (text, reply, client, server, codec, dns, proxyproto, mime)
-- and the Lua parts (core, net, tls, poll, sched, sink, spool, idna and each engine's *_lua.c binding).
local sources = "csrc/core.c" .. " " .. "csrc/net.c" .. " " .. "csrc/tls.c"
  .. " " .. "csrc/poll.c" .. " " .. "csrc/sched.c" .. " " .. "csrc/sink.c" .. " " .. "csrc/text.c"
  .. " " .. "csrc/reply.c" .. " " .. "csrc/reply_lua.c"
  .. " " .. "csrc/client.c" .. " " .. "csrc/client_lua.c"
  .. " " .. "csrc/server.c" .. " " .. "csrc/server_lua.c"
  .. " " .. "csrc/codec.c" .. " " .. "csrc/codec_lua.c" .. " " .. "csrc/dns.c"
  .. " " .. "csrc/dns_lua.c" .. " " .. "csrc/idna.c" .. " " .. "csrc/mime.c" .. " " .. "csrc/mime_lua.c"
  .. " " .. "csrc/proxyproto.c" .. " " .. "csrc/proxyproto_lua.c"
  .. " " .. "csrc/spool.c"

build = {
  type = "command",
  build_command = "$(CC) $(CFLAGS) -std=gnu11 -fvisibility=hidden -D_GNU_SOURCE -Icsrc -I$(LUA_INCDIR)"
    .. " -I$(OPENSSL_INCDIR) -I$(CARES_INCDIR) -I$(IDN2_INCDIR) " .. sources .. " $(LIBFLAG) -o core.so"
    .. " -L$(OPENSSL_LIBDIR) -L$(CARES_LIBDIR) -L$(IDN2_LIBDIR) -lssl -lcrypto -lcares -lidn2",
  install = {
    lua = {
      -- ".init" keeps the file name: the tree then has smtp/init.lua, as `make install` lays it out
      ["smtp.init"] = "lua/smtp/init.lua",
      ["smtp.errors"] = "lua/smtp/errors.lua",
      ["smtp.argcheck"] = "lua/smtp/argcheck.lua",
      ["smtp.check"] = "lua/smtp/check.lua",
      ["smtp.config"] = "lua/smtp/config.lua",
      ["smtp.url"] = "lua/smtp/url.lua",
      ["smtp.proxy"] = "lua/smtp/proxy.lua",
      ["smtp.source"] = "lua/smtp/source.lua",
      ["smtp.session"] = "lua/smtp/session.lua",
      ["smtp.transaction"] = "lua/smtp/transaction.lua",
      ["smtp.batch"] = "lua/smtp/batch.lua",
      ["smtp.limits"] = "lua/smtp/limits.lua",
      ["smtp.observe"] = "lua/smtp/observe.lua",
      ["smtp.wait"] = "lua/smtp/wait.lua",
      ["smtp.loop"] = "lua/smtp/loop.lua",
      ["smtp.dns"] = "lua/smtp/dns.lua",
      ["smtp.dnsutil"] = "lua/smtp/dnsutil.lua",
      ["smtp.mx"] = "lua/smtp/mx.lua",
      ["smtp.deliver"] = "lua/smtp/deliver.lua",
      ["smtp.dane"] = "lua/smtp/dane.lua",
      ["smtp.mtasts"] = "lua/smtp/mtasts.lua",
      ["smtp.tlsrpt"] = "lua/smtp/tlsrpt.lua",
      ["smtp.background"] = "lua/smtp/background.lua",
      ["smtp.message"] = "lua/smtp/message.lua",
      ["smtp.parse"] = "lua/smtp/parse.lua",
      ["smtp.dkim"] = "lua/smtp/dkim.lua",
      ["smtp.spf"] = "lua/smtp/spf.lua",
      ["smtp.psl"] = "lua/smtp/psl.lua",
      ["smtp.dmarc"] = "lua/smtp/dmarc.lua",
      ["smtp.auth"] = "lua/smtp/auth.lua",
      ["smtp.server"] = "lua/smtp/server.lua",
      ["smtp.cidr"] = "lua/smtp/cidr.lua",
      ["smtp.received"] = "lua/smtp/received.lua",
      ["smtp.queue"] = "lua/smtp/queue.lua",
      ["smtp.serial"] = "lua/smtp/serial.lua",
      ["smtp.json"] = "lua/smtp/json.lua",
      ["smtp.dsn"] = "lua/smtp/dsn.lua",
      ["smtp.faults"] = "lua/smtp/faults.lua",
      ["smtp.testing"] = "lua/smtp/testing.lua",
      ["smtp.transport.init"] = "lua/smtp/transport/init.lua",
      ["smtp.transport.native"] = "lua/smtp/transport/native.lua",
      ["smtp.transport.ngx"] = "lua/smtp/transport/ngx.lua",
      ["smtp.transport.ngx_dns"] = "lua/smtp/transport/ngx_dns.lua",
      ["smtp.cli.send"] = "lua/smtp/cli/send.lua",
      ["smtp.cli.sink"] = "lua/smtp/cli/sink.lua",
      ["smtp.cli.mx"] = "lua/smtp/cli/mx.lua",
      ["smtp.cli.queue"] = "lua/smtp/cli/queue.lua",
      ["smtp.cli.args"] = "lua/smtp/cli/args.lua",
      ["smtp.inbox.store"] = "lua/smtp/inbox/store.lua",
      ["smtp.inbox.api"] = "lua/smtp/inbox/api.lua",
      ["smtp.inbox.http"] = "lua/smtp/inbox/http.lua",
      ["smtp.inbox.page"] = "lua/smtp/inbox/page.lua",
    },
    lib = { ["smtp.core"] = "core.so" },
    bin = { ["lua-smtp"] = "bin/lua-smtp" },
  },
}
