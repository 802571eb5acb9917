/* Socket object shared by net.c (plain TCP) and tls.c (OpenSSL over the same socket). */
#ifndef SMTP_NET_H
#define SMTP_NET_H

#include <openssl/ssl.h>
#include "core.h"

#define SMTP_SOCKET   "smtp.socket"
#define SMTP_LISTENER "smtp.listener"
#define SMTP_TLS_CTX  "smtp.tls_context"

/* Largest single read; reads land in a stack buffer of this size, never in the object. */
#define SMTP_READ_MAX 65536

enum sock_flag {
    SOCK_F_CONNECTING = 1, /* connect() returned EINPROGRESS, connect_finish() not yet done */
    SOCK_F_HANDSHAKEN = 2, /* TLS handshake finished: reads and writes go through ssl */
    SOCK_F_EOF        = 4, /* the peer's side of the stream ended */
};

/* Kept small on purpose: an idle connection costs this, a Lua wrapper and its coroutine. */
typedef struct smtp_sock {
    int fd;     /* -1 once closed */
    int flags;  /* enum sock_flag */
    SSL *ssl;   /* non-NULL once tls_start() ran */
} smtp_sock;

/* Result of one non-blocking I/O step. */
enum io_result { IO_OK = 0, IO_WANTREAD, IO_WANTWRITE, IO_CLOSED, IO_ERROR };

/* tls.c: non-blocking read/write through the socket's SSL; on IO_ERROR writes a message to err
 * and the errno (0 when the failure is OpenSSL's own) to *errnum. */
enum io_result smtp_tls_read(smtp_sock *s, char *buf, size_t len, size_t *got,
                             char *err, size_t errlen, int *errnum);
enum io_result smtp_tls_write(smtp_sock *s, const char *buf, size_t len, size_t *put,
                              char *err, size_t errlen, int *errnum);
/* Frees the socket's SSL (sending close_notify once, best effort, if the handshake finished). */
void smtp_tls_free(smtp_sock *s);

/* net.c: the socket method table, so tls.c can add its methods to it. */
void smtp_net_add_methods(lua_State *L, const luaL_Reg *methods);
smtp_sock *smtp_check_sock(lua_State *L, int idx);

/* One write through the socket at idx (TLS once started); pushes what sock:write returns and
 * sets *put to the bytes written (0 on failure). */
int smtp_sock_write(lua_State *L, int idx, const char *buf, size_t len, size_t *put);
/* One read of up to max bytes into buf through the socket at idx (TLS once started): 0 with *got
 * set, or the failure pushed (nil, want | nil, "closed" | nil, msg, code) and its count. */
int smtp_sock_read(lua_State *L, int idx, char *buf, size_t max, size_t *got);

/* Pushes nil, msg, code and returns 3: the failure shape of every socket method. */
int smtp_push_fail(lua_State *L, const char *msg, const char *code);

#endif
