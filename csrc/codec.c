/* Codecs for message composition and DKIM, plain C: quoted-printable and DKIM canonicalization
 * (base64 and xtext are in text.c). Its Lua binding, with SHA-256 and DKIM signing, is
 * codec_lua.c. */
#include <stddef.h>
#include <string.h>
#include "codec.h"

/* ---------------------------------------------------------------------------------------------
 * Quoted-printable
 * ------------------------------------------------------------------------------------------- */

static const char hexdig[] = "0123456789ABCDEF";

size_t smtp_qp_encoded_max(size_t n)
{
    return 4 * n + 8;
}

/* Is position i the start of a line end (LF or CRLF) or the end of the input? */
static int at_eol(const unsigned char *in, size_t n, size_t i)
{
    return i >= n || in[i] == '\n' || (in[i] == '\r' && i + 1 < n && in[i + 1] == '\n');
}

size_t smtp_qp_encode(const unsigned char *in, size_t n, char *out)
{
    char *o = out;
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = in[i];
        if (ch == '\n' || (ch == '\r' && i + 1 < n && in[i + 1] == '\n')) {
            if (ch == '\r')
                i++;
            *o++ = '\r'; *o++ = '\n'; col = 0;
            continue;
        }
        int lit = (ch >= 33 && ch <= 126 && ch != '=') ||
                  ((ch == ' ' || ch == '\t') && !at_eol(in, n, i + 1));
        size_t len = lit ? 1 : 3;
        if (col + len > 75) {
            *o++ = '='; *o++ = '\r'; *o++ = '\n'; col = 0;
        }
        if (col == 0 && ch == '.') {
            lit = 0; len = 3;
        }
        if (lit) {
            *o++ = (char)ch;
        } else {
            *o++ = '='; *o++ = hexdig[ch >> 4]; *o++ = hexdig[ch & 15];
        }
        col += len;
    }
    return (size_t)(o - out);
}

size_t smtp_qp_decode(const char *in0, size_t n, unsigned char *out)
{
    const unsigned char *in = (const unsigned char *)in0;
    unsigned char *o = out;
    size_t i = 0;
    while (i < n) {
        size_t s = i, e, next;
        int haseol;
        while (i < n && in[i] != '\n')
            i++;
        haseol = i < n;
        next = haseol ? i + 1 : i;
        e = i;
        if (haseol && e > s && in[e - 1] == '\r')
            e--;
        while (e > s && (in[e - 1] == ' ' || in[e - 1] == '\t'))
            e--;
        int soft = e > s && in[e - 1] == '=';
        if (soft)
            e--;
        for (size_t j = s; j < e; j++) {
            int h, l;
            if (in[j] == '=' && j + 2 < e && (h = smtp_hexdigit(in[j + 1], SMTP_HEX_ANY)) >= 0 &&
                (l = smtp_hexdigit(in[j + 2], SMTP_HEX_ANY)) >= 0) {
                *o++ = (unsigned char)(h << 4 | l);
                j += 2;
            } else {
                *o++ = in[j];
            }
        }
        if (haseol && !soft) {
            /* "\r\n" is 2 bytes of input for 2 of output; a bare LF would grow the output, so it
             * stays a bare LF: the decoder never writes more than it reads. */
            if (i > s && in[i - 1] == '\r') { *o++ = '\r'; *o++ = '\n'; }
            else *o++ = '\n';
        }
        i = next;
    }
    return (size_t)(o - out);
}

/* ---------------------------------------------------------------------------------------------
 * DKIM canonicalization (RFC 6376 3.4)
 * ------------------------------------------------------------------------------------------- */

static int is_wsp(unsigned char c)
{
    return c == ' ' || c == '\t';
}

size_t smtp_dkim_header_relaxed(const char *in0, size_t n, char *out)
{
    const unsigned char *in = (const unsigned char *)in0;
    char *o = out;
    size_t i = 0, nameend;
    while (i < n && in[i] != ':')
        i++;
    nameend = i;
    while (nameend > 0 && (is_wsp(in[nameend - 1]) || in[nameend - 1] == '\r' || in[nameend - 1] == '\n'))
        nameend--;
    for (size_t j = 0; j < nameend; j++) {
        unsigned char c = in[j];
        if (c == '\r' || c == '\n')
            continue;               /* unfolding covers the whole field */
        *o++ = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    if (i < n) {
        int pending = 0, started = 0;
        *o++ = ':';
        for (i++; i < n; i++) {
            unsigned char c = in[i];
            if (c == '\r' || c == '\n')
                continue;           /* unfolding */
            if (is_wsp(c)) {
                pending = 1;
                continue;
            }
            if (pending && started)
                *o++ = ' ';
            pending = 0;
            started = 1;
            *o++ = (char)c;
        }
    }
    *o++ = '\r'; *o++ = '\n';
    return (size_t)(o - out);
}

size_t smtp_dkim_header_simple(const char *in, size_t n, char *out)
{
    while (n > 0 && (in[n - 1] == '\r' || in[n - 1] == '\n'))
        n--;
    memcpy(out, in, n);
    out[n] = '\r'; out[n + 1] = '\n';
    return n + 2;
}

void smtp_bodycanon_init(struct smtp_bodycanon *c, int relaxed, smtp_canon_sink sink, void *ud)
{
    memset(c, 0, offsetof(struct smtp_bodycanon, buf));
    c->relaxed = relaxed;
    c->sink = sink;
    c->ud = ud;
}

static void bc_flush(struct smtp_bodycanon *c)
{
    if (c->blen) {
        c->sink(c->ud, c->buf, c->blen);
        c->blen = 0;
    }
}

static void bc_put(struct smtp_bodycanon *c, char ch)
{
    if (c->blen == sizeof c->buf)
        bc_flush(c);
    c->buf[c->blen++] = ch;
}

static void bc_content(struct smtp_bodycanon *c, unsigned char ch)
{
    /* held-back line ends were not trailing after all */
    for (; c->crlfs; c->crlfs--) {
        bc_put(c, '\r');
        bc_put(c, '\n');
    }
    if (c->wsp) {
        bc_put(c, ' ');
        c->wsp = 0;
    }
    bc_put(c, (char)ch);
    c->any = 1;
    c->open_line = 1;
}

static void bc_eol(struct smtp_bodycanon *c)
{
    c->wsp = 0;          /* relaxed: whitespace at the end of a line is ignored */
    c->crlfs++;
    c->open_line = 0;
}

void smtp_bodycanon_feed(struct smtp_bodycanon *c, const char *p0, size_t n)
{
    const unsigned char *p = (const unsigned char *)p0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = p[i];
        if (ch == '\n') {
            if (c->cr)
                c->cr = 0;   /* the CR already ended this line */
            else
                bc_eol(c);
            continue;
        }
        c->cr = 0;
        if (ch == '\r') {
            bc_eol(c);
            c->cr = 1;
        } else if (c->relaxed && is_wsp(ch)) {
            c->wsp = 1;
        } else {
            bc_content(c, ch);
        }
    }
}

void smtp_bodycanon_finish(struct smtp_bodycanon *c)
{
    /* One CRLF ends the last line with content (added when missing); an empty body is CRLF in
     * simple and nothing in relaxed (RFC 6376 3.4.3, 3.4.4, errata 3192). */
    if (c->any || !c->relaxed) {
        bc_put(c, '\r');
        bc_put(c, '\n');
    }
    c->crlfs = 0;
    c->wsp = 0;
    c->cr = 0;
    bc_flush(c);
}

