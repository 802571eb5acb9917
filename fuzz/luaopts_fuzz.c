/* libFuzzer harness for the Lua-facing option parsing of the C binding (linked with Lua 5.4):
 * core.server_engine{...} and its e:decide / e:shutdown arguments, core.tls_context{...},
 * core.resolver{...}, and the client engine's command arguments. The input builds the option
 * table (any value type, nested tables, and a metatable whose __index counts its calls, raises
 * on one of them or hands out fresh strings the table does not hold) and the call, which runs
 * through lua_pcall with the collector running all the time. Whatever the input, the outcome is
 * a result or a clean Lua error (a string): never a crash, a sanitizer report or a leak.
 * Path options (cafile, capath, cert, key) are always under /nonexistent-fuzz/ so that nothing
 * on the machine is read. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_smtp_core(lua_State *L);

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static uint8_t byte(input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static const char *const KEYS[] = {
    /* server_engine */
    "hostname", "max_line", "max_message_size", "max_recipients", "max_errors", "out_cap", "tls",
    "tls_active", "auth", "auth_plaintext", "require_auth", "normalize", "hook_mail", "hook_rcpt",
    /* tls_context */
    "mode", "verify", "cafile", "capath", "cert", "key", "min_version", "max_version", "ciphers",
    /* resolver */
    "nameservers", "timeout", "tries",
};
#define NKEYS (sizeof KEYS / sizeof KEYS[0])

static const char *const WORDS[] = {
    "client", "server", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "HIGH:!aNULL", "DEFAULT",
    "127.0.0.1", "127.0.0.1:5353", "[::1]:53", "::1", "mx.test", "", "5.7.1", "4.3.0",
    "5.12345678.1", "Rejected", "x\r\ny", "a\0b",
};
#define NWORDS (sizeof WORDS / sizeof WORDS[0])

static int is_path_key(const char *k)
{
    return k && (!strcmp(k, "cafile") || !strcmp(k, "capath") || !strcmp(k, "cert") ||
                 !strcmp(k, "key"));
}

/* __index: counts its calls; raises on call number `raise_at`, else hands out a fresh string
 * (nothing else holds it, so only the C stack can keep it alive) or nil. */
static int meta_index(lua_State *L)
{
    lua_Integer calls = lua_tointeger(L, lua_upvalueindex(1)) + 1;
    lua_Integer raise_at = lua_tointeger(L, lua_upvalueindex(2));
    lua_Integer mode = lua_tointeger(L, lua_upvalueindex(3));
    lua_pushinteger(L, calls);
    lua_replace(L, lua_upvalueindex(1));
    if (calls == raise_at)
        return luaL_error(L, "__index raised on call %d", (int)calls);
    if (mode & 1)
        lua_pushfstring(L, "/nonexistent-fuzz/fresh-%d-%s", (int)calls, lua_tostring(L, 2));
    else
        lua_pushnil(L);
    return 1;
}

static void push_value(lua_State *L, input *in, int depth, const char *key);

static void push_table(lua_State *L, input *in, int depth)
{
    int n = byte(in) % 9;
    lua_createtable(L, 0, n);
    for (int i = 0; i < n && in->n; i++) {
        uint8_t k = byte(in);
        const char *key = NULL;
        if (k < 200) {
            key = KEYS[k % NKEYS];
            lua_pushstring(L, key);
        } else if (k < 230) {
            lua_pushinteger(L, 1 + k % 4);  /* array part (nameservers) */
        } else {
            push_value(L, in, depth + 1, NULL);
            if (lua_isnil(L, -1) || (lua_type(L, -1) == LUA_TNUMBER &&
                                     lua_tonumber(L, -1) != lua_tonumber(L, -1))) {
                lua_pop(L, 1);  /* not a valid key */
                continue;
            }
        }
        push_value(L, in, depth + 1, key);
        lua_rawset(L, -3);
    }
    uint8_t m = byte(in);
    if (m & 0x80) {
        lua_createtable(L, 0, 1);
        lua_pushinteger(L, 0);
        lua_pushinteger(L, m & 0x1f);        /* 0: never raises */
        lua_pushinteger(L, (m >> 5) & 3);
        lua_pushcclosure(L, meta_index, 3);
        lua_setfield(L, -2, "__index");
        lua_setmetatable(L, -2);
    }
}

static void push_value(lua_State *L, input *in, int depth, const char *key)
{
    uint8_t t = byte(in);
    switch (t % 11) {
    case 0: lua_pushnil(L); break;
    case 1: lua_pushboolean(L, t & 0x10); break;
    case 2: {
        lua_Integer v = 0;
        for (int i = 0; i < 8; i++)
            v = (lua_Integer)((lua_Unsigned)v << 8 | byte(in));
        lua_pushinteger(L, v);
        break;
    }
    case 3: lua_pushinteger(L, (int8_t)byte(in)); break;
    case 4: {
        static const double specials[] = { 0.5, -1.5, 1e300, -1e300, 65536.0, 63.9, 1.0 / 0.0, 0.0 / 0.0 };
        lua_pushnumber(L, specials[byte(in) % 8]);
        break;
    }
    case 5:
    case 6: {
        size_t len = byte(in) % 64;
        char buf[64];
        size_t i = 0;
        while (i < len && in->n)
            buf[i++] = (char)byte(in);
        if (is_path_key(key)) {
            lua_pushliteral(L, "/nonexistent-fuzz/");
            lua_pushlstring(L, buf, i);
            lua_concat(L, 2);
        } else {
            lua_pushlstring(L, buf, i);
        }
        break;
    }
    case 7:
        if (is_path_key(key))
            lua_pushliteral(L, "/nonexistent-fuzz/word");
        else
            lua_pushstring(L, WORDS[byte(in) % NWORDS]);
        break;
    case 8:
        if (depth < 3)
            push_table(L, in, depth);
        else
            lua_pushnil(L);
        break;
    case 9: lua_pushvalue(L, LUA_REGISTRYINDEX); break; /* some other table */
    default: lua_pushcfunction(L, meta_index); break;  /* a function where a value belongs */
    }
}

/* The call itself, run under lua_pcall: upvalue-free, arguments on the stack: core, opts, input
 * bytes as a string (for the argument values of the engine methods). */
static int call(lua_State *L)
{
    input in;
    size_t n;
    in.p = (const uint8_t *)lua_tolstring(L, 3, &n);
    in.n = n;
    uint8_t what = byte(&in);
    int top = lua_gettop(L);
    switch (what % 5) {
    case 0:
        lua_getfield(L, 1, "server_engine");
        lua_pushvalue(L, 2);
        lua_call(L, 1, LUA_MULTRET);
        break;
    case 1:
        lua_getfield(L, 1, "tls_context");
        lua_pushvalue(L, 2);
        lua_call(L, 1, LUA_MULTRET);
        break;
    case 2:
        lua_getfield(L, 1, "resolver");
        lua_pushvalue(L, 2);
        lua_call(L, 1, LUA_MULTRET);
        if (lua_type(L, top + 1) == LUA_TUSERDATA) {
            lua_getfield(L, top + 1, "close");
            if (lua_isfunction(L, -1)) {
                lua_pushvalue(L, top + 1);
                lua_call(L, 1, 0);
            } else {
                lua_pop(L, 1);
            }
        }
        break;
    case 3: {
        /* a server engine with hooks, a MAIL waiting: decide, then shutdown, with input values */
        lua_getfield(L, 1, "server_engine");
        lua_createtable(L, 0, 3);
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "hook_mail");
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "auth");
        lua_call(L, 1, 1);
        int e = lua_gettop(L);
        lua_getfield(L, e, "feed");
        lua_pushvalue(L, e);
        lua_pushliteral(L, "EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        lua_call(L, 2, 0);
        lua_getfield(L, e, "next");
        lua_pushvalue(L, e);
        lua_call(L, 1, 0);
        const char *method = (byte(&in) & 1) ? "decide" : "shutdown";
        lua_getfield(L, e, method);
        lua_pushvalue(L, e);
        int nargs = 1 + byte(&in) % 5;
        for (int i = 1; i < nargs; i++)
            push_value(L, &in, 0, NULL);
        lua_call(L, nargs, 0);
        lua_getfield(L, e, "output");
        lua_pushvalue(L, e);
        lua_call(L, 1, 1);
        /* whatever got through makes well-formed reply lines */
        size_t olen;
        const char *o = lua_tolstring(L, -1, &olen);
        for (size_t i = 0; o && i < olen;) {
            const char *lf = memchr(o + i, '\n', olen - i);
            assert(lf && lf > o + i && lf[-1] == '\r');
            size_t len = (size_t)(lf - (o + i));
            assert(len >= 4 && o[i] >= '2' && o[i] <= '5');
            for (size_t j = 0; j + 1 < len; j++)
                assert(o[i + j] != '\r' && o[i + j] != '\n' && o[i + j] != 0);
            i += len + 1;
        }
        break;
    }
    default: {
        /* client engine commands with input values as arguments */
        static const char *const cmds[] = { "ehlo", "helo", "mail", "rcpt", "auth", "data",
                                            "bdat", "body", "rset", "noop", "quit" };
        lua_getfield(L, 1, "client_engine");
        if (!lua_isfunction(L, -1))
            return 0;
        lua_call(L, 0, 1);
        int e = lua_gettop(L);
        for (int k = 0; k < 4 && in.n; k++) {
            lua_getfield(L, e, cmds[byte(&in) % (sizeof cmds / sizeof cmds[0])]);
            lua_pushvalue(L, e);
            int nargs = 1 + byte(&in) % 5;
            for (int i = 1; i < nargs; i++)
                push_value(L, &in, 0, NULL);
            lua_call(L, nargs, LUA_MULTRET);
            lua_settop(L, e);
        }
        break;
    }
    }
    return lua_gettop(L) - top;
}

/* A client context that verifies loads the system trust store: pointed at nothing, it loads
 * nothing, which keeps each run short and reads no file of the machine. */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    setenv("SSL_CERT_FILE", "/nonexistent-fuzz/ca.pem", 1);
    setenv("SSL_CERT_DIR", "/nonexistent-fuzz", 1);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_State *L = luaL_newstate();
    assert(L);
    luaL_openlibs(L);
    /* the collector runs all the time: a string C uses but nothing anchors is freed at once */
    lua_gc(L, LUA_GCINC, 1, 400, 0);
    lua_pushcfunction(L, call);
    luaL_requiref(L, "smtp.core", luaopen_smtp_core, 0);
    input in = { data, size };
    /* the option table comes first; the call and its values follow */
    push_table(L, &in, 0);
    lua_pushlstring(L, (const char *)in.p, in.n);
    int st = lua_pcall(L, 3, LUA_MULTRET, 0);
    if (getenv("LUAOPTS_DEBUG")) { /* what a seed does: LUAOPTS_DEBUG=1 build/luaopts file */
        fprintf(stderr, "status %d:", st);
        for (int i = 1; i <= lua_gettop(L); i++)
            fprintf(stderr, " %s", luaL_tolstring(L, i, NULL)), lua_pop(L, 1);
        fprintf(stderr, "\n");
    }
    if (st != LUA_OK) {
        assert(st == LUA_ERRRUN);
        /* a clean error: a message (string) */
        assert(lua_type(L, -1) == LUA_TSTRING);
    }
    lua_close(L);
    return 0;
}
