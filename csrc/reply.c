/* Placeholder for the reply part of the C core; filled in by its own change. */
#include "core.h"

int smtp_open_reply(lua_State *L)
{
    (void)L;
    return 0;
}
