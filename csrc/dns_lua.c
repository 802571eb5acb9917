/* dns part of the C core for Lua: a c-ares resolver for A, AAAA, MX, TXT and PTR that never blocks and
 * offers one pollable fd (an epoll set holding c-ares's own sockets), and its binding
 * core.resolver{...}. The answers are parsed by dns.c. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netdb.h>
#include <arpa/nameser.h>
#include <ares.h>
#include "core.h"
#include "dns.h"

/* ---------------------------------------------------------------------------------------------
 * Plain C: the resolver (a c-ares channel whose sockets live in one epoll set) and its queries.
 * ------------------------------------------------------------------------------------------- */

#define DNS_MAX_QUERIES 256     /* queries alive at once on one resolver */
enum { DNSSEC_AD = 1, DNSSEC_CD = 2 };

enum query_state { Q_PENDING, Q_DONE, Q_ABANDONED };
static const char *const query_state_name[] = { "pending", "done", "abandoned" };

enum query_type { T_ADDR4, T_ADDR6, T_MXREC, T_TXTREC, T_PTRREC, T_TLSAREC, T_COUNT };
static const char *const query_type_name[] = { "A", "AAAA", "MX", "TXT", "PTR", "TLSA" };
static const int query_type_ns[] = { ns_t_a, ns_t_aaaa, ns_t_mx, ns_t_txt, ns_t_ptr, 52 };

struct dns_resolver;

struct dns_query {
    struct dns_query *next;
    struct dns_resolver *res;
    long id;
    enum query_state state;
    enum query_type type;
    int status;                 /* ARES_* once done */
    int dnssec;                 /* 0, or DNSSEC_AD / DNSSEC_CD: sent raw, header read by us */
    unsigned char *abuf;        /* copy of the answer once done with ARES_SUCCESS */
    int alen;
};

struct dns_resolver {
    ares_channel channel;
    int epfd;
    int live;                   /* channel initialised and not destroyed */
    long next_id;
    int nqueries;
    struct dns_query *queries;
};

static void unlink_query(struct dns_resolver *r, struct dns_query *q)
{
    for (struct dns_query **p = &r->queries; *p; p = &(*p)->next)
        if (*p == q) {
            *p = q->next;
            r->nqueries--;
            break;
        }
    free(q->abuf);
    free(q);
}

/* c-ares opened, changed or is about to close one of its sockets: mirror it in the epoll set, so
 * that the set's fd is readable exactly when c-ares has something to do. */
static void sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
    struct dns_resolver *r = data;
    if (!readable && !writable) {
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, fd, NULL);
        return;
    }
    struct epoll_event ev = { 0 };
    ev.events = (readable ? EPOLLIN : 0) | (writable ? EPOLLOUT : 0);
    ev.data.fd = fd;
    if (epoll_ctl(r->epfd, EPOLL_CTL_MOD, fd, &ev) < 0 && errno == ENOENT)
        epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void answer_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct dns_query *q = arg;
    (void)timeouts;
    if (q->state == Q_ABANDONED) {
        unlink_query(q->res, q);
        return;
    }
    q->state = Q_DONE;
    q->status = status;
    if (status == ARES_SUCCESS && abuf && alen > 0) {
        q->abuf = malloc((size_t)alen);
        if (q->abuf) {
            memcpy(q->abuf, abuf, (size_t)alen);
            q->alen = alen;
        } else {
            q->status = ARES_ENOMEM;
        }
    }
}

static int resolver_init(struct dns_resolver *r, const char *servers, int timeout_ms, int tries,
                         const char **why)
{
    memset(r, 0, sizeof *r);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (r->epfd < 0) {
        *why = strerror(errno);
        return -1;
    }
    struct ares_options o;
    memset(&o, 0, sizeof o);
    /* NOCHECKRESP: let SERVFAIL and REFUSED reach us as such instead of "could not contact". */
    o.flags = ARES_FLAG_NOCHECKRESP;
    o.timeout = timeout_ms;
    o.tries = tries;
    o.sock_state_cb = sock_state_cb;
    o.sock_state_cb_data = r;
    int st = ares_init_options(&r->channel, &o,
                               ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES |
                               ARES_OPT_SOCK_STATE_CB);
    if (st != ARES_SUCCESS) {
        close(r->epfd);
        r->epfd = -1;
        *why = ares_strerror(st);
        return -1;
    }
    r->live = 1;
    if (servers && servers[0]) {
        st = ares_set_servers_ports_csv(r->channel, servers);
        if (st != ARES_SUCCESS) {
            *why = ares_strerror(st);
            return -1;      /* the caller destroys */
        }
    }
    return 0;
}

static void resolver_destroy(struct dns_resolver *r)
{
    if (r->live) {
        r->live = 0;
        /* Calls answer_cb with ARES_EDESTRUCTION for each query still out. */
        ares_destroy(r->channel);
    }
    while (r->queries)
        unlink_query(r, r->queries);
    if (r->epfd >= 0) {
        close(r->epfd);
        r->epfd = -1;
    }
}

static struct dns_query *find_query(struct dns_resolver *r, long id)
{
    for (struct dns_query *q = r->queries; q; q = q->next)
        if (q->id == id && q->state != Q_ABANDONED)
            return q;
    return NULL;
}

/* Handles whatever is ready now (never waits), then timeouts. */
static void resolver_process(struct dns_resolver *r)
{
    struct epoll_event evs[16];
    int n = epoll_wait(r->epfd, evs, 16, 0);
    for (int i = 0; i < n; i++) {
        ares_socket_t fd = evs[i].data.fd;
        int rd = (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0;
        int wr = (evs[i].events & EPOLLOUT) != 0;
        ares_process_fd(r->channel, rd ? fd : ARES_SOCKET_BAD, wr ? fd : ARES_SOCKET_BAD);
    }
    ares_process_fd(r->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
}

/* Short error names the Lua layer maps to temporary/permanent. */
static const char *status_name(int st)
{
    switch (st) {
    case ARES_ENODATA: return "nodata";
    case ARES_EFORMERR: return "formerr";
    case ARES_ESERVFAIL: return "servfail";
    case ARES_ENOTFOUND: return "nxdomain";
    case ARES_ENOTIMP: return "notimp";
    case ARES_EREFUSED: return "refused";
    case ARES_EBADRESP: return "badresp";
    case ARES_ECONNREFUSED: return "connrefused";
    case ARES_ETIMEOUT: return "timeout";
    case ARES_EBADNAME: return "badname";
    case ARES_ENOMEM: return "nomem";
    case ARES_EDESTRUCTION: return "closed";
    case ARES_ECANCELLED: return "cancelled";
    default: return "error";
    }
}

/* ---------------------------------------------------------------------------------------------
 * Lua binding.
 * ------------------------------------------------------------------------------------------- */

#define RESOLVER "smtp.core.resolver"

struct lresolver {
    struct dns_resolver r;
};

static struct lresolver *check_resolver(lua_State *L)
{
    struct lresolver *lr = luaL_checkudata(L, 1, RESOLVER);
    if (!lr->r.live)
        luaL_error(L, "resolver is closed");
    return lr;
}

/* core.resolver{ nameservers = {"127.0.0.1:5353", "[::1]:53"}, timeout = 5, tries = 2 } */
static int l_resolver(lua_State *L)
{
    double timeout = 5;
    lua_Integer tries = 2;
    char csv[8 * 66] = "";
    int have_servers = 0;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_getfield(L, 1, "timeout");
        if (!lua_isnil(L, -1))
            timeout = luaL_checknumber(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 1, "tries");
        if (!lua_isnil(L, -1))
            tries = luaL_checkinteger(L, -1);
        lua_pop(L, 1);
        if (!(timeout > 0 && timeout <= 3600))
            return luaL_error(L, "bad timeout: seconds between 0 and 3600");
        if (tries < 1 || tries > 10)
            return luaL_error(L, "bad tries: 1 to 10");
    }
    if (!lua_isnoneornil(L, 1)) {
        lua_getfield(L, 1, "nameservers");
        if (!lua_isnil(L, -1)) {
            luaL_checktype(L, -1, LUA_TTABLE);
            lua_Integer n = (lua_Integer)lua_rawlen(L, -1);
            if (n > 8)
                return luaL_error(L, "bad nameservers: at most 8");
            for (lua_Integer i = 1; i <= n; i++) {
                lua_rawgeti(L, -1, i);
                size_t len;
                const char *s = lua_tolstring(L, -1, &len);
                if (!s || lua_type(L, -1) != LUA_TSTRING)
                    return luaL_error(L, "bad nameservers[%d]: string expected", (int)i);
                if (len == 0 || len > 64 || strlen(s) != len || strcspn(s, ", \t\r\n") != len)
                    return luaL_error(L, "bad nameservers[%d]: 'ip' or 'ip:port' expected", (int)i);
                if (i > 1)
                    strcat(csv, ",");
                strcat(csv, s);
                lua_pop(L, 1);
                have_servers = 1;
            }
        }
        lua_pop(L, 1);
    }
    const char *servers = have_servers ? csv : NULL;

    struct lresolver *lr = lua_newuserdata(L, sizeof *lr);
    memset(lr, 0, sizeof *lr);
    lr->r.epfd = -1;
    luaL_setmetatable(L, RESOLVER);
    const char *why = "resolver setup failed";
    if (resolver_init(&lr->r, servers, (int)(timeout * 1000 + 0.5), (int)tries, &why) < 0) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        resolver_destroy(&lr->r);
        return 2;
    }
    return 1;
}

/* Sends a query we build ourselves, for DNSSEC: AD set asks a validating resolver to say whether
 * it validated the answer (RFC 6840 §5.7), CD set asks for the answer without validation (to tell
 * a bogus answer from an unreachable server). EDNS0 with a 1232-byte payload, as resolvers
 * advise for UDP; a truncated answer is asked again over TCP by c-ares. 0 or an ARES_* status. */
static int send_dnssec(struct dns_query *q, const char *name, int type, int mode)
{
    unsigned char *buf = NULL;
    int len = 0;
    int st = ares_create_query(name, ns_c_in, type, 0, 1, &buf, &len, 1232);
    if (st != ARES_SUCCESS)
        return st;
    if (len < 12) {
        ares_free_string(buf);
        return ARES_EBADQUERY;
    }
    buf[3] |= 0x20;
    if (mode == DNSSEC_CD)
        buf[3] |= 0x10;
    ares_send(q->res->channel, buf, len, answer_cb, q);
    ares_free_string(buf);
    return 0;
}

/* r:query(name, "A"|"AAAA"|"MX"|"TXT"|"PTR"|"TLSA"[, "ad"|"cd"]) -> id | nil, msg */
static int l_query(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    const char *tname = luaL_checkstring(L, 3);
    int type = -1;
    for (int i = 0; i < T_COUNT; i++)
        if (strcmp(tname, query_type_name[i]) == 0)
            type = i;
    if (type < 0)
        return luaL_argerror(L, 3, "\"A\", \"AAAA\", \"MX\", \"TXT\", \"PTR\" or \"TLSA\" expected");
    int dnssec = 0;
    if (!lua_isnoneornil(L, 4)) {
        const char *m = luaL_checkstring(L, 4);
        if (strcmp(m, "ad") == 0)
            dnssec = DNSSEC_AD;
        else if (strcmp(m, "cd") == 0)
            dnssec = DNSSEC_CD;
        else
            return luaL_argerror(L, 4, "\"ad\" or \"cd\" expected");
    }
    if (type == T_TLSAREC && !dnssec)
        return luaL_argerror(L, 4, "TLSA is asked with \"ad\" or \"cd\" (DANE needs the AD bit)");
    if (len == 0 || len > DNS_HOST_MAX + 1 || strlen(name) != len || !dns_valid_qname(name)) {
        lua_pushnil(L);
        lua_pushliteral(L, "badname");
        return 2;
    }
    if (lr->r.nqueries >= DNS_MAX_QUERIES) {
        lua_pushnil(L);
        lua_pushliteral(L, "too many queries in flight");
        return 2;
    }
    struct dns_query *q = calloc(1, sizeof *q);
    if (!q)
        return luaL_error(L, "out of memory");
    q->res = &lr->r;
    q->id = ++lr->r.next_id;
    q->type = type;
    q->state = Q_PENDING;
    q->dnssec = dnssec;
    q->next = lr->r.queries;
    lr->r.queries = q;
    lr->r.nqueries++;
    /* May call answer_cb at once (e.g. a bad name): the query is already linked. */
    if (dnssec) {
        int st = send_dnssec(q, name, query_type_ns[type], dnssec);
        if (st) {
            q->state = Q_DONE;
            q->status = st;
        }
    } else {
        ares_query(lr->r.channel, name, ns_c_in, query_type_ns[type], answer_cb, q);
    }
    lua_pushinteger(L, q->id);
    return 1;
}

static void push_result(lua_State *L, struct dns_query *q)
{
    if (q->type == T_TLSAREC) {
        struct dns_tlsa_answer a;
        int st = dns_parse_tlsa(q->abuf, q->alen, &a);
        if (st != ARES_SUCCESS) {
            lua_pushnil(L);
            lua_pushstring(L, status_name(st));
            return;
        }
        lua_createtable(L, a.count, 2);
        for (int i = 0; i < a.count; i++) {
            lua_createtable(L, 0, 4);
            lua_pushinteger(L, a.usage[i]);
            lua_setfield(L, -2, "usage");
            lua_pushinteger(L, a.selector[i]);
            lua_setfield(L, -2, "selector");
            lua_pushinteger(L, a.mtype[i]);
            lua_setfield(L, -2, "mtype");
            lua_pushlstring(L, (const char *)a.data[i], a.len[i]);
            lua_setfield(L, -2, "data");
            lua_rawseti(L, -2, i + 1);
        }
        lua_pushinteger(L, a.dropped);
        lua_setfield(L, -2, "dropped");
        dns_tlsa_free(&a);
        lua_pushnil(L);
        return;
    }
    if (q->type == T_TXTREC || q->type == T_PTRREC) {
        /* Both are lists of strings with a count of records left out. */
        struct dns_txt_answer t;
        struct dns_ptr_answer p;
        const char *rec[DNS_MAX_TXT > DNS_MAX_PTR ? DNS_MAX_TXT : DNS_MAX_PTR];
        size_t len[DNS_MAX_TXT > DNS_MAX_PTR ? DNS_MAX_TXT : DNS_MAX_PTR];
        int st, count, dropped;
        if (q->type == T_TXTREC) {
            st = dns_parse_txt(q->abuf, q->alen, &t);
            count = t.count, dropped = t.dropped;
            for (int i = 0; i < count; i++)
                rec[i] = t.rec[i], len[i] = t.len[i];
        } else {
            st = dns_parse_ptr(q->abuf, q->alen, &p);
            count = p.count, dropped = p.dropped;
            for (int i = 0; i < count; i++)
                rec[i] = p.name[i], len[i] = strlen(p.name[i]);
        }
        if (st != ARES_SUCCESS && st != ARES_ENODATA) {
            lua_pushnil(L);
            lua_pushstring(L, status_name(st));
            return;
        }
        lua_createtable(L, count, 1);
        for (int i = 0; i < count; i++) {
            lua_pushlstring(L, rec[i], len[i]);
            lua_rawseti(L, -2, i + 1);
        }
        lua_pushinteger(L, dropped);
        lua_setfield(L, -2, "dropped");
        if (q->type == T_TXTREC && st == ARES_SUCCESS)
            dns_txt_free(&t);
        lua_pushnil(L);
        return;
    }
    if (q->type == T_MXREC) {
        struct dns_mx_answer a;
        int st = dns_parse_mx(q->abuf, q->alen, &a);
        if (st != ARES_SUCCESS && st != ARES_ENODATA) {
            lua_pushnil(L);
            lua_pushstring(L, status_name(st));
            return;
        }
        lua_createtable(L, a.count, 2);
        for (int i = 0; i < a.count; i++) {
            lua_createtable(L, 0, 2);
            lua_pushstring(L, a.mx[i].host);
            lua_setfield(L, -2, "host");
            lua_pushinteger(L, a.mx[i].preference);
            lua_setfield(L, -2, "preference");
            lua_rawseti(L, -2, i + 1);
        }
        if (a.null_mx) {
            lua_pushboolean(L, 1);
            lua_setfield(L, -2, "null");
        }
        lua_pushinteger(L, a.dropped);
        lua_setfield(L, -2, "dropped");
        lua_pushnil(L);
        return;
    }
    struct dns_addr_answer a;
    int st = dns_parse_addrs(q->abuf, q->alen, q->type == T_ADDR4 ? AF_INET : AF_INET6, &a);
    if (st != ARES_SUCCESS && st != ARES_ENODATA) {
        lua_pushnil(L);
        lua_pushstring(L, status_name(st));
        return;
    }
    lua_createtable(L, a.count, 0);
    for (int i = 0; i < a.count; i++) {
        lua_pushstring(L, a.addr[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_pushnil(L);
}

/* r:result(id) -> answer | nil, "pending" | nil, errname. A finished query is consumed.
 * A query sent with "ad" or "cd" has `secure` (the AD bit) in its answer, and a failure by
 * response code also gives it as a third value (a validated NXDOMAIN is a secure denial).
 * TLSA: a list of {usage=, selector=, mtype=, data=} (data binary).
 * Answers: A/AAAA a list of address strings; MX a list of {host=, preference=} with fields
 * null (a null MX) and dropped (records left out); TXT a list of strings (each record's
 * character-strings joined); PTR a list of host names; TXT and PTR lists carry `dropped` too.
 * NOERROR without records is an empty list. */
static int l_result(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    struct dns_query *q = find_query(&lr->r, (long)luaL_checkinteger(L, 2));
    if (!q)
        return luaL_argerror(L, 2, "no such query");
    if (q->state == Q_PENDING) {
        lua_pushnil(L);
        lua_pushstring(L, query_state_name[Q_PENDING]);
        return 2;
    }
    if (q->dnssec && q->status == ARES_SUCCESS) {
        /* Raw answer: the response code is ours to read, and the AD bit says whether the
         * resolver validated it (secure) -- for a denial too (NXDOMAIN, NODATA). */
        int rcode = dns_header_rcode(q->abuf, q->alen);
        int ad = dns_header_ad(q->abuf, q->alen) == 1;
        if (rcode == 0) {
            int an = q->alen >= 12 ? ((q->abuf[6] << 8) | q->abuf[7]) : 0;
            if (an == 0 && q->type != T_TLSAREC)
                lua_newtable(L), lua_pushnil(L);
            else
                push_result(L, q);
            if (lua_istable(L, -2)) {
                lua_pushboolean(L, ad);
                lua_setfield(L, -3, "secure");
            }
            unlink_query(&lr->r, q);
            return 2;
        }
        lua_pushnil(L);
        lua_pushstring(L, rcode < 0 ? "badresp" : rcode == 3 ? "nxdomain" : rcode == 2 ? "servfail"
                          : rcode == 5 ? "refused" : rcode == 4 ? "notimp" : rcode == 1 ? "formerr"
                          : "error");
        lua_pushboolean(L, ad);
        unlink_query(&lr->r, q);
        return 3;
    } else if (q->status == ARES_SUCCESS) {
        push_result(L, q);
    } else if (q->status == ARES_ENODATA) {
        /* NOERROR with nothing of that type: an empty answer, not a failure. */
        lua_newtable(L);
        lua_pushnil(L);
    } else {
        lua_pushnil(L);
        lua_pushstring(L, status_name(q->status));
    }
    unlink_query(&lr->r, q);
    return 2;
}

/* r:cancel(id): forget a query; its answer, if it ever comes, is dropped. */
static int l_cancel(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    struct dns_query *q = find_query(&lr->r, (long)luaL_checkinteger(L, 2));
    if (q) {
        if (q->state == Q_PENDING)
            q->state = Q_ABANDONED;
        else
            unlink_query(&lr->r, q);
    }
    return 0;
}

/* r:servers() -> { "ip", ... }: the servers the channel asks (the system's unless nameservers
 * were given), so that a caller trusting the AD bit can check they are on loopback. */
static int l_servers(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    struct ares_addr_port_node *list = NULL;
    int n = 0;
    lua_newtable(L);
    if (ares_get_servers_ports(lr->r.channel, &list) != ARES_SUCCESS)
        return 1;
    for (struct ares_addr_port_node *p = list; p; p = p->next) {
        char buf[INET6_ADDRSTRLEN];
        if (inet_ntop(p->family, p->family == AF_INET ? (const void *)&p->addr.addr4
                                                     : (const void *)&p->addr.addr6, buf, sizeof buf)) {
            lua_pushstring(L, buf);
            lua_rawseti(L, -2, ++n);
        }
    }
    ares_free_data(list);
    return 1;
}

static int l_fd(lua_State *L)
{
    lua_pushinteger(L, check_resolver(L)->r.epfd);
    return 1;
}

static int l_events(lua_State *L)
{
    check_resolver(L);
    lua_pushliteral(L, "r");
    return 1;
}

/* r:timeout() -> seconds until c-ares wants :process() for its timers, or nil when idle. */
static int l_timeout(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    struct timeval tv;
    if (!ares_timeout(lr->r.channel, NULL, &tv)) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, (double)tv.tv_sec + (double)tv.tv_usec / 1e6);
    return 1;
}

/* r:process() -> number of queries still pending. Never waits. */
static int l_process(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    resolver_process(&lr->r);
    int n = 0;
    for (struct dns_query *q = lr->r.queries; q; q = q->next)
        n += q->state == Q_PENDING;
    lua_pushinteger(L, n);
    return 1;
}

/* r:wait(seconds): blocks on the epoll fd for at most `seconds` (and no longer than c-ares's own
 * next timer), then processes. For callers with no scheduler at all. */
static int l_wait(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    double t = luaL_optnumber(L, 2, 0);
    struct timeval tv;
    if (ares_timeout(lr->r.channel, NULL, &tv)) {
        double at = (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
        if (at < t)
            t = at;
    }
    if (t < 0)
        t = 0;
    struct epoll_event ev;
    int ms = (int)(t * 1000 + 0.999);
    while (epoll_wait(lr->r.epfd, &ev, 1, ms) < 0 && errno == EINTR)
        ;
    return l_process(L);
}

/* r:hosts(name) -> { addresses } from the hosts file (IPv6 first), or nil. Reads a local file. */
static int l_hosts(lua_State *L)
{
    struct lresolver *lr = check_resolver(L);
    const char *name = luaL_checkstring(L, 2);
    static const int fam[2] = { AF_INET6, AF_INET };
    int n = 0;
    lua_newtable(L);
    for (int f = 0; f < 2; f++) {
        struct hostent *h = NULL;
        if (ares_gethostbyname_file(lr->r.channel, name, fam[f], &h) != ARES_SUCCESS || !h)
            continue;
        for (int i = 0; h->h_addr_list && h->h_addr_list[i] && n < DNS_MAX_ADDRS; i++) {
            char buf[DNS_ADDR_MAX];
            if (h->h_addrtype == fam[f] && inet_ntop(fam[f], h->h_addr_list[i], buf, sizeof buf)) {
                lua_pushstring(L, buf);
                lua_rawseti(L, -2, ++n);
            }
        }
        ares_free_hostent(h);
    }
    if (n == 0)
        lua_pushnil(L);
    return 1;
}

static int l_close(lua_State *L)
{
    struct lresolver *lr = luaL_checkudata(L, 1, RESOLVER);
    resolver_destroy(&lr->r);
    return 0;
}

static int l_tostring(lua_State *L)
{
    struct lresolver *lr = luaL_checkudata(L, 1, RESOLVER);
    if (lr->r.live)
        lua_pushfstring(L, RESOLVER " (fd %d, %d queries)", lr->r.epfd, lr->r.nqueries);
    else
        lua_pushliteral(L, RESOLVER " (closed)");
    return 1;
}

static const luaL_Reg methods[] = {
    { "query", l_query },   { "result", l_result }, { "cancel", l_cancel },
    { "fd", l_fd },         { "pollfd", l_fd },     { "events", l_events },
    { "timeout", l_timeout }, { "process", l_process }, { "wait", l_wait },
    { "hosts", l_hosts },   { "close", l_close },   { "servers", l_servers },
    { NULL, NULL },
};

static const luaL_Reg metamethods[] = {
    { "__gc", l_close }, { "__close", l_close }, { "__tostring", l_tostring }, { NULL, NULL },
};

/* 1 when s is a valid host name (for the Lua layer's checks on names it is given). */
static int l_valid_hostname(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_pushboolean(L, strlen(s) == len && dns_valid_hostname(s));
    return 1;
}

int smtp_open_dns(lua_State *L)
{
    ares_library_init(ARES_LIB_INIT_ALL);
    smtp_newclass(L, RESOLVER, methods, metamethods);
    lua_pushcfunction(L, l_resolver);
    lua_setfield(L, -2, "resolver");
    lua_pushcfunction(L, l_valid_hostname);
    lua_setfield(L, -2, "valid_hostname");
    return 0;
}
