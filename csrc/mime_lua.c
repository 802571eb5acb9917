/* Lua binding of the message parser's helpers: core.b64_decoder() and core.line_meter() around
 * mime.h, and core.charset_converter(name), glibc iconv to UTF-8 fed in chunks, replacing what
 * does not convert with U+FFFD (as mail readers show it) and counting the replacements. */
#include <errno.h>
#include <iconv.h>
#include <stdlib.h>
#include <string.h>
#include "core.h"
#include "mime.h"

#define B64_CLASS "smtp.b64_decoder"
#define METER_CLASS "smtp.line_meter"
#define CONV_CLASS "smtp.charset_converter"

/* s, i, j as string.sub takes them (negative counts from the end), clamped to the string */
static const char *check_span(lua_State *L, int arg, size_t *len)
{
    size_t n;
    const char *s = luaL_checklstring(L, arg, &n);
    lua_Integer i = luaL_optinteger(L, arg + 1, 1), j = luaL_optinteger(L, arg + 2, -1);
    if (i < 0) i = (lua_Integer)n + i + 1;
    if (j < 0) j = (lua_Integer)n + j + 1;
    if (i < 1) i = 1;
    if (j > (lua_Integer)n) j = (lua_Integer)n;
    if (i > j) {
        *len = 0;
        return s;
    }
    *len = (size_t)(j - i + 1);
    return s + i - 1;
}

/* ---- base64 ---------------------------------------------------------------------------------- */

static int l_b64_decoder(lua_State *L)
{
    struct smtp_b64dec *d = (struct smtp_b64dec *)lua_newuserdata(L, sizeof *d);
    smtp_b64dec_init(d);
    luaL_setmetatable(L, B64_CLASS);
    return 1;
}

/* d:feed(s [, i [, j]]) -> the bytes decoded so far from s:sub(i, j) */
static int b64_feed(lua_State *L)
{
    struct smtp_b64dec *d = (struct smtp_b64dec *)luaL_checkudata(L, 1, B64_CLASS);
    size_t n;
    const char *s = check_span(L, 2, &n);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, n / 4 * 3 + 3);
    luaL_pushresultsize(&b, smtp_b64dec_feed(d, s, n, out));
    return 1;
}

/* d:finish() -> the last bytes, flags (a sum of 1 bad character, 2 data after padding,
 * 4 padding missing, 8 one dangling character) */
static int b64_finish(lua_State *L)
{
    struct smtp_b64dec *d = (struct smtp_b64dec *)luaL_checkudata(L, 1, B64_CLASS);
    unsigned char out[3];
    size_t n = smtp_b64dec_finish(d, out);
    lua_pushlstring(L, (const char *)out, n);
    lua_pushinteger(L, (lua_Integer)d->flags);
    return 2;
}

/* ---- line meter ------------------------------------------------------------------------------ */

static int l_line_meter(lua_State *L)
{
    struct smtp_linemeter *m = (struct smtp_linemeter *)lua_newuserdata(L, sizeof *m);
    smtp_linemeter_init(m);
    luaL_setmetatable(L, METER_CLASS);
    return 1;
}

/* m:feed(s [, i [, j]]) -> the longest line so far (the one in progress included) */
static int meter_feed(lua_State *L)
{
    struct smtp_linemeter *m = (struct smtp_linemeter *)luaL_checkudata(L, 1, METER_CLASS);
    size_t n;
    const char *s = check_span(L, 2, &n);
    smtp_linemeter_feed(m, s, n);
    lua_pushinteger(L, (lua_Integer)m->longest);
    return 1;
}

/* m:finish() -> CRLF count, bare LF count, bare CR count, longest line */
static int meter_finish(lua_State *L)
{
    struct smtp_linemeter *m = (struct smtp_linemeter *)luaL_checkudata(L, 1, METER_CLASS);
    smtp_linemeter_finish(m);
    lua_pushinteger(L, (lua_Integer)m->crlf);
    lua_pushinteger(L, (lua_Integer)m->lf);
    lua_pushinteger(L, (lua_Integer)m->barecr);
    lua_pushinteger(L, (lua_Integer)m->longest);
    return 4;
}

/* ---- charsets -------------------------------------------------------------------------------- */

struct conv {
    iconv_t cd;              /* (iconv_t)-1 once closed */
    size_t npend;
    char pend[32];           /* an incomplete multibyte sequence held for the next chunk */
};

static struct conv *check_conv(lua_State *L)
{
    struct conv *c = (struct conv *)luaL_checkudata(L, 1, CONV_CLASS);
    if (c->cd == (iconv_t)-1)
        luaL_error(L, "charset converter is closed");
    return c;
}

/* core.charset_converter(name) -> conv | nil, "unknown charset".  Names are charset names as
 * MIME writes them: letters, digits and . _ : + - ( ) only, so that nothing reaches iconv_open
 * that glibc reads as an option ("//TRANSLIT") or a module path. */
static int l_charset_converter(lua_State *L)
{
    size_t n;
    const char *name = luaL_checklstring(L, 1, &n);
    int ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             strchr("._:+-()", c) != NULL;
    }
    if (!ok) {
        lua_pushnil(L);
        lua_pushliteral(L, "unknown charset");
        return 2;
    }
    struct conv *c = (struct conv *)lua_newuserdata(L, sizeof *c);
    c->cd = (iconv_t)-1;
    c->npend = 0;
    luaL_setmetatable(L, CONV_CLASS);
    c->cd = iconv_open("UTF-8", name);
    if (c->cd == (iconv_t)-1) {
        lua_pushnil(L);
        lua_pushliteral(L, "unknown charset");
        return 2;
    }
    return 1;
}

static const char REPL[] = "\xEF\xBF\xBD";

/* Runs iconv over in[0..n) into b; returns the replacements made. An incomplete sequence at the
 * end is kept in c->pend unless final (then it is one replacement). */
static size_t run_iconv(struct conv *c, luaL_Buffer *b, const char *in, size_t n, int final)
{
    size_t reps = 0;
    char *ip = (char *)in;
    size_t left = n;
    while (left > 0) {
        char *op = luaL_prepbuffsize(b, 4096), *o0 = op;
        size_t room = 4096;
        size_t r = iconv(c->cd, &ip, &left, &op, &room);
        luaL_addsize(b, (size_t)(op - o0));
        if (r != (size_t)-1)
            break;
        if (errno == E2BIG)
            continue;
        if (errno == EINVAL && !final && left <= sizeof c->pend) {
            memcpy(c->pend, ip, left);
            c->npend = left;
            return reps;
        }
        /* EILSEQ, or an incomplete sequence that will never complete: one replacement for the
         * octet that failed, then go on after it */
        luaL_addlstring(b, REPL, 3);
        reps++;
        if (errno == EINVAL) {
            left = 0;
            break;
        }
        ip++;
        left--;
    }
    if (final) {
        /* return a stateful encoding (ISO-2022-JP) to its initial state */
        char *op = luaL_prepbuffsize(b, 64), *o0 = op;
        size_t room = 64;
        iconv(c->cd, NULL, NULL, &op, &room);
        luaL_addsize(b, (size_t)(op - o0));
    }
    return reps;
}

/* conv:convert(s [, final]) -> UTF-8 text, replacements made */
static int conv_convert(lua_State *L)
{
    struct conv *c = check_conv(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    int final = lua_toboolean(L, 3);
    if (c->npend) {
        /* the held octets go first: one Lua string (below the buffer on the stack) holds both */
        lua_pushlstring(L, c->pend, c->npend);
        lua_pushvalue(L, 2);
        lua_concat(L, 2);
        s = lua_tolstring(L, -1, &n);
        c->npend = 0;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t reps = run_iconv(c, &b, s, n, final);
    luaL_pushresult(&b);
    lua_pushinteger(L, (lua_Integer)reps);
    return 2;
}

static int conv_gc(lua_State *L)
{
    struct conv *c = (struct conv *)luaL_checkudata(L, 1, CONV_CLASS);
    if (c->cd != (iconv_t)-1) {
        iconv_close(c->cd);
        c->cd = (iconv_t)-1;
    }
    return 0;
}

int smtp_open_mime(lua_State *L)
{
    static const luaL_Reg b64_methods[] = { { "feed", b64_feed }, { "finish", b64_finish },
                                            { NULL, NULL } };
    static const luaL_Reg meter_methods[] = { { "feed", meter_feed }, { "finish", meter_finish },
                                              { NULL, NULL } };
    static const luaL_Reg conv_methods[] = { { "convert", conv_convert }, { "close", conv_gc },
                                             { NULL, NULL } };
    static const luaL_Reg conv_meta[] = { { "__gc", conv_gc }, { NULL, NULL } };
    static const luaL_Reg funcs[] = {
        { "b64_decoder", l_b64_decoder }, { "line_meter", l_line_meter },
        { "charset_converter", l_charset_converter }, { NULL, NULL }
    };
    smtp_newclass(L, B64_CLASS, b64_methods, NULL);
    smtp_newclass(L, METER_CLASS, meter_methods, NULL);
    smtp_newclass(L, CONV_CLASS, conv_methods, conv_meta);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
