/* Lua binding of the client engine (client.h): core.client_engine() and core.stuffer(). Only the
 * engine's header API is used here. */
#include <stdint.h>
#include <string.h>
#include "core.h"
#include "client.h"
#include "net.h"

#define ENGINE "smtp.client_engine"
#define STUFFER "smtp.stuffer"

typedef struct {
    smtp_client *c;
} engine_ud;

static smtp_client *check_engine(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    if (!u->c)
        luaL_error(L, "client engine is closed");
    return u->c;
}

static int l_engine_new(lua_State *L)
{
    engine_ud *u = lua_newuserdata(L, sizeof *u);
    u->c = NULL;
    luaL_setmetatable(L, ENGINE);
    u->c = smtp_client_new();
    if (!u->c)
        return luaL_error(L, "out of memory");
    return 1;
}

static int l_engine_gc(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    smtp_client_free(u->c);
    u->c = NULL;
    return 0;
}

static int l_engine_tostring(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    lua_pushfstring(L, ENGINE " (%s)",
                    u->c ? smtp_client_state_names[smtp_client_get_state(u->c)] : "closed");
    return 1;
}

/* Callers pass `why` only after the engine call has set it: C leaves the order in which
 * arguments are evaluated open, so result(L, f(&why), why) could read it before f ran. */
static int result(lua_State *L, int rc, const char *why)
{
    if (rc == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
}

/* e:feed(bytes) -> true | nil, err */
static int l_engine_feed(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    int rc = smtp_client_feed(c, s, n);
    return result(L, rc, smtp_client_error(c));
}

/* e:reply() -> reply table (with .command, and .more = true when LMTP has more replies to the
 * same end of data) | nil (more input needed) | nil, err */
static int l_engine_reply(lua_State *L)
{
    smtp_client *c = check_engine(L);
    const smtp_reply *r;
    smtp_cmd cmd;
    int rc = smtp_client_next(c, &r, &cmd);
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, smtp_client_error(c));
        return 2;
    }
    if (rc == 0) {
        lua_pushnil(L);
        return 1;
    }
    smtp_reply_push(L, r, (cmd == SMTP_CMD_EHLO && r->code / 100 == 2));
    lua_pushstring(L, smtp_cmd_names[cmd]);
    lua_setfield(L, -2, "command");
    if (smtp_client_lmtp_due(c)) {
        /* LMTP: another reply to the same end of data follows (the next recipient's) */
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "more");
    }
    return 1;
}

static const char *opt_value(lua_State *L, int i, size_t *n)
{
    if (lua_isnoneornil(L, i)) {
        *n = 0;
        return NULL;
    }
    return luaL_checklstring(L, i, n);
}

static int command(lua_State *L, smtp_cmd cmd, int has_arg, int has_params)
{
    smtp_client *c = check_engine(L);
    size_t alen = 0, plen = 0;
    const char *arg = has_arg ? luaL_checklstring(L, 2, &alen) : NULL;
    const char *params = has_params ? opt_value(L, 3, &plen) : NULL;
    const char *why = NULL;
    int rc = smtp_client_command(c, cmd, arg, alen, params, plen, &why);
    return result(L, rc, why);
}

static int l_ehlo(lua_State *L) { return command(L, SMTP_CMD_EHLO, 1, 0); }
static int l_helo(lua_State *L) { return command(L, SMTP_CMD_HELO, 1, 0); }
static int l_starttls(lua_State *L) { return command(L, SMTP_CMD_STARTTLS, 0, 0); }
/* e:mail(from [, params]) -> true, mark | nil, err: the mark is where the output stood before
 * MAIL (as e:mark() would say), for e:rollback(): a transaction starts with MAIL, so it needs no
 * second call for its mark. */
static int l_mail(lua_State *L)
{
    smtp_client_mark m = smtp_client_mark_now(check_engine(L));
    int n = command(L, SMTP_CMD_MAIL, 1, 1);
    if (n == 1) {
        lua_pushinteger(L, (lua_Integer)m);
        return 2;
    }
    return n;
}
static int l_rcpt(lua_State *L) { return command(L, SMTP_CMD_RCPT, 1, 1); }
static int l_data(lua_State *L) { return command(L, SMTP_CMD_DATA, 0, 0); }
static int l_rset(lua_State *L) { return command(L, SMTP_CMD_RSET, 0, 0); }
static int l_noop(lua_State *L) { return command(L, SMTP_CMD_NOOP, 0, 0); }
static int l_quit(lua_State *L) { return command(L, SMTP_CMD_QUIT, 0, 0); }

/* e:auth(mechanism, user, secret [, authzid]) -> true | nil, err */
static int l_auth(lua_State *L)
{
    smtp_client *c = check_engine(L);
    int mech = luaL_checkoption(L, 2, NULL, smtp_sasl_names);
    size_t ul, sl, zl;
    const char *user = luaL_checklstring(L, 3, &ul);
    const char *secret = luaL_checklstring(L, 4, &sl);
    const char *authz = opt_value(L, 5, &zl);
    const char *why = NULL;
    int rc = smtp_client_auth(c, (smtp_sasl)mech, user, ul, secret, sl, authz, zl, &why);
    return result(L, rc, why);
}

/* e:body(chunk) -> true | nil, err   (dot-stuffed, CRLF-normalized) */
static int l_body(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    int rc = smtp_client_body(c, s, n, &why);
    return result(L, rc, why);
}

static int l_body_end(lua_State *L)
{
    smtp_client *c = check_engine(L);
    const char *why = NULL;
    int rc = smtp_client_body_end(c, &why);
    return result(L, rc, why);
}

/* e:bdat(chunk, last) -> true | nil, err */
static int l_bdat(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    int rc = smtp_client_bdat(c, s, n, lua_toboolean(L, 3), &why);
    return result(L, rc, why);
}

/* e:bdat_last(message) -> true | nil, err: a whole message as one "BDAT n LAST" chunk, CRLF-
 * normalized (send_many's pipelined window). A message already in CRLF form, the usual case, is
 * queued without a copy; otherwise it is normalized into a scratch buffer first, since the chunk
 * size has to be known before the chunk. */
static int l_bdat_last(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    int clean = 1;
    for (size_t i = 0; i < n && clean; i++) {
        if (s[i] == '\r') {
            if (i + 1 < n && s[i + 1] == '\n')
                i++;
            else
                clean = 0;
        } else if (s[i] == '\n') {
            clean = 0;
        }
    }
    if (clean) {
        int rc = smtp_client_bdat(c, s, n, 1, &why);
        return result(L, rc, why);
    }
    smtp_stuffer st;
    smtp_buf b = {0};
    smtp_stuffer_init(&st, 0);
    if (smtp_stuff(&st, s, n, &b) < 0 || smtp_stuff_finish(&st, &b) < 0) {
        smtp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    int rc = smtp_client_bdat(c, b.p ? b.p : "", b.len, 1, &why);
    smtp_buf_free(&b);
    return result(L, rc, why);
}

/* e:take() -> the bytes to write ("" when none); they leave the engine */
static int l_take(lua_State *L)
{
    smtp_client *c = check_engine(L);
    smtp_buf *o = smtp_client_output(c);
    lua_pushlstring(L, o->p ? o->p : "", o->len);
    smtp_client_taken(c, o->len);
    return 1;
}

/* e:write_to(sock) -> nwritten | nil, want | nil, msg, code: one write of the pending output
 * straight from the engine's buffer to a native socket, no Lua string in between (a big body
 * leaves no garbage, AUTH secrets never reach the Lua heap); what went leaves the engine. */
static int l_write_to(lua_State *L)
{
    smtp_client *c = check_engine(L);
    smtp_buf *o = smtp_client_output(c);
    size_t put;
    int n = smtp_sock_write(L, 2, o->p ? o->p : "", o->len, &put);
    smtp_client_taken(c, put);
    return n;
}

/* e:outlen(), e:upgrade(), e:pending(), e:mark(): one number each. e:upgrade() returns the
 * bytes dropped (anything > 0 after the STARTTLS 220 is an attack); e:mark() where the output
 * stands now, for e:rollback(). */
static size_t outlen_of(smtp_client *c) { return smtp_client_output(c)->len; }
#define ENGINE_NUMBER(name, get)                                                                   \
    static int l_##name(lua_State *L)                                                              \
    {                                                                                              \
        lua_pushinteger(L, (lua_Integer)get(check_engine(L)));                                     \
        return 1;                                                                                  \
    }
ENGINE_NUMBER(outlen, outlen_of)
ENGINE_NUMBER(upgrade, smtp_client_upgrade)
ENGINE_NUMBER(pending, smtp_client_pending)
ENGINE_NUMBER(mark, smtp_client_mark_now)

/* e:shrink(): an idle session hands its engine's empty buffers back (smtp_client_shrink). */
static int l_shrink(lua_State *L)
{
    smtp_client_shrink(check_engine(L));
    return 0;
}

static int l_state(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushstring(L, smtp_client_state_names[smtp_client_get_state(c)]);
    return 1;
}



/* e:rollback(mark) -> true | nil, reason: drops the commands queued after the mark, if none of
 * their bytes has been taken or written yet */
static int l_rollback(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_Integer m = luaL_checkinteger(L, 2);
    const char *why = NULL;
    if (m < 0)
        return result(L, -1, "not a mark of this engine");
    int rc = smtp_client_rollback(c, (smtp_client_mark)m, &why);
    return result(L, rc, why);
}

/* e:lmtp(on): speak LMTP (client.h, smtp_client_set_lmtp) */
static int l_lmtp(lua_State *L)
{
    smtp_client *c = check_engine(L);
    smtp_client_set_lmtp(c, lua_toboolean(L, 2));
    return 0;
}

/* e:trace(level): 0 off, 1 lines (credentials replaced, body sizes), 2 body bytes too */
static int l_trace(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_Integer level = luaL_checkinteger(L, 2);
    luaL_argcheck(L, level >= 0 && level <= 2, 2, "0, 1 or 2 expected");
    smtp_client_set_trace(c, (int)level);
    return 0;
}

/* Transcript records (client.h's format, server.h uses it too) as a Lua list
 * { kind, value, kind, value, ... }: kind "line" (a line as sent or read), "secret" (a line whose
 * credentials were replaced by the marker), "size" (message bytes, a number) or "body" (message
 * bytes as sent). Pushes nil when there are none. */
void smtp_push_trace(lua_State *L, const char *p, size_t n)
{
    size_t i = 0;
    if (n == 0) {
        lua_pushnil(L);
        return;
    }
    lua_newtable(L);
    int k = 0;
    while (i + 5 <= n) {
        uint32_t len;
        char kind = p[i];
        memcpy(&len, p + i + 1, 4);
        const char *v = p + i + 5;
        if (len > n - i - 5)
            break;
        i += 5 + (size_t)len;
        switch (kind) {
        case SMTP_TRACE_LINE: lua_pushliteral(L, "line"); break;
        case SMTP_TRACE_SECRET: lua_pushliteral(L, "secret"); break;
        case SMTP_TRACE_SIZE: lua_pushliteral(L, "size"); break;
        default: lua_pushliteral(L, "body"); break;
        }
        lua_rawseti(L, -2, ++k);
        if (kind == SMTP_TRACE_SIZE) {
            unsigned long long total = 0;
            memcpy(&total, v, len < sizeof total ? len : sizeof total);
            lua_pushinteger(L, (lua_Integer)total);
        } else {
            lua_pushlstring(L, v, len);
        }
        lua_rawseti(L, -2, ++k);
    }
}

/* e:trace_take() -> nil | { kind, value, ... }: the records queued since the last call */
static int l_trace_take(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *p = smtp_client_trace(c, &n);
    smtp_push_trace(L, p, n);
    smtp_client_trace_taken(c);
    return 1;
}

/* ---- core.stuffer([dot = true]) --------------------------------------------------------- */

typedef struct {
    smtp_stuffer s;
    smtp_buf out;
} stuffer_ud;

static int l_stuffer_new(lua_State *L)
{
    int dot = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
    stuffer_ud *u = lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    smtp_stuffer_init(&u->s, dot);
    luaL_setmetatable(L, STUFFER);
    return 1;
}

static int push_out(lua_State *L, stuffer_ud *u, int rc)
{
    if (rc < 0)
        return luaL_error(L, "out of memory");
    lua_pushlstring(L, u->out.p ? u->out.p : "", u->out.len);
    u->out.len = 0;
    /* a big chunk should not pin a big buffer for the whole message */
    if (u->out.cap > (1u << 20))
        smtp_buf_free(&u->out);
    return 1;
}

/* st:feed(s) and st:add(s): stuff s into the stuffer's buffer */
static stuffer_ud *stuff_arg(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (u->s.finished)
        luaL_error(L, "stuffer already finished");
    if (smtp_stuff(&u->s, s, n, &u->out) < 0)
        luaL_error(L, "out of memory");
    return u;
}

static int l_stuffer_feed(lua_State *L)
{
    return push_out(L, stuff_arg(L), 0);
}

static int l_stuffer_finish(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    return push_out(L, u, smtp_stuff_finish(&u->s, &u->out));
}

/* st:add(s) -> bytes held: like feed, but the output stays in the stuffer (a BDAT chunk being
 * gathered; e:bdat_from(st, last) sends it). st:add_end() -> bytes held, after finishing. */
static int l_stuffer_add(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)stuff_arg(L)->out.len);
    return 1;
}

static int l_stuffer_add_end(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    if (!u->s.finished && smtp_stuff_finish(&u->s, &u->out) < 0)
        return luaL_error(L, "out of memory");
    lua_pushinteger(L, (lua_Integer)u->out.len);
    return 1;
}

/* e:bdat_from(st, last) -> true | nil, err: queues what the stuffer holds as one BDAT chunk
 * (copied into the output, the stuffer's buffer emptied and kept for the next chunk). */
static int l_bdat_from(lua_State *L)
{
    smtp_client *c = check_engine(L);
    stuffer_ud *u = luaL_checkudata(L, 2, STUFFER);
    const char *why = NULL;
    int rc = smtp_client_bdat(c, u->out.p ? u->out.p : "", u->out.len, lua_toboolean(L, 3), &why);
    if (rc == 0)
        u->out.len = 0;
    return result(L, rc, why);
}

static int l_stuffer_gc(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    smtp_buf_free(&u->out);
    return 0;
}

int smtp_open_client(lua_State *L)
{
    static const luaL_Reg engine_methods[] = {
        {"feed", l_engine_feed}, {"reply", l_engine_reply}, {"ehlo", l_ehlo},
        {"helo", l_helo}, {"starttls", l_starttls}, {"mail", l_mail}, {"rcpt", l_rcpt},
        {"data", l_data}, {"rset", l_rset}, {"noop", l_noop}, {"quit", l_quit},
        {"auth", l_auth}, {"body", l_body}, {"body_end", l_body_end}, {"bdat", l_bdat},
        {"bdat_last", l_bdat_last}, {"bdat_from", l_bdat_from}, {"take", l_take},
        {"write_to", l_write_to}, {"outlen", l_outlen}, {"upgrade", l_upgrade}, {"state", l_state},
        {"shrink", l_shrink}, {"pending", l_pending}, {"mark", l_mark}, {"rollback", l_rollback},
        {"trace", l_trace}, {"trace_take", l_trace_take}, {"lmtp", l_lmtp}, {NULL, NULL},
    };
    static const luaL_Reg engine_meta[] = {
        {"__gc", l_engine_gc}, {"__tostring", l_engine_tostring}, {NULL, NULL},
    };
    static const luaL_Reg stuffer_methods[] = {
        {"feed", l_stuffer_feed}, {"finish", l_stuffer_finish}, {"add", l_stuffer_add},
        {"add_end", l_stuffer_add_end}, {NULL, NULL},
    };
    static const luaL_Reg stuffer_meta[] = {{"__gc", l_stuffer_gc}, {NULL, NULL}};
    smtp_newclass(L, ENGINE, engine_methods, engine_meta);
    smtp_newclass(L, STUFFER, stuffer_methods, stuffer_meta);
    lua_pushcfunction(L, l_engine_new);
    lua_setfield(L, -2, "client_engine");
    lua_pushcfunction(L, l_stuffer_new);
    lua_setfield(L, -2, "stuffer");
    return 0;
}
