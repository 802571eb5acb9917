/* libFuzzer harness for the codec engine (csrc/codec.c): round trips for base64,
 * quoted-printable and xtext, and DKIM canonicalization invariants (idempotence, chunking makes
 * no difference, output shape). The first input byte picks a chunk size for the streaming checks. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "codec.h"

struct buf {
    char *p;
    size_t len, cap;
};

static void sink(void *ud, const char *p, size_t n)
{
    struct buf *b = (struct buf *)ud;
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 16;
        b->p = realloc(b->p, b->cap);
        assert(b->p);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static struct buf canon_body(const char *in, size_t n, int relaxed, size_t step)
{
    struct buf out = { NULL, 0, 0 };
    struct smtp_bodycanon *c = malloc(sizeof *c);
    assert(c);
    smtp_bodycanon_init(c, relaxed, sink, &out);
    for (size_t i = 0; i < n; i += step)
        smtp_bodycanon_feed(c, in + i, n - i < step ? n - i : step);
    smtp_bodycanon_finish(c);
    free(c);
    return out;
}

static void check_body(const uint8_t *data, size_t n, int relaxed, size_t step)
{
    const char *in = (const char *)data;
    struct buf whole = canon_body(in, n, relaxed, n ? n : 1);
    struct buf chunked = canon_body(in, n, relaxed, step);
    assert(whole.len == chunked.len && (whole.len == 0 || !memcmp(whole.p, chunked.p, whole.len)));
    /* output: only CRLF line ends, ends with exactly one CRLF unless empty (relaxed) */
    for (size_t i = 0; i < whole.len; i++) {
        if (whole.p[i] == '\n')
            assert(i > 0 && whole.p[i - 1] == '\r');
        if (whole.p[i] == '\r')
            assert(i + 1 < whole.len && whole.p[i + 1] == '\n');
        if (relaxed && whole.p[i] == ' ')
            assert(i + 1 < whole.len && whole.p[i + 1] != ' ' && whole.p[i + 1] != '\r');
        if (relaxed)
            assert(whole.p[i] != '\t');
    }
    if (whole.len) {
        assert(whole.len >= 2 && whole.p[whole.len - 2] == '\r' && whole.p[whole.len - 1] == '\n');
        assert(!(whole.len >= 4 && whole.p[whole.len - 4] == '\r' && whole.p[whole.len - 3] == '\n'));
    } else {
        assert(relaxed);
    }
    /* idempotent: canon(canon(x)) == canon(x) */
    struct buf again = canon_body(whole.p ? whole.p : "", whole.len, relaxed, step);
    assert(again.len == whole.len && (whole.len == 0 || !memcmp(again.p, whole.p, whole.len)));
    free(whole.p);
    free(chunked.p);
    free(again.p);
}

static void check_header(const uint8_t *data, size_t n)
{
    char *out = malloc(n + 2), *out2 = malloc(n + 4);
    assert(out && out2);
    size_t len = smtp_dkim_header_relaxed((const char *)data, n, out);
    assert(len >= 2 && len <= n + 2 && out[len - 2] == '\r' && out[len - 1] == '\n');
    char *colon = memchr(out, ':', len);
    for (size_t i = 0; i + 2 < len; i++) {
        assert(out[i] != '\r' && out[i] != '\n');
        if (colon && out + i > colon) {
            assert(out[i] != '\t');
            assert(!(out[i] == ' ' && out[i + 1] == ' '));
            assert(!(out[i] == ' ' && i + 3 == len));     /* no trailing space */
        }
    }
    if (colon)
        assert(colon + 1 == out + len - 2 || colon[1] != ' ');
    /* relaxed(relaxed(x)) == relaxed(x) when the field has a colon (a name) */
    if (memchr(data, ':', n)) {
        size_t len2 = smtp_dkim_header_relaxed(out, len, out2);
        assert(len2 == len && !memcmp(out, out2, len));
    }
    free(out);
    free(out2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t n)
{
    size_t step = n ? (size_t)data[0] % 17 + 1 : 1;

    /* base64, with and without line wrapping */
    for (size_t wrap = 0; wrap <= 76; wrap += 76) {
        size_t cap = smtp_b64_encoded_len(n, wrap);
        char *enc = malloc(cap + 1);
        unsigned char *dec = malloc(cap / 4 * 3 + 3);
        assert(enc && dec);
        size_t elen = smtp_b64_encode(data, n, enc, wrap);
        assert(elen == cap);
        size_t dlen = smtp_b64_decode(enc, elen, dec, SMTP_B64_MIME);
        assert(dlen == n && (n == 0 || !memcmp(dec, data, n)));
        if (!wrap) {   /* unwrapped output is the strict form too */
            dlen = smtp_b64_decode(enc, elen, dec, SMTP_B64_STRICT);
            assert(dlen == n && (n == 0 || !memcmp(dec, data, n)));
        }
        free(enc);
        free(dec);
    }
    /* the decoder on arbitrary input: bounded output, no crash; what strict mode accepts, MIME
     * mode accepts with the same bytes (it only adds skipped whitespace and unpadded tails) */
    {
        unsigned char *dec = malloc(n / 4 * 3 + 3), *dec2 = malloc(n / 4 * 3 + 3);
        assert(dec && dec2);
        size_t dlen = smtp_b64_decode((const char *)data, n, dec, SMTP_B64_MIME);
        assert(dlen == (size_t)-1 || dlen <= n / 4 * 3 + 3);
        size_t slen = smtp_b64_decode((const char *)data, n, dec2, SMTP_B64_STRICT);
        if (slen != (size_t)-1) {
            assert(n % 4 == 0 && slen <= n / 4 * 3);
            assert(dlen == slen && (slen == 0 || !memcmp(dec, dec2, slen)));
        }
        free(dec);
        free(dec2);
    }

    /* quoted-printable: decode(encode(x)) == x with bare LF made CRLF; lines within 76 */
    {
        char *enc = malloc(smtp_qp_encoded_max(n));
        unsigned char *dec = malloc(smtp_qp_encoded_max(n) + 1);
        unsigned char *norm = malloc(2 * n + 1);
        assert(enc && dec && norm);
        size_t elen = smtp_qp_encode(data, n, enc);
        assert(elen <= smtp_qp_encoded_max(n));
        size_t col = 0;
        for (size_t i = 0; i < elen; i++) {
            unsigned char ch = (unsigned char)enc[i];
            if (ch == '\r') {
                assert(i + 1 < elen && enc[i + 1] == '\n');
                col = 0;
                i++;
                continue;
            }
            assert((ch >= 32 && ch < 127) || ch == '\t');
            assert(++col <= 76);
        }
        size_t dlen = smtp_qp_decode(enc, elen, dec);
        size_t nlen = 0;
        for (size_t i = 0; i < n; i++) {
            if (data[i] == '\n' && !(i > 0 && data[i - 1] == '\r'))
                norm[nlen++] = '\r';
            norm[nlen++] = data[i];
        }
        assert(dlen == nlen && (nlen == 0 || !memcmp(dec, norm, nlen)));
        /* decoding arbitrary input never grows it */
        assert(smtp_qp_decode((const char *)data, n, dec) <= n);
        free(enc);
        free(dec);
        free(norm);
    }

    /* xtext */
    {
        char *enc = malloc(3 * n + 1);
        unsigned char *dec = malloc(3 * n + 1);
        assert(enc && dec);
        size_t elen = smtp_xtext_encode(data, n, enc);
        for (size_t i = 0; i < elen; i++)
            assert(enc[i] >= 33 && enc[i] <= 126 && enc[i] != '=');
        size_t dlen = smtp_xtext_decode(enc, elen, dec);
        assert(dlen == n && (n == 0 || !memcmp(dec, data, n)));
        size_t d2 = smtp_xtext_decode((const char *)data, n, dec);
        assert(d2 == (size_t)-1 || d2 <= n);
        free(enc);
        free(dec);
    }

    check_body(data, n, 0, step);
    check_body(data, n, 1, step);
    check_header(data, n);
    return 0;
}
