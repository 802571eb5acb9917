/* SMTP reply parsing shared by the client engine and the fuzz harnesses: turns server bytes into
 * complete replies (code, enhanced status code, text lines) with hard caps on line and reply size,
 * and EHLO replies into capability keyword/parameter pairs. Plain C, no Lua. */
#ifndef SMTP_REPLY_H
#define SMTP_REPLY_H

#include <stddef.h>

#define SMTP_REPLY_MAX_LINE 4096    /* one reply line, without its CRLF */
#define SMTP_REPLY_MAX 65536        /* a whole multi-line reply, line ends included */

/* A growable byte buffer (malloc'd). One marked secret (credentials) never leaves a copy behind
 * in freed memory: growing it wipes the old block, consuming wipes the bytes it vacates. */
typedef struct smtp_buf {
    char *p;
    size_t len, cap;
    int secret;
} smtp_buf;

int smtp_buf_reserve(smtp_buf *b, size_t extra);           /* 0 ok, -1 out of memory */
int smtp_buf_add(smtp_buf *b, const void *data, size_t n);  /* 0 ok, -1 out of memory */
void smtp_buf_consume(smtp_buf *b, size_t n);               /* drops the first n bytes */
void smtp_buf_free(smtp_buf *b);                            /* wipes then frees */

/* One complete reply. `text` holds the lines (code and separator removed, enhanced code kept)
 * each followed by '\n'; `enhanced` is the RFC 3463 code of the first line, or "" when absent. */
typedef struct smtp_reply {
    int code;
    char enhanced[16];
    int nlines;
    smtp_buf text;
} smtp_reply;

typedef enum {
    SMTP_RP_MORE = 0,   /* every byte consumed, no complete reply yet */
    SMTP_RP_DONE = 1,   /* a complete reply is in parser->reply; bytes after it not consumed */
    SMTP_RP_ERROR = -1  /* malformed or oversized input: parser->error says why; stays failed */
} smtp_rp_status;

typedef struct smtp_reply_parser {
    smtp_buf line;          /* the current partial line */
    smtp_reply reply;       /* the reply being assembled / just completed */
    size_t reply_bytes;     /* bytes of the current reply so far */
    const char *error;      /* static message once failed */
    int done;               /* reply holds a completed reply not yet reset */
} smtp_reply_parser;

void smtp_reply_parser_init(smtp_reply_parser *p);
void smtp_reply_parser_free(smtp_reply_parser *p);
/* Drops any partial line and reply (the STARTTLS upgrade); returns how many bytes were held. */
size_t smtp_reply_parser_reset(smtp_reply_parser *p);
/* Feeds bytes; *consumed tells how many were used. On SMTP_RP_DONE the caller reads p->reply and
 * feeds the rest again (the next call starts a new reply). */
smtp_rp_status smtp_reply_parser_feed(smtp_reply_parser *p, const char *data, size_t len,
                                      size_t *consumed);

/* Checks one reply line (no line end). Returns 0 and sets *code, *last (1 for ' ' or nothing after
 * the code, 0 for '-') and *text and *textlen, or -1 with *why set. */
int smtp_reply_line(const char *line, size_t len, int *code, int *last, const char **text,
                    size_t *textlen, const char **why);

/* Length of an RFC 3463 enhanced status code at the start of s (class must match the reply's
 * first digit) followed by a space or the end, or 0 when there is none. */
size_t smtp_enhanced_len(const char *s, size_t len, int code);

/* Splits one EHLO line into an uppercased keyword (written to kw, at most kwcap-1 bytes, NUL
 * ended) and its parameters (*params and *plen, leading spaces skipped). Returns -1 when the line
 * does not start with a valid keyword ((ALPHA / DIGIT) *(ALPHA / DIGIT / "-")). */
int smtp_ehlo_line(const char *line, size_t len, char *kw, size_t kwcap, const char **params,
                   size_t *plen);


#endif
