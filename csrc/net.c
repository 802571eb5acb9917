/* Non-blocking sockets for the native transport (TCP, and Unix domain sockets for LMTP and local
 * servers): connect, listen/accept, read, write. */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <poll.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include "net.h"

/* ---- plain C: addresses and sockets ---------------------------------------------------- */

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
    struct sockaddr_un un;
    struct sockaddr_storage ss;
} sockaddr_any;

/* Numeric IPv4 or IPv6 text (IPv6 may come in brackets) -> address; 0 if it is not one. */
static int addr_parse(const char *ip, int port, sockaddr_any *a, socklen_t *len)
{
    char tmp[INET6_ADDRSTRLEN + 2];
    size_t n = strlen(ip);
    memset(a, 0, sizeof *a);
    if (n >= 2 && ip[0] == '[' && ip[n - 1] == ']' && n - 2 < sizeof tmp) {
        memcpy(tmp, ip + 1, n - 2);
        tmp[n - 2] = '\0';
        ip = tmp;
    }
    if (inet_pton(AF_INET, ip, &a->v4.sin_addr) == 1) {
        a->v4.sin_family = AF_INET;
        a->v4.sin_port = htons((unsigned short)port);
        *len = sizeof a->v4;
        return 1;
    }
    if (inet_pton(AF_INET6, ip, &a->v6.sin6_addr) == 1) {
        a->v6.sin6_family = AF_INET6;
        a->v6.sin6_port = htons((unsigned short)port);
        *len = sizeof a->v6;
        return 1;
    }
    return 0;
}

/* Room for an address as text: an IPv6 address, or a Unix socket's path. */
#define ADDR_TEXT 112

/* Address -> text and port (for peer() and accept()). */
static void addr_format(const sockaddr_any *a, char *buf, size_t len, int *port)
{
    buf[0] = '\0';
    *port = 0;
    if (a->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &a->v4.sin_addr, buf, (socklen_t)len);
        *port = ntohs(a->v4.sin_port);
    } else if (a->sa.sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &a->v6.sin6_addr, buf, (socklen_t)len);
        *port = ntohs(a->v6.sin6_port);
    } else if (a->sa.sa_family == AF_UNIX) {
        /* a client's end of a Unix socket usually has no name: say what it is instead */
        const char *name = a->un.sun_path[0] ? a->un.sun_path : "unix";
        size_t n = strnlen(name, sizeof a->un.sun_path);
        if (n >= len)
            n = len - 1;
        memcpy(buf, name, n);
        buf[n] = '\0';
    }
}

/* A Unix socket path -> address; 0 when it is empty or too long for sun_path. */
static int unix_addr(const char *path, size_t n, sockaddr_any *a, socklen_t *len)
{
    memset(a, 0, sizeof *a);
    if (n == 0 || n >= sizeof a->un.sun_path || memchr(path, '\0', n))
        return 0;
    a->un.sun_family = AF_UNIX;
    memcpy(a->un.sun_path, path, n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 1;
}

/* Small writes must leave at once: SMTP is request/reply and Nagle would stall it 40 ms. */
static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static const char *errno_name(int e)
{
    const char *n = strerrorname_np(e);
    return n ? n : "EUNKNOWN";
}

/* Plain (non-TLS) read of up to len bytes. */
static enum io_result plain_read(smtp_sock *s, char *buf, size_t len, size_t *got, int *err)
{
    ssize_t n;
    do
        n = recv(s->fd, buf, len, 0);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        *got = (size_t)n;
        return IO_OK;
    }
    if (n == 0)
        return IO_CLOSED;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return IO_WANTREAD;
    *err = errno;
    return IO_ERROR;
}

/* Plain write; MSG_NOSIGNAL because a peer that went away must give EPIPE, not kill us. */
static enum io_result plain_write(smtp_sock *s, const char *buf, size_t len, size_t *put, int *err)
{
    ssize_t n;
    do
        n = send(s->fd, buf, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n >= 0) {
        *put = (size_t)n;
        return IO_OK;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        return IO_WANTWRITE;
    *err = errno;
    return IO_ERROR;
}

static void sock_close_fd(smtp_sock *s)
{
    smtp_tls_free(s);
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
}

/* ---- Lua binding ----------------------------------------------------------------------- */

int smtp_push_fail(lua_State *L, const char *msg, const char *code)
{
    lua_pushnil(L);
    lua_pushstring(L, msg);
    if (code)
        lua_pushstring(L, code);
    else
        lua_pushnil(L);
    return 3;
}

static int push_errno(lua_State *L, int e)
{
    return smtp_push_fail(L, strerror(e), errno_name(e));
}

/* read and write, and the server engine's recv, carry the socket metatable as upvalue 1
 * (smtp_check_class). */
smtp_sock *smtp_check_sock(lua_State *L, int idx)
{
    return smtp_check_class(L, idx, 1, SMTP_SOCKET);
}

static smtp_sock *check_open(lua_State *L, int idx)
{
    smtp_sock *s = smtp_check_sock(L, idx);
    if (s->fd < 0)
        luaL_error(L, "attempt to use a closed socket");
    return s;
}

static smtp_sock *new_sock(lua_State *L, int fd, int flags)
{
    smtp_sock *s = (smtp_sock *)lua_newuserdata(L, sizeof *s);
    s->fd = fd;
    s->flags = flags;
    s->ssl = NULL;
    luaL_setmetatable(L, SMTP_SOCKET);
    return s;
}

static int check_port(lua_State *L, int idx)
{
    lua_Integer port = luaL_checkinteger(L, idx);
    if (port < 0 || port > 65535)
        luaL_argerror(L, idx, "port out of range");
    return (int)port;
}

/* Binds fd to the local address bip (port bport, 0 = any) before it connects: for hosts with
 * several addresses. With port 0 the kernel picks the port at connect time (IP_BIND_ADDRESS_NO_PORT),
 * so many connections from one address do not each reserve a port at bind time. */
static int bind_local(int fd, const sockaddr_any *b, socklen_t blen, int bport)
{
    if (bport == 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    }
    return bind(fd, &b->sa, blen);
}

/* Starts a non-blocking connect on fd and pushes the socket (connecting, or connected at once;
 * connect_finish completes it) -> 1, or closes fd -> nil, msg, code. */
static int connect_push(lua_State *L, int fd, const sockaddr_any *a, socklen_t alen)
{
    int flags = 0;
    if (connect(fd, &a->sa, alen) < 0) {
        if (errno == EINPROGRESS || errno == EINTR) {
            flags = SOCK_F_CONNECTING;
        } else {
            int e = errno;
            close(fd);
            return push_errno(L, e);
        }
    }
    new_sock(L, fd, flags);
    return 1;
}

/* core.connect_start(ip, port [, bind_ip [, bind_port]]) -> sock | nil, msg, code
 * A bind address of another family than ip fails with code "EAFNOSUPPORT"; one this host does
 * not hold with "EADDRNOTAVAIL" (the message then starts with "bind"). */
static int l_connect_start(lua_State *L)
{
    const char *ip = luaL_checkstring(L, 1);
    int port = check_port(L, 2);
    const char *bip = luaL_optstring(L, 3, NULL);
    int bport = (int)luaL_optinteger(L, 4, 0);
    sockaddr_any a, b;
    socklen_t alen, blen = 0;
    int fd;
    if (bport < 0 || bport > 65535)
        return luaL_argerror(L, 4, "port out of range");
    if (!addr_parse(ip, port, &a, &alen))
        return smtp_push_fail(L, "not a numeric IP address", "EINVAL");
    if (bip) {
        if (!addr_parse(bip, bport, &b, &blen))
            return smtp_push_fail(L, "bind: not a numeric IP address", "EINVAL");
        if (b.sa.sa_family != a.sa.sa_family)
            return smtp_push_fail(L, "bind: the local address is not of the server address's family",
                                  "EAFNOSUPPORT");
    }
    fd = socket(a.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return push_errno(L, errno);
    set_nodelay(fd);
    if (bip && bind_local(fd, &b, blen, bport) < 0) {
        int e = errno;
        char msg[160];
        close(fd);
        snprintf(msg, sizeof msg, "bind %s: %s", bip, strerror(e));
        return smtp_push_fail(L, msg, errno_name(e));
    }
    return connect_push(L, fd, &a, alen);
}

/* core.connect_unix(path) -> sock | nil, msg, code: a stream connection to a Unix socket (an
 * LMTP server's, say), non-blocking like connect_start; connect_finish completes it. A listener
 * whose backlog is full answers EAGAIN at once (no handshake to wait for): that is a failure. */
static int l_connect_unix(lua_State *L)
{
    size_t n;
    const char *path = luaL_checklstring(L, 1, &n);
    sockaddr_any a;
    socklen_t alen;
    int fd;
    if (!unix_addr(path, n, &a, &alen))
        return smtp_push_fail(L, "not a usable socket path (empty, a NUL, or too long)", "EINVAL");
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return push_errno(L, errno);
    return connect_push(L, fd, &a, alen);
}

/* sock:connect_finish() -> true | nil,"wantwrite" | nil,msg,code */
static int l_connect_finish(lua_State *L)
{
    smtp_sock *s = check_open(L, 1);
    struct pollfd p = { .fd = s->fd, .events = POLLOUT };
    int err = 0;
    socklen_t len = sizeof err;
    if (!(s->flags & SOCK_F_CONNECTING)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    /* Not writable yet means the handshake is still under way. */
    if (poll(&p, 1, 0) == 0)
        return smtp_push_fail(L, "wantwrite", NULL);
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err)
        return push_errno(L, err);
    s->flags &= ~SOCK_F_CONNECTING;
    lua_pushboolean(L, 1);
    return 1;
}

/* nil, "wantread" | "wantwrite" | "closed" | message, code: what a read or write that did not
 * complete says to Lua. */
static int push_io_fail(lua_State *L, const smtp_sock *s, enum io_result r, const char *err, int e)
{
    switch (r) {
    case IO_WANTREAD:
        return smtp_push_fail(L, "wantread", NULL);
    case IO_WANTWRITE:
        return smtp_push_fail(L, "wantwrite", NULL);
    case IO_CLOSED:
        return smtp_push_fail(L, "closed", NULL);
    default:
        if (s->ssl)
            return smtp_push_fail(L, err, e ? errno_name(e) : "TLS");
        return push_errno(L, e);
    }
}

int smtp_sock_read(lua_State *L, int idx, char *buf, size_t max, size_t *got)
{
    smtp_sock *s = check_open(L, idx);
    char err[256];
    int e = 0;
    enum io_result r;
    *got = 0;
    if (s->ssl) {
        err[0] = '\0';
        r = smtp_tls_read(s, buf, max, got, err, sizeof err, &e);
    } else {
        r = plain_read(s, buf, max, got, &e);
    }
    if (r == IO_OK)
        return 0;
    *got = 0;
    if (r == IO_CLOSED)
        s->flags |= SOCK_F_EOF;
    return push_io_fail(L, s, r, err, e);
}

/* sock:read(max) -> string | nil,"wantread"/"wantwrite" | nil,"closed" | nil,msg,code */
static int l_read(lua_State *L)
{
    check_open(L, 1);
    lua_Integer max = luaL_optinteger(L, 2, SMTP_READ_MAX);
    char buf[SMTP_READ_MAX];
    size_t got;
    int n;
    if (max < 1)
        return luaL_argerror(L, 2, "max must be positive");
    if (max > SMTP_READ_MAX)
        max = SMTP_READ_MAX;
    if ((n = smtp_sock_read(L, 1, buf, (size_t)max, &got)) != 0)
        return n;
    lua_pushlstring(L, buf, got);
    return 1;
}

/* One write of len bytes from buf through the socket at idx (TLS once started): pushes the
 * number of bytes the kernel took, or the failure (nil, want | nil, msg, code); *put gets the
 * count. sock:write and the client engine's write_to both go through here. */
int smtp_sock_write(lua_State *L, int idx, const char *buf, size_t len, size_t *put)
{
    smtp_sock *s = check_open(L, idx);
    char err[256];
    int e = 0;
    enum io_result r;
    *put = 0;
    if (len == 0) {
        lua_pushinteger(L, 0);
        return 1;
    }
    if (s->ssl) {
        err[0] = '\0';
        r = smtp_tls_write(s, buf, len, put, err, sizeof err, &e);
    } else {
        r = plain_write(s, buf, len, put, &e);
    }
    if (r == IO_OK) {
        lua_pushinteger(L, (lua_Integer)*put);
        return 1;
    }
    *put = 0; /* a failed TLS write may have counted bytes it did not send */
    return push_io_fail(L, s, r, err, e);
}

/* sock:write(str [, i]) -> nwritten | nil,want | nil,msg,code.  Writes str from byte i. */
static int l_write(lua_State *L)
{
    size_t len, put;
    const char *str = luaL_checklstring(L, 2, &len);
    lua_Integer i = luaL_optinteger(L, 3, 1);
    if (i < 1 || (size_t)i > len + 1)
        return luaL_argerror(L, 3, "index out of range");
    return smtp_sock_write(L, 1, str + (i - 1), len - (size_t)(i - 1), &put);
}

static int l_sock_fd(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    lua_pushinteger(L, s->fd);
    return 1;
}

static int l_sock_close(lua_State *L)
{
    sock_close_fd(smtp_check_sock(L, 1));
    return 0;
}

static int l_shutdown_write(lua_State *L)
{
    smtp_sock *s = check_open(L, 1);
    if (shutdown(s->fd, SHUT_WR) < 0)
        return push_errno(L, errno);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_name(lua_State *L, int fd, int peer)
{
    sockaddr_any a;
    socklen_t len = sizeof a;
    char buf[ADDR_TEXT];
    int port;
    memset(&a, 0, sizeof a);
    if ((peer ? getpeername(fd, &a.sa, &len) : getsockname(fd, &a.sa, &len)) < 0)
        return push_errno(L, errno);
    addr_format(&a, buf, sizeof buf, &port);
    lua_pushstring(L, buf);
    lua_pushinteger(L, port);
    return 2;
}

static int l_peer(lua_State *L) { return push_name(L, check_open(L, 1)->fd, 1); }
static int l_local_addr(lua_State *L) { return push_name(L, check_open(L, 1)->fd, 0); }

static int l_sock_tostring(lua_State *L)
{
    smtp_sock *s = smtp_check_sock(L, 1);
    if (s->fd < 0)
        lua_pushstring(L, "smtp.socket (closed)");
    else
        lua_pushfstring(L, "smtp.socket (fd %d%s)", s->fd, s->ssl ? ", tls" : "");
    return 1;
}

/* ---- listener -------------------------------------------------------------------------- */

typedef struct smtp_listener {
    int fd;
    int port;
} smtp_listener;

static smtp_listener *check_listener(lua_State *L, int idx)
{
    return (smtp_listener *)luaL_checkudata(L, idx, SMTP_LISTENER);
}

/* core.listen(ip, port, backlog) -> listener | nil, msg, code */
static int l_listen(lua_State *L)
{
    const char *ip = luaL_checkstring(L, 1);
    int port = check_port(L, 2);
    lua_Integer backlog = luaL_optinteger(L, 3, 128);
    sockaddr_any a;
    socklen_t alen;
    int fd, one = 1;
    smtp_listener *l;
    if (!addr_parse(ip, port, &a, &alen))
        return smtp_push_fail(L, "not a numeric IP address", "EINVAL");
    fd = socket(a.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return push_errno(L, errno);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Accepted sockets inherit it from here (Linux copies the listener's TCP options), which
     * saves a setsockopt per connection. */
    set_nodelay(fd);
    if (a.sa.sa_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (backlog < 1 || backlog > 65535)
        backlog = 128;
    if (bind(fd, &a.sa, alen) < 0 || listen(fd, (int)backlog) < 0) {
        int e = errno;
        close(fd);
        return push_errno(L, e);
    }
    l = (smtp_listener *)lua_newuserdata(L, sizeof *l);
    l->fd = fd;
    l->port = port;
    if (port == 0) {
        char ignored[INET6_ADDRSTRLEN];
        alen = sizeof a;
        if (getsockname(fd, &a.sa, &alen) == 0)
            addr_format(&a, ignored, sizeof ignored, &l->port);
    }
    luaL_setmetatable(L, SMTP_LISTENER);
    return 1;
}

/* A socket file at a that nobody listens on any more (a server that died left it): it may go. */
static int stale_socket(const sockaddr_any *a, socklen_t alen)
{
    struct stat st;
    if (stat(a->un.sun_path, &st) < 0 || !S_ISSOCK(st.st_mode))
        return 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int refused = connect(fd, &a->sa, alen) < 0 && errno == ECONNREFUSED;
    close(fd);
    return refused;
}

/* core.listen_unix(path, backlog) -> listener | nil, msg, code: a listener on a Unix socket
 * (port() is 0). A socket file left by a server that is gone is replaced; a live one, or any
 * other file, is EADDRINUSE. The file stays when the listener closes: the caller removes it. */
static int l_listen_unix(lua_State *L)
{
    size_t n;
    const char *path = luaL_checklstring(L, 1, &n);
    lua_Integer backlog = luaL_optinteger(L, 2, 128);
    sockaddr_any a;
    socklen_t alen;
    if (!unix_addr(path, n, &a, &alen))
        return smtp_push_fail(L, "not a usable socket path (empty, a NUL, or too long)", "EINVAL");
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return push_errno(L, errno);
    if (backlog < 1 || backlog > 65535)
        backlog = 128;
    int rc = bind(fd, &a.sa, alen);
    if (rc < 0 && errno == EADDRINUSE && stale_socket(&a, alen) && unlink(path) == 0)
        rc = bind(fd, &a.sa, alen);
    if (rc < 0 || listen(fd, (int)backlog) < 0) {
        int e = errno;
        close(fd);
        return push_errno(L, e);
    }
    smtp_listener *l = (smtp_listener *)lua_newuserdata(L, sizeof *l);
    l->fd = fd;
    l->port = 0;
    luaL_setmetatable(L, SMTP_LISTENER);
    return 1;
}

/* listener:accept() -> sock, peer_ip, peer_port | nil,"wantread" | nil,msg,code */
static int l_accept(lua_State *L)
{
    smtp_listener *l = check_listener(L, 1);
    sockaddr_any a;
    socklen_t alen = sizeof a;
    char buf[ADDR_TEXT];
    int fd, port;
    if (l->fd < 0)
        return luaL_error(L, "attempt to use a closed listener");
    memset(&a, 0, sizeof a);   /* an unnamed Unix peer leaves sun_path unwritten */
    do
        fd = accept4(l->fd, &a.sa, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        /* A connection that died in the backlog is not the listener's failure. */
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED)
            return smtp_push_fail(L, "wantread", NULL);
        return push_errno(L, errno);
    }
    new_sock(L, fd, 0);
    addr_format(&a, buf, sizeof buf, &port);
    lua_pushstring(L, buf);
    lua_pushinteger(L, port);
    return 3;
}

static int l_listener_fd(lua_State *L)
{
    lua_pushinteger(L, check_listener(L, 1)->fd);
    return 1;
}

static int l_listener_port(lua_State *L)
{
    lua_pushinteger(L, check_listener(L, 1)->port);
    return 1;
}

static int l_listener_close(lua_State *L)
{
    smtp_listener *l = check_listener(L, 1);
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
    return 0;
}

static int l_listener_tostring(lua_State *L)
{
    smtp_listener *l = check_listener(L, 1);
    lua_pushfstring(L, "smtp.listener (fd %d, port %d)", l->fd, l->port);
    return 1;
}

static const luaL_Reg sock_methods[] = {
    { "connect_finish", l_connect_finish },
    { "read", l_read },
    { "write", l_write },
    { "fd", l_sock_fd },
    { "close", l_sock_close },
    { "shutdown_write", l_shutdown_write },
    { "peer", l_peer },
    { "local_addr", l_local_addr },
    { NULL, NULL },
};

static const luaL_Reg sock_meta[] = {
    { "__gc", l_sock_close },
    { "__close", l_sock_close },
    { "__tostring", l_sock_tostring },
    { NULL, NULL },
};

static const luaL_Reg listener_methods[] = {
    { "accept", l_accept },
    { "fd", l_listener_fd },
    { "port", l_listener_port },
    { "close", l_listener_close },
    { NULL, NULL },
};

static const luaL_Reg listener_meta[] = {
    { "__gc", l_listener_close },
    { "__close", l_listener_close },
    { "__tostring", l_listener_tostring },
    { NULL, NULL },
};

static const luaL_Reg funcs[] = {
    { "connect_start", l_connect_start },
    { "connect_unix", l_connect_unix },
    { "listen", l_listen },
    { "listen_unix", l_listen_unix },
    { NULL, NULL },
};

void smtp_net_add_methods(lua_State *L, const luaL_Reg *methods)
{
    luaL_getmetatable(L, SMTP_SOCKET);
    lua_getfield(L, -1, "__index");
    luaL_setfuncs(L, methods, 0);
    lua_pop(L, 2);
}

int smtp_open_net(lua_State *L)
{
    smtp_newclass(L, SMTP_SOCKET, sock_methods, sock_meta);
    /* read and write again, as closures over the metatable (smtp_check_sock) */
    static const luaL_Reg hot[] = { { "read", l_read }, { "write", l_write }, { NULL, NULL } };
    smtp_class_closures(L, SMTP_SOCKET, hot);
    smtp_newclass(L, SMTP_LISTENER, listener_methods, listener_meta);
    luaL_setfuncs(L, funcs, 0);
    return 0;
}
