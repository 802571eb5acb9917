/* Readiness waiting: a monotonic clock and a blocking wait on one fd (smtp.loop's epoll set is in
 * sched.c). */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include "core.h"

/* Event bits as Lua sees them: 1 readable, 2 writable (both on error/hangup, so waiters retry). */
enum { EV_R = 1, EV_W = 2 };

/* ---- plain C --------------------------------------------------------------------------- */

double smtp_mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Seconds (negative or NaN = forever) -> poll milliseconds, rounded up so we never wake early. */
int smtp_poll_ms(double s)
{
    if (s != s || s < 0)
        return -1;
    if (s > 86400.0 * 24)
        return 86400 * 24 * 1000;
    {
        double ms = s * 1000.0;
        int i = (int)ms;
        return i < ms ? i + 1 : i;
    }
}

static int parse_events(const char *ev)
{
    int m = 0;
    for (; *ev; ev++) {
        if (*ev == 'r')
            m |= EV_R;
        else if (*ev == 'w')
            m |= EV_W;
        else
            return -1;
    }
    return m;
}

/* ---- Lua binding ----------------------------------------------------------------------- */

static int l_now(lua_State *L)
{
    lua_pushnumber(L, smtp_mono_now());
    return 1;
}

static int check_events(lua_State *L, int idx)
{
    int m = parse_events(luaL_checkstring(L, idx));
    if (m <= 0)
        luaL_argerror(L, idx, "events must be \"r\", \"w\" or \"rw\"");
    return m;
}

/* core.wait(fd, "r"|"w"|"rw", timeout|nil) -> true | nil, "timeout" | nil, msg */
static int l_wait(lua_State *L)
{
    int fd = (int)luaL_checkinteger(L, 1);
    int m = check_events(L, 2);
    double timeout = luaL_optnumber(L, 3, -1);
    double deadline = smtp_mono_now() + timeout;
    struct pollfd p = { .fd = fd, .events = (short)((m & EV_R ? POLLIN : 0) | (m & EV_W ? POLLOUT : 0)) };
    for (;;) {
        int n = poll(&p, 1, timeout < 0 ? -1 : smtp_poll_ms(deadline - smtp_mono_now()));
        if (n > 0) {
            lua_pushboolean(L, 1);
            return 1;
        }
        if (n == 0) {
            lua_pushnil(L);
            lua_pushliteral(L, "timeout");
            return 2;
        }
        if (errno != EINTR) {
            lua_pushnil(L);
            lua_pushstring(L, strerror(errno));
            return 2;
        }
    }
}

static const luaL_Reg funcs[] = {
    { "now", l_now },
    { "wait", l_wait },
    { NULL, NULL },
};

int smtp_open_poll(lua_State *L)
{
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
