/* Lua binding of the server engine (server.h): core.server_engine{...}. Only the engine's header
 * API is used here. */
#include <string.h>
#include "core.h"
#include "server.h"
#include "net.h"

#define ENGINE_MT "smtp.server_engine"

typedef struct { smtp_server *s; } lengine;

/* The hot methods (see smtp_open_server) carry the engine's metatable as upvalue `up`
 * (smtp_check_class: a server makes ~27 engine calls per message). */
static smtp_server *check_engine_up(lua_State *L, int up)
{
    lengine *e = smtp_check_class(L, 1, up, ENGINE_MT);
    if (!e->s)
        luaL_error(L, "server engine already freed");
    return e->s;
}

static smtp_server *check_engine(lua_State *L) { return check_engine_up(L, 1); }

static lua_Integer opt_int(lua_State *L, int t, const char *k, lua_Integer d)
{
    lua_getfield(L, t, k);
    lua_Integer v = lua_isnil(L, -1) ? d : luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    return v;
}

static int opt_bool(lua_State *L, int t, const char *k)
{
    lua_getfield(L, t, k);
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* core.server_engine{ hostname=, max_line=, max_message_size=, max_recipients=, max_errors=,
 *   max_commands=, max_transactions=,
 *   out_cap=, tls=, tls_active=, auth=, auth_plaintext=, require_auth=, normalize=, hook_mail=,
 *   hook_rcpt=, hook_helo=, hook_rset=, hook_data=, hook_starttls=, xclient= (0, 1 refused, 2
 *   trusted), lmtp=, requiretls= } -> engine
 *   (its greeting already queued) */
static int l_engine_new(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    smtp_server_config c;
    memset(&c, 0, sizeof c);
    lua_getfield(L, 1, "hostname");
    c.hostname = luaL_optstring(L, -1, "localhost");
    c.max_line = (size_t)opt_int(L, 1, "max_line", 512);
    c.max_message_size = (size_t)opt_int(L, 1, "max_message_size", 0);
    c.max_recipients = (unsigned)opt_int(L, 1, "max_recipients", 100);
    c.max_errors = (unsigned)opt_int(L, 1, "max_errors", SMTP_SERVER_MAX_ERRORS_DEFAULT);
    c.max_commands = (unsigned)opt_int(L, 1, "max_commands", 0);
    c.max_transactions = (unsigned)opt_int(L, 1, "max_transactions", 0);
    c.out_cap = (size_t)opt_int(L, 1, "out_cap", 64 * 1024);
    c.tls_available = opt_bool(L, 1, "tls");
    c.tls_active = opt_bool(L, 1, "tls_active");
    c.auth_enabled = opt_bool(L, 1, "auth");
    c.auth_plaintext = opt_bool(L, 1, "auth_plaintext");
    c.require_auth = opt_bool(L, 1, "require_auth");
    c.normalize_newlines = opt_bool(L, 1, "normalize");
    c.hook_mail = opt_bool(L, 1, "hook_mail");
    c.hook_rcpt = opt_bool(L, 1, "hook_rcpt");
    c.lmtp = opt_bool(L, 1, "lmtp");
    c.hook_helo = opt_bool(L, 1, "hook_helo");
    c.hook_rset = opt_bool(L, 1, "hook_rset");
    c.requiretls = opt_bool(L, 1, "requiretls");
    c.hook_data = opt_bool(L, 1, "hook_data");
    c.hook_starttls = opt_bool(L, 1, "hook_starttls");
    c.xclient = (int)opt_int(L, 1, "xclient", 0);
    if (c.xclient < 0 || c.xclient > 2)
        return luaL_argerror(L, 1, "xclient must be 0, 1 or 2");
    if (c.max_line < 64 || c.max_line > 65536)
        return luaL_argerror(L, 1, "max_line must be within 64..65536");
    lengine *e = lua_newuserdata(L, sizeof *e);
    e->s = NULL;
    luaL_setmetatable(L, ENGINE_MT);
    e->s = smtp_server_new(&c);
    if (!e->s)
        return luaL_error(L, "out of memory");
    return 1;
}

static int l_engine_gc(lua_State *L)
{
    lengine *e = luaL_checkudata(L, 1, ENGINE_MT);
    smtp_server_free(e->s);
    e->s = NULL;
    return 0;
}

/* e:feed(str [, i]) -> bytes taken from str starting at byte i */
static int l_feed(lua_State *L)
{
    smtp_server *s = check_engine(L);
    size_t len;
    const char *d = luaL_checklstring(L, 2, &len);
    lua_Integer i = luaL_optinteger(L, 3, 1);
    if (i < 1 || (size_t)i > len + 1)
        return luaL_argerror(L, 3, "out of range");
    lua_pushinteger(L, (lua_Integer)smtp_server_feed(s, d + i - 1, len - (size_t)(i - 1)));
    return 1;
}

/* e:recv(sock [, max]) -> bytes taken | nil, "wantread"/"wantwrite" | nil, "closed" | nil, msg,
 * code: one read of the socket straight into the engine's input (as sock:read then e:feed, without
 * the string between them: a 4 KB message was copied and collected once more that way). At most
 * max bytes (default: all the engine can take). A closed engine's input is read and dropped. */
static int l_recv(lua_State *L)
{
    smtp_server *s = check_engine_up(L, 2);
    lua_Integer max = luaL_optinteger(L, 3, SMTP_READ_MAX);
    size_t room, got;
    int n;
    if (max < 1)
        return luaL_argerror(L, 3, "max must be positive");
    char *p = smtp_server_feed_buf(s, &room);
    if (!p) {
        char scratch[4096];
        if ((n = smtp_sock_read(L, 2, scratch, sizeof scratch, &got)) != 0)
            return n;
    } else {
        if ((size_t)max < room)
            room = (size_t)max;
        n = smtp_sock_read(L, 2, p, room, &got);
        smtp_server_fed(s, got);
        if (n)
            return n;
    }
    lua_pushinteger(L, (lua_Integer)got);
    return 1;
}

/* e:space() -> bytes the engine can take now, and whether it holds part of a command line (the
 * server's command deadline runs then) */
static int l_space(lua_State *L)
{
    smtp_server *s = check_engine(L);
    smtp_server_usage u;
    smtp_server_get_usage(s, &u);
    lua_pushinteger(L, (lua_Integer)smtp_server_space(s));
    lua_pushboolean(L, u.partial);
    return 2;
}

static void push_params(lua_State *L, const smtp_server_params *p)
{
    lua_createtable(L, 0, 4);
    if (p->size >= 0) {
        lua_pushinteger(L, (lua_Integer)p->size);
        lua_setfield(L, -2, "SIZE");
    }
    if (p->smtputf8) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "SMTPUTF8");
    }
    if (p->requiretls) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "REQUIRETLS");
    }
    const char *names[] = { "BODY", "RET", "ENVID", "NOTIFY", "ORCPT" };
    const char *vals[] = { p->body, p->ret, p->envid, p->notify, p->orcpt };
    for (int i = 0; i < 5; i++) {
        if (vals[i]) {
            lua_pushstring(L, vals[i]);
            lua_setfield(L, -2, names[i]);
        }
    }
}

/* e:next([skip]) -> nil (needs input) | nil, "write" (write the output first) | "mail", addr, params | "rcpt", addr, params | "begin" | "data", chunk (true with skip) |
 *   "end", code|nil, text | "auth", mechanism, user, secret | "starttls" | "close" |
 *   "helo", name, "HELO"|"EHLO" | "rset" | "xclient", { NAME = value, ... } | "data_command" |
 *   "starttls_command" */
static int l_next(lua_State *L)
{
    smtp_server *s = check_engine(L);
    int skip = lua_toboolean(L, 2);
    lua_settop(L, 1);
    smtp_server_event ev;
    int k = smtp_server_next(s, &ev);
    if (k == SMTP_SRV_NONE) {
        lua_pushnil(L);
        if (smtp_server_want_write(s)) {
            lua_pushliteral(L, "write");
            return 2;
        }
        return 1;
    }
    lua_pushstring(L, smtp_server_event_names[k]);
    switch (k) {
    case SMTP_SRV_MAIL:
    case SMTP_SRV_RCPT:
        lua_pushlstring(L, ev.a, ev.alen);
        push_params(L, ev.params);
        return 3;
    case SMTP_SRV_DATA:
        /* e:next(true): data nobody will read comes as true, not as a string copied and collected */
        if (skip)
            lua_pushboolean(L, 1);
        else
            lua_pushlstring(L, ev.a, ev.alen);
        return 2;
    case SMTP_SRV_END:
        if (ev.code) {
            lua_pushinteger(L, ev.code);
            lua_pushlstring(L, ev.a, ev.alen);
            return 3;
        }
        return 1;
    case SMTP_SRV_AUTH:
        lua_pushlstring(L, ev.a, ev.alen);
        lua_pushlstring(L, ev.b, ev.blen);
        lua_pushlstring(L, ev.c, ev.clen);
        return 4;
    case SMTP_SRV_HELO:
        lua_pushlstring(L, ev.a, ev.alen);
        lua_pushlstring(L, ev.b, ev.blen);
        return 3;
    case SMTP_SRV_XCLIENT:
        lua_newtable(L);
        for (size_t i = 0; i < ev.alen;) {
            const char *n = ev.a + i, *v = n + strlen(n) + 1;
            lua_pushstring(L, v);
            lua_setfield(L, -2, n);
            i = (size_t)(v - ev.a) + strlen(v) + 1;
        }
        return 2;
    case SMTP_SRV_CLOSE:
        /* "close", "out of memory" when the engine gave up (its 421 is in the output) */
        if (smtp_server_error(s)) {
            lua_pushstring(L, smtp_server_error(s));
            return 2;
        }
        return 1;
    default:
        return 1;
    }
}

/* RFC 3463: class "." subject "." detail, class 2, 4 or 5, subject and detail 1 to 3 digits. */
static int enh_valid(const char *e)
{
    if ((e[0] != '2' && e[0] != '4' && e[0] != '5') || e[1] != '.')
        return 0;
    e += 2;
    for (int part = 0; part < 2; part++) {
        int n = 0;
        while (*e >= '0' && *e <= '9' && n < 4) {
            e++;
            n++;
        }
        if (n < 1 || n > 3 || *e != (part ? '\0' : '.'))
            return 0;
        e++;
    }
    return 1;
}

/* e:decide(ok [, code, enhanced, text]) */
static int l_decide(lua_State *L)
{
    smtp_server *s = check_engine(L);
    int ok = lua_toboolean(L, 2);
    int code = (int)luaL_optinteger(L, 3, 0);
    const char *enh = luaL_optstring(L, 4, NULL);
    const char *text = luaL_optstring(L, 5, NULL);
    if (code && (code < 200 || code > 599))
        return luaL_argerror(L, 3, "reply code out of range");
    if (text && strpbrk(text, "\r\n"))
        return luaL_argerror(L, 5, "CR or LF in reply text");
    if (enh && !enh_valid(enh))
        return luaL_argerror(L, 4, "bad enhanced status code");
    /* once the session is shut down (a dropped connection) a decision changes nothing */
    if (smtp_server_decide(s, ok, code, enh, text) < 0 && !smtp_server_closed(s))
        return luaL_error(L, "no decision pending");
    return 0;
}

/* e:output() -> pending reply bytes (taken) or nil */
static int l_output(lua_State *L)
{
    smtp_server *s = check_engine(L);
    size_t n;
    int parts = 0;
    const char *p;
    /* at most two pieces: the replies, then a 421 that did not fit after running out of memory */
    while (parts < 2 && (p = smtp_server_output(s, &n)) != NULL && n) {
        lua_pushlstring(L, p, n);
        smtp_server_output_done(s, n);
        parts++;
    }
    if (!parts)
        lua_pushnil(L);
    else if (parts == 2)
        lua_concat(L, 2);
    return 1;
}

static int l_envelope(lua_State *L)
{
    smtp_server *s = check_engine(L);
    const smtp_server_params *p;
    const char *from = smtp_server_from(s, &p);
    if (!from) {
        lua_pushnil(L);
        return 1;
    }
    unsigned n = smtp_server_rcpt_count(s);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, from);
    lua_setfield(L, -2, "from");
    push_params(L, p);
    lua_setfield(L, -2, "params");
    if (p->requiretls) {
        /* RFC 8689: the next hop must honour it, so it is a field of its own */
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "requiretls");
    }
    lua_createtable(L, (int)n, 0);
    lua_createtable(L, (int)n, 0);
    for (unsigned i = 0; i < n; i++) {
        const smtp_server_params *rp = NULL;
        lua_pushstring(L, smtp_server_rcpt(s, i, &rp));
        lua_rawseti(L, -3, (lua_Integer)i + 1);
        push_params(L, rp);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -3, "rcpt_params");
    lua_setfield(L, -2, "to");
    return 1;
}

static int l_shutdown(lua_State *L)
{
    smtp_server *s = check_engine(L);
    int code = (int)luaL_optinteger(L, 2, 421);
    const char *enh = luaL_optstring(L, 3, "4.3.2");
    const char *text = luaL_optstring(L, 4, "Service shutting down");
    if (code < 400 || code > 599)
        return luaL_argerror(L, 2, "reply code out of range");
    if (!enh_valid(enh))
        return luaL_argerror(L, 3, "bad enhanced status code");
    if (strpbrk(text, "\r\n"))
        return luaL_argerror(L, 4, "CR or LF in reply");
    smtp_server_shutdown(s, code, enh, text);
    return 0;
}

/* e:closed(), e:state(), e:helo(), e:user(), e:tls(): one engine fact each */
#define ENGINE_GETTER(name, push, get)                                                             \
    static int l_##name(lua_State *L)                                                              \
    {                                                                                              \
        push(L, get(check_engine(L)));                                                             \
        return 1;                                                                                  \
    }
ENGINE_GETTER(closed, lua_pushboolean, smtp_server_closed)
ENGINE_GETTER(state, lua_pushstring, smtp_server_state_name)
ENGINE_GETTER(helo, lua_pushstring, smtp_server_helo)
ENGINE_GETTER(helo_kind, lua_pushinteger, smtp_server_helo_kind)
ENGINE_GETTER(rcpt_count, lua_pushinteger, smtp_server_rcpt_count)
ENGINE_GETTER(user, lua_pushstring, smtp_server_user)
ENGINE_GETTER(tls, lua_pushboolean, smtp_server_tls)
/* e:lmtp_due(): LMTP replies still to decide for the pending "end" (one per accepted recipient) */
ENGINE_GETTER(lmtp_due, lua_pushinteger, smtp_server_lmtp_due)

/* e:usage() -> commands, errors, partial, limit|nil, transactions: what the session used (read
 * for the command deadline while part of a line waits, for the tarpit and at the end) */
static int l_usage(lua_State *L)
{
    smtp_server_usage u;
    smtp_server_get_usage(check_engine(L), &u);
    lua_pushinteger(L, (lua_Integer)u.commands);
    lua_pushinteger(L, (lua_Integer)u.errors);
    lua_pushboolean(L, u.partial);
    if (u.limit)
        lua_pushstring(L, u.limit);
    else
        lua_pushnil(L);
    lua_pushinteger(L, (lua_Integer)u.transactions);
    return 5;
}

/* e:trace(level): 0 off, 1 record the lines read (credentials replaced) for e:trace_take(), 2
 * the message data too */
static int l_trace(lua_State *L)
{
    smtp_server *s = check_engine(L);
    lua_Integer level = luaL_checkinteger(L, 2);
    luaL_argcheck(L, level >= 0 && level <= 2, 2, "0, 1 or 2 expected");
    smtp_server_set_trace(s, (int)level);
    return 0;
}

/* e:trace_take() -> nil | { kind, value, ... } (smtp_push_trace): lines read since the last call */
static int l_trace_take(lua_State *L)
{
    smtp_server *s = check_engine(L);
    size_t n;
    const char *p = smtp_server_trace(s, &n);
    smtp_push_trace(L, p, n);
    smtp_server_trace_taken(s);
    return 1;
}

/* e:hooks(mail, rcpt, data, starttls): which of those commands wait for a decision from now on */
static int l_hooks(lua_State *L)
{
    smtp_server *s = check_engine(L);
    smtp_server_set_hooks(s, lua_toboolean(L, 2), lua_toboolean(L, 3), lua_toboolean(L, 4),
                          lua_toboolean(L, 5));
    return 0;
}

static int l_engine_tostring(lua_State *L)
{
    lengine *e = luaL_checkudata(L, 1, ENGINE_MT);
    lua_pushfstring(L, ENGINE_MT " (%s)", e->s ? smtp_server_state_name(e->s) : "freed");
    return 1;
}

int smtp_open_server(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "feed", l_feed }, { "recv", l_recv }, { "space", l_space }, { "next", l_next }, { "decide", l_decide },
        { "output", l_output }, { "envelope", l_envelope }, { "shutdown", l_shutdown },
        { "closed", l_closed }, { "state", l_state }, { "helo", l_helo }, { "helo_kind", l_helo_kind },
        { "rcpt_count", l_rcpt_count },
        { "user", l_user },
        { "tls", l_tls }, { "usage", l_usage }, { "trace", l_trace },
        { "trace_take", l_trace_take }, { "lmtp_due", l_lmtp_due },
        { "hooks", l_hooks }, { NULL, NULL }
    };
    static const luaL_Reg meta[] = {
        { "__gc", l_engine_gc }, { "__tostring", l_engine_tostring }, { NULL, NULL }
    };
    /* the methods of the per-message path again, as closures over the metatable (check_engine) */
    static const luaL_Reg hot[] = {
        { "feed", l_feed }, { "space", l_space }, { "next", l_next }, { "decide", l_decide },
        { "output", l_output }, { "envelope", l_envelope }, { "helo", l_helo }, { "user", l_user },
        { "closed", l_closed }, { NULL, NULL }
    };
    smtp_newclass(L, ENGINE_MT, methods, meta);
    smtp_class_closures(L, ENGINE_MT, hot);
    luaL_getmetatable(L, ENGINE_MT);
    lua_getfield(L, -1, "__index");
    /* e:recv(sock): the socket's metatable first (smtp_check_sock), then the engine's */
    luaL_getmetatable(L, SMTP_SOCKET);
    lua_pushvalue(L, -3);
    lua_pushcclosure(L, l_recv, 2);
    lua_setfield(L, -2, "recv");
    lua_pop(L, 2);
    lua_pushcfunction(L, l_engine_new);
    lua_setfield(L, -2, "server_engine");
    return 0;
}
