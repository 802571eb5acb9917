/* libFuzzer harness for the message parser (lua/smtp/parse.lua, linked with Lua 5.4 and the whole
 * C core). The first input byte picks a chunk size and whether to compose; the rest is a message.
 * Invariants, any failure aborts:
 *  - parse never raises: a message or nil, err with err.kind "invalid";
 *  - output is bounded: parts <= max_parts, nesting <= max_depth, octets kept in memory <= max_kept,
 *    decoded sizes within the input's size, text within a few times its octets;
 *  - chunking does not matter: the source fed in chunks of 1..17 octets gives the same tree
 *    (types, parameters, names, contents, texts, offsets, headers, defects) as the whole string;
 *  - parse(compose(x)) round trips: pieces of the input made into a message by smtp.message
 *    (when it accepts them and they are UTF-8) read back with the same subject, text and
 *    attachment;
 *  - in C: the incremental base64 decoder and line meter give the same in any chunking. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include "mime.h"
#include "text.h"

int luaopen_smtp_core(lua_State *L);

#ifndef SMTP_LUA_DIR
#error "build with -DSMTP_LUA_DIR=\"<checkout>/lua\""
#endif

static const char CHECK[] =
    "local parse = require 'smtp.parse'\n"
    "local message = require 'smtp.message'\n"
    "local core = require 'smtp.core'\n"
    "local O = { max_parts = 40, max_depth = 8, max_headers = 50, max_header_size = 20000,\n"
    "            max_line = 3000, max_kept = 200000 }\n"
    "local function s(x) return x == nil and '~' or tostring(x) end\n"
    "local function shape(m)\n"
    "  local t = {}\n"
    "  for p in m:walk() do\n"
    "    t[#t + 1] = table.concat({ p.path, s(p.content_type), s(p.disposition), s(p.filename),\n"
    "      s(p.cid), s(p.size), s(p.content), s(p.text), s(p.preamble), s(p.epilogue), #p.headers,\n"
    "      s(p.start), s(p.body_start), s(p.stop), s(p.transfer_encoding) }, '\\0')\n"
    "    for k, v in pairs(p.params) do t[#t + 1] = k .. '=' .. v end\n"
    "    for _, f in ipairs(p.headers) do t[#t + 1] = f.name .. '\\0' .. f.value .. '\\0' .. f.raw end\n"
    "  end\n"
    "  t[#t + 1] = table.concat(m.defects, '\\0') .. s(m.truncated)\n"
    "  return table.concat(t, '\\1')\n"
    "end\n"
    "local function norm(x) return (x:gsub('\\r\\n', '\\n'):gsub('\\r', '\\n')) end\n"
    "local function ws(x) return (x:gsub('%s+', ' '):gsub('^ ', ''):gsub(' $', '')) end\n"
    "return function(data)\n"
    "  local mode = data:byte(1) or 0\n"
    "  local body = data:sub(2)\n"
    "  local m1, e1 = parse.parse(body, O)\n"
    "  if m1 then\n"
    "    local parts, kept, sizes = 0, 0, 0\n"
    "    for p in m1:walk() do\n"
    "      parts = parts + 1\n"
    "      local depth = select(2, p.path:gsub('%.', ''))\n"
    "      assert(depth <= O.max_depth, 'too deep')\n"
    "      kept = kept + #(p.content or '') + #(p.preamble or '') + #(p.epilogue or '')\n"
    "      if p.size then sizes = sizes + p.size end\n"
    "      if p.size and p.content then assert(p.size == #p.content, 'size') end\n"
    "      if p.text then assert(#p.text <= 8 * #p.content + 8, 'text blowup') end\n"
    "    end\n"
    "    assert(parts <= O.max_parts, 'too many parts')\n"
    "    assert(kept <= O.max_kept, 'kept too much')\n"
    "    assert(sizes <= #body, 'decoded more than read')\n"
    "  else\n"
    "    assert(e1.kind == 'invalid', 'error kind')\n"
    "  end\n"
    "  local cs, at = mode % 17 + 1, 0\n"
    "  local m2 = parse.parse(function()\n"
    "    if at >= #body then return nil end\n"
    "    local c = body:sub(at + 1, at + cs); at = at + cs; return c\n"
    "  end, O)\n"
    "  assert((m1 == nil) == (m2 == nil), 'chunking changed the outcome')\n"
    "  if m1 then assert(shape(m1) == shape(m2), 'chunking changed the tree') end\n"
    "  if mode >= 128 then\n"
    "    local a, b, c, d = body:match('^([^%z]*)%z([^%z]*)%z([^%z]*)%z(.*)$')\n"
    "    -- the composer takes what it is given; a reader shows invalid UTF-8 as U+FFFD\n"
    "    if not a or not core.utf8_valid(a .. b) then return end\n"
    "    local ok, msg = pcall(message.new, { from = 'a@example.com', to = 'b@example.org',\n"
    "      subject = a, text = b, attachments = { { filename = c ~= '' and c or 'f.bin', content = d } },\n"
    "      clock = function() return 1700000000 end })\n"
    "    if not ok or not msg then return end\n"
    "    local raw = msg:tostring()\n"
    "    local m = assert(parse.parse(raw))\n"
    "    assert(ws(m:header('subject') or '') == ws(a), 'subject round trip')\n"
    "    local t, f\n"
    "    for p in m:walk() do\n"
    "      if p.disposition == 'attachment' then f = p elseif p.maintype == 'text' then t = p end\n"
    "    end\n"
    "    assert(t and norm(t.text) == norm(b), 'text round trip')\n"
    "    assert(f and f.content == d, 'attachment round trip')\n"
    "  end\n"
    "end\n";

static lua_State *L;
static int check_ref;

static void setup(void)
{
    L = luaL_newstate();
    assert(L);
    luaL_openlibs(L);
    luaL_requiref(L, "smtp.core", luaopen_smtp_core, 0);
    lua_pop(L, 1);
    lua_getglobal(L, "package");
    lua_pushstring(L, SMTP_LUA_DIR "/?.lua;" SMTP_LUA_DIR "/?/init.lua");
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
    if (luaL_loadbuffer(L, CHECK, sizeof CHECK - 1, "=parse_fuzz") || lua_pcall(L, 0, 1, 0)) {
        fprintf(stderr, "harness: %s\n", lua_tostring(L, -1));
        abort();
    }
    check_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* The C helpers: the same output and flags in any chunking. */
static void check_c(const uint8_t *data, size_t size)
{
    size_t step = size ? (size_t)data[0] % 13 + 1 : 1;
    unsigned char *whole = malloc(size / 4 * 3 + 8), *parts = malloc(size / 4 * 3 + 8 + 3 * size);
    assert(whole && parts);
    struct smtp_b64dec a, b;
    smtp_b64dec_init(&a);
    smtp_b64dec_init(&b);
    size_t n1 = smtp_b64dec_feed(&a, (const char *)data, size, whole);
    n1 += smtp_b64dec_finish(&a, whole + n1);
    size_t n2 = 0;
    for (size_t i = 0; i < size; i += step) {
        size_t k = size - i < step ? size - i : step;
        n2 += smtp_b64dec_feed(&b, (const char *)data + i, k, parts + n2);
    }
    n2 += smtp_b64dec_finish(&b, parts + n2);
    assert(n1 == n2 && memcmp(whole, parts, n1) == 0 && a.flags == b.flags);
    assert(n1 <= size / 4 * 3 + 2);
    /* what the strict-but-MIME decoder of text.c takes, this one decodes to the same bytes */
    unsigned char *ref = malloc(size / 4 * 3 + 3);
    assert(ref);
    size_t n3 = smtp_b64_decode((const char *)data, size, ref, SMTP_B64_MIME);
    if (n3 != (size_t)-1)
        assert(n3 == n1 && memcmp(ref, whole, n1) == 0);
    free(ref);
    free(whole);
    free(parts);
    struct smtp_linemeter m1, m2;
    smtp_linemeter_init(&m1);
    smtp_linemeter_init(&m2);
    smtp_linemeter_feed(&m1, (const char *)data, size);
    for (size_t i = 0; i < size; i += step)
        smtp_linemeter_feed(&m2, (const char *)data + i, size - i < step ? size - i : step);
    smtp_linemeter_finish(&m1);
    smtp_linemeter_finish(&m2);
    assert(m1.crlf == m2.crlf && m1.lf == m2.lf && m1.barecr == m2.barecr && m1.longest == m2.longest);
    assert(m1.longest <= size);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 20000)
        return 0;
    if (!L)
        setup();
    check_c(data, size);
    lua_rawgeti(L, LUA_REGISTRYINDEX, check_ref);
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
        fprintf(stderr, "invariant broken: %s\n", lua_tostring(L, -1));
        abort();
    }
    /* a full collection now and then keeps the heap from carrying one input's garbage into
     * the next one's measurements */
    static unsigned runs;
    if (++runs % 64 == 0)
        lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
