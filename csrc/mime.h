/* Incremental decoding for the message parser (lua/smtp/parse.lua): base64 the way mail readers
 * take it (lenient, with what was wrong reported as flags) fed in chunks of any size, and a line
 * meter that counts line ends and finds over-long lines in the same pass. Plain C, no Lua, so the
 * fuzz harness drives them directly; the binding is mime_lua.c. */
#ifndef SMTP_MIME_H
#define SMTP_MIME_H

#include <stddef.h>

/* What a base64 body had wrong (each decodes anyway, as Python's email and mail readers do). */
#define SMTP_B64D_BADCHAR  1u  /* a character outside the alphabet (not CR or LF): skipped */
#define SMTP_B64D_AFTERPAD 2u  /* data after the padding: ignored */
#define SMTP_B64D_NOPAD    4u  /* the last quad lacks its padding: decoded as if padded */
#define SMTP_B64D_DANGLING 8u  /* one character left over (cannot hold a byte): dropped */

struct smtp_b64dec {
    unsigned v;      /* bits of the quad being read */
    int k;           /* characters of that quad so far (0..3) */
    int pads;        /* '=' seen since the quad's last character */
    int done;        /* padding closed the data: the rest is ignored */
    unsigned flags;  /* SMTP_B64D_* seen so far */
};

void smtp_b64dec_init(struct smtp_b64dec *d);
/* Decodes in[0..n) after what was fed before. out holds n / 4 * 3 + 3 bytes. Returns the bytes
 * written. Feeding a body in any chunking gives the same output as feeding it whole. */
size_t smtp_b64dec_feed(struct smtp_b64dec *d, const char *in, size_t n, unsigned char *out);
/* Ends the data: a quad of 2 or 3 characters gives its 1 or 2 bytes. out holds 2 bytes. */
size_t smtp_b64dec_finish(struct smtp_b64dec *d, unsigned char *out);

/* Line ends of a stream: CRLF, bare LF, bare CR counted; the longest line (octets before its
 * line end, CR included when it ends a CRLF is not counted) tracked across chunks. */
struct smtp_linemeter {
    size_t run;               /* octets of the current line so far */
    size_t longest;
    int cr;                   /* the last octet fed was CR */
    unsigned long long crlf, lf, barecr;
};

void smtp_linemeter_init(struct smtp_linemeter *m);
void smtp_linemeter_feed(struct smtp_linemeter *m, const char *p, size_t n);
/* A CR at the very end is a bare CR. */
void smtp_linemeter_finish(struct smtp_linemeter *m);

#endif
