/* libFuzzer harness for the PROXY protocol header parser (csrc/proxyproto.c). Invariants: a
 * complete header's length is within the input and the format's maximum, and the same bytes cut
 * to that length give the same header; every shorter prefix of a complete or unfinished header
 * asks for more bytes (a header is never refused before its bad byte arrives, nor accepted
 * early); addresses reported parse back as their family; the parser reads no byte past the
 * input (each call gets its own exact-size copy, so ASan sees an over-read). */
#include <arpa/inet.h>
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "proxyproto.h"

static long parse_copy(const uint8_t *data, size_t n, smtp_proxy_header *h)
{
    unsigned char *copy = malloc(n ? n : 1);
    memcpy(copy, data, n);
    const char *why;
    long r = smtp_proxy_parse(copy, n, h, &why);
    free(copy);
    assert(r >= -1);
    assert((r < 0) == (why != NULL));
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    smtp_proxy_header h, h2;
    long r = parse_copy(data, size, &h);
    if (r > 0) {
        assert((size_t)r <= size);
        assert(h.version == 1 || h.version == 2);
        assert((size_t)r <= (h.version == 1 ? SMTP_PROXY_V1_MAX : SMTP_PROXY_V2_MAX));
        if (h.family) {
            unsigned char bin[16];
            int af = h.family == 4 ? AF_INET : AF_INET6;
            assert(h.family == 4 || h.family == 6);
            assert(!h.local);
            assert(inet_pton(af, h.src, bin) == 1 && inet_pton(af, h.dst, bin) == 1);
            assert(h.sport <= 65535 && h.dport <= 65535);
        } else {
            assert(h.local);
        }
        assert(parse_copy(data, (size_t)r, &h2) == r);
        assert(!memcmp(&h, &h2, sizeof h));
    }
    /* prefixes: a few cut points, all of them for short inputs */
    size_t upto = r > 0 ? (size_t)r : size;
    size_t step = upto > 64 ? upto / 16 : 1;
    for (size_t k = 0; k < upto; k += step) {
        long rk = parse_copy(data, k, &h2);
        if (r >= 0)
            assert(rk == 0);
        else
            assert(rk <= 0);
    }
    return 0;
}
