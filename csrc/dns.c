/* DNS answer parsing, plain C (c-ares reads the wire format): MX and A/AAAA answers cut down to
 * valid, unique host names and numeric addresses, TXT records joined, PTR names checked, and host
 * name checks. Shared by the resolver's
 * Lua binding (dns_lua.c) and fuzz/mx_fuzz.c. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <netdb.h>
#include <arpa/nameser.h>
#include <ares.h>
#include "dns.h"

static int is_ldh(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

/* Labels of 1 to 63 bytes, 253 in all, an optional final dot; `ldh`: letters, digits and inner
 * hyphens only (a host name), else any printable ASCII byte but '\\' (a name to ask TXT or PTR of). */
static int valid_name(const char *s, int ldh)
{
    size_t n = strlen(s);
    if (n > 0 && s[n - 1] == '.')
        n--;
    if (n == 0 || n > DNS_HOST_MAX)
        return 0;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '.') {
            if (label == 0 || (ldh && s[i - 1] == '-'))
                return 0;
            label = 0;
            continue;
        }
        if (ldh ? (!is_ldh(c) || (label == 0 && c == '-')) : (c <= 0x20 || c >= 0x7f || c == '\\'))
            return 0;
        if (++label > 63)
            return 0;
    }
    return !ldh || s[n - 1] != '-';
}

int dns_valid_hostname(const char *s)
{
    return valid_name(s, 1);
}

/* Copies a valid host name lower-cased and without its final dot. */
static void copy_host(char *dst, const char *src)
{
    size_t n = strlen(src);
    if (n > 0 && src[n - 1] == '.')
        n--;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        dst[i] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
    }
    dst[n] = '\0';
}

/* Room to sort more candidates than we keep, so that the cap keeps the most preferred ones even
 * when they come last in the answer. Beyond this, records count as dropped. */
#define MX_CANDIDATES (DNS_MAX_MX * 4)

int dns_parse_mx(const unsigned char *abuf, int alen, struct dns_mx_answer *out)
{
    struct ares_mx_reply *head = NULL;
    memset(out, 0, sizeof *out);
    int status = ares_parse_mx_reply(abuf, alen, &head);
    if (status != ARES_SUCCESS)
        return status;

    struct dns_mx cand[MX_CANDIDATES];
    int n = 0, total = 0, roots = 0;
    for (struct ares_mx_reply *r = head; r; r = r->next) {
        total++;
        const char *h = r->host ? r->host : "";
        if (h[0] == '\0' || (h[0] == '.' && h[1] == '\0')) {
            roots++;
            continue;
        }
        if (!dns_valid_hostname(h) || n >= MX_CANDIDATES) {
            out->dropped++;
            continue;
        }
        char host[DNS_HOST_MAX + 1];
        copy_host(host, h);
        int dup = -1;
        for (int i = 0; i < n; i++)
            if (strcmp(cand[i].host, host) == 0) {
                dup = i;
                break;
            }
        if (dup >= 0) {
            /* The same host twice: keep its best preference. */
            if (r->priority < cand[dup].preference)
                cand[dup].preference = r->priority;
            out->dropped++;
            continue;
        }
        cand[n].preference = r->priority;
        memcpy(cand[n].host, host, strlen(host) + 1);
        n++;
    }
    ares_free_data(head);

    /* RFC 7505: a null MX is the only record of its domain; a "." next to real hosts is junk. */
    if (total == 1 && roots == 1) {
        out->null_mx = 1;
        return ARES_SUCCESS;
    }
    out->dropped += roots;

    /* Stable insertion sort: equal preferences keep answer order (Lua shuffles them). */
    for (int i = 1; i < n; i++) {
        struct dns_mx t = cand[i];
        int j = i - 1;
        while (j >= 0 && cand[j].preference > t.preference) {
            cand[j + 1] = cand[j];
            j--;
        }
        cand[j + 1] = t;
    }
    out->count = n < DNS_MAX_MX ? n : DNS_MAX_MX;
    if (n > DNS_MAX_MX)
        out->dropped += n - DNS_MAX_MX;
    memcpy(out->mx, cand, sizeof(cand[0]) * (size_t)out->count);
    return ARES_SUCCESS;
}

int dns_parse_addrs(const unsigned char *abuf, int alen, int family, struct dns_addr_answer *out)
{
    memset(out, 0, sizeof *out);
    int n = DNS_MAX_ADDRS, status;
    if (family == AF_INET) {
        struct ares_addrttl a[DNS_MAX_ADDRS];
        status = ares_parse_a_reply(abuf, alen, NULL, a, &n);
        if (status != ARES_SUCCESS)
            return status;
        for (int i = 0; i < n && i < DNS_MAX_ADDRS; i++)
            if (inet_ntop(AF_INET, &a[i].ipaddr, out->addr[out->count], DNS_ADDR_MAX))
                out->count++;
    } else {
        struct ares_addr6ttl a[DNS_MAX_ADDRS];
        status = ares_parse_aaaa_reply(abuf, alen, NULL, a, &n);
        if (status != ARES_SUCCESS)
            return status;
        for (int i = 0; i < n && i < DNS_MAX_ADDRS; i++)
            if (inet_ntop(AF_INET6, &a[i].ip6addr, out->addr[out->count], DNS_ADDR_MAX))
                out->count++;
    }
    return ARES_SUCCESS;
}

int dns_valid_qname(const char *s)
{
    return valid_name(s, 0);
}

void dns_txt_free(struct dns_txt_answer *a)
{
    free(a->buf);
    a->buf = NULL;
    a->count = 0;
}

int dns_parse_txt(const unsigned char *abuf, int alen, struct dns_txt_answer *out)
{
    struct ares_txt_ext *head = NULL;
    memset(out, 0, sizeof *out);
    int status = ares_parse_txt_reply_ext(abuf, alen, &head);
    if (status != ARES_SUCCESS)
        return status;
    /* Room for every kept record and its NUL: the answer bounds the total (< 64 KB). */
    size_t total = 0;
    for (struct ares_txt_ext *t = head; t; t = t->next)
        total += t->length + 1;
    out->buf = malloc(total + 1);
    if (!out->buf) {
        ares_free_data(head);
        return ARES_ENOMEM;
    }
    size_t used = 0;
    int cur = -1;
    for (struct ares_txt_ext *t = head; t; t = t->next) {
        if (t->record_start || cur < 0) {
            if (cur >= 0 && cur < DNS_MAX_TXT)
                out->buf[used++] = '\0';
            cur++;
            if (cur >= DNS_MAX_TXT) {
                out->dropped++;
                continue;
            }
            out->rec[cur] = out->buf + used;
            out->len[cur] = 0;
            out->count = cur + 1;
        } else if (cur >= DNS_MAX_TXT) {
            continue;
        }
        memcpy(out->buf + used, t->txt, t->length);
        used += t->length;
        out->len[cur] += t->length;
    }
    out->buf[used] = '\0';
    ares_free_data(head);
    if (out->count == 0) {
        dns_txt_free(out);
        return ARES_ENODATA;
    }
    return ARES_SUCCESS;
}

static void add_ptr(struct dns_ptr_answer *out, const char *h)
{
    if (!h || !dns_valid_hostname(h) || out->count >= DNS_MAX_PTR) {
        out->dropped++;
        return;
    }
    char name[DNS_HOST_MAX + 1];
    copy_host(name, h);
    for (int i = 0; i < out->count; i++)
        if (strcmp(out->name[i], name) == 0) {
            out->dropped++;
            return;
        }
    memcpy(out->name[out->count++], name, strlen(name) + 1);
}

int dns_parse_ptr(const unsigned char *abuf, int alen, struct dns_ptr_answer *out)
{
    memset(out, 0, sizeof *out);
    /* c-ares wants the address asked about to fill its hostent; the names are all we read. */
    static const unsigned char any[4];
    struct hostent *h = NULL;
    int status = ares_parse_ptr_reply(abuf, alen, any, (int)sizeof any, AF_INET, &h);
    if (status != ARES_SUCCESS)
        return status;
    add_ptr(out, h->h_name);
    for (int i = 0; h->h_aliases && h->h_aliases[i]; i++)
        add_ptr(out, h->h_aliases[i]);
    ares_free_hostent(h);
    return ARES_SUCCESS;
}

int dns_header_rcode(const unsigned char *abuf, int alen)
{
    return alen < 12 ? -1 : (abuf[3] & 0x0f);
}

int dns_header_ad(const unsigned char *abuf, int alen)
{
    return alen < 12 ? -1 : (abuf[3] & 0x20) != 0;
}

void dns_tlsa_free(struct dns_tlsa_answer *a)
{
    free(a->buf);
    a->buf = NULL;
    a->count = 0;
}

/* Steps over a (possibly compressed) name at *pos; 0 on success. */
static int skip_name(const unsigned char *abuf, int alen, int *pos)
{
    char *name = NULL;
    long enclen = 0;
    if (ares_expand_name(abuf + *pos, abuf, alen, &name, &enclen) != ARES_SUCCESS)
        return -1;
    ares_free_string(name);
    *pos += (int)enclen;
    return *pos <= alen ? 0 : -1;
}

int dns_parse_tlsa(const unsigned char *abuf, int alen, struct dns_tlsa_answer *out)
{
    memset(out, 0, sizeof *out);
    if (alen < 12)
        return ARES_EBADRESP;
    int qd = (abuf[4] << 8) | abuf[5], an = (abuf[6] << 8) | abuf[7];
    int pos = 12;
    for (int i = 0; i < qd; i++) {
        if (skip_name(abuf, alen, &pos) < 0 || pos + 4 > alen)
            return ARES_EBADRESP;
        pos += 4;
    }
    /* One copy of the answer holds every record's data. */
    out->buf = malloc((size_t)alen);
    if (!out->buf)
        return ARES_ENOMEM;
    memcpy(out->buf, abuf, (size_t)alen);
    for (int i = 0; i < an; i++) {
        if (skip_name(abuf, alen, &pos) < 0 || pos + 10 > alen) {
            dns_tlsa_free(out);
            return ARES_EBADRESP;
        }
        int type = (abuf[pos] << 8) | abuf[pos + 1], cls = (abuf[pos + 2] << 8) | abuf[pos + 3];
        int rdlen = (abuf[pos + 8] << 8) | abuf[pos + 9];
        pos += 10;
        if (pos + rdlen > alen) {
            dns_tlsa_free(out);
            return ARES_EBADRESP;
        }
        if (type == 52 && cls == C_IN) {
            if (rdlen < 3 || out->count >= DNS_MAX_TLSA) {
                out->dropped++;
            } else {
                int k = out->count++;
                out->usage[k] = abuf[pos];
                out->selector[k] = abuf[pos + 1];
                out->mtype[k] = abuf[pos + 2];
                out->data[k] = out->buf + pos + 3;
                out->len[k] = (size_t)rdlen - 3;
            }
        }
        pos += rdlen;
    }
    return ARES_SUCCESS;
}
