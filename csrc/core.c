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

SMTP_API int luaopen_smtp_core(lua_State *L)
{
    lua_newtable(L);
    smtp_open_net(L);
    smtp_open_tls(L);
    smtp_open_poll(L);
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
