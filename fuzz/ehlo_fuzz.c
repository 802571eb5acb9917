/* libFuzzer harness for capability parsing (csrc/reply.c): each input line is checked as a reply
 * line and split as an EHLO capability line. Invariants: a keyword is non-empty, uppercase
 * letters, digits and '-' only, shorter than the buffer, and starts the line (case-folded); the
 * parameters are exactly the rest of the line after the spaces; a reply line's code is 200..599
 * style (three digits) and its text lies inside the line. */
#include <assert.h>
#include <ctype.h>
#include <stdint.h>
#include <string.h>
#include "reply.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    size_t kwcap = size ? 2 + data[0] % 40 : 16;
    while (size > 0) {
        const char *nl = memchr(p, '\n', size);
        size_t n = nl ? (size_t)(nl - p) : size;
        char kw[64];
        const char *params = NULL;
        size_t plen = 0;
        memset(kw, 0x55, sizeof kw);
        if (smtp_ehlo_line(p, n, kw, kwcap, &params, &plen) == 0) {
            size_t k = strlen(kw);
            assert(k > 0 && k < kwcap);
            for (size_t i = 0; i < k; i++) {
                unsigned char c = (unsigned char)kw[i];
                assert(isdigit(c) || isupper(c) || c == '-' || (isalpha(c) && !islower(c)));
                assert(toupper((unsigned char)p[i]) == c);
            }
            assert(params >= p + k && params + plen == p + n);
            for (const char *q = p + k; q < params; q++)
                assert(*q == ' ');
            assert(plen == 0 || params[0] != ' ');
        }
        int code = 0, last = -1;
        const char *text = NULL, *why = NULL;
        size_t tlen = 0;
        if (smtp_reply_line(p, n, &code, &last, &text, &tlen, &why) == 0) {
            assert(code >= 100 && code <= 999);
            assert(last == 0 || last == 1);
            assert(n >= 3);
            assert(text >= p && text + tlen <= p + n);
            size_t e = smtp_enhanced_len(text, tlen, code);
            assert(e <= tlen);
        } else {
            assert(why != NULL);
        }
        if (!nl)
            break;
        size -= n + 1;
        p = nl + 1;
    }
    return 0;
}
