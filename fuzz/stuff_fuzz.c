/* libFuzzer harness for the dot-stuffer (csrc/client.c): whatever the body and however it is cut
 * into chunks, the output has only CRLF line ends, exactly one end-of-data marker (at its end),
 * and unstuffing it gives back the CRLF-normalized input (plus a final CRLF when it lacked one). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "client.h"

/* Reference normalization: bare CR or LF -> CRLF. */
static size_t normalize(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (in[i] == '\r') {
            out[o++] = '\r';
            out[o++] = '\n';
            if (i + 1 < n && in[i + 1] == '\n')
                i++;
        } else if (in[i] == '\n') {
            out[o++] = '\r';
            out[o++] = '\n';
        } else {
            out[o++] = (char)in[i];
        }
    }
    return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    int dot = data[0] & 1;
    size_t step = (size_t)data[1] + 1;
    data += 2;
    size -= 2;
    smtp_stuffer st;
    smtp_stuffer_init(&st, dot);
    smtp_buf out = {0};
    for (size_t off = 0; off < size; off += step) {
        size_t n = size - off < step ? size - off : step;
        assert(smtp_stuff(&st, (const char *)data + off, n, &out) == 0);
    }
    assert(smtp_stuff_finish(&st, &out) == 0);
    assert(smtp_stuff_finish(&st, &out) == 0); /* a second finish adds nothing */

    char *norm = malloc(2 * size + 3);
    size_t nl = normalize(data, size, norm);
    const char *o = out.p ? out.p : "";
    /* only CRLF line ends */
    for (size_t i = 0; i < out.len; i++) {
        if (o[i] == '\r')
            assert(i + 1 < out.len && o[i + 1] == '\n');
        if (o[i] == '\n')
            assert(i > 0 && o[i - 1] == '\r');
    }
    if (!dot) {
        assert(out.len == nl && memcmp(o, norm, nl) == 0);
    } else {
        if (nl && !(nl >= 2 && norm[nl - 2] == '\r' && norm[nl - 1] == '\n')) {
            norm[nl++] = '\r';
            norm[nl++] = '\n';
        }
        /* the marker ends the output, and no line before it is a lone "." */
        assert(out.len >= 3 && memcmp(o + out.len - 3, ".\r\n", 3) == 0);
        assert(out.len == 3 || (o[out.len - 5] == '\r' && o[out.len - 4] == '\n'));
        size_t body = out.len - 3;
        char *un = malloc(body + 1);
        size_t u = 0;
        int line_start = 1;
        for (size_t i = 0; i < body; i++) {
            if (line_start) {
                /* a line starting with "." was stuffed: it must start with ".." */
                if (o[i] == '.') {
                    assert(i + 1 < body && o[i + 1] == '.');
                    i++;
                }
            }
            un[u++] = o[i];
            line_start = (o[i] == '\n');
        }
        assert(u == nl && memcmp(un, norm, nl) == 0);
        free(un);
    }
    free(norm);
    smtp_buf_free(&out);
    return 0;
}
