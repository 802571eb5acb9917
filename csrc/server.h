/* Sans-I/O SMTP server engine: client bytes in, events and reply bytes out. Plain C; used by its
 * Lua binding (server_lua.c) and by fuzz/server_fuzz.c and fuzz/path_fuzz.c. */
#ifndef SMTP_SERVER_H
#define SMTP_SERVER_H

#include <stddef.h>

typedef struct smtp_server smtp_server;

#define SMTP_SERVER_MAX_ERRORS_DEFAULT 20

typedef struct smtp_server_config {
    const char *hostname;        /* name in the greeting and the EHLO reply */
    size_t max_line;             /* command line limit, CRLF included (512) */
    size_t max_message_size;     /* after unstuffing; 0 = no limit */
    unsigned max_recipients;     /* 452 past it (100) */
    unsigned max_errors;         /* 421 and close once reached (20) */
    unsigned max_commands;       /* 421 and close at the command past this many; 0 = no limit */
    unsigned max_transactions;   /* 421 and close at a MAIL past this many; 0 = no limit */
    size_t out_cap;              /* stop consuming input while this much output waits (64 KB) */
    int tls_available;           /* offer STARTTLS */
    int tls_active;              /* implicit TLS: the session starts encrypted */
    int auth_enabled;            /* AUTH PLAIN LOGIN through SMTP_SRV_AUTH events */
    int auth_plaintext;          /* offer AUTH without TLS (loopback or configured) */
    int require_auth;            /* MAIL before AUTH: 530 */
    int normalize_newlines;      /* bare CR/LF in DATA become CRLF instead of a 550 */
    int hook_mail, hook_rcpt;    /* report MAIL/RCPT as events needing a decision */
    int lmtp;                    /* LMTP (RFC 2033): LHLO, no HELO/EHLO (500), and the end of a
                                    message's data decided once per accepted recipient (below) */
    int hook_helo;               /* report HELO/EHLO as an event needing a decision */
    int hook_rset;               /* report RSET (after its 250) as an event needing none */
    int requiretls;              /* RFC 8689: advertise REQUIRETLS once TLS is on and take the
                                    MAIL parameter then (the application honours it) */
    int hook_data;               /* report a valid DATA command for a decision before its 354 */
    int hook_starttls;           /* report a valid STARTTLS for a decision before its 220 */
    int xclient;                 /* 0: XCLIENT unknown; 1: refused (550 5.7.0, an untrusted
                                    peer); 2: advertised and reported for a decision */
    /* Every allocation goes through realloc_fn(alloc_ud, p, n) when set (else realloc); what it
     * returns must be releasable with free(). Tests and the fuzzer use it to make allocations
     * fail: the engine then queues "421 4.3.0" and closes (smtp_server_error says why). */
    void *(*realloc_fn)(void *ud, void *p, size_t n);
    void *alloc_ud;
} smtp_server_config;

enum smtp_server_event_kind {
    SMTP_SRV_NONE = 0,   /* needs input, or output to be written first */
    SMTP_SRV_MAIL,       /* a = reverse path ("" for <>); decide */
    SMTP_SRV_RCPT,       /* a = forward path; decide */
    SMTP_SRV_BEGIN,      /* a message starts (354 sent, or first BDAT chunk) */
    SMTP_SRV_DATA,       /* a = chunk of the unstuffed message */
    SMTP_SRV_END,        /* end of message; code == 0: decide; else the engine refused it
                            with `code` (already replied) and a = its text */
    SMTP_SRV_AUTH,       /* a = mechanism, b = user, c = secret; decide */
    SMTP_SRV_STARTTLS,   /* 220 queued: write the output, then run the TLS handshake */
    SMTP_SRV_CLOSE,      /* final reply queued: write the output, then close */
    SMTP_SRV_HELO,       /* a = the name, b = "HELO", "EHLO" or "LHLO"; decide (hook_helo) */
    SMTP_SRV_RSET,       /* RSET answered; nothing to decide (hook_rset) */
    SMTP_SRV_XCLIENT,    /* a = NAME NUL value NUL ... (values xtext-decoded, names upper
                            case), alen its length; decide: accepted, the session starts over
                            with a new 220 greeting */
    SMTP_SRV_DATA_CMD,   /* DATA (hook_data); decide: accepted, its 354 and the data follow;
                            refused, the transaction stays as it was */
    SMTP_SRV_STARTTLS_CMD /* STARTTLS (hook_starttls); decide: accepted, SMTP_SRV_STARTTLS
                            follows; refused (default 454 4.7.0), the session goes on in clear */
};

typedef struct smtp_server_params smtp_server_params;

typedef struct smtp_server_event {
    int kind;
    const char *a, *b, *c;
    size_t alen, blen, clen;
    int code;
    const smtp_server_params *params;   /* MAIL, RCPT: the command's parameters */
} smtp_server_event;

/* Parsed ESMTP parameters of MAIL or RCPT (values decoded; NULL when absent). */
struct smtp_server_params {
    long long size;              /* -1 when absent */
    const char *body, *ret, *envid, *notify, *orcpt;
    int smtputf8;
    int requiretls;              /* MAIL ... REQUIRETLS (only accepted over TLS) */
};

extern const char *const smtp_server_event_names[];

smtp_server *smtp_server_new(const smtp_server_config *cfg);
void smtp_server_free(smtp_server *s);
size_t smtp_server_space(const smtp_server *s);
size_t smtp_server_feed(smtp_server *s, const char *data, size_t len);
/* Input without a copy: the free tail of the input buffer (*room bytes, allocated and compacted
 * as feed would), or NULL when the engine takes no more input (closed, out of memory); after
 * writing n <= *room bytes there, smtp_server_fed(s, n) takes them as smtp_server_feed would. */
char *smtp_server_feed_buf(smtp_server *s, size_t *room);
void smtp_server_fed(smtp_server *s, size_t n);
int smtp_server_next(smtp_server *s, smtp_server_event *ev);
/* Events and output stay valid until the next call on the engine. Output may come in two pieces
 * (after running out of memory): take what smtp_server_output gives, then ask again. */
/* Answers the pending MAIL/RCPT/END/AUTH event: accept, or reject with code/enh/text (NULLs, or
 * a code outside 200..599, give a default 550/451/535). Returns 0, or -1 when no event waits.
 * With lmtp an END is answered once per accepted recipient, in their order: the event stays
 * pending until smtp_server_lmtp_due() says none is left. The engine's own refusals at the end
 * (552 size, 550 bare CR/LF) are repeated for each recipient by the engine. */
int smtp_server_decide(smtp_server *s, int accept, int code, const char *enh, const char *text);
/* LMTP: replies still to be decided for the pending END (0 when none is pending). */
unsigned smtp_server_lmtp_due(const smtp_server *s);
const char *smtp_server_output(const smtp_server *s, size_t *len);
void smtp_server_output_done(smtp_server *s, size_t n);
/* Queues a final reply (421 on shutdown or timeout; a code outside 400..599 becomes 421, NULLs a
 * default text) and closes the session. */
void smtp_server_shutdown(smtp_server *s, int code, const char *enh, const char *text);
int smtp_server_closed(const smtp_server *s);
/* True when smtp_server_next stopped because the pending output reached out_cap: write it, then
 * call next again before reading more. */
int smtp_server_want_write(const smtp_server *s);
/* "command", "skipline", "data", "bdat", "auth", "closed", or "failed" after running out of
 * memory (closed too). */
const char *smtp_server_state_name(const smtp_server *s);
/* NULL, or why the engine failed ("out of memory"). */
const char *smtp_server_error(const smtp_server *s);
const char *smtp_server_helo(const smtp_server *s);
int smtp_server_helo_kind(const smtp_server *s);   /* 0 none yet, 1 HELO, 2 EHLO */
const char *smtp_server_user(const smtp_server *s);
int smtp_server_tls(const smtp_server *s);
/* What a session has used so far: its caller's deadlines and statistics read it. */
typedef struct smtp_server_usage {
    unsigned commands;           /* command lines taken (AUTH continuation lines not counted) */
    unsigned transactions;       /* MAIL commands accepted */
    unsigned errors;             /* counted toward max_errors (hook and AUTH rejections too) */
    int partial;                 /* a command line is partly received, or a long one skipped */
    const char *limit;           /* NULL, or the limit that closed the session: "errors",
                                    "commands", "transactions", "line" */
} smtp_server_usage;
void smtp_server_get_usage(const smtp_server *s, smtp_server_usage *u);
/* Transcript: with it on (1), the engine records each line it reads in command or AUTH mode
 * (records as the client engine's, client.h: 'L' a line, 'S' a line whose credentials became
 * SMTP_SERVER_TRACE_MARKER: AUTH's initial response and every AUTH response line; 'N' the size
 * of a message's data, a native unsigned long long, at its end; at level 2 'B' the message data
 * as the application gets it). smtp_server_trace() gives the
 * records not taken yet; smtp_server_trace_taken() drops them. */
#define SMTP_SERVER_TRACE_MARKER "[redacted]"
void smtp_server_set_trace(smtp_server *s, int on);
/* Turns the MAIL, RCPT, DATA and STARTTLS decisions (hook_mail ... hook_starttls) on or off for
 * the commands that come from now on; a decision already asked for is still awaited. */
void smtp_server_set_hooks(smtp_server *s, int mail, int rcpt, int data, int starttls);
const char *smtp_server_trace(const smtp_server *s, size_t *n);
void smtp_server_trace_taken(smtp_server *s);
/* Envelope of the current transaction. */
const char *smtp_server_from(const smtp_server *s, const smtp_server_params **p);
unsigned smtp_server_rcpt_count(const smtp_server *s);
const char *smtp_server_rcpt(const smtp_server *s, unsigned i, const smtp_server_params **p);

#endif
