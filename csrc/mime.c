/* Incremental base64 decoding and line metering for the message parser; see mime.h. */
#include "mime.h"

/* value of each octet in the base64 alphabet, -1 outside it */
static const signed char B64V[256] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1, -1, 63,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
    -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
    15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1,
    -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
};

void smtp_b64dec_init(struct smtp_b64dec *d)
{
    d->v = 0;
    d->k = 0;
    d->pads = 0;
    d->done = 0;
    d->flags = 0;
}

static unsigned char *partial(struct smtp_b64dec *d, unsigned char *o)
{
    if (d->k == 2) {
        *o++ = (unsigned char)(d->v >> 4);
    } else if (d->k == 3) {
        *o++ = (unsigned char)(d->v >> 10);
        *o++ = (unsigned char)(d->v >> 2);
    }
    d->k = 0;
    d->v = 0;
    return o;
}

size_t smtp_b64dec_feed(struct smtp_b64dec *d, const char *in0, size_t n, unsigned char *out)
{
    const unsigned char *in = (const unsigned char *)in0;
    unsigned char *o = out;
    size_t i = 0;
    while (i < n) {
        if (d->k == 0 && !d->pads && !d->done) {
            /* whole quads of alphabet characters, the bulk of every body, four at a time */
            while (i + 4 <= n) {
                int a = B64V[in[i]], b = B64V[in[i + 1]], c = B64V[in[i + 2]], e = B64V[in[i + 3]];
                if ((a | b | c | e) < 0)
                    break;
                unsigned v = (unsigned)a << 18 | (unsigned)b << 12 | (unsigned)c << 6 | (unsigned)e;
                *o++ = (unsigned char)(v >> 16);
                *o++ = (unsigned char)(v >> 8);
                *o++ = (unsigned char)v;
                i += 4;
            }
            if (i >= n)
                break;
        }
        unsigned char c = in[i++];
        if (c == '\r' || c == '\n')
            continue;
        if (d->done) {
            /* readers stop at the padding; say so only when data (not just more '=') follows */
            if (B64V[c] >= 0)
                d->flags |= SMTP_B64D_AFTERPAD;
            continue;
        }
        if (c == '=') {
            /* '=' only ends a quad that already holds 2 or 3 characters; elsewhere it is junk */
            if (d->k < 2) {
                d->flags |= SMTP_B64D_BADCHAR;
                continue;
            }
            if (d->k + ++d->pads >= 4) {
                o = partial(d, o);
                d->done = 1;
            }
            continue;
        }
        signed char v = B64V[c];
        if (v < 0) {
            d->flags |= SMTP_B64D_BADCHAR;
            continue;
        }
        if (d->pads) {
            /* a lone '=' inside the data: not padding after all (Python's reading too) */
            d->flags |= SMTP_B64D_BADCHAR;
            d->pads = 0;
        }
        d->v = d->v << 6 | (unsigned)v;
        if (++d->k == 4) {
            *o++ = (unsigned char)(d->v >> 16);
            *o++ = (unsigned char)(d->v >> 8);
            *o++ = (unsigned char)d->v;
            d->k = 0;
            d->v = 0;
        }
    }
    return (size_t)(o - out);
}

size_t smtp_b64dec_finish(struct smtp_b64dec *d, unsigned char *out)
{
    unsigned char *o = out;
    if (!d->done) {
        if (d->k == 1)
            d->flags |= SMTP_B64D_DANGLING;
        else if (d->k > 1)
            d->flags |= SMTP_B64D_NOPAD;
        if (d->k == 1) {
            d->k = 0;
            d->v = 0;
        }
        o = partial(d, o);
        d->done = 1;
    }
    return (size_t)(o - out);
}

void smtp_linemeter_init(struct smtp_linemeter *m)
{
    m->run = 0;
    m->longest = 0;
    m->cr = 0;
    m->crlf = m->lf = m->barecr = 0;
}

void smtp_linemeter_feed(struct smtp_linemeter *m, const char *p0, size_t n)
{
    const unsigned char *p = (const unsigned char *)p0;
    size_t run = m->run, longest = m->longest;
    int cr = m->cr;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c == '\n') {
            if (cr) {
                m->crlf++;
                run--;   /* the CR was counted as part of the line */
            } else {
                m->lf++;
            }
            if (run > longest)
                longest = run;
            run = 0;
            cr = 0;
            continue;
        }
        if (cr)
            m->barecr++;
        cr = c == '\r';
        run++;
    }
    m->run = run;
    /* a CR at the chunk's end may be the first half of a CRLF: not counted yet */
    m->longest = run - (size_t)cr > longest ? run - (size_t)cr : longest;
    m->cr = cr;
}

void smtp_linemeter_finish(struct smtp_linemeter *m)
{
    if (m->cr) {
        m->barecr++;
        m->cr = 0;
    }
}
