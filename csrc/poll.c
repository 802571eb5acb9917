/* Readiness waiting: a monotonic clock, a blocking wait on one fd, and an epoll set for smtp.loop. */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <poll.h>
#include <sys/epoll.h>
#include "core.h"

#define SMTP_POLLER "smtp.poller"
/* Events handed back per poller:wait() call; more stay queued in the kernel for the next call. */
#define POLLER_BATCH 256

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

static unsigned epoll_bits(int m)
{
    return (m & EV_R ? EPOLLIN : 0u) | (m & EV_W ? EPOLLOUT : 0u);
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

typedef struct poller {
    int fd;
} poller;

static poller *check_poller(lua_State *L)
{
    poller *p = (poller *)luaL_checkudata(L, 1, SMTP_POLLER);
    if (p->fd < 0)
        luaL_error(L, "attempt to use a closed poller");
    return p;
}

/* core.poller() -> poller | nil, msg */
static int l_poller(lua_State *L)
{
    poller *p = (poller *)lua_newuserdata(L, sizeof *p);
    p->fd = epoll_create1(EPOLL_CLOEXEC);
    if (p->fd < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(errno));
        return 2;
    }
    luaL_setmetatable(L, SMTP_POLLER);
    return 1;
}

static int ctl(lua_State *L, int op)
{
    poller *p = check_poller(L);
    int fd = (int)luaL_checkinteger(L, 2);
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    if (op != EPOLL_CTL_DEL)
        ev.events = epoll_bits(check_events(L, 3));
    ev.data.fd = fd;
    if (epoll_ctl(p->fd, op, fd, &ev) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(errno));
        lua_pushinteger(L, errno);
        return 3;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* poller:add(fd, events), poller:mod(fd, events), poller:del(fd) -> true | nil, msg, errno */
static int l_add(lua_State *L) { return ctl(L, EPOLL_CTL_ADD); }
static int l_mod(lua_State *L) { return ctl(L, EPOLL_CTL_MOD); }
static int l_del(lua_State *L) { return ctl(L, EPOLL_CTL_DEL); }

/* poller:wait(timeout|nil, fds, evs) -> n; fds[i] = fd, evs[i] = 1 (r) | 2 (w) | 3 (both). */
static int l_poller_wait(lua_State *L)
{
    poller *p = check_poller(L);
    double timeout = luaL_optnumber(L, 2, -1);
    struct epoll_event evs[POLLER_BATCH];
    int n, i;
    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TTABLE);
    n = epoll_wait(p->fd, evs, POLLER_BATCH, smtp_poll_ms(timeout));
    /* A signal only cuts the wait short: the loop recomputes its timers and calls again. */
    if (n < 0 && errno == EINTR)
        n = 0;
    if (n < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(errno));
        return 2;
    }
    for (i = 0; i < n; i++) {
        unsigned e = evs[i].events;
        int m = (e & EPOLLIN ? EV_R : 0) | (e & EPOLLOUT ? EV_W : 0);
        if (e & (EPOLLERR | EPOLLHUP))
            m = EV_R | EV_W;
        lua_pushinteger(L, evs[i].data.fd);
        lua_rawseti(L, 3, i + 1);
        lua_pushinteger(L, m);
        lua_rawseti(L, 4, i + 1);
    }
    lua_pushinteger(L, n);
    return 1;
}

static int l_poller_fd(lua_State *L)
{
    lua_pushinteger(L, check_poller(L)->fd);
    return 1;
}

static int l_poller_close(lua_State *L)
{
    poller *p = (poller *)luaL_checkudata(L, 1, SMTP_POLLER);
    if (p->fd >= 0) {
        close(p->fd);
        p->fd = -1;
    }
    return 0;
}

static const luaL_Reg poller_methods[] = {
    { "add", l_add },
    { "mod", l_mod },
    { "del", l_del },
    { "wait", l_poller_wait },
    { "fd", l_poller_fd },
    { "close", l_poller_close },
    { NULL, NULL },
};

static const luaL_Reg poller_meta[] = {
    { "__gc", l_poller_close },
    { NULL, NULL },
};

static const luaL_Reg funcs[] = {
    { "now", l_now },
    { "wait", l_wait },
    { "poller", l_poller },
    { NULL, NULL },
};

int smtp_open_poll(lua_State *L)
{
    smtp_newclass(L, SMTP_POLLER, poller_methods, poller_meta);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
