/* Sans-I/O parser of the PROXY protocol header (HAProxy's v1 text and v2 binary forms) that a
 * load balancer sends before anything else on a connection. Plain C; used by proxyproto_lua.c and
 * fuzz/proxyproto_fuzz.c. */
#ifndef SMTP_PROXYPROTO_H
#define SMTP_PROXYPROTO_H

#include <stddef.h>

#define SMTP_PROXY_V1_MAX 107            /* the longest v1 line, CRLF included */
#define SMTP_PROXY_V2_MAX (16 + 65535)   /* the v2 fixed part and the longest address block */

typedef struct smtp_proxy_header {
    int version;          /* 1 or 2 */
    int local;            /* v2 LOCAL (a health check), v1 UNKNOWN, or an address family other
                             than IPv4/IPv6 over a stream: the connection's own addresses stand */
    int family;           /* 4 or 6 when the addresses below are set, else 0 */
    char src[46], dst[46];   /* the client's and the proxy's addresses, in inet_ntop's form */
    unsigned sport, dport;
} smtp_proxy_header;

/* Parses the header at the start of p[0..n). Returns its length (> 0) with *h filled when it is
 * complete, 0 when more bytes are needed (nothing read so far is wrong), or -1 when it is
 * malformed (*why says how). Never reads past n. */
long smtp_proxy_parse(const unsigned char *p, size_t n, smtp_proxy_header *h, const char **why);

#endif
