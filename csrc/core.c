/* Entry point of smtp.core: builds the module table from every part of the C core. */
#include <string.h>
#include "core.h"

void smtp_newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *metamethods)
{
    luaL_newmetatable(L, name);
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    if (metamethods)
        luaL_setfuncs(L, metamethods, 0);
    lua_newtable(L);
    if (methods)
        luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

void smtp_class_closures(lua_State *L, const char *name, const luaL_Reg *fns)
{
    luaL_getmetatable(L, name);
    lua_getfield(L, -1, "__index");
    for (; fns->name; fns++) {
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, fns->func, 1);
        lua_setfield(L, -2, fns->name);
    }
    lua_pop(L, 2);
}

void *smtp_check_class(lua_State *L, int idx, int up, const char *name)
{
    void *p = lua_touserdata(L, idx);
    int ok = 0;
    if (p && lua_getmetatable(L, idx)) {
        ok = lua_rawequal(L, -1, lua_upvalueindex(up));
        lua_pop(L, 1);
    }
    return ok ? p : luaL_checkudata(L, idx, name);
}

SMTP_API int luaopen_smtp_core(lua_State *L)
{
    lua_newtable(L);
    smtp_open_net(L);
    smtp_open_tls(L);
    smtp_open_poll(L);
    smtp_open_sched(L);
    smtp_open_dns(L);
    smtp_open_reply(L);
    smtp_open_client(L);
    smtp_open_server(L);
    smtp_open_sink(L);
    smtp_open_codec(L);
    smtp_open_idna(L);
    smtp_open_mime(L);
    smtp_open_proxyproto(L);
    smtp_open_spool(L);
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "_VERSION");
    return 1;
}
