/* Plain C codecs used by message composition and DKIM: quoted-printable and DKIM canonicalization
 * (base64 and xtext, shared with the server engine, are declared in text.h, included here). No Lua
 * here, so the fuzz harness can drive them directly; the binding is codec_lua.c. */
#ifndef SMTP_CODEC_H
#define SMTP_CODEC_H

#include <stddef.h>
#include "text.h"

/* Quoted-printable (RFC 2045 6.7). CRLF and bare LF are line breaks and become CRLF; every other
 * control byte (bare CR too), '=', and bytes >= 0x80 become =XX; space and tab at the end of a line
 * are encoded; output lines stay within 76 characters through soft breaks; a '.' at the start of a
 * line is encoded so that no line can look like end of data. out holds smtp_qp_encoded_max(n). */
size_t smtp_qp_encoded_max(size_t n);
size_t smtp_qp_encode(const unsigned char *in, size_t n, char *out);
/* Decodes soft breaks, =XX (either case), drops trailing whitespace of lines, keeps CRLF. Invalid
 * '=' sequences are kept as they are (RFC 2045 suggests robustness). Output is at most n bytes. */
size_t smtp_qp_decode(const char *in, size_t n, unsigned char *out);

/* DKIM header canonicalization (RFC 6376 3.4.2) of one header field, as it appears in the message
 * (name, colon, value, folding; the trailing CRLF optional). Writes "name:value\r\n" for relaxed;
 * for simple, the field unchanged with exactly one CRLF at its end. out holds n + 2 bytes. */
size_t smtp_dkim_header_relaxed(const char *in, size_t n, char *out);
size_t smtp_dkim_header_simple(const char *in, size_t n, char *out);

/* DKIM body canonicalization (RFC 6376 3.4.3, 3.4.4) as a stream: feed any chunking, get the same
 * output. Line ends are CRLF; a bare CR or bare LF counts as a line end too (the client normalizes
 * them to CRLF on the wire). Empty lines at the end are held back and dropped at finish. */
typedef void (*smtp_canon_sink)(void *ud, const char *p, size_t n);

struct smtp_bodycanon {
    int relaxed;
    int cr;          /* the last byte seen was CR: a following LF belongs to the same line end */
    int wsp;         /* relaxed: whitespace seen since the last content byte of this line */
    int any;         /* some content has been emitted */
    int open_line;   /* a line with content is open (no line end emitted yet) */
    size_t crlfs;    /* line ends held back until more content arrives */
    smtp_canon_sink sink;
    void *ud;
    size_t blen;
    char buf[4096];
};

void smtp_bodycanon_init(struct smtp_bodycanon *c, int relaxed, smtp_canon_sink sink, void *ud);
void smtp_bodycanon_feed(struct smtp_bodycanon *c, const char *p, size_t n);
void smtp_bodycanon_finish(struct smtp_bodycanon *c);

#endif
