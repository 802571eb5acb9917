/* Lua binding of the PROXY protocol parser (proxyproto.h): core.proxy_parse(bytes). */
#include "core.h"
#include "proxyproto.h"

/* core.proxy_parse(s) -> n, { version=, local=, family=, src=, sport=, dst=, dport= } when the
 * header is complete (n bytes long; what follows belongs to SMTP) | 0 when more bytes are needed
 * | nil, why when it is malformed. */
static int l_proxy_parse(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    smtp_proxy_header h;
    const char *why;
    long r = smtp_proxy_parse((const unsigned char *)s, n, &h, &why);
    if (r < 0) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    lua_pushinteger(L, r);
    if (r == 0)
        return 1;
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, h.version);
    lua_setfield(L, -2, "version");
    lua_pushboolean(L, h.local);
    lua_setfield(L, -2, "local");
    lua_pushinteger(L, h.family);
    lua_setfield(L, -2, "family");
    if (h.family) {
        lua_pushstring(L, h.src);
        lua_setfield(L, -2, "src");
        lua_pushstring(L, h.dst);
        lua_setfield(L, -2, "dst");
        lua_pushinteger(L, h.sport);
        lua_setfield(L, -2, "sport");
        lua_pushinteger(L, h.dport);
        lua_setfield(L, -2, "dport");
    }
    return 2;
}

int smtp_open_proxyproto(lua_State *L)
{
    lua_pushcfunction(L, l_proxy_parse);
    lua_setfield(L, -2, "proxy_parse");
    return 0;
}
