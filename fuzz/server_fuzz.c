/* libFuzzer harness for the server engine: arbitrary client bytes (commands, DATA, BDAT, AUTH)
 * fed whole and one byte at a time. Invariants: never more messages than end-of-data markers,
 * every reply line well-formed, output bounded while the client does not read, and identical
 * replies and messages whatever the chunking. A third run makes one allocation fail (which one
 * comes from the input): the engine must not crash or leak, and must end the session with its
 * "421 4.3.0" as the last reply.
 * The first two input bytes choose the configuration (see config()): TLS active from the start,
 * STARTTLS and AUTH offered or not, require_auth, hooks on or off, normalize_newlines, the front
 * door (HELO/RSET hooks and XCLIENT, the high bit of the first byte), and
 * max_line, size, recipient and error limits across their range; 00 00 is the configuration the
 * seeds were written for. With the "resume" bit, the session goes on after STARTTLS with the
 * bytes that follow the first "~TLS~" (what the client sends once the handshake is done). */
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
        case SMTP_SRV_AUTH:
        case SMTP_SRV_HELO:
        case SMTP_SRV_XCLIENT: {
            if (kind == SMTP_SRV_XCLIENT) /* NAME NUL value NUL ...: whole pairs */
                assert(ev.alen >= 4 && ev.a[ev.alen - 1] == 0);
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

/* The configuration from the two prefix bytes (0, 0: the one the seeds were written for). */
static void config(smtp_server_config *c, uint8_t b0, uint8_t b1)
{
    static const size_t max_line[8] = { 0, 64, 65, 200, 513, 1000, 4096, 65536 };
    static const size_t max_size[4] = { 2000, 0, 1, 100000 };
    static const unsigned max_rcpt[4] = { 5, 1, 100, 0 };
    memset(c, 0, sizeof *c);
    c->hostname = "fuzz.test";
    c->out_cap = OUT_CAP;
    c->tls_active = b0 & 0x01;
    c->require_auth = (b0 & 0x02) != 0;
    c->hook_mail = c->hook_rcpt = !(b0 & 0x04);
    c->normalize_newlines = (b0 & 0x08) != 0;
    c->tls_available = !(b0 & 0x10);
    c->auth_enabled = !(b0 & 0x20);
    c->auth_plaintext = !(b0 & 0x40);
    c->max_line = max_line[b1 & 7];
    c->max_message_size = max_size[(b1 >> 3) & 3];
    c->max_recipients = max_rcpt[(b1 >> 5) & 3];
    c->max_errors = (b1 & 0x80) ? 3 : 0;
    /* the front door: HELO and RSET hooks, XCLIENT from a trusted peer */
    c->hook_helo = c->hook_rset = (b0 & 0x80) != 0;
    c->xclient = (b0 & 0x80) ? 2 : 0;
}

/* Feeds one part of the session `step` bytes at a time; stops at STARTTLS (the rest of the part
 * would be TLS records) or when the session ends. */
static void feed_part(smtp_server *s, result *r, const uint8_t *part, size_t plen, size_t step,
                      const uint8_t *data, size_t size, unsigned *k)
{
    size_t i = 0;
    int stalls = 0;
    if (!step)
        step = 1;
    while (i < plen && !smtp_server_closed(s) && !r->tls) {
        size_t n = plen - i < step ? plen - i : step;
        size_t took = smtp_server_feed(s, (const char *)part + i, n);
        i += took;
        drain(s, r, data, size, k);
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
        drain(s, r, data, size, k);
}

/* data/size: the session (after the two configuration bytes); b: where it resumes after
 * STARTTLS (size: not at all). step 0: each part whole. */
static void run(const smtp_server_config *c0, const uint8_t *data, size_t size, size_t b,
                size_t step, result *r, alloc_ctl *a)
{
    smtp_server_config c = *c0;
    c.realloc_fn = failing_realloc;
    c.alloc_ud = a;
    memset(r, 0, sizeof *r);
    smtp_server *s = smtp_server_new(&c);
    if (!s) {
        assert(a->failed);   /* only the engine's own struct may fail to be made */
        return;
    }
    unsigned k = 0;
    size_t alen = b < size ? b - 5 : size;   /* part A ends before "~TLS~" */
    feed_part(s, r, data, alen, step ? step : alen, data, size, &k);
    if (b < size && !smtp_server_closed(s)) {
        /* the handshake "succeeded" (or there was no STARTTLS: the client just goes on) */
        r->tls = 0;
        feed_part(s, r, data + b, size - b, step ? step : size - b, data, size, &k);
    }
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

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t insize)
{
    result whole, bytes, starved;
    alloc_ctl never = { -1, 0 };
    if (insize < 2)
        return 0;
    smtp_server_config c;
    config(&c, in[0], in[1]);
    const uint8_t *data = in + 2;
    size_t size = insize - 2;
    size_t b = size;
    if (in[0] & 0x80) {
        const uint8_t *m = memmem(data, size, "~TLS~", 5);
        if (m)
            b = (size_t)(m - data) + 5;
    }
    run(&c, data, size, b, 0, &whole, &never);
    run(&c, data, size, b, 1, &bytes, &never);
    alloc_ctl once = { size ? (long)(data[size - 1] % 32) : 0, 0 };
    run(&c, data, size, b, 0, &starved, &once);
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
    /* counted over what the engine may have been fed: the parts without "~TLS~" between them */
    uint8_t *fed = malloc(size + 1);
    assert(fed);
    size_t alen = b < size ? b - 5 : size, flen = alen;
    memcpy(fed, data, alen);
    if (b < size) {
        memcpy(fed + alen, data + b, size - b);
        flen += size - b;
    }
    assert(whole.ends <= count(fed, flen, "\n.\r\n", 0) + count(fed, flen, "BDAT", 1));
    free(fed);
    check_replies(whole.out, whole.out_len);
    /* the same conversation whatever the chunking */
    assert(whole.out_len == bytes.out_len && memcmp(whole.out, bytes.out, whole.out_len) == 0);
    assert(whole.msgs_len == bytes.msgs_len &&
           (whole.msgs_len == 0 || memcmp(whole.msgs, bytes.msgs, whole.msgs_len) == 0));
    assert(whole.accepted == bytes.accepted);
    free(whole.out); free(whole.msgs); free(bytes.out); free(bytes.msgs);
    return 0;
}
