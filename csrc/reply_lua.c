/* Lua side of reply parsing: a parsed reply as a Lua table (shared with the client engine's
 * binding) and core.parse_reply(). */
#include <string.h>
#include "core.h"
#include "reply.h"

/* A line's text without its enhanced code (servers repeat it on every line). */
/* A reply line's text without the enhanced code it repeats (servers put it on every line). */
static const char *line_text(const char *s, size_t n, int code, size_t *tn)
{
    size_t el = smtp_enhanced_len(s, n, code);
    const char *ts = s + el;
    *tn = n - el;
    if (el && *tn && *ts == ' ') {
        ts++;
        (*tn)--;
    }
    return ts;
}

void smtp_reply_push(lua_State *L, const smtp_reply *r, int caps)
{
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, r->code);
    lua_setfield(L, -2, "code");
    if (r->enhanced[0]) {
        lua_pushstring(L, r->enhanced);
        lua_setfield(L, -2, "enhanced");
    }
    /* text drops the enhanced code wherever a line repeats it, as servers do. */
    smtp_buf t = {0};
    lua_createtable(L, r->nlines, 0); /* lines */
    const char *s = r->text.p, *end = s + r->text.len;
    int i = 0;
    const char *one = NULL; /* a one-line reply's text goes to Lua straight, with no buffer */
    size_t tn = 0;
    while (s && s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        size_t n = (size_t)(nl - s);
        const char *ts = line_text(s, n, r->code, &tn);
        if (r->nlines == 1) {
            one = ts;
        } else if ((i > 0 && smtp_buf_add(&t, "\n", 1) < 0) || smtp_buf_add(&t, ts, tn) < 0) {
            smtp_buf_free(&t);
            luaL_error(L, "out of memory");
        }
        lua_pushlstring(L, s, n);
        lua_rawseti(L, -2, ++i);
        s = nl + 1;
    }
    lua_setfield(L, -2, "lines");
    if (one)
        lua_pushlstring(L, one, tn);
    else
        lua_pushlstring(L, t.p ? t.p : "", t.len);
    smtp_buf_free(&t);
    lua_setfield(L, -2, "text");
    if (caps) {
        lua_newtable(L);
        s = r->text.p;
        int first = 1;
        while (s && s < end) {
            const char *nl = memchr(s, '\n', (size_t)(end - s));
            size_t n = (size_t)(nl - s);
            char kw[64];
            const char *params;
            size_t pl;
            /* the first line is the server's greeting name, not a capability */
            if (!first && smtp_ehlo_line(s, n, kw, sizeof kw, &params, &pl) == 0) {
                lua_pushlstring(L, params, pl);
                lua_setfield(L, -2, kw);
            }
            first = 0;
            s = nl + 1;
        }
        lua_setfield(L, -2, "extensions");
    }
}

/* core.parse_reply(bytes [, caps]) -> reply, consumed | nil (incomplete) | nil, err */
static int l_parse_reply(lua_State *L)
{
    size_t len, used;
    const char *s = luaL_checklstring(L, 1, &len);
    int caps = lua_toboolean(L, 2);
    smtp_reply_parser p;
    smtp_reply_parser_init(&p);
    smtp_rp_status st = smtp_reply_parser_feed(&p, s, len, &used);
    int n;
    if (st == SMTP_RP_DONE) {
        smtp_reply_push(L, &p.reply, caps);
        lua_pushinteger(L, (lua_Integer)used);
        n = 2;
    } else if (st == SMTP_RP_ERROR) {
        lua_pushnil(L);
        lua_pushstring(L, p.error);
        n = 2;
    } else {
        lua_pushnil(L);
        n = 1;
    }
    smtp_reply_parser_free(&p);
    return n;
}

int smtp_open_reply(lua_State *L)
{
    lua_pushcfunction(L, l_parse_reply);
    lua_setfield(L, -2, "parse_reply");
    return 0;
}
