/* The sans-I/O SMTP client engine: commands in, bytes to write out; server bytes in, replies
 * matched to the command that caused them out. Also the dot-stuffing/CRLF filter. Plain C (no Lua:
 * client_lua.c binds it; fuzz/client_fuzz.c and fuzz/stuff_fuzz.c drive it directly). */
#ifndef SMTP_CLIENT_H
#define SMTP_CLIENT_H

#include <stddef.h>
#include "reply.h"

/* Commands a reply can answer, in the order of the name table in client.c. */
typedef enum {
    SMTP_CMD_GREETING, SMTP_CMD_EHLO, SMTP_CMD_HELO, SMTP_CMD_STARTTLS, SMTP_CMD_AUTH,
    SMTP_CMD_MAIL, SMTP_CMD_RCPT, SMTP_CMD_DATA, SMTP_CMD_DATA_END, SMTP_CMD_BDAT,
    SMTP_CMD_RSET, SMTP_CMD_NOOP, SMTP_CMD_QUIT, SMTP_CMD__COUNT
} smtp_cmd;
extern const char *const smtp_cmd_names[SMTP_CMD__COUNT];

typedef enum {
    SMTP_CS_GREETING,   /* waiting for the server's greeting */
    SMTP_CS_READY,      /* commands may be queued */
    SMTP_CS_BODY,       /* DATA got 354: body bytes until end-of-data */
    SMTP_CS_TLS,        /* STARTTLS got 220: input frozen until smtp_client_upgrade() */
    SMTP_CS_CLOSED,     /* QUIT answered or 421 received */
    SMTP_CS_FAILED,     /* malformed server input: nothing more is parsed */
    SMTP_CS__COUNT
} smtp_client_state;
extern const char *const smtp_client_state_names[SMTP_CS__COUNT];

typedef enum {
    SMTP_SASL_PLAIN, SMTP_SASL_LOGIN, SMTP_SASL_CRAM_MD5, SMTP_SASL_XOAUTH2,
    SMTP_SASL_OAUTHBEARER, SMTP_SASL__COUNT
} smtp_sasl;
extern const char *const smtp_sasl_names[SMTP_SASL__COUNT];

/* Streaming dot-stuffer and line-end normalizer: bare CR or LF become CRLF; with `dot`, a '.' at
 * the start of a line is doubled and finish() ends the data with CRLF "." CRLF. */
typedef struct smtp_stuffer {
    int dot;
    int line_start;   /* the next byte starts a line */
    int cr;           /* a CR was seen and its LF (or not) is still to come */
    int finished;
} smtp_stuffer;

void smtp_stuffer_init(smtp_stuffer *s, int dot);
int smtp_stuff(smtp_stuffer *s, const char *in, size_t n, smtp_buf *out);  /* 0 / -1 (memory) */
int smtp_stuff_finish(smtp_stuffer *s, smtp_buf *out);

#define SMTP_CLIENT_MAX_INPUT (4 * SMTP_REPLY_MAX)  /* unparsed server bytes held at most */

typedef struct smtp_client smtp_client;

smtp_client *smtp_client_new(void);
void smtp_client_free(smtp_client *c);
smtp_client_state smtp_client_get_state(const smtp_client *c);
/* Frees the empty buffers of an engine with nothing queued, unread or awaited (an idle session). */
void smtp_client_shrink(smtp_client *c);
const char *smtp_client_error(const smtp_client *c);
/* Server bytes in. -1 when the engine holds too many unparsed bytes (protocol error). */
int smtp_client_feed(smtp_client *c, const char *data, size_t n);
/* Next reply: 1 and *r, *cmd set (valid until the next call); 0 when more input is needed (or
 * input is frozen after STARTTLS); -1 on a protocol error (smtp_client_error says why). */
int smtp_client_next(smtp_client *c, const smtp_reply **r, smtp_cmd *cmd);
/* Queues a command. arg is the EHLO/HELO name or MAIL/RCPT address (without brackets), params
 * the ESMTP parameters; both may be NULL. Returns 0, or -1 with *why set (nothing queued). */
int smtp_client_command(smtp_client *c, smtp_cmd cmd, const char *arg, size_t alen,
                        const char *params, size_t plen, const char **why);
int smtp_client_auth(smtp_client *c, smtp_sasl mech, const char *user, size_t ulen,
                     const char *secret, size_t slen, const char *authz, size_t zlen,
                     const char **why);
int smtp_client_body(smtp_client *c, const char *data, size_t n, const char **why);
int smtp_client_body_end(smtp_client *c, const char **why);
/* One BDAT chunk (bytes sent as given: the caller normalizes them). */
int smtp_client_bdat(smtp_client *c, const char *data, size_t n, int last, const char **why);
/* After the STARTTLS 220: drops every byte held from before the upgrade and returns how many. */
size_t smtp_client_upgrade(smtp_client *c);
/* Bytes waiting to be written; the caller takes them with smtp_client_taken(). */
smtp_buf *smtp_client_output(smtp_client *c);
void smtp_client_taken(smtp_client *c, size_t n);
size_t smtp_client_pending(const smtp_client *c);

/* Taking back commands that were queued but not sent: a transaction whose MAIL and some RCPTs are
 * queued when a later command cannot be (a bad value) must not leave them to go out with the
 * next one. A mark is a position in the output stream (bytes counted from the session's start,
 * so it stays valid while earlier bytes are taken). smtp_client_rollback() drops every output
 * byte and pending command queued after the mark and returns 0; it returns -1 with *why set and
 * changes nothing when a byte after the mark was already taken ("already written"), one of those
 * commands was already answered, body bytes or a SASL answer follow the mark, or the value is not
 * a mark of this engine. */
/* Transcript. With level 1 the engine keeps a record of each line it queues, credentials
 * replaced by SMTP_TRACE_MARKER (AUTH's initial response, every SASL answer made from the user
 * name or secret) and body bytes counted, not copied; level 2 copies body bytes too. A record
 * is a kind byte, a native uint32 length and that many bytes. smtp_client_trace() gives the
 * records not taken yet; smtp_client_trace_taken() drops them. A rollback drops the records of
 * the commands it takes back. */
#define SMTP_TRACE_LINE 'L'     /* a command line, without CRLF */
#define SMTP_TRACE_SECRET 'S'   /* a line whose credentials were replaced by the marker */
#define SMTP_TRACE_SIZE 'N'     /* body bytes sent (unsigned long long): DATA's body, a BDAT chunk */
#define SMTP_TRACE_BODY 'B'     /* body bytes as sent (level 2) */
#define SMTP_TRACE_MARKER "[redacted]"
void smtp_client_set_trace(smtp_client *c, int level);
/* LMTP (RFC 2033) instead of SMTP: EHLO is sent as LHLO, HELO is refused, and the end of a
 * message's data (the final dot, BDAT LAST) gets one reply per RCPT accepted in its transaction
 * (one when none was, or after a refused BDAT chunk): smtp_client_next returns each with the
 * same command, in the order of the RCPTs. */
void smtp_client_set_lmtp(smtp_client *c, int on);
/* After smtp_client_next gave an LMTP end-of-data reply: how many more replies to it follow. */
unsigned smtp_client_lmtp_due(const smtp_client *c);
const char *smtp_client_trace(smtp_client *c, size_t *n);
void smtp_client_trace_taken(smtp_client *c);

typedef unsigned long long smtp_client_mark;
smtp_client_mark smtp_client_mark_now(const smtp_client *c);
int smtp_client_rollback(smtp_client *c, smtp_client_mark mark, const char **why);

#endif
