/* The PROXY protocol header parser (proxyproto.h): the real client's address as a load balancer
 * forwards it. It reads a connection's first bytes, before SMTP, from peers that are trusted but
 * may be misconfigured, so every field is checked and nothing is read beyond the header. */
#include <arpa/inet.h>
#include <string.h>
#include "proxyproto.h"

static const unsigned char V2_SIG[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51,
                                          0x55, 0x49, 0x54, 0x0a };

static long bad(const char **why, const char *text)
{
    *why = text;
    return -1;
}

/* A v1 port: decimal 0..65535, no sign, no leading zero (one spelling per value). */
static int v1_port(const char *p, size_t n, unsigned *out)
{
    if (n == 0 || n > 5 || (n > 1 && p[0] == '0'))
        return -1;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    if (v > 65535)
        return -1;
    *out = v;
    return 0;
}

/* A v1 address of the family given: parsed and written back in the canonical form. */
static int v1_addr(const char *p, size_t n, int family, char *out)
{
    char tmp[64];
    unsigned char bin[16];
    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    int af = family == 4 ? AF_INET : AF_INET6;
    if (inet_pton(af, tmp, bin) != 1)
        return -1;
    return inet_ntop(af, bin, out, 46) ? 0 : -1;
}

static long parse_v1(const unsigned char *p, size_t n, smtp_proxy_header *h, const char **why)
{
    static const char sig[] = "PROXY ";
    size_t k = n < 6 ? n : 6;
    if (memcmp(p, sig, k))
        return bad(why, "not a PROXY protocol header");
    size_t lim = n < SMTP_PROXY_V1_MAX ? n : SMTP_PROXY_V1_MAX;
    const unsigned char *lf = memchr(p, '\n', lim);
    if (!lf) {
        if (n >= SMTP_PROXY_V1_MAX)
            return bad(why, "PROXY v1 line too long");
        return 0;
    }
    size_t len = (size_t)(lf - p) + 1;
    if (len < 8 || p[len - 2] != '\r')
        return bad(why, "PROXY v1 line does not end in CRLF");
    const char *s = (const char *)p + 6, *end = (const char *)p + len - 2;
    for (const char *q = s; q < end; q++)
        if ((unsigned char)*q < 0x20 || (unsigned char)*q > 0x7e)
            return bad(why, "PROXY v1 line holds a control or 8-bit byte");
    h->version = 1;
    if ((size_t)(end - s) >= 7 && !memcmp(s, "UNKNOWN", 7) && (end - s == 7 || s[7] == ' ')) {
        h->local = 1; /* whatever follows UNKNOWN is to be ignored */
        return (long)len;
    }
    /* TCP4|TCP6 SP src SP dst SP sport SP dport, single spaces */
    const char *f[5];
    size_t fl[5];
    int nf = 0;
    const char *q = s;
    while (nf < 5) {
        const char *sp = memchr(q, ' ', (size_t)(end - q));
        const char *fe = sp ? sp : end;
        f[nf] = q;
        fl[nf] = (size_t)(fe - q);
        nf++;
        if (!sp)
            break;
        q = sp + 1;
    }
    if (nf != 5 || f[4] + fl[4] != end)
        return bad(why, "PROXY v1 line has the wrong number of fields");
    int family;
    if (fl[0] == 4 && !memcmp(f[0], "TCP4", 4))
        family = 4;
    else if (fl[0] == 4 && !memcmp(f[0], "TCP6", 4))
        family = 6;
    else
        return bad(why, "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN");
    if (v1_addr(f[1], fl[1], family, h->src) || v1_addr(f[2], fl[2], family, h->dst))
        return bad(why, "PROXY v1 address is not one of its family");
    if (v1_port(f[3], fl[3], &h->sport) || v1_port(f[4], fl[4], &h->dport))
        return bad(why, "PROXY v1 port is not a number within 0..65535");
    h->family = family;
    return (long)len;
}

static long parse_v2(const unsigned char *p, size_t n, smtp_proxy_header *h, const char **why)
{
    size_t k = n < 12 ? n : 12;
    if (memcmp(p, V2_SIG, k))
        return bad(why, "not a PROXY protocol header");
    if (n < 16)
        return 0;
    if ((p[12] >> 4) != 2)
        return bad(why, "PROXY v2 version is not 2");
    int cmd = p[12] & 0x0f;
    if (cmd > 1)
        return bad(why, "PROXY v2 command is neither LOCAL nor PROXY");
    int fam = p[13] >> 4, proto = p[13] & 0x0f;
    if (fam > 3 || proto > 2)
        return bad(why, "PROXY v2 address family or transport unknown");
    size_t alen = ((size_t)p[14] << 8) | p[15];
    size_t need = fam == 1 ? 12 : fam == 2 ? 36 : fam == 3 ? 216 : 0;
    /* checked before the whole block is there: a short block is wrong however long we wait */
    if (cmd == 1 && alen < need)
        return bad(why, "PROXY v2 address block shorter than its family needs");
    if (n < 16 + alen)
        return 0;
    h->version = 2;
    if (cmd == 0 || proto != 1 || (fam != 1 && fam != 2)) {
        /* LOCAL, UNIX sockets, datagrams, UNSPEC: nothing here replaces the socket's addresses;
         * the block (and its TLVs) is skipped */
        h->local = 1;
        return (long)(16 + alen);
    }
    const unsigned char *a = p + 16;
    int af = fam == 1 ? AF_INET : AF_INET6;
    size_t al = fam == 1 ? 4 : 16;
    if (!inet_ntop(af, a, h->src, sizeof h->src) || !inet_ntop(af, a + al, h->dst, sizeof h->dst))
        return bad(why, "PROXY v2 address cannot be written");
    h->sport = ((unsigned)a[2 * al] << 8) | a[2 * al + 1];
    h->dport = ((unsigned)a[2 * al + 2] << 8) | a[2 * al + 3];
    h->family = fam == 1 ? 4 : 6;
    /* TLVs after the addresses (ALPN, authority, SSL facts, a cloud's endpoint id) are skipped */
    return (long)(16 + alen);
}

long smtp_proxy_parse(const unsigned char *p, size_t n, smtp_proxy_header *h, const char **why)
{
    memset(h, 0, sizeof *h);
    *why = NULL;
    if (n == 0)
        return 0;
    if (p[0] == 'P')
        return parse_v1(p, n, h, why);
    if (p[0] == 0x0d)
        return parse_v2(p, n, h, why);
    return bad(why, "not a PROXY protocol header");
}
