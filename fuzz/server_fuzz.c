/* libFuzzer harness for the server engine: arbitrary client bytes (commands, DATA, BDAT, AUTH)
 * fed whole and one byte at a time. Invariants: never more messages than end-of-data markers,
 * every reply line well-formed, output bounded while the client does not read, and identical
 * replies and messages whatever the chunking. A third run makes one allocation fail (which one
 * comes from the input): the engine must not crash or leak, and must end the session with its
 * "421 4.3.0" as the last reply. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"

#define OUT_CAP 4096

typedef struct {
    char *out;
    size_t out_len;
    char *msgs;            /* all accepted message bytes, each followed by a 0xFF marker */
    size_t msgs_len;
    unsigned ends, accepted;
    int tls;               /* STARTTLS reached: what follows would be TLS records, not SMTP */
    int closed;
} result;

/* Fails the allocation numbered `budget` (counting from 0), once; -1: none fails. */
typedef struct {
    long budget;
    int failed;
} alloc_ctl;

static void *failing_realloc(void *ud, void *p, size_t n)
{
    alloc_ctl *a = ud;
    if (a->budget >= 0 && a->budget-- == 0) {
        a->failed = 1;
        return NULL;
    }
    return realloc(p, n);
}

static void grow_append(char **buf, size_t *len, const char *p, size_t n)
{
    *buf = realloc(*buf, *len + n + 1);
    assert(*buf);
    memcpy(*buf + *len, p, n);
    *len += n;
}

static void drain(smtp_server *s, result *r, const uint8_t *data, size_t size, unsigned *k)
{
    smtp_server_event ev;
    char *cur = NULL;
    size_t cur_len = 0;
    (void)cur;
    for (;;) {
        int kind = smtp_server_next(s, &ev);
        size_t pending;
        smtp_server_output(s, &pending);
        /* bounded: one step adds at most an EHLO reply past the cap */
        assert(pending <= OUT_CAP + 2048);
        if (kind == SMTP_SRV_NONE)
            break;
        switch (kind) {
        case SMTP_SRV_DATA:
            assert(ev.alen > 0);
            grow_append(&r->msgs, &r->msgs_len, ev.a, ev.alen);
            break;
        case SMTP_SRV_END:
            r->ends++;
            if (ev.code == 0) {
                int ok = size ? (data[(*k)++ % size] & 1) : 1;
                smtp_server_decide(s, ok, ok ? 0 : 554, NULL, NULL);
                if (ok)
                    r->accepted++;
            }
            grow_append(&r->msgs, &r->msgs_len, "\xff", 1);
            break;
        case SMTP_SRV_MAIL:
        case SMTP_SRV_RCPT:
        case SMTP_SRV_AUTH: {
            int ok = size ? !(data[(*k)++ % size] & 2) : 1;
            smtp_server_decide(s, ok, ok ? 0 : 550, NULL, NULL);
            break;
        }
        case SMTP_SRV_STARTTLS:
            r->tls = 1;
            return;
        default:
            break;
        }
    }
    (void)cur_len;
}

static void run(const uint8_t *data, size_t size, size_t step, result *r, alloc_ctl *a)
{
    smtp_server_config c;
    memset(&c, 0, sizeof c);
    c.hostname = "fuzz.test";
    c.max_message_size = 2000;
    c.max_recipients = 5;
    c.out_cap = OUT_CAP;
    c.tls_available = 1;
    c.auth_enabled = 1;
    c.auth_plaintext = 1;
    c.hook_mail = c.hook_rcpt = 1;
    c.normalize_newlines = size && (data[0] & 0x80);
    c.realloc_fn = failing_realloc;
    c.alloc_ud = a;
    memset(r, 0, sizeof *r);
    smtp_server *s = smtp_server_new(&c);
    if (!s) {
        assert(a->failed);   /* only the engine's own struct may fail to be made */
        return;
    }
    unsigned k = 0;
    size_t i = 0;
    int stalls = 0;
    while (i < size && !smtp_server_closed(s) && !r->tls) {
        size_t n = size - i < step ? size - i : step;
        size_t took = smtp_server_feed(s, (const char *)data + i, n);
        i += took;
        drain(s, r, data, size, &k);
        /* the client reads everything now and then */
        size_t len;
        const char *o;
        while ((o = smtp_server_output(s, &len)) != NULL && len) {
            grow_append(&r->out, &r->out_len, o, len);
            smtp_server_output_done(s, len);
        }
        if (took == 0 && ++stalls > 4)
            break;
    }
    if (!r->tls)
        drain(s, r, data, size, &k);
    size_t len;
    const char *o;
    /* the output may come in two pieces (a 421 that did not fit after running out of memory) */
    while ((o = smtp_server_output(s, &len)) != NULL && len) {
        grow_append(&r->out, &r->out_len, o, len);
        smtp_server_output_done(s, len);
    }
    r->closed = smtp_server_closed(s);
    smtp_server_free(s);
}

static size_t count(const uint8_t *d, size_t n, const char *pat, int icase)
{
    size_t m = strlen(pat), c = 0;
    for (size_t i = 0; i + m <= n; i++) {
        size_t j = 0;
        while (j < m && (icase ? ((d[i + j] | 0x20) == (pat[j] | 0x20)) : d[i + j] == (uint8_t)pat[j]))
            j++;
        if (j == m)
            c++;
    }
    return c;
}

static void check_replies(const char *out, size_t n)
{
    size_t i = 0;
    while (i < n) {
        const char *lf = memchr(out + i, '\n', n - i);
        assert(lf); /* every reply ends with a line end */
        size_t len = (size_t)(lf - (out + i));
        assert(len >= 4 && out[i + len - 1] == '\r');
        assert(len <= 600);
        for (int j = 0; j < 3; j++)
            assert(out[i + j] >= '0' && out[i + j] <= '9');
        assert(out[i] >= '2' && out[i] <= '5');
        assert(out[i + 3] == ' ' || out[i + 3] == '-');
        for (size_t j = 0; j + 1 < len; j++)
            assert(out[i + j] != '\r' && out[i + j] != '\n' && out[i + j] != 0);
        i += len + 1;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    result whole, bytes, starved;
    alloc_ctl never = { -1, 0 };
    run(data, size, size ? size : 1, &whole, &never);
    run(data, size, 1, &bytes, &never);
    alloc_ctl once = { size ? (long)(data[size - 1] % 32) : 0, 0 };
    run(data, size, size ? size : 1, &starved, &once);
    if (once.failed && starved.out_len) {
        static const char last[] = "421 4.3.0 Out of memory, closing connection\r\n";
        check_replies(starved.out, starved.out_len);
        assert(starved.closed);
        assert(starved.out_len >= sizeof last - 1 &&
               !memcmp(starved.out + starved.out_len - (sizeof last - 1), last, sizeof last - 1));
    }
    free(starved.out); free(starved.msgs);
    /* never more messages than end-of-data markers (CRLF.CRLF, or a BDAT command) */
    /* a DATA command line may end with a bare LF (commands are read leniently), so an empty
     * message can end at "DATA\n.\r\n": count "\n.\r\n", which every real end contains */
    assert(whole.ends <= count(data, size, "\n.\r\n", 0) + count(data, size, "BDAT", 1));
    check_replies(whole.out, whole.out_len);
    /* the same conversation whatever the chunking */
    assert(whole.out_len == bytes.out_len && memcmp(whole.out, bytes.out, whole.out_len) == 0);
    assert(whole.msgs_len == bytes.msgs_len &&
           (whole.msgs_len == 0 || memcmp(whole.msgs, bytes.msgs, whole.msgs_len) == 0));
    assert(whole.accepted == bytes.accepted);
    free(whole.out); free(whole.msgs); free(bytes.out); free(bytes.msgs);
    return 0;
}
