/* libFuzzer harness for the answer handling of csrc/dns.c: arbitrary bytes as a DNS answer must
 * yield only valid, lower-case, unique host names (MX in preference order, PTR), numeric addresses
 * (A/AAAA), TXT and TLSA records that stay inside their buffer, all capped. */
#include <assert.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <ares.h>
#include "dns.h"

/* An independent statement of what a usable host name is, so the harness does not trust
 * dns_valid_hostname to check itself. */
static int ok_host(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > DNS_HOST_MAX || s[n - 1] == '.' || s[0] == '.')
        return 0;
    const char *label = s;
    for (size_t i = 0; i <= n; i++) {
        if (s[i] == '.' || s[i] == '\0') {
            size_t len = (size_t)(s + i - label);
            if (len == 0 || len > 63 || label[0] == '-' || s[i - 1] == '-')
                return 0;
            label = s + i + 1;
            continue;
        }
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
            return 0;   /* lower case only: names come out normalized */
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 65535)
        return 0;
    struct dns_mx_answer mx;
    int st = dns_parse_mx(data, (int)size, &mx);
    if (st == ARES_SUCCESS) {
        assert(mx.count >= 0 && mx.count <= DNS_MAX_MX);
        assert(mx.dropped >= 0);
        if (mx.null_mx)
            assert(mx.count == 0);
        for (int i = 0; i < mx.count; i++) {
            assert(ok_host(mx.mx[i].host));
            assert(dns_valid_hostname(mx.mx[i].host));
            if (i > 0)
                assert(mx.mx[i - 1].preference <= mx.mx[i].preference);
            for (int j = 0; j < i; j++)
                assert(strcmp(mx.mx[i].host, mx.mx[j].host) != 0);
        }
    } else {
        assert(mx.count == 0 && !mx.null_mx);
    }

    static const int fam[2] = { AF_INET, AF_INET6 };
    for (int f = 0; f < 2; f++) {
        struct dns_addr_answer a;
        if (dns_parse_addrs(data, (int)size, fam[f], &a) != ARES_SUCCESS)
            continue;
        assert(a.count >= 0 && a.count <= DNS_MAX_ADDRS);
        for (int i = 0; i < a.count; i++) {
            unsigned char buf[16];
            assert(inet_pton(fam[f], a.addr[i], buf) == 1);
        }
    }

    struct dns_txt_answer t;
    if (dns_parse_txt(data, (int)size, &t) == ARES_SUCCESS) {
        assert(t.count > 0 && t.count <= DNS_MAX_TXT && t.dropped >= 0);
        size_t sum = 0;
        for (int i = 0; i < t.count; i++) {
            assert(t.rec[i][t.len[i]] == '\0');   /* reads the whole record: ASan checks bounds */
            sum += t.len[i];
        }
        assert(sum <= size);
        dns_txt_free(&t);
    } else {
        assert(t.buf == NULL && t.count == 0);
    }

    struct dns_ptr_answer p;
    if (dns_parse_ptr(data, (int)size, &p) == ARES_SUCCESS) {
        assert(p.count >= 0 && p.count <= DNS_MAX_PTR);
        for (int i = 0; i < p.count; i++) {
            assert(ok_host(p.name[i]));
            for (int j = 0; j < i; j++)
                assert(strcmp(p.name[i], p.name[j]) != 0);
        }
    }

    struct dns_tlsa_answer tl;
    if (dns_parse_tlsa(data, (int)size, &tl) == ARES_SUCCESS) {
        assert(tl.count >= 0 && tl.count <= DNS_MAX_TLSA && tl.dropped >= 0);
        for (int i = 0; i < tl.count; i++) {
            assert(tl.data[i] >= tl.buf && tl.data[i] + tl.len[i] <= tl.buf + size);
            volatile unsigned char sink = 0;
            for (size_t k = 0; k < tl.len[i]; k++)
                sink ^= tl.data[i][k];   /* reads the whole record: ASan checks bounds */
            (void)sink;
        }
        dns_tlsa_free(&tl);
    } else {
        assert(tl.buf == NULL && tl.count == 0);
    }
    (void)dns_header_rcode(data, (int)size);
    (void)dns_header_ad(data, (int)size);
    return 0;
}
