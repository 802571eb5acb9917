/* Shared declarations for the lua-smtp C core: every object file adds its functions to the
 * smtp.core table through one smtp_open_<part>() call made by luaopen_smtp_core(). */
#ifndef SMTP_CORE_H
#define SMTP_CORE_H

#include <stddef.h>
#include <lua.h>
#include <lauxlib.h>
#if LUA_VERSION_NUM < 503
#include "compat-5.3.h"
#endif

#define SMTP_API __attribute__((visibility("default")))

/* Each part registers its functions and types into the table on top of the stack and leaves
 * the stack as it found it. */
int smtp_open_net(lua_State *L);
int smtp_open_tls(lua_State *L);
int smtp_open_poll(lua_State *L);
int smtp_open_dns(lua_State *L);
int smtp_open_reply(lua_State *L);
int smtp_open_client(lua_State *L);
int smtp_open_server(lua_State *L);
int smtp_open_codec(lua_State *L);

/* Creates a metatable named `name` with __name, __index = methods, and the metamethods. */
void smtp_newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *metamethods);

/* Overwrites n bytes so that the compiler cannot drop the store (credentials, keys). */
void smtp_wipe(void *p, size_t n);

#endif
