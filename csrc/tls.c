/* TLS for the native transport: OpenSSL contexts and TLS over an smtp.socket (filled in next). */
#include "net.h"

enum io_result smtp_tls_read(smtp_sock *s, char *buf, size_t len, size_t *got,
                             char *err, size_t errlen)
{
    (void)s; (void)buf; (void)len; (void)got; (void)err; (void)errlen;
    return IO_ERROR;
}

enum io_result smtp_tls_write(smtp_sock *s, const char *buf, size_t len, size_t *put,
                              char *err, size_t errlen)
{
    (void)s; (void)buf; (void)len; (void)put; (void)err; (void)errlen;
    return IO_ERROR;
}

void smtp_tls_free(smtp_sock *s)
{
    (void)s;
}

int smtp_open_tls(lua_State *L)
{
    (void)L;
    return 0;
}
