/* SMTP reply parsing (RFC 5321 §4.2, RFC 3463 enhanced codes, RFC 5321 §4.1.1.1 EHLO lines) and
 * the byte buffer the client engine writes into. Plain C; the Lua side is reply_lua.c. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include "reply.h"
#include "text.h"

/* ---- buffers ---------------------------------------------------------------------------- */

int smtp_buf_reserve(smtp_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    size_t need = b->len + extra;
    if (need < b->len)
        return -1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) {
        if (cap > ((size_t)-1) / 2)
            return -1;
        cap *= 2;
    }
    char *p;
    if (b->secret) {
        /* realloc would free the old block as it is */
        p = malloc(cap);
        if (!p)
            return -1;
        if (b->len)
            memcpy(p, b->p, b->len);
        if (b->p) {
            smtp_wipe(b->p, b->cap);
            free(b->p);
        }
    } else {
        p = realloc(b->p, cap);
        if (!p)
            return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

int smtp_buf_add(smtp_buf *b, const void *data, size_t n)
{
    if (n == 0)
        return 0;
    if (smtp_buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

void smtp_buf_consume(smtp_buf *b, size_t n)
{
    if (n >= b->len) {
        if (b->secret)
            smtp_wipe(b->p, b->len);
        b->len = 0;
        return;
    }
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
    /* what is left of the consumed bytes, and stale copies of the moved ones */
    if (b->secret)
        smtp_wipe(b->p + b->len, n);
}

void smtp_buf_free(smtp_buf *b)
{
    if (b->p) {
        smtp_wipe(b->p, b->cap);
        free(b->p);
    }
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- one line --------------------------------------------------------------------------- */

int smtp_reply_line(const char *line, size_t len, int *code, int *last, const char **text,
                    size_t *textlen, const char **why)
{
    /* RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP text, "-" text, or nothing. */
    if (len < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' || line[1] > '5' ||
        line[2] < '0' || line[2] > '9') {
        *why = "malformed reply code";
        return -1;
    }
    *code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    if (len == 3) {
        *last = 1;
        *text = line + 3;
        *textlen = 0;
        return 0;
    }
    if (line[3] == ' ')
        *last = 1;
    else if (line[3] == '-')
        *last = 0;
    else {
        *why = "malformed reply line: no space or '-' after the code";
        return -1;
    }
    *text = line + 4;
    *textlen = len - 4;
    return 0;
}

static size_t digits(const char *s, size_t len, size_t max)
{
    size_t i = 0;
    while (i < len && i < max + 1 && s[i] >= '0' && s[i] <= '9')
        i++;
    return (i >= 1 && i <= max) ? i : 0;
}

size_t smtp_enhanced_len(const char *s, size_t len, int code)
{
    /* RFC 3463: class "." subject "." detail; class 2/4/5 and the same as the reply's. */
    if (len < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[0] - '0' != code / 100 ||
        s[1] != '.')
        return 0;
    size_t i = 2, n = digits(s + i, len - i, 3);
    if (!n)
        return 0;
    i += n;
    if (i >= len || s[i] != '.')
        return 0;
    i++;
    n = digits(s + i, len - i, 3);
    if (!n)
        return 0;
    i += n;
    if (i < len && s[i] != ' ')
        return 0;
    return i;
}

int smtp_ehlo_line(const char *line, size_t len, char *kw, size_t kwcap, const char **params,
                   size_t *plen)
{
    size_t i = 0;
    if (len == 0 || !isalnum((unsigned char)line[0]))
        return -1;
    while (i < len && line[i] != ' ') {
        unsigned char c = (unsigned char)line[i];
        if (!(isalnum(c) || c == '-') || i + 1 >= kwcap)
            return -1;
        kw[i] = (char)toupper(c);
        i++;
    }
    kw[i] = '\0';
    while (i < len && line[i] == ' ')
        i++;
    *params = line + i;
    *plen = len - i;
    return 0;
}

/* ---- whole replies ---------------------------------------------------------------------- */

void smtp_reply_parser_init(smtp_reply_parser *p)
{
    memset(p, 0, sizeof *p);
}

void smtp_reply_parser_free(smtp_reply_parser *p)
{
    smtp_buf_free(&p->line);
    smtp_buf_free(&p->reply.text);
}

static void start_reply(smtp_reply_parser *p)
{
    p->done = 0;
    p->reply.code = 0;
    p->reply.enhanced[0] = '\0';
    p->reply.nlines = 0;
    p->reply.text.len = 0;
    p->reply_bytes = 0;
}

size_t smtp_reply_parser_reset(smtp_reply_parser *p)
{
    size_t held = p->done ? 0 : p->reply_bytes; /* counts the partial line too */
    p->line.len = 0;
    start_reply(p);
    return held;
}

static smtp_rp_status fail(smtp_reply_parser *p, const char *why)
{
    p->error = why;
    return SMTP_RP_ERROR;
}

/* One complete line (line end removed) of the current reply. */
static smtp_rp_status take_line(smtp_reply_parser *p, const char *line, size_t len)
{
    int code, last;
    const char *text, *why;
    size_t tl;
    if (smtp_reply_line(line, len, &code, &last, &text, &tl, &why) < 0)
        return fail(p, why);
    smtp_reply *r = &p->reply;
    if (r->nlines == 0) {
        r->code = code;
        size_t el = smtp_enhanced_len(text, tl, code);
        if (el && el < sizeof r->enhanced) {
            memcpy(r->enhanced, text, el);
            r->enhanced[el] = '\0';
        }
    } else if (code != r->code) {
        return fail(p, "multi-line reply whose codes disagree");
    }
    if (smtp_buf_add(&r->text, text, tl) < 0 || smtp_buf_add(&r->text, "\n", 1) < 0)
        return fail(p, "out of memory");
    r->nlines++;
    if (last) {
        p->done = 1;
        return SMTP_RP_DONE;
    }
    return SMTP_RP_MORE;
}

smtp_rp_status smtp_reply_parser_feed(smtp_reply_parser *p, const char *data, size_t len,
                                      size_t *consumed)
{
    size_t used = 0;
    *consumed = 0;
    if (p->error)
        return SMTP_RP_ERROR;
    if (p->done)
        start_reply(p);
    while (used < len) {
        const char *nl = memchr(data + used, '\n', len - used);
        size_t n = nl ? (size_t)(nl - (data + used)) : len - used;
        /* +1 leaves room for the CR of a CRLF still to come. */
        if (p->line.len + n > SMTP_REPLY_MAX_LINE + 1)
            return fail(p, "reply line over 4096 bytes");
        if (p->reply_bytes + n + (nl ? 1 : 0) > SMTP_REPLY_MAX)
            return fail(p, "reply over 65536 bytes");
        if (smtp_buf_add(&p->line, data + used, n) < 0)
            return fail(p, "out of memory");
        p->reply_bytes += n;
        used += n;
        if (!nl)
            break;
        used++; /* the LF */
        p->reply_bytes++;
        size_t ll = p->line.len;
        if (ll && p->line.p[ll - 1] == '\r')
            ll--;
        if (ll > SMTP_REPLY_MAX_LINE)
            return fail(p, "reply line over 4096 bytes");
        smtp_rp_status st = take_line(p, p->line.p ? p->line.p : "", ll);
        p->line.len = 0;
        if (st != SMTP_RP_MORE) {
            *consumed = used;
            return st;
        }
    }
    *consumed = used;
    return SMTP_RP_MORE;
}
