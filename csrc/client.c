/* Placeholder for the client part of the C core; filled in by its own change. */
#include "core.h"

int smtp_open_client(lua_State *L)
{
    (void)L;
    return 0;
}
