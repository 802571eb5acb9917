/* The SMTP client engine (sans-I/O): queues commands as bytes to write, matches server replies
 * to the commands that caused them, runs the SASL exchanges, freezes its input at STARTTLS so
 * nothing read before the handshake survives it, and dot-stuffs bodies as a stream. Plain C (no
 * Lua: its binding is client_lua.c); OpenSSL only for CRAM-MD5's HMAC. */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "client.h"
#include "text.h"

const char *const smtp_cmd_names[SMTP_CMD__COUNT] = {
    "GREETING", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DATA_END", "BDAT",
    "RSET", "NOOP", "QUIT",
};
const char *const smtp_client_state_names[SMTP_CS__COUNT] = {
    "greeting", "ready", "body", "tls", "closed", "failed",
};
const char *const smtp_sasl_names[SMTP_SASL__COUNT] = {
    "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER",
};

/* ---- dot-stuffing ----------------------------------------------------------------------- */

void smtp_stuffer_init(smtp_stuffer *s, int dot)
{
    s->dot = dot;
    s->line_start = 1;
    s->cr = 0;
    s->finished = 0;
}

int smtp_stuff(smtp_stuffer *s, const char *in, size_t n, smtp_buf *out)
{
    /* Worst case every byte doubles ("\n" -> CRLF, leading "." -> ".."), plus a held CR. */
    if (n > ((size_t)-1) / 2 - 8 || smtp_buf_reserve(out, 2 * n + 4) < 0)
        return -1;
    char *o = out->p + out->len;
    int line_start = s->line_start, cr = s->cr;
    const int dot = s->dot;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        if (cr) {
            cr = 0;
            *o++ = '\r';
            *o++ = '\n';
            line_start = 1;
            if (c == '\n')
                continue;
        }
        if (c == '\r') {
            cr = 1;
        } else if (c == '\n') {
            *o++ = '\r';
            *o++ = '\n';
            line_start = 1;
        } else {
            if (line_start && dot && c == '.')
                *o++ = '.';
            line_start = 0;
            /* the rest of the line up to the next CR or LF in one copy: memchr is far faster
             * than this loop byte by byte (the body path of every message) */
            const char *run = in + i, *end = in + n;
            const char *lim = memchr(run, '\n', (size_t)(end - run));
            if (!lim)
                lim = end;
            const char *crp = memchr(run, '\r', (size_t)(lim - run));
            if (crp)
                lim = crp;
            size_t len = (size_t)(lim - run);
            memcpy(o, run, len);
            o += len;
            i += len - 1;
        }
    }
    s->line_start = line_start;
    s->cr = cr;
    out->len = (size_t)(o - out->p);
    return 0;
}

int smtp_stuff_finish(smtp_stuffer *s, smtp_buf *out)
{
    if (s->finished)
        return 0;
    s->finished = 1;
    if (s->cr) {
        s->cr = 0;
        s->line_start = 1;
        if (smtp_buf_add(out, "\r\n", 2) < 0)
            return -1;
    }
    if (!s->dot)
        return 0;
    /* DATA can only end on a line boundary: a body without a final line end gets one. */
    if (!s->line_start && smtp_buf_add(out, "\r\n", 2) < 0)
        return -1;
    return smtp_buf_add(out, ".\r\n", 3);
}

/* ---- the engine ------------------------------------------------------------------------- */

/* A command awaiting its reply, and where its bytes end in the output stream. */
struct pending {
    unsigned long long end;
    unsigned long long trace;   /* where its trace records start (for a rollback) */
    unsigned char cmd;
    unsigned char last;         /* BDAT: the LAST chunk (LMTP answers it once per recipient) */
};

struct smtp_client {
    smtp_client_state state;
    const char *error;
    smtp_buf in;           /* server bytes not parsed yet, from in_pos */
    size_t in_pos;
    smtp_reply_parser parser;
    smtp_buf out;          /* bytes to write; out.secret while it holds credentials */
    struct pending *pending; /* ring of commands awaiting replies */
    size_t pcap, phead, pcount;
    /* Output positions counted from the session's first byte, for smtp_client_rollback(): */
    unsigned long long taken;     /* bytes taken (written) so far: the output starts here */
    unsigned long long sealed;    /* no rollback below this (body bytes, SASL answers) */
    unsigned long long answered;  /* end of the last command that got its reply */
    smtp_stuffer stuffer;
    /* SASL exchange in progress */
    smtp_sasl mech;
    int auth_step;
    smtp_buf user, secret;
    /* Transcript (smtp_client_set_trace): records of what was queued, credentials replaced */
    int trace;
    smtp_buf tr;
    unsigned long long tr_taken;  /* record bytes taken so far: tr starts here */
    unsigned long long body_len;  /* body bytes of the DATA in progress */
    /* LMTP (smtp_client_set_lmtp): LHLO for EHLO, no HELO, and the end of a message's data
     * answered once per accepted recipient. Counted from the replies as they come, since with
     * PIPELINING a BDAT LAST is queued before any RCPT is answered. */
    int lmtp;
    unsigned rcpt_ok;             /* RCPTs of this transaction answered 2xx */
    unsigned due;                 /* replies still due to the end of data being answered */
    int chunk_failed;             /* a BDAT chunk before LAST was refused: LAST gets one reply */
};

static void set_state(smtp_client *c, smtp_client_state s)
{
#ifdef SMTP_TRACE
    fprintf(stderr, "client %s -> %s\n", smtp_client_state_names[c->state],
            smtp_client_state_names[s]);
#endif
    c->state = s;
}

static unsigned long long out_end(const smtp_client *c) { return c->taken + c->out.len; }

/* One transcript record: a kind byte (client.h), a 32-bit length, the bytes. The record of a
 * command is made from what was queued, except for credentials: the caller passes a marker
 * instead, so no secret or encoding of it is ever copied here. A record that does not fit in
 * memory is left out (the transcript must never make the session fail). */
static void trace_rec(smtp_client *c, char kind, const char *p, size_t n)
{
    if (n > 0x7fffffffu || smtp_buf_reserve(&c->tr, 5 + n) < 0)
        return;
    uint32_t len = (uint32_t)n;
    c->tr.p[c->tr.len] = kind;
    memcpy(c->tr.p + c->tr.len + 1, &len, 4);
    if (n)
        memcpy(c->tr.p + c->tr.len + 5, p, n);
    c->tr.len += 5 + n;
}

/* The command line that ends the output (from `from`, its CRLF left out). */
static void trace_out(smtp_client *c, size_t from)
{
    if (c->trace && c->out.len >= from + 2)
        trace_rec(c, SMTP_TRACE_LINE, c->out.p + from, c->out.len - from - 2);
}

static void trace_secret(smtp_client *c, const char *prefix)
{
    if (!c->trace)
        return;
    char line[64];
    int n = snprintf(line, sizeof line, "%s%s", prefix, SMTP_TRACE_MARKER);
    trace_rec(c, SMTP_TRACE_SECRET, line, (size_t)n);
}

void smtp_client_set_trace(smtp_client *c, int level) { c->trace = level; }
void smtp_client_set_lmtp(smtp_client *c, int on) { c->lmtp = on; }
unsigned smtp_client_lmtp_due(const smtp_client *c) { return c->due; }

const char *smtp_client_trace(smtp_client *c, size_t *n)
{
    *n = c->tr.len;
    return c->tr.p ? c->tr.p : "";
}

void smtp_client_trace_taken(smtp_client *c)
{
    c->tr_taken += c->tr.len;
    c->tr.len = 0;
}

/* Queues cmd as awaiting a reply; call after its bytes are in the output. */
static int push_pending(smtp_client *c, smtp_cmd cmd)
{
    if (c->pcount == c->pcap) {
        size_t ncap = c->pcap ? c->pcap * 2 : 16;
        struct pending *p = malloc(ncap * sizeof *p);
        if (!p)
            return -1;
        for (size_t i = 0; i < c->pcount; i++)
            p[i] = c->pending[(c->phead + i) % c->pcap];
        free(c->pending);
        c->pending = p;
        c->pcap = ncap;
        c->phead = 0;
    }
    struct pending *e = &c->pending[(c->phead + c->pcount) % c->pcap];
    e->cmd = (unsigned char)cmd;
    e->last = 0;
    e->end = out_end(c);
    e->trace = c->tr_taken + c->tr.len;
    c->pcount++;
    return 0;
}

static smtp_cmd pop_pending(smtp_client *c)
{
    const struct pending *e = &c->pending[c->phead];
    if (e->end > c->answered)
        c->answered = e->end;
    c->phead = (c->phead + 1) % c->pcap;
    c->pcount--;
    return (smtp_cmd)e->cmd;
}

smtp_client *smtp_client_new(void)
{
    smtp_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    smtp_reply_parser_init(&c->parser);
    c->user.secret = c->secret.secret = 1;
    c->state = SMTP_CS_GREETING;
    if (push_pending(c, SMTP_CMD_GREETING) < 0) {
        free(c);
        return NULL;
    }
    return c;
}

static void wipe_credentials(smtp_client *c)
{
    smtp_buf_free(&c->user);
    smtp_buf_free(&c->secret);
    c->auth_step = 0;
}

void smtp_client_free(smtp_client *c)
{
    if (!c)
        return;
    wipe_credentials(c);
    smtp_buf_free(&c->in);
    smtp_buf_free(&c->out);
    smtp_buf_free(&c->tr);
    smtp_reply_parser_free(&c->parser);
    free(c->pending);
    free(c);
}

/* An idle session keeps its engine for hours between messages: its empty buffers (input, output,
 * the parser's line and reply, the ring of pending commands; some 1.5 KB) go back to the heap
 * while nothing is queued, unread or awaited, and grow again with the next command. */
void smtp_client_shrink(smtp_client *c)
{
    if (c->pcount || c->out.len || c->in_pos < c->in.len || c->parser.line.len ||
        (c->parser.reply_bytes && !c->parser.done))
        return;
    smtp_buf_free(&c->in);
    c->in_pos = 0;
    smtp_buf_free(&c->out);
    smtp_reply_parser_free(&c->parser);
    free(c->pending);
    c->pending = NULL;
    c->pcap = c->phead = 0;
    if (c->tr.len == 0)
        smtp_buf_free(&c->tr);
}

smtp_client_state smtp_client_get_state(const smtp_client *c) { return c->state; }
const char *smtp_client_error(const smtp_client *c) { return c->error; }
smtp_buf *smtp_client_output(smtp_client *c) { return &c->out; }
size_t smtp_client_pending(const smtp_client *c) { return c->pcount; }

void smtp_client_taken(smtp_client *c, size_t n)
{
    if (n > c->out.len)
        n = c->out.len;
    smtp_buf_consume(&c->out, n);   /* wipes what it frees while out.secret */
    c->taken += n;
    if (c->out.len == 0)
        c->out.secret = 0;
}

/* Nothing appended from here on may be taken back by a rollback (it is not a whole command). */
static void seal(smtp_client *c) { c->sealed = out_end(c); }

smtp_client_mark smtp_client_mark_now(const smtp_client *c) { return out_end(c); }

int smtp_client_rollback(smtp_client *c, smtp_client_mark mark, const char **why)
{
    unsigned long long end = out_end(c);
    *why = mark > end            ? "not a mark of this engine"
         : mark < c->taken       ? "already written"
         : mark < c->answered    ? "already answered"
         : mark < c->sealed      ? "a message body or SASL answer follows the mark"
                                 : NULL;
    /* past those floors, a mark can only be the end of the output or of a pending command */
    int boundary = mark == end || mark == c->sealed || mark == c->answered;
    for (size_t i = 0; i < c->pcount && !boundary && !*why; i++)
        boundary = c->pending[(c->phead + i) % c->pcap].end == mark;
    if (!*why && !boundary)
        *why = "not a mark of this engine";
    if (*why)
        return -1;
    /* the commands queued after the mark are the newest pending ones */
    while (c->pcount) {
        const struct pending *e = &c->pending[(c->phead + c->pcount - 1) % c->pcap];
        if (e->end <= mark)
            break;
        if (e->cmd == SMTP_CMD_AUTH)
            wipe_credentials(c);
        if (e->trace >= c->tr_taken && e->trace - c->tr_taken < c->tr.len)
            c->tr.len = (size_t)(e->trace - c->tr_taken);
        c->pcount--;
    }
    size_t keep = (size_t)(mark - c->taken);
    if (c->out.secret)
        smtp_wipe(c->out.p + keep, c->out.len - keep);
    c->out.len = keep;
    if (keep == 0)
        c->out.secret = 0;
    return 0;
}

static int fail(smtp_client *c, const char *why)
{
    c->error = why;
    set_state(c, SMTP_CS_FAILED);
    return -1;
}

int smtp_client_feed(smtp_client *c, const char *data, size_t n)
{
    if (c->state == SMTP_CS_FAILED)
        return -1;
    if (c->in_pos) {
        smtp_buf_consume(&c->in, c->in_pos);
        c->in_pos = 0;
    }
    if (c->in.len + n > SMTP_CLIENT_MAX_INPUT)
        return fail(c, "too many unanswered bytes from the server");
    if (smtp_buf_add(&c->in, data, n) < 0)
        return fail(c, "out of memory");
    return 0;
}

/* Appends base64(data) CRLF to out. */
static int add_b64_line(smtp_client *c, const unsigned char *data, size_t n)
{
    c->out.secret = 1;   /* from now on growing out must not leave this line behind */
    if (smtp_buf_reserve(&c->out, smtp_b64_encoded_len(n, 0) + 2) < 0)
        return -1;
    c->out.len += smtp_b64_encode(data, n, c->out.p + c->out.len, 0);
    memcpy(c->out.p + c->out.len, "\r\n", 2);
    c->out.len += 2;
    return 0;
}

static int add(smtp_client *c, const char *s, size_t n)
{
    return smtp_buf_add(&c->out, s, n);
}

static int add_str(smtp_client *c, const char *s) { return add(c, s, strlen(s)); }

/* The answer to one 334 challenge of the SASL exchange in progress. */
static int auth_continue(smtp_client *c, const smtp_reply *r)
{
    int rc = 0;
    c->auth_step++;
    switch (c->mech) {
    case SMTP_SASL_LOGIN:
        if (c->auth_step == 1) {
            trace_secret(c, "");
            return add_b64_line(c, (unsigned char *)c->user.p, c->user.len);
        }
        if (c->auth_step == 2) {
            trace_secret(c, "");
            return add_b64_line(c, (unsigned char *)c->secret.p, c->secret.len);
        }
        break;
    case SMTP_SASL_CRAM_MD5:
        if (c->auth_step == 1) {
            /* challenge: base64 text of the 334 line */
            const char *t = r->text.p;
            size_t tl = r->text.len;
            const char *nl = memchr(t, '\n', tl);
            tl = nl ? (size_t)(nl - t) : tl;
            while (tl && (t[tl - 1] == ' ' || t[tl - 1] == '\r'))
                tl--;
            if (tl == 0 || tl > 4096)
                break;
            unsigned char chal[3 * 4096 / 4 + 4];
            size_t cl = smtp_b64_decode(t, tl, chal, SMTP_B64_STRICT);
            if (cl == (size_t)-1)
                break;
            unsigned char md[EVP_MAX_MD_SIZE];
            unsigned int mdlen = 0;
            if (!HMAC(EVP_md5(), c->secret.p ? c->secret.p : "", (int)c->secret.len, chal,
                      (size_t)cl, md, &mdlen))
                break;
            smtp_buf resp = { .secret = 1 };
            static const char hex[] = "0123456789abcdef";
            char hx[2 * EVP_MAX_MD_SIZE];
            for (unsigned int i = 0; i < mdlen; i++) {
                hx[2 * i] = hex[md[i] >> 4];
                hx[2 * i + 1] = hex[md[i] & 15];
            }
            if (smtp_buf_add(&resp, c->user.p, c->user.len) < 0 ||
                smtp_buf_add(&resp, " ", 1) < 0 || smtp_buf_add(&resp, hx, 2 * mdlen) < 0)
                rc = -1;
            else
                rc = add_b64_line(c, (unsigned char *)resp.p, resp.len);
            trace_secret(c, "");
            smtp_buf_free(&resp);
            smtp_wipe(md, sizeof md);
            smtp_wipe(hx, sizeof hx);
            return rc;
        }
        break;
    case SMTP_SASL_XOAUTH2:
        /* a 334 here carries a JSON error; an empty line makes the server send its 5xx */
        if (c->auth_step == 1) {
            size_t from = c->out.len;
            rc = add(c, "\r\n", 2);
            trace_out(c, from);
            return rc;
        }
        break;
    case SMTP_SASL_OAUTHBEARER:
        /* RFC 7628 §3.2.3: the client answers the error with a single %x01 */
        if (c->auth_step == 1) {
            size_t from = c->out.len;
            rc = add(c, "AQ==\r\n", 6);
            trace_out(c, from);
            return rc;
        }
        break;
    default:
        break;
    }
    /* A challenge the mechanism does not expect: cancel the exchange (RFC 4954 §4). */
    size_t from = c->out.len;
    rc = add(c, "*\r\n", 3);
    trace_out(c, from);
    return rc;
}

/* LMTP bookkeeping for one reply to e (the command at the head); returns 1 when e stays at the
 * head because more replies to it are due. RFC 2033: after the end of the data (the final dot,
 * or BDAT LAST) one reply comes for each RCPT that was accepted, in order; with none accepted
 * (or after a refused chunk, the transaction being void) the server has only one reply to give. */
static int lmtp_more(smtp_client *c, const struct pending *e, const smtp_reply *rep)
{
    int ok = rep->code >= 200 && rep->code < 300;
    switch ((smtp_cmd)e->cmd) {
    case SMTP_CMD_MAIL:
    case SMTP_CMD_RSET:
    case SMTP_CMD_EHLO:
        c->rcpt_ok = 0;
        c->chunk_failed = 0;
        return 0;
    case SMTP_CMD_RCPT:
        if (ok)
            c->rcpt_ok++;
        return 0;
    case SMTP_CMD_BDAT:
    case SMTP_CMD_DATA_END:
        if (e->cmd == SMTP_CMD_BDAT && !e->last) {
            if (!ok)
                c->chunk_failed = 1;
            return 0;
        }
        if (c->due == 0)
            c->due = (c->rcpt_ok && !c->chunk_failed) ? c->rcpt_ok : 1;
        if (--c->due > 0)
            return 1;
        c->rcpt_ok = 0;
        c->chunk_failed = 0;
        return 0;
    default:
        return 0;
    }
}

int smtp_client_next(smtp_client *c, const smtp_reply **r, smtp_cmd *cmd)
{
    for (;;) {
        if (c->state == SMTP_CS_FAILED)
            return -1;
        /* after the STARTTLS 220 nothing is parsed: those bytes are dropped at the upgrade */
        if (c->state == SMTP_CS_TLS || c->in_pos >= c->in.len)
            return 0;
        size_t used;
        smtp_rp_status st = smtp_reply_parser_feed(&c->parser, c->in.p + c->in_pos,
                                                   c->in.len - c->in_pos, &used);
        c->in_pos += used;
        if (st == SMTP_RP_ERROR)
            return fail(c, c->parser.error);
        if (st == SMTP_RP_MORE)
            return 0;
        const smtp_reply *rep = &c->parser.reply;
        if (c->pcount == 0)
            return fail(c, "a reply that no command asked for");
        smtp_cmd head = (smtp_cmd)c->pending[c->phead].cmd;
        if (head == SMTP_CMD_AUTH && rep->code == 334) {
            if (auth_continue(c, rep) < 0)
                return fail(c, "out of memory");
            seal(c);   /* a SASL answer is not a command a rollback could take back */
            continue;
        }
        if (c->lmtp && rep->code != 421 && lmtp_more(c, &c->pending[c->phead], rep)) {
            *r = rep;
            *cmd = head;
            return 1;   /* more replies to the same end of data follow */
        }
        pop_pending(c);
        if (head == SMTP_CMD_AUTH)
            wipe_credentials(c);
        if (rep->code == 421) {
            c->due = 0;   /* nothing more comes after it */
            set_state(c, SMTP_CS_CLOSED);
        } else {
            switch (head) {
            case SMTP_CMD_GREETING:
                if (c->state == SMTP_CS_GREETING)
                    set_state(c, SMTP_CS_READY);
                break;
            case SMTP_CMD_STARTTLS:
                if (rep->code == 220)
                    set_state(c, SMTP_CS_TLS);
                break;
            case SMTP_CMD_DATA:
                if (rep->code == 354)
                    set_state(c, SMTP_CS_BODY);
                break;
            case SMTP_CMD_QUIT:
                set_state(c, SMTP_CS_CLOSED);
                break;
            default:
                break;
            }
        }
        *r = rep;
        *cmd = head;
        return 1;
    }
}

size_t smtp_client_upgrade(smtp_client *c)
{
    size_t dropped = (c->in.len - c->in_pos) + smtp_reply_parser_reset(&c->parser);
    smtp_wipe(c->in.p, c->in.len);
    c->in.len = 0;
    c->in_pos = 0;
    /* commands pipelined behind STARTTLS were never answered over TLS: forget them */
    c->pcount = 0;
    c->phead = 0;
    seal(c);
    if (c->state == SMTP_CS_TLS)
        set_state(c, SMTP_CS_READY);
    return dropped;
}

/* Rejects what would end or split a command line. */
static int bad_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return 1;
    return 0;
}

static int can_queue(smtp_client *c, const char **why)
{
    if (c->state == SMTP_CS_READY || c->state == SMTP_CS_GREETING)
        return 0;
    *why = c->state == SMTP_CS_BODY ? "the message body is being sent"
         : c->state == SMTP_CS_TLS  ? "STARTTLS accepted: upgrade first"
                                    : "the session is over";
    return -1;
}

int smtp_client_command(smtp_client *c, smtp_cmd cmd, const char *arg, size_t alen,
                        const char *params, size_t plen, const char **why)
{
    static const char *const verbs[SMTP_CMD__COUNT] = {
        NULL, "EHLO ", "HELO ", "STARTTLS", NULL, "MAIL FROM:<", "RCPT TO:<", "DATA", NULL,
        NULL, "RSET", "NOOP", "QUIT",
    };
    if (can_queue(c, why) < 0)
        return -1;
    if (cmd >= SMTP_CMD__COUNT || !verbs[cmd]) {
        *why = "not a plain command";
        return -1;
    }
    if (!arg)
        alen = 0;
    if (!params)
        plen = 0;
    if (bad_value(arg, alen) || bad_value(params, plen)) {
        *why = "CR, LF or NUL in a command value";
        return -1;
    }
    if (alen > 1024 || plen > 2048) {
        *why = "command value too long";
        return -1;
    }
    if ((cmd == SMTP_CMD_EHLO || cmd == SMTP_CMD_HELO) && alen == 0) {
        *why = "empty HELO name";
        return -1;
    }
    if (cmd == SMTP_CMD_HELO && c->lmtp) {
        *why = "LMTP has no HELO (RFC 2033)";
        return -1;
    }
    size_t mark = c->out.len;
    int rc = add_str(c, cmd == SMTP_CMD_EHLO && c->lmtp ? "LHLO " : verbs[cmd]);
    if (cmd == SMTP_CMD_EHLO || cmd == SMTP_CMD_HELO || cmd == SMTP_CMD_MAIL ||
        cmd == SMTP_CMD_RCPT)
        rc |= add(c, arg, alen);
    if (cmd == SMTP_CMD_MAIL || cmd == SMTP_CMD_RCPT)
        rc |= add(c, ">", 1);
    if (plen && (cmd == SMTP_CMD_MAIL || cmd == SMTP_CMD_RCPT)) {
        rc |= add(c, " ", 1);
        rc |= add(c, params, plen);
    }
    rc |= add(c, "\r\n", 2);
    if (rc || push_pending(c, cmd) < 0) {
        c->out.len = mark;
        *why = "out of memory";
        return -1;
    }
    trace_out(c, mark);
    if (cmd == SMTP_CMD_DATA) {
        smtp_stuffer_init(&c->stuffer, 1);
        c->body_len = 0;
    }
    return 0;
}

static int bad_identity(const char *s, size_t n, int oauth)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0' || (oauth && s[i] == '\001'))
            return 1;
    return 0;
}

int smtp_client_auth(smtp_client *c, smtp_sasl mech, const char *user, size_t ulen,
                     const char *secret, size_t slen, const char *authz, size_t zlen,
                     const char **why)
{
    if (can_queue(c, why) < 0)
        return -1;
    if (mech >= SMTP_SASL__COUNT) {
        *why = "unknown SASL mechanism";
        return -1;
    }
    int oauth = mech == SMTP_SASL_XOAUTH2 || mech == SMTP_SASL_OAUTHBEARER;
    if (!authz)
        zlen = 0;
    if (bad_identity(user, ulen, oauth) || bad_identity(authz, zlen, oauth) ||
        memchr(secret, '\0', slen) || (oauth && bad_identity(secret, slen, 1))) {
        *why = "CR, LF or NUL in an AUTH identity or secret";
        return -1;
    }
    if (ulen > 4096 || slen > 8192 || zlen > 4096) {
        *why = "AUTH identity or secret too long";
        return -1;
    }
    wipe_credentials(c);
    c->mech = mech;
    c->auth_step = 0;
    size_t mark = c->out.len;
    int rc = add_str(c, "AUTH ") | add_str(c, smtp_sasl_names[mech]);
    smtp_buf ir = { .secret = 1 };   /* the initial response holds the secret */
    switch (mech) {
    case SMTP_SASL_PLAIN:
        rc |= smtp_buf_add(&ir, authz, zlen) | smtp_buf_add(&ir, "", 1) |
              smtp_buf_add(&ir, user, ulen) | smtp_buf_add(&ir, "", 1) |
              smtp_buf_add(&ir, secret, slen);
        break;
    case SMTP_SASL_XOAUTH2:
        rc |= smtp_buf_add(&ir, "user=", 5) | smtp_buf_add(&ir, user, ulen) |
              smtp_buf_add(&ir, "\001auth=Bearer ", 13) | smtp_buf_add(&ir, secret, slen) |
              smtp_buf_add(&ir, "\001\001", 2);
        break;
    case SMTP_SASL_OAUTHBEARER:
        /* gs2 header: "n,a=" saslname "," with ',' and '=' escaped (RFC 5801 §4) */
        rc |= smtp_buf_add(&ir, "n,a=", 4);
        for (size_t i = 0; i < ulen; i++) {
            if (user[i] == ',')
                rc |= smtp_buf_add(&ir, "=2C", 3);
            else if (user[i] == '=')
                rc |= smtp_buf_add(&ir, "=3D", 3);
            else
                rc |= smtp_buf_add(&ir, user + i, 1);
        }
        rc |= smtp_buf_add(&ir, ",\001auth=Bearer ", 14) | smtp_buf_add(&ir, secret, slen) |
              smtp_buf_add(&ir, "\001\001", 2);
        break;
    default: /* LOGIN and CRAM-MD5 answer challenges: keep the credentials until then */
        rc |= smtp_buf_add(&c->user, user, ulen) | smtp_buf_add(&c->secret, secret, slen);
        break;
    }
    if (ir.len) {
        rc |= add(c, " ", 1);
        rc |= add_b64_line(c, (unsigned char *)ir.p, ir.len);
    } else {
        rc |= add(c, "\r\n", 2);
    }
    size_t irlen = ir.len;
    smtp_buf_free(&ir);
    if (rc || push_pending(c, SMTP_CMD_AUTH) < 0) {
        smtp_wipe(c->out.p + mark, c->out.len - mark);
        c->out.len = mark;
        wipe_credentials(c);
        *why = "out of memory";
        return -1;
    }
    if (c->trace) {
        /* the verb and mechanism from fixed strings, never from the output that holds the secret */
        char head[48];
        snprintf(head, sizeof head, "AUTH %s%s", smtp_sasl_names[mech], irlen ? " " : "");
        if (irlen)
            trace_secret(c, head);
        else
            trace_rec(c, SMTP_TRACE_LINE, head, strlen(head));
    }
    return 0;
}

int smtp_client_body(smtp_client *c, const char *data, size_t n, const char **why)
{
    if (c->state != SMTP_CS_BODY) {
        *why = "no DATA accepted (354) to send a body for";
        return -1;
    }
    size_t from = c->out.len;
    if (smtp_stuff(&c->stuffer, data, n, &c->out) < 0) {
        *why = "out of memory";
        return -1;
    }
    c->body_len += c->out.len - from;
    if (c->trace == 2)
        trace_rec(c, SMTP_TRACE_BODY, c->out.p + from, c->out.len - from);
    seal(c);
    return 0;
}

int smtp_client_body_end(smtp_client *c, const char **why)
{
    if (c->state != SMTP_CS_BODY) {
        *why = "no DATA accepted (354) to end";
        return -1;
    }
    size_t from = c->out.len;
    if (smtp_stuff_finish(&c->stuffer, &c->out) < 0 || push_pending(c, SMTP_CMD_DATA_END) < 0) {
        *why = "out of memory";
        return -1;
    }
    if (c->trace == 2) {
        trace_rec(c, SMTP_TRACE_BODY, c->out.p + from, c->out.len - from);
    } else if (c->trace) {
        /* the size of what went (the line end finish() may have added counts, the dot not) */
        unsigned long long total = c->body_len + (c->out.len - from) - 3;
        trace_rec(c, SMTP_TRACE_SIZE, (const char *)&total, sizeof total);
        trace_rec(c, SMTP_TRACE_LINE, ".", 1);
    }
    seal(c);
    set_state(c, SMTP_CS_READY);
    return 0;
}

int smtp_client_bdat(smtp_client *c, const char *data, size_t n, int last, const char **why)
{
    if (can_queue(c, why) < 0)
        return -1;
    char head[64];
    int hl = snprintf(head, sizeof head, "BDAT %zu%s\r\n", n, last ? " LAST" : "");
    size_t mark = c->out.len;
    if (add(c, head, (size_t)hl) < 0 || add(c, data, n) < 0 ||
        push_pending(c, SMTP_CMD_BDAT) < 0) {
        c->out.len = mark;
        *why = "out of memory";
        return -1;
    }
    c->pending[(c->phead + c->pcount - 1) % c->pcap].last = last ? 1 : 0;
    if (c->trace) {
        trace_rec(c, SMTP_TRACE_LINE, head, (size_t)hl - 2);
        if (c->trace == 2) {
            trace_rec(c, SMTP_TRACE_BODY, data, n);
        } else {
            unsigned long long total = n;
            trace_rec(c, SMTP_TRACE_SIZE, (const char *)&total, sizeof total);
        }
    }
    return 0;
}

