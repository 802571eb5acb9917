/* libFuzzer harness for the reply parser (csrc/reply.c): arbitrary server bytes, parsed whole and
 * one byte at a time, must give the same replies and the same error; every reply respects the
 * code range and the line and size caps. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "reply.h"

#define MAXR 64
typedef struct {
    int code[MAXR];
    char enh[MAXR][16];
    size_t textlen[MAXR];
    unsigned long hash[MAXR];
    int n;
    const char *error;
} outcome;

static unsigned long hash(const char *s, size_t n)
{
    unsigned long h = 5381;
    for (size_t i = 0; i < n; i++)
        h = h * 33 + (unsigned char)s[i];
    return h;
}

static void run(const uint8_t *data, size_t size, size_t step, outcome *o)
{
    smtp_reply_parser p;
    smtp_reply_parser_init(&p);
    memset(o, 0, sizeof *o);
    size_t off = 0;
    while (off < size && o->n < MAXR) {
        size_t n = size - off < step ? size - off : step, used;
        smtp_rp_status st = smtp_reply_parser_feed(&p, (const char *)data + off, n, &used);
        assert(used <= n);
        off += used;
        if (st == SMTP_RP_ERROR) {
            o->error = p.error;
            break;
        }
        if (st == SMTP_RP_DONE) {
            const smtp_reply *r = &p.reply;
            assert(r->code >= 200 && r->code <= 559);
            assert(r->nlines >= 1);
            assert(r->text.len <= SMTP_REPLY_MAX);
            /* each stored line is at most the line cap (code and separator removed) */
            const char *s = r->text.p, *end = s + r->text.len;
            while (s < end) {
                const char *nl = memchr(s, '\n', (size_t)(end - s));
                assert(nl && (size_t)(nl - s) <= SMTP_REPLY_MAX_LINE);
                s = nl + 1;
            }
            if (r->enhanced[0])
                assert(r->enhanced[0] - '0' == r->code / 100);
            o->code[o->n] = r->code;
            memcpy(o->enh[o->n], r->enhanced, 16);
            o->textlen[o->n] = r->text.len;
            o->hash[o->n] = hash(r->text.p, r->text.len);
            o->n++;
        } else {
            assert(used == n);
        }
    }
    smtp_reply_parser_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static outcome a, b;
    run(data, size, size ? size : 1, &a);
    run(data, size, 1, &b);
    assert(a.n == b.n);
    assert((a.error == NULL) == (b.error == NULL));
    if (a.error)
        assert(strcmp(a.error, b.error) == 0);
    for (int i = 0; i < a.n; i++) {
        assert(a.code[i] == b.code[i]);
        assert(strcmp(a.enh[i], b.enh[i]) == 0);
        assert(a.textlen[i] == b.textlen[i] && a.hash[i] == b.hash[i]);
    }
    return 0;
}
