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
#include "text.h"   /* smtp_wipe and the text helpers every part may use */

#define SMTP_API __attribute__((visibility("default")))

/* Each part registers its functions and types into the table on top of the stack and leaves
 * the stack as it found it. */
int smtp_open_net(lua_State *L);
int smtp_open_tls(lua_State *L);
int smtp_open_poll(lua_State *L);
int smtp_open_sched(lua_State *L);
/* poll.c: the monotonic clock in seconds, and seconds (negative or NaN = forever) as a poll
 * timeout in milliseconds, rounded up; sched.c waits with them too. */
double smtp_mono_now(void);
int smtp_poll_ms(double s);
int smtp_open_dns(lua_State *L);
int smtp_open_reply(lua_State *L);
int smtp_open_client(lua_State *L);
int smtp_open_server(lua_State *L);
int smtp_open_sink(lua_State *L);
/* sink.c: a file object owning fd (:write :sync :size :truncate :close), and an exclusive flock
 * that does not wait; shared with the spool (spool.c). */
void smtp_push_file(lua_State *L, int fd);
int smtp_push_locked_file(lua_State *L, int fd, const char *path);
int smtp_flock_nb(int fd);
int smtp_open_codec(lua_State *L);
int smtp_open_idna(lua_State *L);
int smtp_open_mime(lua_State *L);
int smtp_open_proxyproto(lua_State *L);
int smtp_open_spool(lua_State *L);

/* Pushes a parsed reply as a table { code=, enhanced=, text=, lines={...} } plus
 * extensions={KEYWORD=params} when caps != 0 (reply_lua.c; used by client_lua.c too). */
struct smtp_reply;
void smtp_reply_push(lua_State *L, const struct smtp_reply *r, int caps);

/* Pushes transcript records (the client engine's format, client.h) as a Lua list, or nil;
 * client_lua.c holds it, server_lua.c uses it too. */
void smtp_push_trace(lua_State *L, const char *p, size_t n);
/* Creates a metatable named `name` with __name, __index = methods, and the metamethods. */
void smtp_newclass(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *metamethods);
/* The hot methods of a class are closures over its metatable: smtp_class_closures puts fns into
 * the class's __index that way, and smtp_check_class(L, idx, up, name) then compares the
 * userdata's metatable with upvalue `up` (a few API calls, where luaL_checkudata interns and
 * hashes the class name on every call: 8% of a server's instructions per message). A function
 * without that upvalue, or anything else at idx, takes luaL_checkudata's path and message. */
void smtp_class_closures(lua_State *L, const char *name, const luaL_Reg *fns);
void *smtp_check_class(lua_State *L, int idx, int up, const char *name);

#endif
