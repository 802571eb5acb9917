/* smtp.loop's scheduler core: its tasks, the fds they wait on, their timers and the loop's turn
 * (epoll_wait, waking the tasks, resuming them, settling epoll interest), so that a task's wait
 * costs a few Lua VM instructions instead of some 160. lua/smtp/loop.lua is the API around it.
 * C resumes the task coroutines but never yields: a task parks itself here, then yields in Lua. */
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include "core.h"

#define SMTP_SCHED "smtp.sched"
/* Events taken per epoll_wait; more stay queued in the kernel for the next turn. */
#define SCHED_BATCH 256

enum { EV_R = 1, EV_W = 2 };
/* What a woken task's wait returns: true, nil "timeout", nil "closed". */
enum { WAKE_OK, WAKE_TIMEOUT, WAKE_CLOSED };

/* One task. Its timer is one entry in the heap, reused from wait to wait: `key` orders the heap,
 * `due` is the deadline in force while `armed`. A later deadline only moves `due` (a server
 * renews its idle deadline before every read); the entry is re-keyed when its key comes due. */
typedef struct task {
    lua_State *co;   /* NULL: a free slot (next_free chains them) */
    double key, due;
    int hpos;        /* position in the heap (1-based), 0 = not in it */
    int fd;          /* fd waited on, -1 = none */
    int dir;         /* EV_R or EV_W while fd >= 0 */
    int next_free;
    char armed;
    char parked;     /* waits for an fd or a timer: its next yield is that wait, not a bare yield */
} task;

typedef struct sched {
    int epfd;
    task *t;                   /* ids 1..tused; t[0] unused */
    int tcap, tused, free_head;
    int ntasks, nwaiting;
    int *rd, *wr;              /* fd -> id of the task waiting to read / write it, 0 = none */
    unsigned char *interest;   /* fd -> EV_* bits epoll watches now */
    int fdcap;
    int *uns, nuns, unscap;    /* fds whose interest may exceed what their waiters want */
    int *rq;                   /* run queue: task ids, with the wake value of each */
    unsigned char *rv;
    int rhead, rtail, rcap;
    int *heap, nheap, hcap;    /* binary heap of task ids by key, heap[1] earliest */
    lua_State *current;        /* the task being resumed, NULL between resumes */
    int current_id;
    int trim_due;
    double last_trim;
} sched;

/* Grows *p (elements of `size` bytes) to hold index `need`, doubling; new space zeroed. */
static void *grow(lua_State *L, void *p, int *cap, int need, size_t size)
{
    int n = *cap ? *cap : 16;
    char *q;
    while (n <= need)
        n *= 2;
    q = (char *)realloc(p, (size_t)n * size);
    if (!q)
        luaL_error(L, "smtp.loop: not enough memory");
    memset(q + (size_t)*cap * size, 0, (size_t)(n - *cap) * size);
    *cap = n;
    return q;
}

static void fd_room(lua_State *L, sched *s, int fd)
{
    int cap;
    if (fd < s->fdcap)
        return;
    cap = s->fdcap;
    s->rd = (int *)grow(L, s->rd, &cap, fd, sizeof *s->rd);
    cap = s->fdcap;
    s->wr = (int *)grow(L, s->wr, &cap, fd, sizeof *s->wr);
    cap = s->fdcap;
    s->interest = (unsigned char *)grow(L, s->interest, &cap, fd, 1);
    s->fdcap = cap;
}

/* ---- timers ---------------------------------------------------------------------------- */

static void heap_place(sched *s, int i, int id)
{
    s->heap[i] = id;
    s->t[id].hpos = i;
}

static void sift_up(sched *s, int i)
{
    int id = s->heap[i];
    double k = s->t[id].key;
    while (i > 1) {
        int p = i / 2;
        if (s->t[s->heap[p]].key <= k)
            break;
        heap_place(s, i, s->heap[p]);
        i = p;
    }
    heap_place(s, i, id);
}

static void sift_down(sched *s, int i)
{
    int id = s->heap[i];
    double k = s->t[id].key;
    for (;;) {
        int c = 2 * i;
        if (c > s->nheap)
            break;
        if (c + 1 <= s->nheap && s->t[s->heap[c + 1]].key < s->t[s->heap[c]].key)
            c++;
        if (s->t[s->heap[c]].key >= k)
            break;
        heap_place(s, i, s->heap[c]);
        i = c;
    }
    heap_place(s, i, id);
}

static void heap_remove(sched *s, int id)
{
    int i = s->t[id].hpos, last;
    if (!i)
        return;
    s->t[id].hpos = 0;
    last = s->heap[s->nheap--];
    if (i <= s->nheap) {
        heap_place(s, i, last);
        sift_up(s, i);
        sift_down(s, s->t[last].hpos);
    }
}

static void add_timer(lua_State *L, sched *s, int id, double deadline)
{
    task *k = &s->t[id];
    k->armed = 1;
    k->due = deadline;
    if (k->hpos && k->key <= deadline)
        return;
    k->key = deadline;
    if (k->hpos) {
        sift_up(s, k->hpos);
        return;
    }
    if (s->nheap + 1 >= s->hcap)
        s->heap = (int *)grow(L, s->heap, &s->hcap, s->nheap + 1, sizeof *s->heap);
    s->heap[++s->nheap] = id;
    sift_up(s, s->nheap);
}

/* The earliest armed timer entry, or 0; disarmed entries (waits that ended early) leave the heap
 * here. Its key may be earlier than its deadline (moved lazily, see task): the loop then wakes
 * early once and re-keys it, so an entry is re-keyed once per timeout period, not per read. */
static int top_timer(sched *s)
{
    while (s->nheap) {
        int id = s->heap[1];
        if (s->t[id].armed)
            return id;
        heap_remove(s, id);
    }
    return 0;
}

/* ---- fds --------------------------------------------------------------------------------- */

static int ctl(sched *s, int op, int fd, int m)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = (m & EV_R ? EPOLLIN : 0u) | (m & EV_W ? EPOLLOUT : 0u);
    ev.data.fd = fd;
    return epoll_ctl(s->epfd, op, fd, &ev);
}

/* Makes epoll watch `m` on fd (0: nothing); -1 when epoll cannot watch it (a regular file).
 * ADD and MOD each fall back to the other: the fd may have been closed and reused, or
 * registered by an earlier holder of its number, behind the loop's back. */
static int set_interest(sched *s, int fd, int m)
{
    int old = s->interest[fd];
    if (m == old)
        return 0;
    if (m == 0) {
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, fd, NULL);
        s->interest[fd] = 0;
        return 0;
    }
    if (old == 0) {
        if (ctl(s, EPOLL_CTL_ADD, fd, m) < 0 && ctl(s, EPOLL_CTL_MOD, fd, m) < 0)
            return -1;
    } else if (ctl(s, EPOLL_CTL_MOD, fd, m) < 0 && ctl(s, EPOLL_CTL_ADD, fd, m) < 0)
        return -1;
    s->interest[fd] = (unsigned char)m;
    return 0;
}

static void unsettle(lua_State *L, sched *s, int fd)
{
    if (s->nuns >= s->unscap)
        s->uns = (int *)grow(L, s->uns, &s->unscap, s->nuns, sizeof *s->uns);
    s->uns[s->nuns++] = fd;
}

/* Brings epoll in line with the waiters once per turn. A task woken for an fd usually waits on
 * it again before the turn ends (a server reads a command, replies, waits for the next): keeping
 * the registration until then saves an EPOLL_CTL_DEL and an EPOLL_CTL_ADD per wait. What nobody
 * waits for any more is dropped before epoll_wait, so a level-triggered event is never reported
 * for an fd nobody waits on. */
static void settle(sched *s)
{
    int i;
    for (i = 0; i < s->nuns; i++) {
        int fd = s->uns[i];
        int want = (s->rd[fd] ? EV_R : 0) | (s->wr[fd] ? EV_W : 0);
        if (want != s->interest[fd])
            set_interest(s, fd, want);
    }
    s->nuns = 0;
}

static void unhook(lua_State *L, sched *s, int id)
{
    task *k = &s->t[id];
    if (k->fd < 0)
        return;
    if (k->dir == EV_R)
        s->rd[k->fd] = 0;
    else
        s->wr[k->fd] = 0;
    s->nwaiting--;
    unsettle(L, s, k->fd);
    k->fd = -1;
}

/* ---- the run queue --------------------------------------------------------------------- */

static void push_ready(lua_State *L, sched *s, int id, int v)
{
    if (s->rtail >= s->rcap) {
        int cap = s->rcap;
        s->rq = (int *)grow(L, s->rq, &cap, s->rtail, sizeof *s->rq);
        cap = s->rcap;
        s->rv = (unsigned char *)grow(L, s->rv, &cap, s->rtail, 1);
        s->rcap = cap;
    }
    s->rq[s->rtail] = id;
    s->rv[s->rtail++] = (unsigned char)v;
    s->t[id].parked = 0;
}

/* A waiter woken: its deadline no longer holds, its fd is let go. */
static void wake(lua_State *L, sched *s, int id, int v)
{
    s->t[id].armed = 0;
    unhook(L, s, id);
    push_ready(L, s, id, v);
}

/* ---- Lua binding ----------------------------------------------------------------------- */

#define S(L) ((sched *)lua_touserdata(L, lua_upvalueindex(1)))
#define ANCHORS lua_upvalueindex(2)   /* id -> coroutine: keeps the live tasks from the GC */

/* Raises msg at the level of whoever called our caller (smtp.wait.fd's or loop.wait_fd's). */
static int misuse(lua_State *L, const char *msg)
{
    luaL_where(L, 2);
    lua_pushstring(L, msg);
    lua_concat(L, 2);
    return lua_error(L);
}

/* spawn(co): a new task, run first on the next turn. */
static int l_spawn(lua_State *L)
{
    sched *s = S(L);
    lua_State *co = lua_tothread(L, 1);
    int id;
    luaL_argcheck(L, co != NULL, 1, "coroutine expected");
    if (s->free_head) {
        id = s->free_head;
        s->free_head = s->t[id].next_free;
    } else {
        if (s->tused + 1 >= s->tcap)
            s->t = (task *)grow(L, s->t, &s->tcap, s->tused + 1, sizeof *s->t);
        id = ++s->tused;
    }
    memset(&s->t[id], 0, sizeof s->t[id]);
    s->t[id].co = co;
    s->t[id].fd = -1;
    lua_pushvalue(L, 1);
    lua_rawseti(L, ANCHORS, id);
    s->ntasks++;
    push_ready(L, s, id, WAKE_OK);
    return 0;
}

/* A task ended (returned or raised): its timer and slot go. */
static void task_end(lua_State *L, sched *s, int id)
{
    task *k = &s->t[id];
    heap_remove(s, id);
    unhook(L, s, id);
    k->co = NULL;
    k->next_free = s->free_head;
    s->free_head = id;
    s->ntasks--;
    lua_pushnil(L);
    lua_rawseti(L, ANCHORS, id);
}

/* current() -> the running task's coroutine, or nil (the main thread, a foreign coroutine, or a
 * coroutine a task resumed itself). */
static int l_current(lua_State *L)
{
    if (S(L)->current == L)
        lua_pushthread(L);
    else
        lua_pushnil(L);
    return 1;
}

/* park_fd(fd, "r"|"w", deadline|nil) -> 0 (parked: the caller yields next and gets the wait's
 * result from the resume) | true (an fd epoll cannot watch is always ready) | nil, "timeout"
 * (deadline passed) | false (not in a loop task: the caller waits some other way). */
static int l_park_fd(lua_State *L)
{
    sched *s = S(L);
    int id, fd, bit, isnum;
    size_t len;
    const char *what;
    double deadline = 0;
    int has_deadline;
    if (s->current != L) {
        lua_pushboolean(L, 0);
        return 1;
    }
    id = s->current_id;
    fd = (int)lua_tointegerx(L, 1, &isnum);
    if (!isnum)
        return misuse(L, "bad argument #1 to 'wait_fd' (fd number expected)");
    what = lua_tolstring(L, 2, &len);
    if (!what || len != 1 || (what[0] != 'r' && what[0] != 'w'))
        return misuse(L, "bad argument #2 to 'wait_fd' (\"r\" or \"w\" expected)");
    bit = what[0] == 'r' ? EV_R : EV_W;
    if (fd < 0) {   /* nothing epoll could watch: as a regular file */
        lua_pushboolean(L, 1);
        return 1;
    }
    fd_room(L, s, fd);
    if ((bit == EV_R ? s->rd : s->wr)[fd]) {
        lua_pushfstring(L, "two tasks wait to %s fd %d", bit == EV_R ? "read" : "write", fd);
        return misuse(L, lua_tostring(L, -1));
    }
    has_deadline = !lua_isnoneornil(L, 3);
    if (has_deadline) {
        deadline = luaL_checknumber(L, 3);
        if (deadline <= smtp_mono_now()) {
            lua_pushnil(L);
            lua_pushliteral(L, "timeout");
            return 2;
        }
    }
    if (!(s->interest[fd] & bit) && set_interest(s, fd, s->interest[fd] | bit) < 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    (bit == EV_R ? s->rd : s->wr)[fd] = id;
    s->t[id].fd = fd;
    s->t[id].dir = bit;
    s->nwaiting++;
    if (has_deadline)
        add_timer(L, s, id, deadline);
    s->t[id].parked = 1;
    lua_pushinteger(L, 0);
    return 1;
}

/* park_sleep(seconds) -> 0 (parked: the caller yields next) | false (not in a loop task). */
static int l_park_sleep(lua_State *L)
{
    sched *s = S(L);
    double secs;
    if (s->current != L) {
        lua_pushboolean(L, 0);
        return 1;
    }
    secs = luaL_optnumber(L, 1, 0);
    add_timer(L, s, s->current_id, smtp_mono_now() + secs);
    s->t[s->current_id].parked = 1;
    lua_pushinteger(L, 0);
    return 1;
}

/* forget(fd): whoever waits on fd wakes with nil, "closed"; epoll stops watching it. Called
 * before the fd is closed. */
static int l_forget(lua_State *L)
{
    sched *s = S(L);
    int isnum, fd = (int)lua_tointegerx(L, 1, &isnum);
    if (!isnum || fd < 0 || fd >= s->fdcap)
        return 0;
    if (s->rd[fd])
        wake(L, s, s->rd[fd], WAKE_CLOSED);
    if (s->wr[fd])
        wake(L, s, s->wr[fd], WAKE_CLOSED);
    if (s->interest[fd] && s->epfd >= 0)
        set_interest(s, fd, 0);
    return 0;
}

static int l_release_memory_later(lua_State *L)
{
    S(L)->trim_due = 1;
    return 0;
}

/* stats() -> tasks, waiting, timers, disarmed timers (entries of waits that ended early, left in
 * the heap until they reach its top) */
static int l_stats(lua_State *L)
{
    sched *s = S(L);
    int i, disarmed = 0;
    for (i = 1; i <= s->nheap; i++)
        disarmed += !s->t[s->heap[i]].armed;
    lua_pushinteger(L, s->ntasks);
    lua_pushinteger(L, s->nwaiting);
    lua_pushinteger(L, s->nheap);
    lua_pushinteger(L, disarmed);
    return 4;
}

/* Resumes task id with its wake value. Returns 0, or 2 with the task's coroutine and error
 * object on L's stack when it raised. */
static int resume(lua_State *L, sched *s, int id, int v)
{
    lua_State *co = s->t[id].co;
    int st, nres, nargs = 1;
    if (!co)
        return 0;
    lua_checkstack(co, 3);
    if (v == WAKE_OK)
        lua_pushboolean(co, 1);
    else {
        lua_pushnil(co);
        lua_pushstring(co, v == WAKE_TIMEOUT ? "timeout" : "closed");
        nargs = 2;
    }
    s->current = co;
    s->current_id = id;
#if LUA_VERSION_NUM >= 504
    st = lua_resume(co, L, nargs, &nres);
#else
    st = lua_resume(co, L, nargs);
    nres = lua_gettop(co);
#endif
    s->current = NULL;
    s->current_id = 0;
    if (st == LUA_YIELD) {
        lua_pop(co, nres);
        if (!s->t[id].parked)
            push_ready(L, s, id, WAKE_OK);   /* a bare coroutine.yield(): runs again after the others */
        return 0;
    }
    if (st == LUA_OK) {
        task_end(L, s, id);
        return 0;
    }
    lua_checkstack(L, 3);
    lua_xmove(co, L, 1);
    lua_rawgeti(L, ANCHORS, id);
    lua_insert(L, -2);
    task_end(L, s, id);
    return 2;
}

/* run() -> nothing once every task has ended | co, err when a task raised err (its traceback is
 * the caller's to take). The run queue is left as it was, so the next run() goes on from there. */
static int l_run(lua_State *L)
{
    sched *s = S(L);
    struct epoll_event evs[SCHED_BATCH];
    if (s->epfd < 0) {
        s->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (s->epfd < 0)
            return luaL_error(L, "smtp.loop: epoll_create1: %s", strerror(errno));
    }
    for (;;) {
        int n, i, id;
        double timeout = -1, t;
        while (s->rhead < s->rtail) {
            id = s->rq[s->rhead];
            i = s->rv[s->rhead];
            s->rhead++;
            if (resume(L, s, id, i))
                return 2;
        }
        s->rhead = s->rtail = 0;
        if (s->nuns)
            settle(s);
        if (s->ntasks == 0)
            break;
        id = top_timer(s);
        if (id) {
            timeout = s->t[id].key - smtp_mono_now();
            if (timeout < 0)
                timeout = 0;
        } else if (s->nwaiting == 0) {
            lua_pushfstring(L, "smtp.loop: %d task(s) suspended with nothing to wait for", s->ntasks);
            return lua_error(L);
        }
        /* A TLS handshake allocates some 60 KB for a moment and keeps a third of it; after a
         * burst glibc would hold the rest, doubling an idle TLS connection's RSS: the free
         * pages go back once the burst has passed, at most once a second. */
        if (s->trim_due) {
            double left = s->last_trim + 1 - smtp_mono_now();
            if (left <= 0) {
                s->trim_due = 0;
                s->last_trim = smtp_mono_now();
                malloc_trim(0);
            } else if (timeout < 0 || timeout > left)
                timeout = left;
        }
        n = epoll_wait(s->epfd, evs, SCHED_BATCH, smtp_poll_ms(timeout));
        if (n < 0) {
            if (errno != EINTR)   /* a signal only cuts the wait short */
                return luaL_error(L, "smtp.loop: epoll_wait: %s", strerror(errno));
            n = 0;
        }
        for (i = 0; i < n; i++) {
            unsigned e = evs[i].events;
            int fd = evs[i].data.fd, r, w;
            if (fd < 0 || fd >= s->fdcap)
                continue;
            r = s->rd[fd];
            w = s->wr[fd];
            if (r && (e & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                wake(L, s, r, WAKE_OK);
            if (w && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                wake(L, s, w, WAKE_OK);
            /* level-triggered: an fd nobody waits for any more is settled before the next wait */
            unsettle(L, s, fd);
        }
        /* Only entries whose key came due are looked at: the tasks woken above have disarmed
         * theirs, but most wait again before the next epoll_wait and re-arm them in place. */
        t = smtp_mono_now();
        while (s->nheap && s->t[id = s->heap[1]].key <= t) {
            if (!s->t[id].armed) {
                heap_remove(s, id);
                continue;
            }
            if (s->t[id].due > s->t[id].key) {
                s->t[id].key = s->t[id].due;
                sift_down(s, 1);
                continue;
            }
            heap_remove(s, id);
            if (s->t[id].fd >= 0)
                wake(L, s, id, WAKE_TIMEOUT);
            else {
                s->t[id].armed = 0;
                push_ready(L, s, id, WAKE_OK);   /* a sleep ended */
            }
        }
    }
    return 0;
}

static int l_gc(lua_State *L)
{
    sched *s = (sched *)lua_touserdata(L, 1);
    if (s->epfd >= 0)
        close(s->epfd);
    s->epfd = -1;
    free(s->t);
    free(s->rd);
    free(s->wr);
    free(s->interest);
    free(s->uns);
    free(s->rq);
    free(s->rv);
    free(s->heap);
    memset(s, 0, sizeof *s);
    s->epfd = -1;
    return 0;
}

static const luaL_Reg sched_fns[] = {
    { "spawn", l_spawn },
    { "current", l_current },
    { "park_fd", l_park_fd },
    { "park_sleep", l_park_sleep },
    { "forget", l_forget },
    { "release_memory_later", l_release_memory_later },
    { "stats", l_stats },
    { "run", l_run },
    { NULL, NULL },
};

/* core.scheduler() -> a table of the functions above, closures over one scheduler (smtp.loop
 * makes the one a Lua state uses). */
static int l_scheduler(lua_State *L)
{
    sched *s;
    lua_newtable(L);
    s = (sched *)lua_newuserdata(L, sizeof *s);
    memset(s, 0, sizeof *s);
    s->epfd = -1;
    s->last_trim = -1;
    luaL_setmetatable(L, SMTP_SCHED);
    lua_newtable(L);
    luaL_setfuncs(L, sched_fns, 2);
    return 1;
}

int smtp_open_sched(lua_State *L)
{
    static const luaL_Reg meta[] = { { "__gc", l_gc }, { NULL, NULL } };
    static const luaL_Reg none[] = { { NULL, NULL } };
    smtp_newclass(L, SMTP_SCHED, none, meta);
    lua_pushcfunction(L, l_scheduler);
    lua_setfield(L, -2, "scheduler");
    return 0;
}
