/* Lua binding of the codecs (core.b64encode, b64decode, qpencode, qpdecode, xtext_encode,
 * xtext_decode, is_7bit, utf8_valid, has_8bit, sha256, random, dkim_header, dkim_body,
 * dkim_canon_body, dkim_key, dkim_pubkey): argument checking and Lua strings around codec.h and
 * text.h, plus SHA-256 and DKIM signing and verifying with OpenSSL 3. */
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include "core.h"
#include "codec.h"
#include "text.h"

#define KEY_CLASS "smtp.dkim_key"
#define BODY_CLASS "smtp.dkim_body"
#define PUBKEY_CLASS "smtp.dkim_pubkey"

static void *xalloc(lua_State *L, size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        luaL_error(L, "out of memory");
    return p;
}

static int l_b64encode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_Integer linelen = luaL_optinteger(L, 2, 0);
    luaL_argcheck(L, linelen >= 0 && linelen % 4 == 0 && linelen <= 1000, 2,
                  "line length must be a multiple of 4 up to 1000");
    luaL_Buffer b;
    size_t cap = smtp_b64_encoded_len(n, (size_t)linelen);
    char *out = luaL_buffinitsize(L, &b, cap);
    size_t len = smtp_b64_encode((const unsigned char *)s, n, out, (size_t)linelen);
    luaL_pushresultsize(&b, len);
    return 1;
}

static int l_b64decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, n / 4 * 3 + 3);
    size_t len = smtp_b64_decode(s, n, out, SMTP_B64_MIME);
    if (len == (size_t)-1) {
        luaL_pushresultsize(&b, 0);
        lua_pushnil(L);
        lua_pushliteral(L, "invalid base64");
        return 2;
    }
    luaL_pushresultsize(&b, len);
    return 1;
}

static int l_qpencode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, smtp_qp_encoded_max(n));
    luaL_pushresultsize(&b, smtp_qp_encode((const unsigned char *)s, n, out));
    return 1;
}

static int l_qpdecode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, n + 1);
    luaL_pushresultsize(&b, smtp_qp_decode(s, n, out));
    return 1;
}

static int l_xtext_encode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, 3 * n + 1);
    luaL_pushresultsize(&b, smtp_xtext_encode((const unsigned char *)s, n, out));
    return 1;
}

static int l_xtext_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    unsigned char *out = (unsigned char *)luaL_buffinitsize(L, &b, n + 1);
    size_t len = smtp_xtext_decode(s, n, out);
    if (len == (size_t)-1) {
        luaL_pushresultsize(&b, 0);
        lua_pushnil(L);
        lua_pushliteral(L, "invalid xtext");
        return 2;
    }
    luaL_pushresultsize(&b, len);
    return 1;
}

/* core.is_7bit(s): ASCII without NUL, CR only as part of CRLF, and no line over 998 octets, so
 * the text can go as 7bit once bare LFs are made CRLF. */
static int l_is_7bit(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, smtp_is_7bit(s, n));
    return 1;
}

/* core.utf8_valid(s): well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF). */
static int l_utf8_valid(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, smtp_utf8_valid(s, n));
    return 1;
}

/* core.has_8bit(s) -> true when any byte is >= 0x80 (SMTPUTF8 / 8BITMIME decisions; a Lua
 * pattern class is far slower on large header sections) */
static int l_has_8bit(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, smtp_has_8bit(s, n));
    return 1;
}

static int l_sha256(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    unsigned char md[32];
    unsigned int len = 0;
    if (!EVP_Digest(s, n, md, &len, EVP_sha256(), NULL))
        return luaL_error(L, "sha256 failed");
    lua_pushlstring(L, (const char *)md, len);
    return 1;
}

static int l_random(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_argcheck(L, n >= 0 && n <= 4096, 1, "0..4096 bytes");
    unsigned char buf[4096];
    if (RAND_bytes(buf, (int)n) != 1)
        return luaL_error(L, "RAND_bytes failed");
    lua_pushlstring(L, (const char *)buf, (size_t)n);
    return 1;
}

static int canon_mode(lua_State *L, int idx)
{
    static const char *const modes[] = { "simple", "relaxed", NULL };
    return luaL_checkoption(L, idx, "relaxed", modes);
}

static int l_dkim_header(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    int relaxed = canon_mode(L, 2);
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n + 2);
    size_t len = relaxed ? smtp_dkim_header_relaxed(s, n, out) : smtp_dkim_header_simple(s, n, out);
    luaL_pushresultsize(&b, len);
    return 1;
}

/* Body canonicalizer object: a running SHA-256 over the canonical body, or over its first
 * `limit` bytes (a verifier's l=); `total` counts every canonical byte, so what l= left unsigned
 * can be reported. */
struct body_obj {
    EVP_MD_CTX *md;
    int done;
    int limited;
    unsigned long long limit, total;
    struct smtp_bodycanon c;
};

static void sink_md(void *ud, const char *p, size_t n)
{
    struct body_obj *b = (struct body_obj *)ud;
    size_t take = n;
    if (b->limited) {
        unsigned long long room = b->total >= b->limit ? 0 : b->limit - b->total;
        if (take > room)
            take = (size_t)room;
    }
    b->total += n;
    if (take)
        EVP_DigestUpdate(b->md, p, take);
}

/* After __gc (which Lua code can call through the metatable) the digest context is gone and
 * the canonicalizer's sink would write to freed memory: refuse instead. */
static struct body_obj *check_body(lua_State *L)
{
    struct body_obj *b = (struct body_obj *)luaL_checkudata(L, 1, BODY_CLASS);
    if (!b->md)
        luaL_error(L, "dkim body hash is closed");
    return b;
}

/* core.dkim_body(mode [, limit]): limit is the l= of a signature being verified. */
static int l_dkim_body(lua_State *L)
{
    int relaxed = canon_mode(L, 1);
    lua_Integer limit = luaL_optinteger(L, 2, -1);
    luaL_argcheck(L, limit >= -1, 2, "limit must be a byte count");
    struct body_obj *b = (struct body_obj *)lua_newuserdata(L, sizeof *b);
    b->md = NULL;
    b->done = 0;
    b->limited = limit >= 0;
    b->limit = limit >= 0 ? (unsigned long long)limit : 0;
    b->total = 0;
    luaL_setmetatable(L, BODY_CLASS);
    b->md = EVP_MD_CTX_new();
    if (!b->md || !EVP_DigestInit_ex(b->md, EVP_sha256(), NULL))
        return luaL_error(L, "sha256 init failed");
    smtp_bodycanon_init(&b->c, relaxed, sink_md, b);
    return 1;
}

/* b:length() -> canonical body bytes so far (all of them once digest() has run). */
static int body_length(lua_State *L)
{
    struct body_obj *b = check_body(L);
    lua_pushinteger(L, (lua_Integer)b->total);
    return 1;
}

static int body_update(lua_State *L)
{
    struct body_obj *b = check_body(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (b->done)
        return luaL_error(L, "dkim body hash already finished");
    smtp_bodycanon_feed(&b->c, s, n);
    lua_settop(L, 1);
    return 1;
}

static int body_digest(lua_State *L)
{
    struct body_obj *b = check_body(L);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (b->done)
        return luaL_error(L, "dkim body hash already finished");
    smtp_bodycanon_finish(&b->c);
    b->done = 1;
    if (!EVP_DigestFinal_ex(b->md, md, &len))
        return luaL_error(L, "sha256 failed");
    lua_pushlstring(L, (const char *)md, len);
    return 1;
}

static int body_gc(lua_State *L)
{
    struct body_obj *b = (struct body_obj *)luaL_checkudata(L, 1, BODY_CLASS);
    if (b->md) {
        EVP_MD_CTX_free(b->md);
        b->md = NULL;
    }
    return 0;
}

struct growbuf {
    char *p;
    size_t len, cap;
    int oom;
};

static void sink_grow(void *ud, const char *p, size_t n)
{
    struct growbuf *g = (struct growbuf *)ud;
    if (g->oom)
        return;
    if (g->len + n > g->cap) {
        size_t cap = (g->len + n) * 2 + 64;
        char *q = (char *)realloc(g->p, cap);
        if (!q) {
            g->oom = 1;
            return;
        }
        g->p = q;
        g->cap = cap;
    }
    memcpy(g->p + g->len, p, n);
    g->len += n;
}

/* core.dkim_canon_body(s, mode) -> the canonical body (tests and debugging). */
static int l_dkim_canon_body(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    int relaxed = canon_mode(L, 2);
    struct smtp_bodycanon *c = (struct smtp_bodycanon *)xalloc(L, sizeof *c);
    struct growbuf g = { NULL, 0, 0, 0 };
    smtp_bodycanon_init(c, relaxed, sink_grow, &g);
    smtp_bodycanon_feed(c, s, n);
    smtp_bodycanon_finish(c);
    free(c);
    if (g.oom) {
        free(g.p);
        return luaL_error(L, "out of memory");
    }
    lua_pushlstring(L, g.p ? g.p : "", g.len);
    free(g.p);
    return 1;
}

/* Signing keys. */
struct key_obj {
    EVP_PKEY *pkey;
    int ed25519;
};

static struct key_obj *check_key(lua_State *L)
{
    struct key_obj *k = (struct key_obj *)luaL_checkudata(L, 1, KEY_CLASS);
    if (!k->pkey)
        luaL_error(L, "key is closed");
    return k;
}

static int push_ssl_error(lua_State *L, const char *what)
{
    unsigned long e = ERR_peek_last_error();
    char buf[256];
    lua_pushnil(L);
    if (e) {
        ERR_error_string_n(e, buf, sizeof buf);
        lua_pushfstring(L, "%s: %s", what, buf);
    } else {
        lua_pushstring(L, what);
    }
    ERR_clear_error();
    return 2;
}

static int l_dkim_key(lua_State *L)
{
    size_t n;
    const char *pem = luaL_checklstring(L, 1, &n);
    struct key_obj *k = (struct key_obj *)lua_newuserdata(L, sizeof *k);
    k->pkey = NULL;
    k->ed25519 = 0;
    luaL_setmetatable(L, KEY_CLASS);
    ERR_clear_error();
    if (n > 64 * 1024) {
        lua_pushnil(L);
        lua_pushliteral(L, "key: PEM text too long");
        return 2;
    }
    BIO *bio = BIO_new_mem_buf(pem, (int)n);
    if (!bio)
        return push_ssl_error(L, "key");
    /* A NULL password callback with an empty passphrase: encrypted keys fail instead of asking
     * on the terminal. */
    k->pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, (void *)"");
    BIO_free(bio);
    if (!k->pkey)
        return push_ssl_error(L, "key does not parse as a PEM private key");
    int id = EVP_PKEY_get_base_id(k->pkey);
    if (id == EVP_PKEY_ED25519) {
        k->ed25519 = 1;
    } else if (id == EVP_PKEY_RSA) {
        if (EVP_PKEY_get_bits(k->pkey) < 1024) {
            EVP_PKEY_free(k->pkey);
            k->pkey = NULL;
            lua_pushnil(L);
            lua_pushliteral(L, "key: RSA keys under 1024 bits are refused by verifiers");
            return 2;
        }
    } else {
        EVP_PKEY_free(k->pkey);
        k->pkey = NULL;
        lua_pushnil(L);
        lua_pushliteral(L, "key: only RSA and Ed25519 keys can sign DKIM");
        return 2;
    }
    return 1;
}

static int key_type(lua_State *L)
{
    struct key_obj *k = check_key(L);
    lua_pushstring(L, k->ed25519 ? "ed25519" : "rsa");
    return 1;
}

static int key_bits(lua_State *L)
{
    struct key_obj *k = check_key(L);
    lua_pushinteger(L, EVP_PKEY_get_bits(k->pkey));
    return 1;
}

/* key:sign(data): rsa-sha256 signs data with PKCS#1 v1.5 over SHA-256; ed25519-sha256 signs the
 * SHA-256 digest of data with PureEdDSA (RFC 8463 3). Returns the raw signature. */
static int key_sign(lua_State *L)
{
    struct key_obj *k = check_key(L);
    size_t n;
    const char *data = luaL_checklstring(L, 2, &n);
    unsigned char md[32], sig[1024];
    size_t siglen = sizeof sig;
    const unsigned char *tbs = (const unsigned char *)data;
    size_t tbslen = n;
    int ok;
    ERR_clear_error();
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return push_ssl_error(L, "sign");
    if (k->ed25519) {
        unsigned int mdlen = 0;
        if (!EVP_Digest(data, n, md, &mdlen, EVP_sha256(), NULL)) {
            EVP_MD_CTX_free(ctx);
            return push_ssl_error(L, "sign");
        }
        tbs = md;
        tbslen = mdlen;
        ok = EVP_DigestSignInit(ctx, NULL, NULL, NULL, k->pkey) == 1;
    } else {
        if ((size_t)EVP_PKEY_get_size(k->pkey) > sizeof sig) {
            EVP_MD_CTX_free(ctx);
            lua_pushnil(L);
            lua_pushliteral(L, "sign: key too large");
            return 2;
        }
        ok = EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1;
    }
    ok = ok && EVP_DigestSign(ctx, sig, &siglen, tbs, tbslen) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok)
        return push_ssl_error(L, "sign");
    lua_pushlstring(L, (const char *)sig, siglen);
    return 1;
}

/* key:public() -> the p= value of the key record, base64: the SubjectPublicKeyInfo for RSA, the
 * raw 32-byte public key for Ed25519 (RFC 8463 4). */
static int key_public(lua_State *L)
{
    struct key_obj *k = check_key(L);
    unsigned char raw[64], *der = NULL;
    size_t len = sizeof raw;
    const unsigned char *p;
    int dlen = 0;
    ERR_clear_error();
    if (k->ed25519) {
        if (EVP_PKEY_get_raw_public_key(k->pkey, raw, &len) != 1)
            return push_ssl_error(L, "public");
        p = raw;
    } else {
        dlen = i2d_PUBKEY(k->pkey, &der);
        if (dlen <= 0)
            return push_ssl_error(L, "public");
        p = der;
        len = (size_t)dlen;
    }
    size_t cap = smtp_b64_encoded_len(len, 0);
    char *out = (char *)malloc(cap + 1);
    if (!out) {
        OPENSSL_free(der);
        return luaL_error(L, "out of memory");
    }
    size_t olen = smtp_b64_encode(p, len, out, 0);
    OPENSSL_free(der);
    lua_pushlstring(L, out, olen);
    free(out);
    return 1;
}

static int key_close(lua_State *L)
{
    struct key_obj *k = (struct key_obj *)luaL_checkudata(L, 1, KEY_CLASS);
    if (k->pkey) {
        /* EVP_PKEY_free clears the private key material (BN_clear_free / OPENSSL_secure_clear_free) */
        EVP_PKEY_free(k->pkey);
        k->pkey = NULL;
    }
    smtp_wipe(k, sizeof *k);
    return 0;
}

static int key_tostring(lua_State *L)
{
    struct key_obj *k = (struct key_obj *)luaL_checkudata(L, 1, KEY_CLASS);
    lua_pushfstring(L, "%s (%s)", KEY_CLASS, !k->pkey ? "closed" : k->ed25519 ? "ed25519" : "rsa");
    return 1;
}

/* Verifying keys: the p= of a DKIM key record, decoded. RSA takes a SubjectPublicKeyInfo (what
 * RFC 6376 3.6.1 specifies) or a bare RSAPublicKey (which some publish, and other verifiers take);
 * Ed25519 the raw 32-byte key (RFC 8463 4). */
struct pubkey_obj {
    EVP_PKEY *pkey;
    int ed25519;
};

static struct pubkey_obj *check_pubkey(lua_State *L)
{
    struct pubkey_obj *k = (struct pubkey_obj *)luaL_checkudata(L, 1, PUBKEY_CLASS);
    if (!k->pkey)
        luaL_error(L, "key is closed");
    return k;
}

/* core.dkim_pubkey(bytes, "rsa"|"ed25519") -> key | nil, why */
static int l_dkim_pubkey(lua_State *L)
{
    static const char *const types[] = { "rsa", "ed25519", NULL };
    size_t n;
    const unsigned char *der = (const unsigned char *)luaL_checklstring(L, 1, &n);
    int ed = luaL_checkoption(L, 2, NULL, types);
    struct pubkey_obj *k = (struct pubkey_obj *)lua_newuserdata(L, sizeof *k);
    k->pkey = NULL;
    k->ed25519 = ed;
    luaL_setmetatable(L, PUBKEY_CLASS);
    ERR_clear_error();
    if (n > 16 * 1024) {
        lua_pushnil(L);
        lua_pushliteral(L, "public key too long");
        return 2;
    }
    if (ed) {
        if (n != 32) {
            lua_pushnil(L);
            lua_pushliteral(L, "an ed25519 public key is 32 bytes");
            return 2;
        }
        k->pkey = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, der, n);
        if (!k->pkey)
            return push_ssl_error(L, "ed25519 public key does not parse");
        return 1;
    }
    const unsigned char *p = der;
    k->pkey = d2i_PUBKEY(NULL, &p, (long)n);
    if (!k->pkey || p != der + n) {
        EVP_PKEY_free(k->pkey);
        p = der;
        k->pkey = d2i_PublicKey(EVP_PKEY_RSA, NULL, &p, (long)n);
        if (k->pkey && p != der + n) {
            EVP_PKEY_free(k->pkey);
            k->pkey = NULL;
        }
    }
    if (!k->pkey)
        return push_ssl_error(L, "RSA public key does not parse");
    ERR_clear_error();
    if (EVP_PKEY_get_base_id(k->pkey) != EVP_PKEY_RSA) {
        EVP_PKEY_free(k->pkey);
        k->pkey = NULL;
        lua_pushnil(L);
        lua_pushliteral(L, "p= is not an RSA key");
        return 2;
    }
    return 1;
}

static int pubkey_type(lua_State *L)
{
    struct pubkey_obj *k = check_pubkey(L);
    lua_pushstring(L, k->ed25519 ? "ed25519" : "rsa");
    return 1;
}

static int pubkey_bits(lua_State *L)
{
    struct pubkey_obj *k = check_pubkey(L);
    lua_pushinteger(L, EVP_PKEY_get_bits(k->pkey));
    return 1;
}

/* key:verify(data, sig) -> true | false: the counterpart of key:sign (PKCS#1 v1.5 over SHA-256
 * of data; PureEdDSA over the SHA-256 digest of data). A signature that does not verify, whatever
 * the reason OpenSSL gives, is false. */
static int pubkey_verify(lua_State *L)
{
    struct pubkey_obj *k = check_pubkey(L);
    size_t n, slen;
    const char *data = luaL_checklstring(L, 2, &n);
    const unsigned char *sig = (const unsigned char *)luaL_checklstring(L, 3, &slen);
    unsigned char md[32];
    const unsigned char *tbs = (const unsigned char *)data;
    size_t tbslen = n;
    int ok;
    ERR_clear_error();
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return luaL_error(L, "out of memory");
    if (k->ed25519) {
        unsigned int mdlen = 0;
        if (!EVP_Digest(data, n, md, &mdlen, EVP_sha256(), NULL)) {
            EVP_MD_CTX_free(ctx);
            return luaL_error(L, "sha256 failed");
        }
        tbs = md;
        tbslen = mdlen;
        ok = EVP_DigestVerifyInit(ctx, NULL, NULL, NULL, k->pkey) == 1;
    } else {
        ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1;
    }
    ok = ok && EVP_DigestVerify(ctx, sig, slen, tbs, tbslen) == 1;
    EVP_MD_CTX_free(ctx);
    ERR_clear_error();
    lua_pushboolean(L, ok);
    return 1;
}

static int pubkey_gc(lua_State *L)
{
    struct pubkey_obj *k = (struct pubkey_obj *)luaL_checkudata(L, 1, PUBKEY_CLASS);
    if (k->pkey) {
        EVP_PKEY_free(k->pkey);
        k->pkey = NULL;
    }
    return 0;
}

static int pubkey_tostring(lua_State *L)
{
    struct pubkey_obj *k = (struct pubkey_obj *)luaL_checkudata(L, 1, PUBKEY_CLASS);
    lua_pushfstring(L, "%s (%s)", PUBKEY_CLASS, !k->pkey ? "closed" : k->ed25519 ? "ed25519" : "rsa");
    return 1;
}

int smtp_open_codec(lua_State *L)
{
    static const luaL_Reg body_methods[] = {
        { "update", body_update }, { "digest", body_digest }, { "length", body_length },
        { NULL, NULL }
    };
    static const luaL_Reg body_meta[] = { { "__gc", body_gc }, { NULL, NULL } };
    static const luaL_Reg key_methods[] = {
        { "type", key_type }, { "bits", key_bits }, { "sign", key_sign },
        { "public", key_public }, { "close", key_close }, { NULL, NULL }
    };
    static const luaL_Reg key_meta[] = {
        { "__gc", key_close }, { "__tostring", key_tostring }, { NULL, NULL }
    };
    static const luaL_Reg pubkey_methods[] = {
        { "type", pubkey_type }, { "bits", pubkey_bits }, { "verify", pubkey_verify },
        { "close", pubkey_gc }, { NULL, NULL }
    };
    static const luaL_Reg pubkey_meta[] = {
        { "__gc", pubkey_gc }, { "__tostring", pubkey_tostring }, { NULL, NULL }
    };
    static const luaL_Reg funcs[] = {
        { "b64encode", l_b64encode }, { "b64decode", l_b64decode },
        { "qpencode", l_qpencode }, { "qpdecode", l_qpdecode },
        { "xtext_encode", l_xtext_encode }, { "xtext_decode", l_xtext_decode },
        { "is_7bit", l_is_7bit }, { "utf8_valid", l_utf8_valid }, { "has_8bit", l_has_8bit },
        { "sha256", l_sha256 }, { "random", l_random },
        { "dkim_header", l_dkim_header }, { "dkim_body", l_dkim_body },
        { "dkim_canon_body", l_dkim_canon_body }, { "dkim_key", l_dkim_key },
        { "dkim_pubkey", l_dkim_pubkey }, { NULL, NULL }
    };
    smtp_newclass(L, BODY_CLASS, body_methods, body_meta);
    smtp_newclass(L, KEY_CLASS, key_methods, key_meta);
    smtp_newclass(L, PUBKEY_CLASS, pubkey_methods, pubkey_meta);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
