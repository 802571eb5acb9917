/* International domain names (IDNA2008 with UTS #46 mapping, through libidn2): a domain typed in
 * Unicode becomes the A-label form ("xn--...") that reaches any mail server and DNS. Adds
 * core.idna_to_ascii(domain) and core.idna_to_unicode(domain) to smtp.core. */
#include <string.h>
#include <idn2.h>
#include "core.h"

/* Non-transitional processing only, with no transitional retry: the transitional mapping turns
 * "faß.de" into "fass.de", another domain with another owner, and libidn2's transitional mode
 * also lets through what IDNA2008 forbids (symbols such as U+2603, labels that break the bidi
 * rule). Mail sent to the wrong domain cannot be called back, so a name that fails is refused. */
#define IDNA_FLAGS (IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL)

/* Runs one libidn2 conversion on argument 1 -> the result | nil, why. The domain goes as a C
 * string, so a NUL inside (which would cut it short) is refused first. */
static int convert(lua_State *L, int (*fn)(const char *, char **, int), int flags)
{
    size_t len;
    const char *in = luaL_checklstring(L, 1, &len);
    char *out = NULL;
    int rc;
    if (strlen(in) != len) {
        lua_pushnil(L);
        lua_pushliteral(L, "NUL in domain");
        return 2;
    }
    rc = fn(in, &out, flags);
    if (rc != IDN2_OK) {
        lua_pushnil(L);
        lua_pushstring(L, idn2_strerror(rc));
        return 2;
    }
    lua_pushstring(L, out);
    idn2_free(out);
    return 1;
}

/* core.idna_to_ascii(domain) -> ascii | nil, why. ASCII labels come back lower-cased (the
 * mapping folds case); the caller decides whether to call it for an ASCII name at all. */
static int l_idna_to_ascii(lua_State *L)
{
    return convert(L, idn2_to_ascii_8z, IDNA_FLAGS);
}

/* core.idna_to_unicode(domain) -> utf8 | nil, why: A-labels decoded, for showing a name. */
static int l_idna_to_unicode(lua_State *L)
{
    return convert(L, idn2_to_unicode_8z8z, 0);
}

int smtp_open_idna(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "idna_to_ascii", l_idna_to_ascii }, { "idna_to_unicode", l_idna_to_unicode },
        { NULL, NULL }
    };
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
