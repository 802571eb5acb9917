/* TLS for the native transport: OpenSSL 3 contexts (client and server) and TLS over an existing
 * smtp.socket, for implicit TLS and for the STARTTLS upgrade. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <arpa/inet.h>
#include <time.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include "net.h"

/* ---- plain C: contexts, a socket BIO, error text ---------------------------------------- */

/* Client sessions kept for resumption, per context (so per set of verification settings) and
 * per key (server name, port and name check, built by the caller): a resumed handshake skips the
 * certificate check, so a session must never be offered to any other server or name. */
#define SESS_CACHE_MAX 128

typedef struct sess_entry {
    char *key;
    SSL_SESSION *sess;
} sess_entry;

/* Server ticket keys: the newest encrypts, the one before still decrypts (its tickets get
 * renewed), anything older is gone, so a ticket outlives at most two rotation periods. */
typedef struct ticket_key {
    unsigned char name[16], aes[32], hmac[32];
} ticket_key;

typedef struct tls_ctx {
    SSL_CTX *ctx;
    int server;
    sess_entry cache[SESS_CACHE_MAX];
    int cache_next;
    ticket_key keys[2];   /* [0] current, [1] previous */
    int nkeys;
    time_t rotated;       /* when keys[0] was made */
    long rotate_every;    /* seconds; 0: only on ctx:rotate_ticket_key() */
    EVP_CIPHER *ticket_cipher; /* AES-256-CBC, fetched once: EVP_aes_256_cbc() is looked up
                                  by name again on every ticket sealed or opened */
} tls_ctx;

/* The cache key of the client session being handshaken, owned by the SSL (freed with it). */
static int sess_key_idx = -1;

static void sess_key_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                          void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    free(ptr);
}

static sess_entry *sess_find(tls_ctx *c, const char *key)
{
    int i;
    for (i = 0; i < SESS_CACHE_MAX; i++)
        if (c->cache[i].key && strcmp(c->cache[i].key, key) == 0)
            return &c->cache[i];
    return NULL;
}

static void sess_drop(sess_entry *e)
{
    free(e->key);
    SSL_SESSION_free(e->sess);
    e->key = NULL;
    e->sess = NULL;
}

/* OpenSSL hands over every new client session here: TLS 1.2's at the end of the handshake,
 * TLS 1.3 tickets whenever they arrive after it. The cache keeps a copy (the connection goes on
 * using, and may spoil, the one given) and never takes OpenSSL's reference: returns 0. */
static int sess_new_cb(SSL *ssl, SSL_SESSION *given)
{
    SSL_SESSION *sess;
    tls_ctx *c = (tls_ctx *)SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const char *key = sess_key_idx >= 0 ? (const char *)SSL_get_ex_data(ssl, sess_key_idx) : NULL;
    sess_entry *e;
    if (!c || !key || !SSL_SESSION_is_resumable(given))
        return 0;
    /* Only what passed the checks this context asks for may skip them next time. */
    if (SSL_get_verify_mode(ssl) != SSL_VERIFY_NONE && SSL_get_verify_result(ssl) != X509_V_OK)
        return 0;
    if (!(sess = SSL_SESSION_dup(given)))
        return 0;
    e = sess_find(c, key);
    if (e) {
        SSL_SESSION_free(e->sess);
        e->sess = sess;
        return 0;
    }
    e = &c->cache[c->cache_next];
    c->cache_next = (c->cache_next + 1) % SESS_CACHE_MAX;
    if (e->key)
        sess_drop(e);
    e->key = strdup(key);
    if (!e->key) {
        SSL_SESSION_free(sess);
        return 0;
    }
    e->sess = sess;
    return 0;
}

static int ticket_key_new(ticket_key *k)
{
    return RAND_bytes(k->name, sizeof k->name) == 1 && RAND_bytes(k->aes, sizeof k->aes) == 1 &&
           RAND_bytes(k->hmac, sizeof k->hmac) == 1;
}

static int ticket_rotate(tls_ctx *c)
{
    ticket_key k;
    if (!ticket_key_new(&k))
        return 0;
    c->keys[1] = c->keys[0];
    c->keys[0] = k;
    OPENSSL_cleanse(&k, sizeof k);
    if (c->nkeys < 2)
        c->nkeys++;
    c->rotated = time(NULL);
    return 1;
}

static int ticket_mac_init(EVP_MAC_CTX *hctx, ticket_key *k)
{
    OSSL_PARAM params[3];
    params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, k->hmac, sizeof k->hmac);
    params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[2] = OSSL_PARAM_construct_end();
    return EVP_MAC_CTX_set_params(hctx, params);
}

/* Sealing and opening session tickets with this context's own keys (OpenSSL's default key
 * never rotates). Returns 1: sealed; 2: opened, issue a fresh ticket; 0: not our key (a full
 * handshake); -1: failure. */
static int ticket_cb(SSL *ssl, unsigned char *name, unsigned char *iv, EVP_CIPHER_CTX *ectx,
                     EVP_MAC_CTX *hctx, int enc)
{
    tls_ctx *c = (tls_ctx *)SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    int i;
    if (!c || c->nkeys == 0)
        return enc ? -1 : 0;
    if (c->rotate_every > 0 && time(NULL) - c->rotated >= c->rotate_every && !ticket_rotate(c))
        return enc ? -1 : 0;
    if (enc) {
        ticket_key *k = &c->keys[0];
        if (RAND_bytes(iv, 16) != 1)
            return -1;
        memcpy(name, k->name, sizeof k->name);
        if (!EVP_EncryptInit_ex(ectx, c->ticket_cipher, NULL, k->aes, iv) || !ticket_mac_init(hctx, k))
            return -1;
        return 1;
    }
    for (i = 0; i < c->nkeys; i++) {
        ticket_key *k = &c->keys[i];
        if (memcmp(name, k->name, sizeof k->name) != 0)
            continue;
        if (!ticket_mac_init(hctx, k) || !EVP_DecryptInit_ex(ectx, c->ticket_cipher, NULL, k->aes, iv))
            return -1;
        /* 2 also with the current key: the client gets a fresh ticket on every resumption, so
         * none is offered twice (TLS 1.3 clients should not reuse one, RFC 8446 §C.4). */
        return 2;
    }
    return 0;
}

/* OpenSSL's own socket BIO writes with write(2), which raises SIGPIPE when the peer has gone;
 * this one sends with MSG_NOSIGNAL so a vanished peer is an error, never a dead process.
 *
 * It also saves the server system calls (a send on a busy server costs more than its bytes:
 * the kernel delivers them and wakes the peer). During a server's handshake step the records
 * OpenSSL writes are gathered in `out` and sent when the step returns (l_tls_handshake), and a
 * read asked for while they wait is not tried: the client cannot have answered records it has
 * not been sent (OpenSSL reads for the client's answer right after writing its flight, which
 * always failed with EAGAIN). The TLS 1.3 session ticket, which OpenSSL writes in the step that
 * ends the handshake, is held (`hold`) and leaves with the next record written, in one send:
 * the client speaks first after the handshake and needs no ticket to go on, and records keep
 * their order because every later record goes through here behind it. */
typedef struct sock_bio {
    int fd;
    int gather;           /* a server handshake step is running: writes collect in out */
    int hold;             /* out may wait for the next record written (the TLS 1.3 ticket) */
    size_t outlen, outcap;
    char *out;
} sock_bio;

static BIO_METHOD *sock_bio_method;

static sock_bio *bio_state(BIO *b)
{
    return (sock_bio *)BIO_get_data(b);
}

static void out_drop(sock_bio *sb, size_t n)
{
    if (n >= sb->outlen) {
        /* emptied: an idle connection keeps no buffer */
        free(sb->out);
        sb->out = NULL;
        sb->outlen = sb->outcap = 0;
        sb->hold = 0;
        return;
    }
    memmove(sb->out, sb->out + n, sb->outlen - n);
    sb->outlen -= n;
}

/* Sends what waits in out: 1 all sent, 0 the kernel would block (the rest still waits),
 * -1 failure (errno set). */
static int out_send(sock_bio *sb)
{
    while (sb->outlen > 0) {
        ssize_t n = send(sb->fd, sb->out, sb->outlen, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        }
        out_drop(sb, (size_t)n);
    }
    return 1;
}

static int bio_write(BIO *b, const char *buf, int len)
{
    sock_bio *sb = bio_state(b);
    ssize_t n;
    BIO_clear_retry_flags(b);
    if (sb->gather) {
        if (sb->outcap - sb->outlen < (size_t)len) {
            size_t cap = sb->outlen + (size_t)len + 1024;
            char *p = (char *)realloc(sb->out, cap);
            if (!p)
                return -1;
            sb->out = p;
            sb->outcap = cap;
        }
        memcpy(sb->out + sb->outlen, buf, (size_t)len);
        sb->outlen += (size_t)len;
        return len;
    }
    if (sb->outlen > 0) {
        /* the held ticket first, this record behind it, in one system call */
        struct iovec iov[2];
        struct msghdr msg;
        size_t held = sb->outlen;
        memset(&msg, 0, sizeof msg);
        iov[0].iov_base = sb->out;
        iov[0].iov_len = held;
        iov[1].iov_base = (void *)buf;
        iov[1].iov_len = (size_t)len;
        msg.msg_iov = iov;
        msg.msg_iovlen = 2;
        do
            n = sendmsg(sb->fd, &msg, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                BIO_set_retry_write(b);
            return -1;
        }
        out_drop(sb, (size_t)n);
        if ((size_t)n <= held) {
            /* none of this record left yet: OpenSSL offers it again */
            BIO_set_retry_write(b);
            return -1;
        }
        return (int)((size_t)n - held);
    }
    do
        n = send(sb->fd, buf, (size_t)len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        BIO_set_retry_write(b);
    return (int)n;
}

static int bio_read(BIO *b, char *buf, int len)
{
    sock_bio *sb = bio_state(b);
    ssize_t n;
    BIO_clear_retry_flags(b);
    if (sb->outlen > 0 && !sb->hold) {
        /* our flight has not left: nothing to read can be its answer yet */
        BIO_set_retry_read(b);
        return -1;
    }
    do
        n = recv(sb->fd, buf, (size_t)len, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        BIO_set_retry_read(b);
    return (int)n;
}

static int bio_puts(BIO *b, const char *s)
{
    return bio_write(b, s, (int)strlen(s));
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b; (void)num; (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *b)
{
    sock_bio *sb = (sock_bio *)calloc(1, sizeof *sb);
    if (!sb)
        return 0;
    sb->fd = -1;
    BIO_set_data(b, sb);
    BIO_set_init(b, 1);
    return 1;
}

static int bio_destroy(BIO *b)
{
    sock_bio *sb = b ? bio_state(b) : NULL;
    if (sb) {
        free(sb->out);
        free(sb);
        BIO_set_data(b, NULL);
    }
    return 1;
}

static BIO_METHOD *bio_method(void)
{
    if (!sock_bio_method) {
        BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "smtp socket");
        if (!m)
            return NULL;
        BIO_meth_set_write(m, bio_write);
        BIO_meth_set_read(m, bio_read);
        BIO_meth_set_puts(m, bio_puts);
        BIO_meth_set_ctrl(m, bio_ctrl);
        BIO_meth_set_create(m, bio_create);
        BIO_meth_set_destroy(m, bio_destroy);
        sock_bio_method = m;
    }
    return sock_bio_method;
}

/* The method lives as long as the module: free it when the module is unloaded (lua_close
 * dlcloses it after every socket's __gc has run), so leak checkers see no lost block. */
__attribute__((destructor)) static void bio_method_free(void)
{
    if (sock_bio_method) {
        BIO_meth_free(sock_bio_method);
        sock_bio_method = NULL;
    }
}

static int is_ip_text(const char *s)
{
    unsigned char tmp[16];
    return inet_pton(AF_INET, s, tmp) == 1 || inet_pton(AF_INET6, s, tmp) == 1;
}

static int parse_version(const char *v)
{
    static const struct { const char *name; int version; } versions[] = {
        { "TLSv1", TLS1_VERSION }, { "TLSv1.0", TLS1_VERSION }, { "TLSv1.1", TLS1_1_VERSION },
        { "TLSv1.2", TLS1_2_VERSION }, { "TLSv1.3", TLS1_3_VERSION },
    };
    size_t i;
    for (i = 0; i < sizeof versions / sizeof versions[0]; i++)
        if (strcmp(v, versions[i].name) == 0)
            return versions[i].version;
    return -1;
}

/* The newest queued OpenSSL reason, e.g. "unsupported protocol"; NULL if the queue is empty. */
static const char *ssl_reason(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    return r ? r : (e ? "unknown OpenSSL error" : NULL);
}

/* Why a handshake or an I/O call failed, in words a user can act on. Returns the short code. */
static const char *tls_failure(SSL *ssl, int ret, int handshake, char *buf, size_t len,
                               int *errnum)
{
    int e = SSL_get_error(ssl, ret);
    long v = SSL_get_verify_result(ssl);
    const char *reason;
    *errnum = 0;
    if (e == SSL_ERROR_SSL && v != X509_V_OK && SSL_get_verify_mode(ssl) != SSL_VERIFY_NONE) {
        const char *why = X509_verify_cert_error_string(v);
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        switch (v) {
        case X509_V_ERR_HOSTNAME_MISMATCH: {
            const char *host = X509_VERIFY_PARAM_get0_host(param, 0);
            snprintf(buf, len, "certificate verify failed: %s (the certificate is not for %s)",
                     why, host ? host : "the name we connected to");
            break;
        }
        case X509_V_ERR_IP_ADDRESS_MISMATCH: {
            char *ip = X509_VERIFY_PARAM_get1_ip_asc(param);
            snprintf(buf, len, "certificate verify failed: %s (the certificate is not for %s)",
                     why, ip ? ip : "the address we connected to");
            OPENSSL_free(ip);
            break;
        }
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
        case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
            snprintf(buf, len, "certificate verify failed: %s (issued by an unknown CA)", why);
            break;
        default:
            snprintf(buf, len, "certificate verify failed: %s", why);
            break;
        }
        return "certificate verify failed";
    }
    switch (e) {
    case SSL_ERROR_ZERO_RETURN:
        snprintf(buf, len, "%sconnection closed by peer", handshake ? "TLS handshake failed: " : "");
        return "closed";
    case SSL_ERROR_SYSCALL:
        if (errno) {
            *errnum = errno;
            snprintf(buf, len, "%s%s", handshake ? "TLS handshake failed: " : "", strerror(errno));
            return "syscall";
        }
        snprintf(buf, len, "%sconnection closed by peer", handshake ? "TLS handshake failed: " : "");
        return "closed";
    default:
        reason = ssl_reason();
        if (!reason)
            reason = "unknown failure";
        if (strstr(reason, "protocol version") || strstr(reason, "unsupported protocol"))
            snprintf(buf, len, "TLS handshake failed: %s (no TLS version both sides accept; "
                     "ours start at %s)", reason,
                     SSL_get_min_proto_version(ssl) == TLS1_3_VERSION ? "TLSv1.3" :
                     SSL_get_min_proto_version(ssl) == TLS1_2_VERSION ? "TLSv1.2" :
                     SSL_get_min_proto_version(ssl) == TLS1_1_VERSION ? "TLSv1.1" : "TLSv1");
        else
            snprintf(buf, len, "%s: %s", handshake ? "TLS handshake failed" : "TLS failed", reason);
        return reason;
    }
}

/* SSL_get_error reads the thread's error queue, so it must hold nothing stale when an I/O call
 * fails. ERR_clear_error walks all 16 of its slots (~840 instructions in OpenSSL 3.0) and the
 * record path called it twice per record; a look (ERR_peek_error) is enough when it is empty,
 * as it nearly always is. */
static void err_clean(void)
{
    if (ERR_peek_error() != 0)
        ERR_clear_error();
}

enum io_result smtp_tls_read(smtp_sock *s, char *buf, size_t len, size_t *got,
                             char *err, size_t errlen, int *errnum)
{
    int r, e;
    err_clean();
    errno = 0;
    r = SSL_read_ex(s->ssl, buf, len, got);
    if (r == 1) {
        /* A server reads ahead, so whole records can wait in OpenSSL's buffer where no
         * readiness event announces them: take them too, so a short read leaves none behind. */
        size_t more;
        while (*got < len && SSL_has_pending(s->ssl) &&
               SSL_read_ex(s->ssl, buf + *got, len - *got, &more) == 1)
            *got += more;
        err_clean();
        return IO_OK;
    }
    e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        /* About to idle: hand back the empty record buffers (SSL_MODE_RELEASE_BUFFERS does not
         * after handshake records such as TLS 1.3 session tickets). */
        SSL_free_buffers(s->ssl);
        return IO_WANTREAD;
    }
    if (e == SSL_ERROR_WANT_WRITE)
        return IO_WANTWRITE;
    if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0))
        return IO_CLOSED;
    tls_failure(s->ssl, r, 0, err, errlen, errnum);
    return IO_ERROR;
}

enum io_result smtp_tls_write(smtp_sock *s, const char *buf, size_t len, size_t *put,
                              char *err, size_t errlen, int *errnum)
{
    int r, e;
    err_clean();
    errno = 0;
    r = SSL_write_ex(s->ssl, buf, len, put);
    if (r == 1)
        return IO_OK;
    e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ)
        return IO_WANTREAD;
    if (e == SSL_ERROR_WANT_WRITE)
        return IO_WANTWRITE;
    if (e == SSL_ERROR_ZERO_RETURN)
        return IO_CLOSED;
    tls_failure(s->ssl, r, 0, err, errlen, errnum);
    return IO_ERROR;
}

void smtp_tls_free(smtp_sock *s)
{
    if (!s->ssl)
        return;
    /* One non-blocking close_notify, best effort: SMTP's QUIT already ended the session. */
    if ((s->flags & SOCK_F_HANDSHAKEN) && !(s->flags & SOCK_F_EOF) && s->fd >= 0) {
        err_clean();
        SSL_shutdown(s->ssl);
    }
    SSL_free(s->ssl);
    err_clean();
    s->ssl = NULL;
    s->flags &= ~SOCK_F_HANDSHAKEN;
}

/* ---- Lua binding ----------------------------------------------------------------------- */

static tls_ctx *check_ctx(lua_State *L, int idx)
{
    tls_ctx *c = (tls_ctx *)luaL_checkudata(L, idx, SMTP_TLS_CTX);
    if (!c->ctx)
        luaL_error(L, "attempt to use a freed TLS context");
    return c;
}

/* Pushes option `name` of table t and leaves it on the stack: the returned pointer stays valid
 * only while the string is anchored there (a table with an __index metamethod can hand out a
 * fresh string that nothing else references, and the next allocation may collect it). */
static const char *opt_string(lua_State *L, int t, const char *name)
{
    lua_getfield(L, t, name);
    if (lua_isnil(L, -1))
        return NULL;
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad argument #1 to 'tls_context' (option '%s': string expected, got %s)",
                   name, luaL_typename(L, -1));
    return lua_tostring(L, -1);
}

static int ctx_fail(lua_State *L, SSL_CTX *ctx, const char *what, const char *arg)
{
    const char *r = ssl_reason();
    char msg[512];
    snprintf(msg, sizeof msg, "%s%s%s: %s", what, arg ? " " : "", arg ? arg : "",
             r ? r : "failed");
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return smtp_push_fail(L, msg, r ? r : "TLS");
}

/* core.tls_context{ mode="client"|"server", verify=, cafile=, capath=, cert=, key=, ciphers=,
 *                   min_version="TLSv1.2", max_version=, ticket_rotation=3600 } -> ctx | nil, msg */
static int l_tls_context(lua_State *L)
{
    const char *mode, *cafile, *capath, *cert, *key, *minv, *maxv, *ciphers;
    int server, verify, vmin, vmax = 0;
    long rotate = 3600;
    SSL_CTX *ctx;
    tls_ctx *c;
    luaL_checktype(L, 1, LUA_TTABLE);
    /* The eight strings stay on the stack (opt_string) until this function returns. */
    luaL_checkstack(L, 12, "tls_context");
    mode = opt_string(L, 1, "mode");
    cafile = opt_string(L, 1, "cafile");
    capath = opt_string(L, 1, "capath");
    cert = opt_string(L, 1, "cert");
    key = opt_string(L, 1, "key");
    minv = opt_string(L, 1, "min_version");
    maxv = opt_string(L, 1, "max_version");
    ciphers = opt_string(L, 1, "ciphers");
    if (mode && strcmp(mode, "client") != 0 && strcmp(mode, "server") != 0)
        return luaL_error(L, "bad argument #1 to 'tls_context' (option 'mode': \"client\" or \"server\" expected)");
    server = mode && strcmp(mode, "server") == 0;
    lua_getfield(L, 1, "ticket_rotation");
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0)
            return luaL_error(L, "bad argument #1 to 'tls_context' (option 'ticket_rotation': seconds expected)");
        rotate = (long)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "verify");
    /* Clients verify unless told not to; servers do not ask for client certificates. */
    verify = lua_isnil(L, -1) ? !server : lua_toboolean(L, -1);
    lua_pop(L, 1);
    vmin = parse_version(minv ? minv : "TLSv1.2");
    if (vmin < 0)
        return smtp_push_fail(L, "unknown min_version (TLSv1, TLSv1.1, TLSv1.2, TLSv1.3)", "EINVAL");
    if (maxv && (vmax = parse_version(maxv)) < 0)
        return smtp_push_fail(L, "unknown max_version (TLSv1, TLSv1.1, TLSv1.2, TLSv1.3)", "EINVAL");
    if (server && (!cert || !key))
        return smtp_push_fail(L, "a server context needs cert and key", "EINVAL");

    ERR_clear_error();
    ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!ctx)
        return ctx_fail(L, NULL, "cannot create TLS context", NULL);
    SSL_CTX_set_min_proto_version(ctx, vmin);
    if (vmax)
        SSL_CTX_set_max_proto_version(ctx, vmax);
    /* Partial and moving writes: Lua retries a write from a new offset of the same string.
     * Released buffers: an idle TLS connection should not hold 34 KB of empty buffers. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                          SSL_MODE_RELEASE_BUFFERS);
    /* SMTP frames its own data, so a TCP close without close_notify is an ordinary close. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                             SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (ciphers && !SSL_CTX_set_cipher_list(ctx, ciphers))
        return ctx_fail(L, ctx, "bad ciphers", ciphers);
    if (verify) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (server ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), NULL);
        if (cafile || capath) {
            if (!SSL_CTX_load_verify_locations(ctx, cafile, capath))
                return ctx_fail(L, ctx, "cannot load CA certificates from", cafile ? cafile : capath);
        } else if (!SSL_CTX_set_default_verify_paths(ctx)) {
            return ctx_fail(L, ctx, "cannot load the system trust store", NULL);
        }
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    if (cert && !SSL_CTX_use_certificate_chain_file(ctx, cert))
        return ctx_fail(L, ctx, "cannot load certificate", cert);
    if (key && !SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM))
        return ctx_fail(L, ctx, "cannot load private key", key);
    if (cert && key && !SSL_CTX_check_private_key(ctx))
        return ctx_fail(L, ctx, "certificate and key do not match:", cert);

    c = (tls_ctx *)lua_newuserdata(L, sizeof *c);
    memset(c, 0, sizeof *c);
    c->ctx = ctx;
    c->server = server;
    luaL_setmetatable(L, SMTP_TLS_CTX);
    /* Full userdata never move, so OpenSSL's callbacks can find the cache and keys through it;
     * __gc clears the pointer before anything it points to goes. */
    SSL_CTX_set_app_data(ctx, c);
    if (server) {
        /* Tickets only: the server keeps no session state per client. One ticket per handshake
         * is enough for a client that resumes one connection at a time. */
        c->rotate_every = rotate;
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_num_tickets(ctx, 1);
        /* Read ahead: one recv takes what has arrived (a record's header and body, the
         * client's Finished and its first command) instead of a header, then a body. */
        SSL_CTX_set_read_ahead(ctx, 1);
        if (rotate > 0)
            SSL_CTX_set_timeout(ctx, rotate * 2);
        c->ticket_cipher = EVP_CIPHER_fetch(NULL, "AES-256-CBC", NULL);
        if (!c->ticket_cipher || !ticket_rotate(c) || !SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, ticket_cb))
            return luaL_error(L, "tls_context: cannot make session ticket keys");
    } else {
        if (sess_key_idx < 0)
            sess_key_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, sess_key_free);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(ctx, sess_new_cb);
    }
    return 1;
}

static int l_ctx_gc(lua_State *L)
{
    tls_ctx *c = (tls_ctx *)luaL_checkudata(L, 1, SMTP_TLS_CTX);
    int i;
    if (c->ctx) {
        SSL_CTX_set_app_data(c->ctx, NULL);
        SSL_CTX_free(c->ctx);
        c->ctx = NULL;
    }
    for (i = 0; i < SESS_CACHE_MAX; i++)
        if (c->cache[i].key)
            sess_drop(&c->cache[i]);
    OPENSSL_cleanse(c->keys, sizeof c->keys);
    c->nkeys = 0;
    EVP_CIPHER_free(c->ticket_cipher);
    c->ticket_cipher = NULL;
    return 0;
}

/* ctx:rotate_ticket_key(): a new key seals tickets from now on; the one before still opens
 * them, older ones no longer do. The server rotates by itself every ticket_rotation seconds. */
static int l_ctx_rotate(lua_State *L)
{
    tls_ctx *c = check_ctx(L, 1);
    if (!c->server)
        return luaL_error(L, "rotate_ticket_key: not a server context");
    if (!ticket_rotate(c))
        return smtp_push_fail(L, "cannot make a session ticket key", "TLS");
    lua_pushboolean(L, 1);
    return 1;
}

/* ctx:forget_sessions(): a client context drops every session it kept for resumption. */
static int l_ctx_forget(lua_State *L)
{
    tls_ctx *c = check_ctx(L, 1);
    int i;
    for (i = 0; i < SESS_CACHE_MAX; i++)
        if (c->cache[i].key)
            sess_drop(&c->cache[i]);
    return 0;
}

static int l_ctx_mode(lua_State *L)
{
    lua_pushstring(L, check_ctx(L, 1)->server ? "server" : "client");
    return 1;
}

static int l_ctx_tostring(lua_State *L)
{
    tls_ctx *c = (tls_ctx *)luaL_checkudata(L, 1, SMTP_TLS_CTX);
    lua_pushfstring(L, "smtp.tls_context (%s)", c->server ? "server" : "client");
    return 1;
}

/* sock:tls_start(ctx, servername|nil [, verify_name]): TLS from now on; the side (client/server)
 * follows ctx. A client that verifies needs a name (host name or IP address) to check the
 * certificate against: without one any certificate a trusted CA issued would pass, so that is an
 * error unless verify_name is false (chain only, the caller's explicit choice). An empty name or
 * one with a NUL in it is misuse: OpenSSL would take it as "no name" or check a shorter one.
 * The caller must already have dropped every plaintext byte it read (STARTTLS injection). */
static int l_tls_start(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    tls_ctx *c = check_ctx(L, 2);
    size_t namelen = 0;
    const char *name = luaL_optlstring(L, 3, NULL, &namelen);
    int verify_name = lua_isnoneornil(L, 4) || lua_toboolean(L, 4);
    const char *skey = luaL_optstring(L, 5, NULL);
    BIO_METHOD *m;
    BIO *b;
    SSL *ssl;
    if (name && (namelen == 0 || strlen(name) != namelen))
        return luaL_argerror(L, 3, "server name is empty or holds a NUL");
    if (s->fd < 0)
        return luaL_error(L, "attempt to use a closed socket");
    if (s->ssl)
        return luaL_error(L, "TLS is already on for this socket");
    if (!c->server && verify_name && !name && SSL_CTX_get_verify_mode(c->ctx) != SSL_VERIFY_NONE)
        return smtp_push_fail(L, "no server name to check the certificate against (give one, or "
                              "turn the name check off explicitly)", "EINVAL");
    err_clean();
    m = bio_method();
    ssl = SSL_new(c->ctx);
    b = m ? BIO_new(m) : NULL;
    if (!ssl || !b) {
        SSL_free(ssl);
        BIO_free(b);
        return smtp_push_fail(L, "out of memory", "ENOMEM");
    }
    bio_state(b)->fd = s->fd;
    SSL_set_bio(ssl, b, b);
    if (c->server) {
        SSL_set_accept_state(ssl);
    } else {
        SSL_set_connect_state(ssl);
        if (name) {
            int ip = is_ip_text(name);
            /* SNI carries host names only (RFC 6066); an IP is checked as an IP. */
            if (!ip && !SSL_set_tlsext_host_name(ssl, name)) {
                SSL_free(ssl);
                return smtp_push_fail(L, "cannot set the server name (SNI)", "EINVAL");
            }
            if (verify_name && SSL_get_verify_mode(ssl) != SSL_VERIFY_NONE) {
                int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name)
                            : SSL_set1_host(ssl, name);
                if (!ok) {
                    SSL_free(ssl);
                    return smtp_push_fail(L, "cannot set the name to verify", "EINVAL");
                }
                SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            }
        }
        if (skey && sess_key_idx >= 0) {
            sess_entry *e = sess_find(c, skey);
            char *k = strdup(skey);
            if (!k || !SSL_set_ex_data(ssl, sess_key_idx, k)) {
                free(k);
                SSL_free(ssl);
                return smtp_push_fail(L, "out of memory", "ENOMEM");
            }
            if (e) {
                SSL_SESSION *ss = e->sess;
                if ((time_t)SSL_SESSION_get_time(ss) + SSL_SESSION_get_timeout(ss) <= time(NULL))
                    sess_drop(e);
                else if ((ss = SSL_SESSION_dup(ss)) != NULL) {
                    /* a copy per connection: OpenSSL marks the session a connection uses
                     * (not resumable, when it ends badly), and others may be using ours */
                    SSL_set_session(ssl, ss);
                    SSL_SESSION_free(ss);
                }
            }
        }
    }
    s->ssl = ssl;
    s->flags &= ~SOCK_F_HANDSHAKEN;
    lua_pushboolean(L, 1);
    return 1;
}

/* sock:tls_handshake() -> true | nil,"wantread"/"wantwrite" | nil,msg,code */
static int l_tls_handshake(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    char msg[512];
    const char *code;
    int r, e, errnum, sent;
    sock_bio *sb;
    if (s->fd < 0 || !s->ssl)
        return luaL_error(L, s->fd < 0 ? "attempt to use a closed socket" : "tls_start() first");
    if (s->flags & SOCK_F_HANDSHAKEN) {
        lua_pushboolean(L, 1);
        return 1;
    }
    /* A server's records of this step are gathered and sent as one (see sock_bio). */
    sb = SSL_is_server(s->ssl) ? bio_state(SSL_get_rbio(s->ssl)) : NULL;
    if (sb && sb->outlen > 0 && (sent = out_send(sb)) <= 0) {
        /* the rest of a flight the kernel did not take at once */
        if (sent == 0)
            return smtp_push_fail(L, "wantwrite", NULL);
        errnum = errno;
        snprintf(msg, sizeof msg, "TLS handshake failed: %s", strerror(errnum));
        return smtp_push_fail(L, msg, strerrorname_np(errnum));
    }
    err_clean();
    errno = 0;
    if (sb)
        sb->gather = 1;
    r = SSL_do_handshake(s->ssl);
    e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(s->ssl, r);
    if (sb) {
        sb->gather = 0;
        if (r == 1 && SSL_version(s->ssl) == TLS1_3_VERSION) {
            /* only the session ticket was written: it leaves with the first reply */
            sb->hold = sb->outlen > 0;
        } else if (sb->outlen > 0) {
            int saved = errno;
            sent = out_send(sb);
            if (sent == 0 && (r == 1 || e == SSL_ERROR_WANT_READ))
                return smtp_push_fail(L, "wantwrite", NULL);
            if (sent < 0 && (r == 1 || e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)) {
                errnum = errno;
                snprintf(msg, sizeof msg, "TLS handshake failed: %s", strerror(errnum));
                return smtp_push_fail(L, msg, strerrorname_np(errnum));
            }
            /* a failure's alert went out as far as it could; report the failure itself */
            errno = saved;
        }
    }
    if (r == 1) {
        s->flags |= SOCK_F_HANDSHAKEN;
        SSL_free_buffers(s->ssl);
        lua_pushboolean(L, 1);
        return 1;
    }
    if (e == SSL_ERROR_WANT_READ)
        return smtp_push_fail(L, "wantread", NULL);
    if (e == SSL_ERROR_WANT_WRITE)
        return smtp_push_fail(L, "wantwrite", NULL);
    code = tls_failure(s->ssl, r, 1, msg, sizeof msg, &errnum);
    if (errnum)
        code = strerrorname_np(errnum);
    ERR_clear_error();
    return smtp_push_fail(L, msg, code);
}

static void set_name(lua_State *L, X509_NAME *n, const char *field)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *p;
    long len;
    if (!b)
        return;
    X509_NAME_print_ex(b, n, 0, XN_FLAG_RFC2253);
    len = BIO_get_mem_data(b, &p);
    lua_pushlstring(L, p, (size_t)len);
    lua_setfield(L, -2, field);
    BIO_free(b);
}

/* sock:tls_info() -> nil | { version=, cipher=, bits=, peer_subject=, peer_issuer=,
 *                            verify_result= ("ok" or why the peer certificate fails),
 *                            resumed= (an earlier session was resumed: no certificate this time) } */
static int l_tls_info(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    X509 *peer;
    if (!s->ssl || !(s->flags & SOCK_F_HANDSHAKEN)) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 5);
    lua_pushstring(L, SSL_get_version(s->ssl));
    lua_setfield(L, -2, "version");
    lua_pushstring(L, SSL_get_cipher_name(s->ssl));
    lua_setfield(L, -2, "cipher");
    lua_pushinteger(L, SSL_get_cipher_bits(s->ssl, NULL));
    lua_setfield(L, -2, "bits");
    lua_pushboolean(L, SSL_session_reused(s->ssl));
    lua_setfield(L, -2, "resumed");
    peer = SSL_get1_peer_certificate(s->ssl);
    if (peer) {
        set_name(L, X509_get_subject_name(peer), "peer_subject");
        set_name(L, X509_get_issuer_name(peer), "peer_issuer");
        X509_free(peer);
        /* what the chain and name check concluded, also when the caller chose not to enforce it */
        long vr = SSL_get_verify_result(s->ssl);
        lua_pushstring(L, vr == X509_V_OK ? "ok" : X509_verify_cert_error_string(vr));
        lua_setfield(L, -2, "verify_result");
    }
    return 1;
}

/* ---- DANE (RFC 7672): OpenSSL's own TLSA matching ---------------------------------------- */

/* sock:tls_dane(base, { {usage=, selector=, mtype=, data=}, ... } [, { name, ... }])
 *   -> usable count | nil, msg
 * Between tls_start and tls_handshake: the handshake then succeeds only when the peer's chain
 * matches one of the usable records, whatever the context's own verify setting. `base` is the
 * TLSA base domain (the MX host name), the reference identifier for DANE-TA(2) together with the
 * extra names; DANE-EE(3) checks neither names nor dates (RFC 7672 §3.1.1). PKIX usages (0, 1)
 * are left out: SMTP has no agreed trust store to check them against (RFC 7672 §3.1.3). Records
 * OpenSSL cannot use (unknown selector or matching type) are not counted; 0 usable is nil, msg. */
static int l_tls_dane(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    const char *base = luaL_checkstring(L, 2);
    int usable = 0;
    luaL_checktype(L, 3, LUA_TTABLE);
    if (!lua_isnoneornil(L, 4))
        luaL_checktype(L, 4, LUA_TTABLE);
    if (!s->ssl || (s->flags & SOCK_F_HANDSHAKEN))
        return luaL_error(L, "tls_dane: call it between tls_start() and tls_handshake()");
    if (SSL_is_server(s->ssl))
        return luaL_error(L, "tls_dane: client side only");
    ERR_clear_error();
    if (SSL_CTX_dane_enable(SSL_get_SSL_CTX(s->ssl)) <= 0 || SSL_dane_enable(s->ssl, base) <= 0) {
        const char *r = ssl_reason();
        ERR_clear_error();
        return smtp_push_fail(L, r ? r : "cannot enable DANE", "TLS");
    }
    SSL_dane_set_flags(s->ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
    if (!lua_isnoneornil(L, 4)) {
        lua_Integer n = (lua_Integer)lua_rawlen(L, 4);
        for (lua_Integer i = 1; i <= n; i++) {
            lua_rawgeti(L, 4, i);
            if (lua_type(L, -1) == LUA_TSTRING && !SSL_add1_host(s->ssl, lua_tostring(L, -1))) {
                ERR_clear_error();
                return smtp_push_fail(L, "cannot add a name to verify", "EINVAL");
            }
            lua_pop(L, 1);
        }
    }
    lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_Integer usage, selector, mtype;
        size_t len = 0;
        const char *data;
        lua_rawgeti(L, 3, i);
        if (!lua_istable(L, -1))
            return luaL_argerror(L, 3, "TLSA records (tables) expected");
        lua_getfield(L, -1, "usage");
        lua_getfield(L, -2, "selector");
        lua_getfield(L, -3, "mtype");
        lua_getfield(L, -4, "data");
        usage = lua_tointeger(L, -4);
        selector = lua_tointeger(L, -3);
        mtype = lua_tointeger(L, -2);
        data = lua_tolstring(L, -1, &len);
        if (data && (usage == 2 || usage == 3) && selector >= 0 && selector <= 255 &&
            mtype >= 0 && mtype <= 255 &&
            SSL_dane_tlsa_add(s->ssl, (uint8_t)usage, (uint8_t)selector, (uint8_t)mtype,
                              (const unsigned char *)data, len) > 0)
            usable++;
        ERR_clear_error();
        lua_pop(L, 5);
    }
    if (usable == 0)
        return smtp_push_fail(L, "no usable TLSA record", "EINVAL");
    SSL_set_verify(s->ssl, SSL_VERIFY_PEER, NULL);
    lua_pushinteger(L, usable);
    return 1;
}

/* sock:tls_dane_info() -> nil (no DANE, or not verified by it) |
 *   { usage=, selector=, mtype=, depth= }: the TLSA record that matched and the chain depth of
 *   the certificate it matched (0 the server's own). */
static int l_tls_dane_info(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    uint8_t usage, selector, mtype;
    unsigned const char *data;
    size_t dlen;
    int depth;
    if (!s->ssl || !(s->flags & SOCK_F_HANDSHAKEN) || SSL_get_verify_result(s->ssl) != X509_V_OK ||
        (depth = SSL_get0_dane_tlsa(s->ssl, &usage, &selector, &mtype, &data, &dlen)) < 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, usage);
    lua_setfield(L, -2, "usage");
    lua_pushinteger(L, selector);
    lua_setfield(L, -2, "selector");
    lua_pushinteger(L, mtype);
    lua_setfield(L, -2, "mtype");
    lua_pushinteger(L, depth);
    lua_setfield(L, -2, "depth");
    return 1;
}

static const luaL_Reg sock_dane_methods[] = {
    { "tls_dane", l_tls_dane },
    { "tls_dane_info", l_tls_dane_info },
    { NULL, NULL },
};

static const luaL_Reg sock_tls_methods[] = {
    { "tls_start", l_tls_start },
    { "tls_handshake", l_tls_handshake },
    { "tls_info", l_tls_info },
    { NULL, NULL },
};

static const luaL_Reg ctx_methods[] = {
    { "mode", l_ctx_mode },
    { "rotate_ticket_key", l_ctx_rotate },
    { "forget_sessions", l_ctx_forget },
    { NULL, NULL },
};

static const luaL_Reg ctx_meta[] = {
    { "__gc", l_ctx_gc },
    { "__tostring", l_ctx_tostring },
    { NULL, NULL },
};

static const luaL_Reg funcs[] = {
    { "tls_context", l_tls_context },
    { NULL, NULL },
};

int smtp_open_tls(lua_State *L)
{
    smtp_newclass(L, SMTP_TLS_CTX, ctx_methods, ctx_meta);
    smtp_net_add_methods(L, sock_tls_methods);
    smtp_net_add_methods(L, sock_dane_methods);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
