/* Plain-C part of the dns resolver (no Lua): answer parsing and host name checks (dns.c), shared
 * by the resolver's Lua binding dns_lua.c and the fuzz harness fuzz/mx_fuzz.c. */
#ifndef SMTP_DNS_H
#define SMTP_DNS_H

#include <netinet/in.h>
#include <arpa/inet.h>

/* Caps on what one answer may hand to the delivery logic: a hostile zone cannot make us try
 * thousands of hosts or addresses. */
#define DNS_MAX_MX      16      /* MX hosts kept, the most preferred first */
#define DNS_MAX_ADDRS   16      /* addresses kept per A or AAAA answer */
#define DNS_HOST_MAX    253     /* longest host name in text form, without the final dot */
#define DNS_ADDR_MAX    INET6_ADDRSTRLEN
#define DNS_MAX_TXT     64      /* TXT records kept per answer (SPF, DKIM, DMARC need one or few) */
#define DNS_MAX_PTR     16      /* PTR names kept per answer (SPF looks at ten at most) */

struct dns_mx {
    unsigned short preference;
    char host[DNS_HOST_MAX + 1];
};

struct dns_mx_answer {
    int count;                  /* valid hosts in mx[], sorted by preference (stable) */
    int null_mx;                /* 1: the answer is exactly one MX of "." (RFC 7505) */
    int dropped;                /* records left out: bad host names, duplicates, over the cap */
    struct dns_mx mx[DNS_MAX_MX];
};

struct dns_addr_answer {
    int count;
    char addr[DNS_MAX_ADDRS][DNS_ADDR_MAX];
};

/* 1 when s is a usable host name: letters, digits and hyphens in dot-separated labels of 1 to 63
 * bytes that neither start nor end with a hyphen, at most 253 bytes, an optional final dot. */
int dns_valid_hostname(const char *s);

/* Parses an MX answer (c-ares does the wire format) and keeps only valid host names, lower-cased,
 * without duplicates, ordered by preference, at most DNS_MAX_MX. Returns an ARES_* status:
 * ARES_SUCCESS (possibly with count 0), ARES_ENODATA for an answer without MX records, or the parse
 * error. */
int dns_parse_mx(const unsigned char *abuf, int alen, struct dns_mx_answer *out);

/* Parses an A (family AF_INET) or AAAA (AF_INET6) answer, CNAMEs in the answer followed, into
 * numeric address strings, at most DNS_MAX_ADDRS. Returns an ARES_* status. */
int dns_parse_addrs(const unsigned char *abuf, int alen, int family, struct dns_addr_answer *out);

/* One TXT answer: each record's character-strings joined, as SPF (RFC 7208 §3.3), DKIM (RFC 6376
 * §3.6.2.2) and DMARC read them. rec[i] points into buf, is len[i] bytes (it may hold NULs) and is
 * NUL-terminated. dropped counts records past DNS_MAX_TXT. Free with dns_txt_free. */
struct dns_txt_answer {
    int count;
    int dropped;
    char *buf;
    const char *rec[DNS_MAX_TXT];
    size_t len[DNS_MAX_TXT];
};

/* Parses a TXT answer. Returns an ARES_* status (ARES_ENODATA: no TXT records). On success the
 * caller frees with dns_txt_free; on failure nothing is held. */
int dns_parse_txt(const unsigned char *abuf, int alen, struct dns_txt_answer *out);
void dns_txt_free(struct dns_txt_answer *a);

/* One PTR answer: the names, lower-cased, without the final dot, valid host names only and
 * without duplicates; dropped counts the others and those past DNS_MAX_PTR. */
struct dns_ptr_answer {
    int count;
    int dropped;
    char name[DNS_MAX_PTR][DNS_HOST_MAX + 1];
};

int dns_parse_ptr(const unsigned char *abuf, int alen, struct dns_ptr_answer *out);

/* 1 when s may be asked for a TXT or PTR record: dot-separated labels of 1 to 63 printable ASCII
 * bytes other than '\\' (underscores and other characters SPF macros produce included), at most 253
 * bytes, an optional final dot. */
int dns_valid_qname(const char *s);

/* DANE (RFC 6698): the TLSA records of one answer, and the header bits a validating resolver sets.
 * data[i] points into buf (len[i] bytes); dropped counts records past DNS_MAX_TLSA and records too
 * short to hold the three fields. Free with dns_tlsa_free. */
#define DNS_MAX_TLSA    32
struct dns_tlsa_answer {
    int count;
    int dropped;
    unsigned char *buf;
    unsigned char usage[DNS_MAX_TLSA], selector[DNS_MAX_TLSA], mtype[DNS_MAX_TLSA];
    const unsigned char *data[DNS_MAX_TLSA];
    size_t len[DNS_MAX_TLSA];
};

/* Parses the TLSA records (type 52) of an answer section, whatever their owner (the resolver has
 * followed any CNAME). Returns ARES_SUCCESS (count may be 0), or ARES_EBADRESP / ARES_ENOMEM. */
int dns_parse_tlsa(const unsigned char *abuf, int alen, struct dns_tlsa_answer *out);
void dns_tlsa_free(struct dns_tlsa_answer *a);

/* The response code (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, ...) and the AD bit of an answer's header,
 * -1 when the answer is shorter than a header. */
int dns_header_rcode(const unsigned char *abuf, int alen);
int dns_header_ad(const unsigned char *abuf, int alen);

#endif
