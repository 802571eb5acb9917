/* The sans-I/O SMTP server engine: client bytes in; commands, message data and replies out.
 * Plain C (no Lua: its binding is server_lua.c; fuzz/server_fuzz.c and fuzz/path_fuzz.c drive it
 * directly). Running out of memory never aborts: the session ends with a 421 (see oom()). */
#include <ctype.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"
#include "text.h"

#define LONG_LINE_CLOSE (64 * 1024) /* a client this far into one command line is cut off */
#define IN_EXTRA 8192               /* input buffer = max_line + this (pipelined commands) */
#define MAX_PATH_LEN 256

/* What the engine is doing with the next input bytes. */
enum mode { M_CMD, M_SKIPLINE, M_DATA, M_BDAT, M_AUTH, M_CLOSED };
static const char *const mode_names[] = { "command", "skipline", "data", "bdat", "auth", "closed" };

/* Where a DATA byte stream is: decides unstuffing and the only end marker, CRLF.CRLF. D_NBOL is
 * the start of a line that follows a bare CR or LF (normalize_newlines): its leading dot is
 * stuffing like after CRLF, but "." there can never end the data. */
enum dstate { D_BOL, D_NBOL, D_MID, D_CR, D_DOT, D_DOTCR };

/* What the pending decision is for. */
enum await { A_NONE, A_MAIL, A_RCPT, A_END, A_AUTH, A_HELO, A_XCLIENT, A_DATA, A_STARTTLS };

enum authstep { AU_PLAIN, AU_LOGIN_USER, AU_LOGIN_PASS };

const char *const smtp_server_event_names[] = {
    "none", "mail", "rcpt", "begin", "data", "end", "auth", "starttls", "close",
    "helo", "rset", "xclient", "data_command", "starttls_command"
};

struct addr {
    char *block;                 /* one allocation: the address then the parameter values */
    const char *addr;
    smtp_server_params p;
};

struct smtp_server {
    smtp_server_config cfg;
    char hostname[256];
    enum mode mode;
    enum await await;
    /* input: [in_pos, in_len) not yet processed */
    char *in;
    size_t in_cap, in_len, in_pos;
    size_t skipped;              /* bytes of an over-long command line thrown away */
    /* output */
    char *out;
    size_t out_len, out_alloc;
    /* unstuffed data of the current step */
    char *dbuf;
    size_t dlen;
    /* session */
    int helo;                    /* 0 none, 1 HELO, 2 EHLO */
    char helo_name[256];
    int tls;
    int authed;
    char user[256];
    unsigned errors;
    unsigned commands, transactions;   /* for max_commands, max_transactions and usage */
    const char *limit;           /* the limit that closed the session (smtp_server_get_usage) */
    int close_reported;
    /* transaction */
    int in_tx;
    struct addr from;
    struct addr *rcpts;
    unsigned nrcpt, rcpt_alloc;
    struct addr pending;         /* MAIL/RCPT waiting for a decision */
    int bdat_tx;                 /* the transaction started BDAT (no DATA then) */
    int data_tx;
    int msg_begun;
    /* message */
    enum dstate ds;
    unsigned long long msg_size;
    int msg_bad;                 /* bare CR/LF seen (reject mode) */
    int bdat_cr;                 /* BDAT data so far ends in a CR (its LF may come next chunk) */
    int msg_over;                /* over max_message_size */
    unsigned long long bdat_left;
    int bdat_last, bdat_discard;
    int end_pending;             /* END to report after the last DATA chunk */
    int begin_pending;           /* BEGIN to report before the first chunk */
    int tls_pending;             /* STARTTLS to report */
    int msg_abort;               /* a BDAT message ended by RSET/EHLO/QUIT: END without reply */
    unsigned lmtp_due;           /* LMTP: END decisions still owed, one per accepted recipient */
    /* auth exchange */
    enum authstep austep;
    char *auth_buf;              /* decoded credentials, wiped after use */
    size_t auth_len;
    char *auth_user;
    /* output bookkeeping for running out of memory */
    size_t out_sealed;           /* out[0..out_sealed) ends with a whole reply */
    int oom;                     /* an allocation failed: the session is over */
    const char *tail;            /* the final 421 when it could not be put in `out` */
    size_t tail_len;
    /* front door: a HELO/EHLO waiting for the hook, RSET to report, XCLIENT's attributes */
    char helo_pend[256];
    int helo_pend_ehlo;
    int rset_pending;
    char *xc;                    /* NAME NUL value NUL ...: the pending XCLIENT */
    size_t xc_len;
    /* transcript (smtp_server_set_trace): records of the lines read, credentials replaced */
    int trace;
    char *tr;
    size_t tr_len, tr_cap;
};

static const char OOM_REPLY[] = "421 4.3.0 Out of memory, closing connection\r\n";

/* Every mode change but closing goes through here: once closed (QUIT, too many errors, out of
 * memory) a session stays closed, whatever the step that closed it meant to do next. */
static void set_mode(smtp_server *s, enum mode m)
{
    if (s->mode != M_CLOSED)
        s->mode = m;
}

static void *xrealloc(smtp_server *s, void *p, size_t n)
{
    return s->cfg.realloc_fn ? s->cfg.realloc_fn(s->cfg.alloc_ud, p, n) : realloc(p, n);
}

static void reset_tx(smtp_server *s);
static void wipe_auth(smtp_server *s);

/* One transcript record (the client engine's format, client.h): a kind byte, a native uint32
 * length, the bytes. A record that does not fit in memory is left out: the transcript must never
 * end a session. */
static void trace_rec(smtp_server *s, char kind, const char *p, size_t n)
{
    if (n > 0xffffu)
        n = 0xffffu;
    if (s->tr_len + 5 + n > s->tr_cap) {
        size_t cap = s->tr_cap ? s->tr_cap * 2 : 256;
        while (cap < s->tr_len + 5 + n)
            cap *= 2;
        char *nt = xrealloc(s, s->tr, cap);
        if (!nt)
            return;
        s->tr = nt;
        s->tr_cap = cap;
    }
    uint32_t len = (uint32_t)n;
    s->tr[s->tr_len] = kind;
    memcpy(s->tr + s->tr_len + 1, &len, 4);
    if (n)
        memcpy(s->tr + s->tr_len + 5, p, n);
    s->tr_len += 5 + n;
}

/* A line read in command or AUTH mode, as the transcript shows it: an AUTH response, and the
 * initial response on an AUTH command, become the marker; the lines are never copied whole. */
static void trace_line(smtp_server *s, const char *line, size_t n)
{
    if (s->mode == M_AUTH) {
        if (n == 1 && line[0] == '*')
            trace_rec(s, 'L', line, n);
        else
            trace_rec(s, 'S', SMTP_SERVER_TRACE_MARKER, sizeof SMTP_SERVER_TRACE_MARKER - 1);
        return;
    }
    if (n >= 4 && (line[0] | 0x20) == 'a' && (line[1] | 0x20) == 'u' && (line[2] | 0x20) == 't' &&
        (line[3] | 0x20) == 'h') {
        /* "AUTH MECH": the verb and the mechanism name, then the marker for anything after it;
         * a line that only looks like AUTH ("AUTH\tPLAIN ...") shows its first four bytes */
        size_t i = 4;
        if (i < n && line[i] == ' ') {
            while (i < n && line[i] == ' ')
                i++;
            while (i < n && line[i] != ' ' && i < 64)
                i++;
        }
        size_t rest = i;
        while (rest < n && line[rest] == ' ')
            rest++;
        if (rest < n) {
            char buf[64 + sizeof SMTP_SERVER_TRACE_MARKER + 1];
            memcpy(buf, line, i);
            buf[i] = ' ';
            memcpy(buf + i + 1, SMTP_SERVER_TRACE_MARKER, sizeof SMTP_SERVER_TRACE_MARKER - 1);
            trace_rec(s, 'S', buf, i + sizeof SMTP_SERVER_TRACE_MARKER);
            return;
        }
        trace_rec(s, 'L', line, i);
        return;
    }
    trace_rec(s, 'L', line, n);
}

/* An allocation failed. There is nothing sane left to do for this client but to say so: a reply
 * built halfway (a multi-line EHLO) is dropped, a final 421 queued, the session closed, and the
 * memory it held given back. A message being received ends with an END event of 451 first. */
static void oom(smtp_server *s)
{
    if (s->oom)
        return;
    s->oom = 1;
    s->out_len = s->out_sealed;
    if (s->msg_begun && !s->end_pending) {
        s->end_pending = 1;
        s->msg_abort = 1;
    }
    reset_tx(s);
    wipe_auth(s);
    s->await = A_NONE;
    s->mode = M_CLOSED;
    if (s->out_alloc - s->out_len >= sizeof OOM_REPLY - 1) {
        memcpy(s->out + s->out_len, OOM_REPLY, sizeof OOM_REPLY - 1);
        s->out_len += sizeof OOM_REPLY - 1;
        s->out_sealed = s->out_len;
    } else {
        s->tail = OOM_REPLY;
        s->tail_len = sizeof OOM_REPLY - 1;
    }
}

/* --- output ----------------------------------------------------------------------------- */

static void out_add(smtp_server *s, const char *p, size_t n)
{
    if (s->oom)
        return;
    if (s->out_len + n > s->out_alloc) {
        size_t na = s->out_alloc ? s->out_alloc : 512;
        while (na < s->out_len + n)
            na *= 2;
        char *nb = xrealloc(s, s->out, na);
        if (!nb) {
            oom(s);
            return;
        }
        s->out = nb;
        s->out_alloc = na;
    }
    memcpy(s->out + s->out_len, p, n);
    s->out_len += n;
}

/* One reply line. Protocol errors and refusals (not 452 past max_recipients) count toward
 * max_errors: see fail(). */
static void reply(smtp_server *s, int code, const char *enh, const char *fmt, ...)
{
    char line[600];
    /* code and enhanced code by hand, and the text copied when it needs no formatting: most
     * replies ("250 2.1.0 Ok") go out without a printf */
    int n = 0;
    line[n++] = (char)('0' + code / 100 % 10);
    line[n++] = (char)('0' + code / 10 % 10);
    line[n++] = (char)('0' + code % 10);
    line[n++] = ' ';
    if (enh) {
        size_t el = strnlen(enh, 16);
        memcpy(line + n, enh, el);
        n += (int)el;
        line[n++] = ' ';
    }
    va_list ap;
    va_start(ap, fmt);
    const char *lit = NULL;
    if (fmt[0] == '%' && fmt[1] == 's' && fmt[2] == '\0')
        lit = va_arg(ap, const char *);
    else if (!strchr(fmt, '%'))
        lit = fmt;
    int m;
    if (lit) {
        size_t ll = strnlen(lit, sizeof line - n - 3);
        memcpy(line + n, lit, ll);
        m = (int)ll;
    } else {
        m = vsnprintf(line + n, sizeof line - n - 2, fmt, ap);
    }
    va_end(ap);
    if (m < 0)
        m = 0;
    if ((size_t)m > sizeof line - n - 3)
        m = (int)(sizeof line - n - 3);
    n += m;
    line[n++] = '\r';
    line[n++] = '\n';
    out_add(s, line, (size_t)n);
    if (!s->oom)
        s->out_sealed = s->out_len;
}

static void close_with(smtp_server *s, int code, const char *enh, const char *text)
{
    reply(s, code, enh, "%s", text);
    s->mode = M_CLOSED;
}

/* An error reply (the engine's, or a hook's or AUTH's refusal); too many end the session. */
static void fail(smtp_server *s, int code, const char *enh, const char *text)
{
    reply(s, code, enh, "%s", text);
    if (++s->errors >= s->cfg.max_errors) {
        s->limit = "errors";
        close_with(s, 421, "4.7.0", "Too many errors, closing connection");
    }
}

/* --- transaction -------------------------------------------------------------------------- */

static void addr_clear(struct addr *a)
{
    free(a->block);
    memset(a, 0, sizeof *a);
}

static void wipe_auth(smtp_server *s)
{
    if (s->auth_buf) {
        smtp_wipe(s->auth_buf, s->auth_len);
        free(s->auth_buf);
    }
    s->auth_buf = NULL;
    s->auth_len = 0;
    s->auth_user = NULL;
}

static void reset_tx(smtp_server *s)
{
    addr_clear(&s->from);
    addr_clear(&s->pending);
    for (unsigned i = 0; i < s->nrcpt; i++)
        addr_clear(&s->rcpts[i]);
    s->nrcpt = 0;
    s->in_tx = s->bdat_tx = s->data_tx = s->msg_begun = 0;
    s->msg_size = 0;
    s->msg_bad = s->msg_over = s->bdat_cr = 0;
}

/* --- helpers ------------------------------------------------------------------------------ */

static int ieq(const char *a, size_t alen, const char *b)
{
    size_t bl = strlen(b);
    if (alen != bl)
        return 0;
    for (size_t i = 0; i < bl; i++)
        if (toupper((unsigned char)a[i]) != b[i])
            return 0;
    return 1;
}

static int iprefix(const char *a, size_t alen, const char *b)
{
    size_t bl = strlen(b);
    return alen >= bl && ieq(a, bl, b);
}

/* An xtext parameter value (ENVID, ORCPT's address) decoded into `out` (NUL-terminated, cap
 * bytes): -1 when it is not xtext (text.h says what is) or decodes to a control character, which
 * would let CR, LF or NUL into what the application stores and passes on. */
static int xtext_value(const char *p, size_t n, char *out, size_t cap)
{
    if (n >= cap)
        return -1;
    size_t len = smtp_xtext_decode(p, n, (unsigned char *)out);
    if (len == (size_t)-1)
        return -1;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)out[i] < 32 || out[i] == 127)
            return -1;
    out[len] = 0;
    return 0;
}

/* --- path and parameter parsing ----------------------------------------------------------- */

static int atext(unsigned char c, int utf8)
{
    return isalnum(c) || strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL || (utf8 && c >= 0x80);
}

/* Parses "<...>" at p[0..n); sets *end after '>', the mailbox without route into [*a, *a+*alen).
 * Returns 0, or an SMTP error code (501 syntax, 553 8-bit without SMTPUTF8). */
static int parse_path(const char *p, size_t n, size_t *end, const char **a, size_t *alen,
                      int allow_null, int allow_postmaster)
{
    size_t i = 0;
    if (n == 0 || p[0] != '<')
        return 501;
    i = 1;
    if (i < n && p[i] == '>') {
        if (!allow_null)
            return 501;
        *a = p + 1;
        *alen = 0;
        *end = 2;
        return 0;
    }
    if (i < n && p[i] == '@') { /* source route: obsolete, ignored */
        while (i < n && p[i] != ':') {
            unsigned char c = (unsigned char)p[i];
            if (!(isalnum(c) || c == '@' || c == ',' || c == '.' || c == '-' || c == '[' ||
                  c == ']'))
                return 501;
            i++;
        }
        if (i >= n)
            return 501;
        i++;
    }
    size_t start = i;
    /* local part */
    if (i < n && p[i] == '"') {
        i++;
        while (i < n && p[i] != '"') {
            unsigned char c = (unsigned char)p[i];
            if (c == '\\') {
                i++;
                if (i >= n || (unsigned char)p[i] < 32 || (unsigned char)p[i] == 127)
                    return 501;
            } else if (c < 32 || c == 127) {
                return 501;
            }
            i++;
        }
        if (i >= n)
            return 501;
        i++;
    } else {
        size_t ls = i;
        int lastdot = 1;
        while (i < n && p[i] != '@' && p[i] != '>') {
            unsigned char c = (unsigned char)p[i];
            if (c == '.') {
                if (lastdot)
                    return 501;
                lastdot = 1;
            } else if (atext(c, 1)) {
                lastdot = 0;
            } else {
                return 501;
            }
            i++;
        }
        if (i == ls || (lastdot && i < n && p[i] == '@'))
            return 501;
        if (i < n && p[i] == '>') {
            if (allow_postmaster && ieq(p + ls, i - ls, "POSTMASTER")) {
                *a = p + start;
                *alen = i - start;
                *end = i + 1;
                return 0;
            }
            return 501;
        }
    }
    if (i - start > 64)
        return 501;
    if (i >= n || p[i] != '@')
        return 501;
    i++;
    size_t ds = i;
    if (i < n && p[i] == '[') {
        i++;
        /* dcontent (RFC 5321 4.1.3) without '[' and '\\'; '<' and '>' refused too, so a hook that
         * writes the path back into "<...>" can never end it early downstream */
        while (i < n && p[i] != ']') {
            unsigned char c = (unsigned char)p[i];
            if (c < 33 || c > 126 || c == '\\' || c == '[' || c == '<' || c == '>')
                return 501;
            i++;
        }
        if (i >= n)
            return 501;
        i++;
    } else {
        int lastsep = 1;
        while (i < n && p[i] != '>') {
            unsigned char c = (unsigned char)p[i];
            if (c == '.') {
                if (lastsep)
                    return 501;
                lastsep = 1;
            } else if (isalnum(c) || c == '-' || c == '_' || c >= 0x80) {
                lastsep = 0;
            } else {
                return 501;
            }
            i++;
        }
        if (i == ds)
            return 501;
    }
    if (i - ds > 255)
        return 501;
    if (i >= n || p[i] != '>')
        return 501;
    if (i + 1 > MAX_PATH_LEN)
        return 501;
    *a = p + start;
    *alen = i - start;
    *end = i + 1;
    return 0;
}

/* Builds an address record: address then parameter values, in one block. -1: out of memory. */
static int addr_make(smtp_server *s, struct addr *d, const char *a, size_t alen,
                     const smtp_server_params *p)
{
    const char *vals[5] = { p->body, p->ret, p->envid, p->notify, p->orcpt };
    size_t need = alen + 1;
    for (int i = 0; i < 5; i++)
        if (vals[i])
            need += strlen(vals[i]) + 1;
    char *b = xrealloc(s, NULL, need);
    if (!b) {
        oom(s);
        return -1;
    }
    memcpy(b, a, alen);
    b[alen] = 0;
    d->block = b;
    d->addr = b;
    d->p = *p;
    size_t o = alen + 1;
    const char **dst[5] = { &d->p.body, &d->p.ret, &d->p.envid, &d->p.notify, &d->p.orcpt };
    for (int i = 0; i < 5; i++) {
        if (!vals[i]) {
            *dst[i] = NULL;
            continue;
        }
        size_t l = strlen(vals[i]) + 1;
        memcpy(b + o, vals[i], l);
        *dst[i] = b + o;
        o += l;
    }
    return 0;
}

/* Parses " KEY[=VALUE]..." after a path. Values land in `scratch`. Returns 0 or an error with
 * *enh and *msg set. */
static int parse_params(smtp_server *s, const char *p, size_t n, int is_mail,
                        smtp_server_params *out, char *scratch, size_t cap, const char **enh,
                        const char **msg)
{
    memset(out, 0, sizeof *out);
    out->size = -1;
    size_t o = 0, i = 0;
    while (i < n) {
        if (p[i] != ' ') {
            *enh = "5.5.4"; *msg = "Syntax error in parameters";
            return 501;
        }
        while (i < n && p[i] == ' ')
            i++;
        if (i >= n)
            break;
        size_t ks = i;
        while (i < n && p[i] != ' ' && p[i] != '=')
            i++;
        const char *k = p + ks;
        size_t kl = i - ks;
        const char *v = NULL;
        size_t vl = 0;
        if (i < n && p[i] == '=') {
            i++;
            size_t vs = i;
            while (i < n && p[i] != ' ') {
                unsigned char c = (unsigned char)p[i];
                if (c < 33 || c > 126 || c == '=') {
                    *enh = "5.5.4"; *msg = "Bad parameter value";
                    return 501;
                }
                i++;
            }
            v = p + vs;
            vl = i - vs;
            if (vl == 0) {
                *enh = "5.5.4"; *msg = "Empty parameter value";
                return 501;
            }
        }
        if (s->helo != 2) {
            *enh = "5.5.4"; *msg = "Parameters need EHLO";
            return 555;
        }
        const char **slot = NULL;
        int xtext = 0;
        if (is_mail && ieq(k, kl, "SIZE")) {
            if (!v || vl > 18 || out->size >= 0) goto bad;
            long long sz = 0;
            for (size_t j = 0; j < vl; j++) {
                if (!isdigit((unsigned char)v[j])) goto bad;
                sz = sz * 10 + (v[j] - '0');
            }
            out->size = sz;
            if (s->cfg.max_message_size && (unsigned long long)sz > s->cfg.max_message_size) {
                *enh = "5.3.4"; *msg = "Message size exceeds fixed maximum message size";
                return 552;
            }
            continue;
        } else if (is_mail && ieq(k, kl, "SMTPUTF8")) {
            if (v || out->smtputf8) goto bad;
            out->smtputf8 = 1;
            continue;
        } else if (is_mail && s->cfg.requiretls && ieq(k, kl, "REQUIRETLS")) {
            if (v || out->requiretls) goto bad;
            if (!s->tls) {
                *enh = "5.7.10"; *msg = "REQUIRETLS needs a TLS session";
                return 530;
            }
            out->requiretls = 1;
            continue;
        } else if (is_mail && ieq(k, kl, "BODY")) {
            if (!v || out->body || !(ieq(v, vl, "7BIT") || ieq(v, vl, "8BITMIME"))) goto bad;
            slot = &out->body;
        } else if (is_mail && ieq(k, kl, "RET")) {
            if (!v || out->ret || !(ieq(v, vl, "FULL") || ieq(v, vl, "HDRS"))) goto bad;
            slot = &out->ret;
        } else if (is_mail && ieq(k, kl, "ENVID")) {
            if (!v || out->envid || vl > 100) goto bad;
            slot = &out->envid;
            xtext = 1;
        } else if (!is_mail && ieq(k, kl, "NOTIFY")) {
            if (!v || out->notify) goto bad;
            /* NEVER alone, or a list of SUCCESS, FAILURE, DELAY */
            size_t j = 0;
            int never = 0, items = 0;
            while (j <= vl) {
                size_t e = j;
                while (e < vl && v[e] != ',')
                    e++;
                if (ieq(v + j, e - j, "NEVER")) never = 1;
                else if (!(ieq(v + j, e - j, "SUCCESS") || ieq(v + j, e - j, "FAILURE") ||
                           ieq(v + j, e - j, "DELAY")))
                    goto bad;
                items++;
                j = e + 1;
            }
            if (never && items > 1) goto bad;
            slot = &out->notify;
        } else if (!is_mail && ieq(k, kl, "ORCPT")) {
            if (!v || out->orcpt || vl > 500) goto bad;
            const char *semi = memchr(v, ';', vl);
            if (!semi || semi == v) goto bad;
            slot = &out->orcpt;
            xtext = 2;
        } else {
            *enh = "5.5.4"; *msg = "Unsupported parameter";
            return 555;
        }
        if (o + vl + 2 > cap) goto bad;
        char *dst = scratch + o;
        if (xtext == 1) {
            if (xtext_value(v, vl, dst, cap - o) < 0) goto bad;
        } else if (xtext == 2) {
            size_t tl = (size_t)((const char *)memchr(v, ';', vl) - v) + 1;
            for (size_t j = 0; j + 1 < tl; j++)
                if (!(isalnum((unsigned char)v[j]) || v[j] == '-')) goto bad;
            memcpy(dst, v, tl);
            if (xtext_value(v + tl, vl - tl, dst + tl, cap - o - tl) < 0) goto bad;
        } else {
            for (size_t j = 0; j < vl; j++)
                dst[j] = (char)toupper((unsigned char)v[j]);
            dst[vl] = 0;
        }
        *slot = dst;
        o += strlen(dst) + 1;
    }
    return 0;
bad:
    *enh = "5.5.4";
    *msg = "Invalid parameter";
    return 501;
}

/* --- verbs -------------------------------------------------------------------------------- */

typedef struct verb {
    const char *name;
    int (*check)(smtp_server *s, const char *arg, size_t alen); /* 0: refused (replied) */
    void (*proceed)(smtp_server *s, const char *arg, size_t alen);
} verb;

static int auth_offered(const smtp_server *s)
{
    return s->cfg.auth_enabled && (s->tls || s->cfg.auth_plaintext);
}

static int starttls_offered(const smtp_server *s)
{
    return s->cfg.tls_available && !s->tls;
}

static int check_none(smtp_server *s, const char *arg, size_t alen)
{
    (void)s; (void)arg; (void)alen;
    return 1;
}

static int check_noarg(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg;
    if (alen) {
        fail(s, 501, "5.5.4", "Syntax error: no parameters allowed");
        return 0;
    }
    return 1;
}

static int check_helo(smtp_server *s, const char *arg, size_t alen)
{
    if (alen == 0) {
        fail(s, 501, "5.5.4", "Syntax: EHLO hostname");
        return 0;
    }
    size_t n = 0;
    while (n < alen && arg[n] != ' ')
        n++;
    if (n > 255 || !smtp_utf8_valid(arg, n)) {
        fail(s, 501, "5.5.4", "Invalid domain name");
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)arg[i];
        if (c < 33 || c == 127) {
            fail(s, 501, "5.5.4", "Invalid domain name");
            return 0;
        }
    }
    return 1;
}

/* RFC 2033 4.1: an LMTP server answers HELO and EHLO with 500; LHLO is LMTP's alone. */
static int check_hello(smtp_server *s, const char *arg, size_t alen)
{
    if (s->cfg.lmtp) {
        fail(s, 500, "5.5.1", "Error: this is LMTP, send LHLO");
        return 0;
    }
    return check_helo(s, arg, alen);
}

static int check_lhlo(smtp_server *s, const char *arg, size_t alen)
{
    if (!s->cfg.lmtp) {
        fail(s, 500, "5.5.2", "Error: command not recognized");
        return 0;
    }
    return check_helo(s, arg, alen);
}

static void set_helo(smtp_server *s, const char *arg, size_t alen, int ehlo)
{
    size_t n = 0;
    while (n < alen && arg[n] != ' ')
        n++;
    memcpy(s->helo_name, arg, n);
    s->helo_name[n] = 0;
    s->helo = ehlo ? 2 : 1;
    reset_tx(s);
}

static void ehlo_reply(smtp_server *s);

/* With hook_helo the name waits in helo_pend for the decision; the transaction is reset at once,
 * as RFC 5321 4.1.4 has EHLO do whatever the answer. */
static int helo_hooked(smtp_server *s, const char *arg, size_t alen, int ehlo)
{
    if (!s->cfg.hook_helo)
        return 0;
    size_t n = 0;
    while (n < alen && arg[n] != ' ')
        n++;
    memcpy(s->helo_pend, arg, n);
    s->helo_pend[n] = 0;
    s->helo_pend_ehlo = ehlo;
    reset_tx(s);
    s->await = A_HELO;
    return 1;
}

static void do_helo(smtp_server *s, const char *arg, size_t alen)
{
    if (helo_hooked(s, arg, alen, 0))
        return;
    set_helo(s, arg, alen, 0);
    reply(s, 250, NULL, "%s", s->hostname);
}

static void do_ehlo(smtp_server *s, const char *arg, size_t alen)
{
    if (helo_hooked(s, arg, alen, 1))
        return;
    set_helo(s, arg, alen, 1);
    ehlo_reply(s);
}

static void ehlo_reply(smtp_server *s)
{
    char line[300];
    int n = snprintf(line, sizeof line, "250-%s\r\n", s->hostname);
    out_add(s, line, (size_t)n);
    out_add(s, "250-PIPELINING\r\n", 16);
    if (s->cfg.max_message_size)
        n = snprintf(line, sizeof line, "250-SIZE %llu\r\n",
                     (unsigned long long)s->cfg.max_message_size);
    else
        n = snprintf(line, sizeof line, "250-SIZE\r\n");
    out_add(s, line, (size_t)n);
    if (starttls_offered(s))
        out_add(s, "250-STARTTLS\r\n", 14);
    if (auth_offered(s) && !s->authed)
        out_add(s, "250-AUTH PLAIN LOGIN\r\n", 22);
    if (s->cfg.requiretls && s->tls)
        out_add(s, "250-REQUIRETLS\r\n", 16);
    if (s->cfg.xclient == 2) {
        static const char xc[] = "250-XCLIENT NAME REVERSE_NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n";
        out_add(s, xc, sizeof xc - 1);
    }
    static const char tail[] = "250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n"
                               "250-CHUNKING\r\n250 DSN\r\n";
    out_add(s, tail, sizeof tail - 1);
    if (!s->oom)
        s->out_sealed = s->out_len;
}

static int check_mail(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    if (!s->helo) {
        fail(s, 503, "5.5.1", "Error: send HELO/EHLO first");
        return 0;
    }
    if (s->cfg.require_auth && !s->authed) {
        fail(s, 530, "5.7.0", "Authentication required");
        return 0;
    }
    if (s->in_tx) {
        fail(s, 503, "5.5.1", "Error: nested MAIL command");
        return 0;
    }
    if (s->cfg.max_transactions && s->transactions >= s->cfg.max_transactions) {
        s->limit = "transactions";
        close_with(s, 421, "4.7.0", "Too many transactions in one session, closing connection");
        return 0;
    }
    return 1;
}

/* MAIL and RCPT share the path + parameters syntax. Returns 0 with s->pending filled. */
static int parse_cmd_path(smtp_server *s, const char *arg, size_t alen, const char *kw,
                          int is_mail)
{
    char scratch[1200];
    size_t kl = strlen(kw);
    if (!iprefix(arg, alen, kw)) {
        fail(s, 501, "5.5.4", is_mail ? "Syntax: MAIL FROM:<address>" : "Syntax: RCPT TO:<address>");
        return -1;
    }
    arg += kl;
    alen -= kl;
    while (alen && *arg == ' ') { arg++; alen--; } /* tolerated: "MAIL FROM: <a@b>" */
    const char *a;
    size_t al, end;
    if (parse_path(arg, alen, &end, &a, &al, is_mail, !is_mail)) {
        fail(s, 501, "5.1.7", "Bad address syntax");
        return -1;
    }
    smtp_server_params p;
    const char *enh, *msg;
    int rc = parse_params(s, arg + end, alen - end, is_mail, &p, scratch, sizeof scratch, &enh, &msg);
    if (rc) {
        fail(s, rc, enh, msg);
        return -1;
    }
    int utf8 = is_mail ? p.smtputf8 : s->from.p.smtputf8;
    if (smtp_has_8bit(a, al)) {
        if (!utf8) {
            fail(s, 553, "5.6.7", "Non-ASCII address needs SMTPUTF8");
            return -1;
        }
        if (!smtp_utf8_valid(a, al)) {
            fail(s, 553, "5.6.7", "Invalid UTF-8 in address");
            return -1;
        }
    }
    addr_clear(&s->pending);
    return addr_make(s, &s->pending, a, al, &p);
}

static void accept_mail(smtp_server *s)
{
    addr_clear(&s->from);
    s->from = s->pending;
    memset(&s->pending, 0, sizeof s->pending);
    s->in_tx = 1;
    s->transactions++;
    reply(s, 250, "2.1.0", "Ok");
}

static void do_mail(smtp_server *s, const char *arg, size_t alen)
{
    if (parse_cmd_path(s, arg, alen, "FROM:", 1))
        return;
    if (s->cfg.hook_mail)
        s->await = A_MAIL;
    else
        accept_mail(s);
}

static int check_rcpt(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    if (!s->in_tx) {
        fail(s, 503, "5.5.1", "Error: need MAIL command");
        return 0;
    }
    if (s->msg_begun) {
        fail(s, 503, "5.5.1", "Error: message already started");
        return 0;
    }
    if (s->nrcpt >= s->cfg.max_recipients) {
        reply(s, 452, "4.5.3", "Error: too many recipients"); /* not an error (RFC 5321 4.5.3.1.10) */
        return 0;
    }
    return 1;
}

static void accept_rcpt(smtp_server *s)
{
    if (s->nrcpt == s->rcpt_alloc) {
        unsigned na = s->rcpt_alloc ? s->rcpt_alloc * 2 : 4;
        struct addr *nr = xrealloc(s, s->rcpts, na * sizeof *nr);
        if (!nr) {
            oom(s);
            return;
        }
        s->rcpts = nr;
        s->rcpt_alloc = na;
    }
    s->rcpts[s->nrcpt++] = s->pending;
    memset(&s->pending, 0, sizeof s->pending);
    reply(s, 250, "2.1.5", "Ok");
}

static void do_rcpt(smtp_server *s, const char *arg, size_t alen)
{
    if (parse_cmd_path(s, arg, alen, "TO:", 0))
        return;
    if (s->cfg.hook_rcpt)
        s->await = A_RCPT;
    else
        accept_rcpt(s);
}

static int check_data(smtp_server *s, const char *arg, size_t alen)
{
    if (!check_noarg(s, arg, alen))
        return 0;
    if (!s->in_tx) {
        fail(s, 503, "5.5.1", "Error: need MAIL command");
        return 0;
    }
    if (s->bdat_tx) {
        fail(s, 503, "5.5.1", "Error: DATA after BDAT in one transaction");
        return 0;
    }
    if (s->nrcpt == 0) {
        /* RFC 2033 4.2: 503 in LMTP */
        fail(s, s->cfg.lmtp ? 503 : 554, "5.5.1", "Error: no valid recipients");
        return 0;
    }
    return 1;
}

static void data_go(smtp_server *s)
{
    reply(s, 354, NULL, "End data with <CR><LF>.<CR><LF>");
    set_mode(s, M_DATA);
    s->ds = D_BOL;
    s->data_tx = 1;
    s->msg_begun = 1;
    s->begin_pending = 1;
    s->msg_size = 0;
    s->msg_bad = s->msg_over = s->bdat_cr = 0;
}

/* With hook_data the DATA command waits for a decision (A_DATA) before its 354. */
static void do_data(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    if (s->cfg.hook_data)
        s->await = A_DATA;
    else
        data_go(s);
}

/* BDAT refusals must still swallow the chunk (RFC 3030), so the size is parsed first. */
static int parse_bdat(const char *arg, size_t alen, unsigned long long *size, int *last)
{
    size_t i = 0;
    unsigned long long n = 0;
    if (alen == 0 || !isdigit((unsigned char)arg[0]))
        return -1;
    while (i < alen && isdigit((unsigned char)arg[i])) {
        if (i >= 15)
            return -1;
        n = n * 10 + (unsigned long long)(arg[i] - '0');
        i++;
    }
    *last = 0;
    if (i < alen) {
        if (arg[i] != ' ')
            return -1;
        while (i < alen && arg[i] == ' ')
            i++;
        if (!ieq(arg + i, alen - i, "LAST"))
            return -1;
        *last = 1;
    }
    *size = n;
    return 0;
}

static int check_bdat(smtp_server *s, const char *arg, size_t alen)
{
    unsigned long long n;
    int last;
    if (parse_bdat(arg, alen, &n, &last)) {
        fail(s, 501, "5.5.4", "Syntax: BDAT size [LAST]");
        return 0;
    }
    const char *err = NULL;
    int code = 503;
    const char *enh = "5.5.1";
    if (!s->in_tx)
        err = "Error: need MAIL command";
    else if (s->data_tx)
        err = "Error: BDAT after DATA";
    else if (s->nrcpt == 0) {
        code = 554;
        err = "Error: no valid recipients";
    }
    if (err) {
        fail(s, code, enh, err);
        if (s->mode != M_CLOSED) {
            set_mode(s, M_BDAT);
            s->bdat_left = n;
            s->bdat_discard = 1;
            s->bdat_last = 0;
        }
        return 0;
    }
    return 1;
}

static void do_bdat(smtp_server *s, const char *arg, size_t alen)
{
    unsigned long long n;
    int last;
    parse_bdat(arg, alen, &n, &last);
    set_mode(s, M_BDAT);
    s->bdat_left = n;
    s->bdat_last = last;
    s->bdat_discard = 0;
    s->bdat_tx = 1;
    if (!s->msg_begun) {
        s->msg_begun = 1;
        s->begin_pending = 1;
        s->msg_size = 0;
        s->msg_bad = s->msg_over = s->bdat_cr = 0;
    }
}

static void do_rset(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    reset_tx(s);
    reply(s, 250, "2.0.0", "Ok");
    s->rset_pending = s->cfg.hook_rset;
}

static void do_noop(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    reply(s, 250, "2.0.0", "Ok");
}

static void do_quit(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    close_with(s, 221, "2.0.0", "Bye");
}

static int check_vrfy(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg;
    if (!alen) {
        fail(s, 501, "5.5.4", "Syntax: VRFY address");
        return 0;
    }
    return 1;
}

static void do_vrfy(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    reply(s, 252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery");
}

static void do_help(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    reply(s, 214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP%s%s",
          starttls_offered(s) ? " STARTTLS" : "", auth_offered(s) ? " AUTH" : "");
}

static int check_starttls(smtp_server *s, const char *arg, size_t alen)
{
    if (!check_noarg(s, arg, alen))
        return 0;
    if (!s->cfg.tls_available && !s->tls) {
        fail(s, 502, "5.5.1", "Error: command not implemented");
        return 0;
    }
    if (s->tls) {
        fail(s, 503, "5.5.1", "Error: TLS already active");
        return 0;
    }
    if (s->in_tx) {
        fail(s, 503, "5.5.1", "Error: STARTTLS inside a mail transaction");
        return 0;
    }
    return 1;
}

static void starttls_go(smtp_server *s)
{
    reply(s, 220, "2.0.0", "Ready to start TLS");
    s->tls_pending = 1;
    /* Everything the client sent after STARTTLS in clear is dropped (CVE-2011-0411), and wiped:
     * a client that pipelined AUTH behind it sent its password in clear. */
    smtp_wipe(s->in + s->in_pos, s->in_len - s->in_pos);
    s->in_pos = s->in_len;
    s->tls = 1;
    s->helo = 0;
    s->helo_name[0] = 0;
    s->authed = 0;
    s->user[0] = 0;
    reset_tx(s);
}

/* With hook_starttls the command waits for a decision (A_STARTTLS); what the client pipelined
 * behind it stays unread until then, and is dropped if TLS goes ahead. */
static void do_starttls(smtp_server *s, const char *arg, size_t alen)
{
    (void)arg; (void)alen;
    if (s->cfg.hook_starttls)
        s->await = A_STARTTLS;
    else
        starttls_go(s);
}

static int check_auth(smtp_server *s, const char *arg, size_t alen)
{
    if (!s->cfg.auth_enabled) {
        fail(s, 502, "5.5.1", "Error: authentication not enabled");
        return 0;
    }
    if (!auth_offered(s)) {
        fail(s, 538, "5.7.11", "Encryption required for requested authentication mechanism");
        return 0;
    }
    if (!s->helo) {
        fail(s, 503, "5.5.1", "Error: send HELO/EHLO first");
        return 0;
    }
    if (s->authed) {
        fail(s, 503, "5.5.1", "Error: already authenticated");
        return 0;
    }
    if (s->in_tx) {
        fail(s, 503, "5.5.1", "Error: AUTH not allowed during a mail transaction");
        return 0;
    }
    if (alen == 0) {
        fail(s, 501, "5.5.4", "Syntax: AUTH mechanism");
        return 0;
    }
    return 1;
}

/* Decodes a base64 response into s->auth_buf (appended); -1 on malformed input (replied). */
static int auth_take(smtp_server *s, const char *b64, size_t n, int *cancelled)
{
    *cancelled = 0;
    if (n == 1 && b64[0] == '*') {
        *cancelled = 1;
        wipe_auth(s);
        fail(s, 501, "5.7.0", "Authentication cancelled");
        return -1;
    }
    size_t need = s->auth_len + n / 4 * 3 + 4;
    char *nb = xrealloc(s, NULL, need);
    if (!nb) {
        oom(s);
        return -1;
    }
    if (s->auth_buf) {
        memcpy(nb, s->auth_buf, s->auth_len);
        smtp_wipe(s->auth_buf, s->auth_len);
        free(s->auth_buf);
    }
    s->auth_buf = nb;
    /* RFC 4954 4: "=" is an empty response; anything else must be strict base64 */
    size_t r = (n == 1 && b64[0] == '=') ? 0
             : smtp_b64_decode(b64, n, (unsigned char *)nb + s->auth_len, SMTP_B64_STRICT);
    if (r == (size_t)-1) {
        wipe_auth(s);
        fail(s, 501, "5.5.2", "Invalid base64 data");
        return -1;
    }
    s->auth_len += (size_t)r;
    return 0;
}

/* Once credentials are complete: check them and ask for a decision. */
static void auth_ready(smtp_server *s)
{
    if (s->austep == AU_PLAIN) {
        /* authzid NUL authcid NUL passwd */
        char *z1 = memchr(s->auth_buf, 0, s->auth_len);
        char *z2 = z1 ? memchr(z1 + 1, 0, s->auth_len - (size_t)(z1 + 1 - s->auth_buf)) : NULL;
        if (!z1 || !z2 || memchr(z2 + 1, 0, s->auth_len - (size_t)(z2 + 1 - s->auth_buf)) ||
            z2 == z1 + 1 || (size_t)(z2 - z1 - 1) >= sizeof s->user) {
            wipe_auth(s);
            fail(s, 501, "5.5.2", "Malformed PLAIN credentials");
            return;
        }
    }
    s->await = A_AUTH;
}

static void do_auth(smtp_server *s, const char *arg, size_t alen)
{
    size_t m = 0;
    while (m < alen && arg[m] != ' ')
        m++;
    const char *init = m < alen ? arg + m + 1 : NULL;
    size_t initlen = init ? alen - m - 1 : 0;
    int cancelled;
    wipe_auth(s);
    if (ieq(arg, m, "PLAIN")) {
        s->austep = AU_PLAIN;
        if (init) {
            if (auth_take(s, init, initlen, &cancelled) == 0)
                auth_ready(s);
        } else {
            reply(s, 334, NULL, "");
            set_mode(s, M_AUTH);
        }
    } else if (ieq(arg, m, "LOGIN")) {
        if (init) {
            if (auth_take(s, init, initlen, &cancelled))
                return;
            if (s->auth_len == 0 || memchr(s->auth_buf, 0, s->auth_len) ||
                s->auth_len >= sizeof s->user) {
                wipe_auth(s);
                fail(s, 501, "5.5.2", "Malformed user name");
                return;
            }
            s->austep = AU_LOGIN_PASS;
            reply(s, 334, NULL, "UGFzc3dvcmQ6");
        } else {
            s->austep = AU_LOGIN_USER;
            reply(s, 334, NULL, "VXNlcm5hbWU6");
        }
        set_mode(s, M_AUTH);
    } else {
        fail(s, 504, "5.5.4", "Unrecognized authentication mechanism");
    }
}

/* A response line during AUTH. */
static void auth_line(smtp_server *s, const char *line, size_t n)
{
    int cancelled;
    set_mode(s, M_CMD);
    if (s->austep == AU_PLAIN) {
        if (auth_take(s, line, n, &cancelled) == 0)
            auth_ready(s);
    } else if (s->austep == AU_LOGIN_USER) {
        if (auth_take(s, line, n, &cancelled))
            return;
        if (s->auth_len == 0 || memchr(s->auth_buf, 0, s->auth_len) ||
            s->auth_len >= sizeof s->user) {
            wipe_auth(s);
            fail(s, 501, "5.5.2", "Malformed user name");
            return;
        }
        s->austep = AU_LOGIN_PASS;
        reply(s, 334, NULL, "UGFzc3dvcmQ6");
        set_mode(s, M_AUTH);
    } else {
        size_t ul = s->auth_len;
        if (auth_take(s, line, n, &cancelled))
            return;
        if (memchr(s->auth_buf + ul, 0, s->auth_len - ul)) {
            wipe_auth(s);
            fail(s, 501, "5.5.2", "Malformed password");
            return;
        }
        /* store as user NUL password for the event */
        char *nb = xrealloc(s, NULL, s->auth_len + 2);
        if (!nb) {
            oom(s);
            return;
        }
        memcpy(nb, s->auth_buf, ul);
        nb[ul] = 0;
        memcpy(nb + ul + 1, s->auth_buf + ul, s->auth_len - ul);
        nb[s->auth_len + 1] = 0;
        size_t total = s->auth_len + 1;
        wipe_auth(s);
        s->auth_buf = nb;
        s->auth_len = total;
        s->auth_user = nb; /* user NUL secret */
        s->await = A_AUTH;
    }
}

/* --- XCLIENT (Postfix's XCLIENT_README): a trusted proxy or filter tells who the real client
 * is. The engine checks the syntax and decodes the values; the application checks the values
 * (an address, a port) and decides. Accepted, the session starts over as Postfix's does: no
 * HELO, no AUTH, no transaction, a new 220; HELO= and LOGIN= stand in for those. */

static const char *const xclient_names[] = {
    "NAME", "REVERSE_NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT"
};

static int check_xclient(smtp_server *s, const char *arg, size_t alen)
{
    if (s->cfg.xclient != 2) {
        fail(s, 550, "5.7.0", "Error: insufficient authorization");
        return 0;
    }
    if (s->in_tx) {
        fail(s, 503, "5.5.1", "Error: MAIL transaction in progress");
        return 0;
    }
    if (alen == 0) {
        fail(s, 501, "5.5.4", "Syntax: XCLIENT attribute=value...");
        return 0;
    }
    return 1;
}

static void xclient_clear(smtp_server *s)
{
    free(s->xc);
    s->xc = NULL;
    s->xc_len = 0;
}

static void do_xclient(smtp_server *s, const char *arg, size_t alen)
{
    /* decoded values are never longer than their xtext: the line's length bounds the block */
    char *b = xrealloc(s, NULL, alen + 2);
    if (!b) {
        oom(s);
        return;
    }
    size_t bl = 0, i = 0;
    while (i < alen) {
        size_t e = i;
        while (e < alen && arg[e] != ' ')
            e++;
        const char *eq = memchr(arg + i, '=', e - i);
        size_t k = 0;
        if (eq) {
            for (; k < sizeof xclient_names / sizeof xclient_names[0]; k++)
                if (ieq(arg + i, (size_t)(eq - arg - i), xclient_names[k]))
                    break;
        }
        char val[256];
        if (!eq || k == sizeof xclient_names / sizeof xclient_names[0] ||
            xtext_value(eq + 1, (size_t)(arg + e - eq - 1), val, sizeof val)) {
            free(b);
            fail(s, 501, "5.5.4", eq && k == sizeof xclient_names / sizeof xclient_names[0]
                 ? "Bad XCLIENT attribute name" : "Syntax: XCLIENT attribute=value...");
            return;
        }
        size_t nl = strlen(xclient_names[k]), vl = strlen(val);
        /* name NUL value NUL fits: "N=" is at least as long as "N\0", the value shrank */
        memcpy(b + bl, xclient_names[k], nl + 1);
        bl += nl + 1;
        memcpy(b + bl, val, vl + 1);
        bl += vl + 1;
        i = e;
        while (i < alen && arg[i] == ' ')
            i++;
    }
    xclient_clear(s);
    s->xc = b;
    s->xc_len = bl;
    s->await = A_XCLIENT;
}

/* The value of attribute `name` in the pending XCLIENT, or NULL; the last one given wins. */
static const char *xclient_get(const smtp_server *s, const char *name)
{
    const char *found = NULL;
    for (size_t i = 0; i < s->xc_len;) {
        const char *n = s->xc + i, *v = n + strlen(n) + 1;
        if (!strcmp(n, name))
            found = v;
        i = (size_t)(v - s->xc) + strlen(v) + 1;
    }
    return found;
}

static int xclient_known(const char *v)
{
    return v && strcmp(v, "[UNAVAILABLE]") && strcmp(v, "[TEMPUNAVAIL]");
}

static void xclient_accept(smtp_server *s)
{
    const char *helo = xclient_get(s, "HELO"), *proto = xclient_get(s, "PROTO");
    const char *login = xclient_get(s, "LOGIN");
    reset_tx(s);
    wipe_auth(s);
    s->helo = 0;
    s->helo_name[0] = 0;
    if (xclient_known(helo)) {
        snprintf(s->helo_name, sizeof s->helo_name, "%s", helo);
        s->helo = proto && !strcmp(proto, "ESMTP") ? 2 : 1;
    }
    s->authed = 0;
    smtp_wipe(s->user, sizeof s->user);
    if (xclient_known(login)) {
        snprintf(s->user, sizeof s->user, "%s", login);
        s->authed = 1;
    }
    reply(s, 220, NULL, "%s ESMTP lua-smtp", s->hostname);
}

static const verb verbs[] = {
    { "HELO", check_hello, do_helo },
    { "EHLO", check_hello, do_ehlo },
    { "LHLO", check_lhlo, do_ehlo },
    { "MAIL", check_mail, do_mail },
    { "RCPT", check_rcpt, do_rcpt },
    { "DATA", check_data, do_data },
    { "BDAT", check_bdat, do_bdat },
    { "RSET", check_noarg, do_rset },
    { "NOOP", check_none, do_noop },
    { "QUIT", check_noarg, do_quit },
    { "VRFY", check_vrfy, do_vrfy },
    { "HELP", check_none, do_help },
    { "STARTTLS", check_starttls, do_starttls },
    { "AUTH", check_auth, do_auth },
    { "XCLIENT", check_xclient, do_xclient },
};

static void command(smtp_server *s, const char *line, size_t n)
{
    s->commands++;
    if (s->cfg.max_commands && s->commands > s->cfg.max_commands) {
        s->limit = "commands";
        close_with(s, 421, "4.7.0", "Too many commands in one session, closing connection");
        return;
    }
    if (memchr(line, 0, n)) {
        fail(s, 500, "5.5.2", "Error: NUL byte in command");
        return;
    }
    size_t vl = 0;
    while (vl < n && line[vl] != ' ')
        vl++;
    const char *arg = vl < n ? line + vl + 1 : line + n;
    size_t alen = vl < n ? n - vl - 1 : 0;
    /* trailing spaces are not part of the argument */
    while (alen && arg[alen - 1] == ' ')
        alen--;
    for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++) {
        if (verbs[i].proceed == do_xclient && !s->cfg.xclient)
            continue;
        if (ieq(line, vl, verbs[i].name)) {
            int begun = s->msg_begun && s->bdat_tx;
            if (verbs[i].check(s, arg, alen))
                verbs[i].proceed(s, arg, alen);
            /* a started BDAT message dropped by RSET, EHLO, QUIT...: its reader must learn it */
            if (begun && (!s->msg_begun || s->mode == M_CLOSED) && !s->end_pending) {
                s->end_pending = 1;
                s->msg_abort = 1;
            }
            return;
        }
    }
    fail(s, 500, "5.5.2", "Error: command not recognized");
}

/* --- data --------------------------------------------------------------------------------- */

static void data_bad(smtp_server *s)
{
    if (!s->cfg.normalize_newlines)
        s->msg_bad = 1;
}

/* BDAT data is counted, not scanned for an end, but a bare CR or LF in it refuses the message
 * all the same (as in DATA): a relay that passed it on could let the next hop see an end of data
 * that is not there. A CRLF split across two chunks is fine. */
static size_t bdat_newlines(smtp_server *s, const char *p, size_t n)
{
    /* returns how many bytes come before the first bare CR/LF, so that what the reader gets does
     * not depend on how the chunk arrived */
    if (s->msg_bad)
        return n;
    const char *start = p, *end = p + n;
    while (p < end) {
        if (s->bdat_cr) {
            if (*p != '\n') {
                s->msg_bad = 1;
                return (size_t)(p - start);
            }
            s->bdat_cr = 0;
            p++;
            continue;
        }
        const char *cr = memchr(p, '\r', (size_t)(end - p));
        const char *lf = memchr(p, '\n', (size_t)((cr ? cr : end) - p));
        if (lf) { /* an LF before any CR: bare */
            s->msg_bad = 1;
            return (size_t)(lf - start);
        }
        if (!cr)
            return n;
        s->bdat_cr = 1;
        p = cr + 1;
    }
    return n;
}

/* Appends unstuffed bytes unless the message is already refused; counts the size. A message
 * that goes over max_message_size gives its reader exactly its first max_message_size bytes,
 * however the input was cut into spans (the reader then gets END 552). */
static void demit(smtp_server *s, const char *p, size_t n)
{
    if (s->msg_bad || s->msg_over)
        return;
    if (s->cfg.max_message_size && s->msg_size + n > s->cfg.max_message_size) {
        n = (size_t)(s->cfg.max_message_size - s->msg_size);
        s->msg_over = 1;
    }
    s->msg_size += n;
    memcpy(s->dbuf + s->dlen, p, n);
    s->dlen += n;
}

/* BDAT data with normalize_newlines: bare CR and LF become CRLF, as in DATA (no dots: BDAT is
 * not stuffed). A CR at a chunk's end waits in bdat_cr for the next byte, which may be its LF. */
static void bdat_normalize(smtp_server *s, const char *p, size_t n)
{
    const char *end = p + n;
    while (p < end) {
        if (s->bdat_cr) {
            s->bdat_cr = 0;
            demit(s, "\r\n", 2);
            if (*p == '\n')
                p++;
            continue;
        }
        const char *q = p;
        while (q < end && *q != '\r' && *q != '\n')
            q++;
        if (q > p)
            demit(s, p, (size_t)(q - p));
        if (q == end)
            break;
        if (*q == '\r')
            s->bdat_cr = 1;
        else
            demit(s, "\r\n", 2);
        p = q + 1;
    }
}

/* Runs the DATA byte machine over the input; returns 1 when CRLF.CRLF was reached. */
static int data_scan(smtp_server *s)
{
    const char *in = s->in;
    size_t i = s->in_pos, n = s->in_len;
    /* Where the next CR and LF are (n: none): found with memchr, and searched again only once
     * passed, so a line costs two memchr calls instead of a byte loop and no byte is scanned
     * twice for the same character. */
    size_t next_cr = i, next_lf = i;
    int cr_known = 0, lf_known = 0;
    int done = 0;
    while (i < n && !done) {
        unsigned char c = (unsigned char)in[i];
        switch (s->ds) {
        case D_BOL:
            if (c == '.') { s->ds = D_DOT; i++; break; }
            s->ds = D_MID;
            break; /* reprocess as a mid-line byte */
        case D_NBOL:
            /* the dot is dropped whatever follows: ".\n" or ".\r\n" here is an empty line,
             * so the reader never gets a lone "." line that a relay could take for the end */
            if (c == '.')
                i++;
            s->ds = D_MID;
            break;
        case D_MID: {
            /* Lines that end in CRLF and are followed by a line not starting with '.' pass
             * through unchanged: they are gathered into one span and copied once. */
            size_t from = i, j;
            for (;;) {
                if (!cr_known || next_cr < i) {
                    const char *q = memchr(in + i, '\r', n - i);
                    next_cr = q ? (size_t)(q - in) : n;
                    cr_known = 1;
                }
                if (!lf_known || next_lf < i) {
                    const char *q = memchr(in + i, '\n', n - i);
                    next_lf = q ? (size_t)(q - in) : n;
                    lf_known = 1;
                }
                j = next_cr < next_lf ? next_cr : next_lf;
                if (j + 2 < n && in[j] == '\r' && in[j + 1] == '\n' && in[j + 2] != '.') {
                    i = j + 2;
                    continue;
                }
                break;
            }
            if (j > from)
                demit(s, in + from, j - from);
            i = j;
            if (i < n) {
                if (in[i] == '\r') {
                    s->ds = D_CR;
                } else { /* bare LF: a line start only for unstuffing, so LF.LF cannot end
                          * the data */
                    data_bad(s);
                    demit(s, "\r\n", 2);
                    s->ds = D_NBOL;
                }
                i++;
            }
            break;
        }
        case D_CR:
            if (c == '\n') {
                demit(s, "\r\n", 2);
                s->ds = D_BOL;
                i++;
            } else { /* bare CR */
                data_bad(s);
                demit(s, "\r\n", 2);
                s->ds = D_NBOL;
            }
            break;
        case D_DOT:
            if (c == '\r') { s->ds = D_DOTCR; i++; break; }
            s->ds = D_MID; /* the leading dot was stuffing: drop it */
            break;
        case D_DOTCR:
            if (c == '\n') {
                done = 1;
                i++;
            } else { /* "." then bare CR */
                data_bad(s);
                demit(s, "\r\n", 2);
                s->ds = D_NBOL;
            }
            break;
        }
    }
    s->in_pos = i;
    return done;
}

/* --- public engine API -------------------------------------------------------------------- */

smtp_server *smtp_server_new(const smtp_server_config *cfg)
{
    smtp_server *s = cfg->realloc_fn ? cfg->realloc_fn(cfg->alloc_ud, NULL, sizeof *s)
                                     : malloc(sizeof *s);
    if (!s)
        return NULL;
    memset(s, 0, sizeof *s);
    s->cfg = *cfg;
    if (!s->cfg.max_line || s->cfg.max_line < 64)
        s->cfg.max_line = 512;
    if (s->cfg.max_line > 65536)
        s->cfg.max_line = 65536;
    if (!s->cfg.max_recipients)
        s->cfg.max_recipients = 100;
    if (!s->cfg.max_errors)
        s->cfg.max_errors = SMTP_SERVER_MAX_ERRORS_DEFAULT;
    if (!s->cfg.out_cap)
        s->cfg.out_cap = 64 * 1024;
    snprintf(s->hostname, sizeof s->hostname, "%s", cfg->hostname ? cfg->hostname : "localhost");
    for (char *p = s->hostname; *p; p++)
        if ((unsigned char)*p < 33 || (unsigned char)*p > 126)
            *p = '_';
    s->cfg.hostname = s->hostname;
    s->tls = cfg->tls_active;
    s->in_cap = s->cfg.max_line + IN_EXTRA;
    set_mode(s, M_CMD);
    reply(s, 220, NULL, "%s %s lua-smtp", s->hostname, s->cfg.lmtp ? "LMTP" : "ESMTP");
    return s;
}

void smtp_server_free(smtp_server *s)
{
    if (!s)
        return;
    reset_tx(s);
    wipe_auth(s);
    xclient_clear(s);
    free(s->rcpts);
    if (s->in)
        smtp_wipe(s->in, s->in_cap); /* unread input may hold AUTH data too */
    free(s->in);
    free(s->out);
    free(s->dbuf);
    free(s->tr);
    free(s);
}

void smtp_server_set_trace(smtp_server *s, int on) { s->trace = on; }

void smtp_server_set_hooks(smtp_server *s, int mail, int rcpt, int data, int starttls)
{
    s->cfg.hook_mail = mail;
    s->cfg.hook_rcpt = rcpt;
    s->cfg.hook_data = data;
    s->cfg.hook_starttls = starttls;
}

const char *smtp_server_trace(const smtp_server *s, size_t *n)
{
    *n = s->tr_len;
    return s->tr ? s->tr : "";
}

void smtp_server_trace_taken(smtp_server *s) { s->tr_len = 0; }

size_t smtp_server_space(const smtp_server *s)
{
    if (s->mode == M_CLOSED)
        return 0;
    return s->in_cap - (s->in_len - s->in_pos);
}

char *smtp_server_feed_buf(smtp_server *s, size_t *room)
{
    *room = 0;
    if (s->mode == M_CLOSED)
        return NULL;
    if (!s->in) {
        s->in = xrealloc(s, NULL, s->in_cap);
        if (!s->in) {
            oom(s);
            return NULL;
        }
    }
    if (s->in_pos) {
        size_t rest = s->in_len - s->in_pos;
        memmove(s->in, s->in + s->in_pos, rest);
        /* The bytes left behind past the moved rest are stale copies: among commands they may be
         * an unfinished AUTH line that now lives at the front, so they are wiped (message data,
         * the bulk of the traffic, is not: AUTH cannot come before its end). */
        if ((s->mode != M_DATA && s->mode != M_BDAT) || s->end_pending)
            smtp_wipe(s->in + rest, s->in_len - rest);
        s->in_len = rest;
        s->in_pos = 0;
    }
    *room = s->in_cap - s->in_len;
    return s->in + s->in_len;
}

void smtp_server_fed(smtp_server *s, size_t n)
{
    if (s->in && n <= s->in_cap - s->in_len)
        s->in_len += n;
    if (s->in && s->in_len == 0) {
        /* the read brought nothing: an idle connection keeps no buffer (see idle_trim) */
        free(s->in);
        s->in = NULL;
        s->in_pos = 0;
    }
}

size_t smtp_server_feed(smtp_server *s, const char *data, size_t len)
{
    size_t room;
    char *p = smtp_server_feed_buf(s, &room);
    if (!p)
        return len; /* nothing more is read after the end (or without memory): swallow */
    size_t n = len < room ? len : room;
    memcpy(p, data, n);
    s->in_len += n;
    return n;
}

/* Drops the buffers of an idle session: a waiting connection costs only the struct. */
static void idle_trim(smtp_server *s)
{
    if (s->in && s->in_pos == s->in_len) {
        free(s->in);
        s->in = NULL;
        s->in_len = s->in_pos = 0;
    }
    if (s->dbuf && s->mode != M_DATA && s->mode != M_BDAT) {
        free(s->dbuf);
        s->dbuf = NULL;
    }
}

/* How many replies the end of the current message gets: in LMTP one per accepted recipient
 * after the final dot or BDAT LAST (RFC 2033 4.2), one for a refused chunk before LAST. */
static unsigned end_replies(const smtp_server *s)
{
    return (s->cfg.lmtp && (s->data_tx || s->bdat_last) && s->nrcpt) ? s->nrcpt : 1;
}

static int ev_end(smtp_server *s, smtp_server_event *ev)
{
    s->end_pending = 0;
    unsigned fan = end_replies(s);
    if (s->trace) {
        unsigned long long size = s->msg_size;
        trace_rec(s, 'N', (const char *)&size, sizeof size);
        if (s->data_tx)
            trace_rec(s, 'L', ".", 1);
    }
    if (s->mode != M_CLOSED)
        set_mode(s, M_CMD);
    memset(ev, 0, sizeof *ev);
    ev->kind = SMTP_SRV_END;
    if (s->msg_abort) {
        s->msg_abort = 0;
        ev->code = 451;
        ev->a = "Transaction aborted";
        if (s->mode == M_CLOSED) {
            ev->alen = strlen(ev->a);
            return ev->kind;
        }
    } else if (s->msg_over) {
        ev->code = 552;
        ev->a = "Message size exceeds fixed maximum message size";
        for (unsigned i = 0; i < fan; i++)
            reply(s, 552, "5.3.4", "%s", ev->a);
        reset_tx(s);
    } else if (s->msg_bad) {
        ev->code = 550;
        ev->a = "Bare CR or LF in message data not allowed";
        for (unsigned i = 0; i < fan; i++)
            reply(s, 550, "5.6.11", "%s", ev->a);
        reset_tx(s);
    } else {
        s->await = A_END;
        s->lmtp_due = fan;
    }
    ev->alen = ev->a ? strlen(ev->a) : 0;
    return ev->kind;
}

int smtp_server_next(smtp_server *s, smtp_server_event *ev)
{
    memset(ev, 0, sizeof *ev);
    if (s->await != A_NONE)
        return SMTP_SRV_NONE;
    for (;;) {
        if (s->end_pending)
            return ev_end(s, ev);
        if (s->rset_pending) {
            s->rset_pending = 0;
            if (s->mode != M_CLOSED) {
                ev->kind = SMTP_SRV_RSET;
                return ev->kind;
            }
        }
        if (s->tls_pending && s->mode != M_CLOSED) {
            /* a STARTTLS accepted through smtp_server_decide (hook_starttls) */
            s->tls_pending = 0;
            ev->kind = SMTP_SRV_STARTTLS;
            return ev->kind;
        }
        if (s->mode == M_CLOSED) {
            if (!s->close_reported) {
                s->close_reported = 1;
                wipe_auth(s);
                ev->kind = SMTP_SRV_CLOSE;
                return ev->kind;
            }
            return SMTP_SRV_NONE;
        }
        if (s->out_len >= s->cfg.out_cap)
            return SMTP_SRV_NONE; /* the client does not read: stop taking its input */
        if (s->begin_pending) {
            s->begin_pending = 0;
            ev->kind = SMTP_SRV_BEGIN;
            return ev->kind;
        }
        if ((s->mode == M_DATA || s->mode == M_BDAT) && !s->dbuf) {
            /* bare CR/LF become CRLF: up to twice the input */
            s->dbuf = xrealloc(s, NULL, 2 * s->in_cap + 8);
            if (!s->dbuf) {
                oom(s);
                continue;
            }
        }
        /* a BDAT chunk may be empty ("BDAT 0 LAST"): it completes without input */
        if (s->in_pos >= s->in_len && !(s->mode == M_BDAT && s->bdat_left == 0)) {
            idle_trim(s);
            return SMTP_SRV_NONE;
        }
        switch (s->mode) {
        case M_DATA: {
            s->dlen = 0;
            int done = data_scan(s);
            if (done)
                s->end_pending = 1;
            if (s->dlen) {
                if (s->trace == 2)
                    trace_rec(s, 'B', s->dbuf, s->dlen);
                ev->kind = SMTP_SRV_DATA;
                ev->a = s->dbuf;
                ev->alen = s->dlen;
                return ev->kind;
            }
            continue;
        }
        case M_BDAT: {
            size_t avail = s->in_len - s->in_pos;
            size_t take = s->bdat_left < avail ? (size_t)s->bdat_left : avail;
            const char *p = s->in + s->in_pos;
            s->in_pos += take;
            s->bdat_left -= take;
            s->dlen = 0;
            if (!s->bdat_discard && s->cfg.normalize_newlines) {
                bdat_normalize(s, p, take);
            } else if (!s->bdat_discard) {
                int was_bad = s->msg_bad;
                size_t good = bdat_newlines(s, p, take);
                if (!was_bad && good) {
                    int bad = s->msg_bad;
                    s->msg_bad = 0; /* the bytes before the bare CR/LF still go to the reader */
                    demit(s, p, good);
                    s->msg_bad = bad;
                }
            }
            if (s->bdat_left == 0) {
                set_mode(s, M_CMD);
                if (s->bdat_discard) {
                    s->bdat_discard = 0;
                } else if (s->bdat_last) {
                    if (s->bdat_cr && s->cfg.normalize_newlines) {
                        s->bdat_cr = 0;
                        demit(s, "\r\n", 2); /* the message ends in a bare CR */
                    } else if (s->bdat_cr) {
                        s->msg_bad = 1; /* the message ends in a bare CR */
                    }
                    s->end_pending = 1;
                } else if (s->msg_over) {
                    /* refuse at once: the rest of the transaction is void */
                    s->end_pending = 1;
                } else {
                    reply(s, 250, "2.0.0", "%llu octets received",
                          (unsigned long long)s->msg_size);
                }
            }
            if (s->dlen) {
                if (s->trace == 2)
                    trace_rec(s, 'B', s->dbuf, s->dlen);
                ev->kind = SMTP_SRV_DATA;
                ev->a = s->dbuf;
                ev->alen = s->dlen;
                return ev->kind;
            }
            continue;
        }
        case M_SKIPLINE: {
            char *lf = memchr(s->in + s->in_pos, '\n', s->in_len - s->in_pos);
            size_t upto = lf ? (size_t)(lf - s->in) + 1 : s->in_len;
            s->skipped += upto - s->in_pos;
            smtp_wipe(s->in + s->in_pos, upto - s->in_pos); /* see M_CMD */
            s->in_pos = upto;
            if (s->skipped > LONG_LINE_CLOSE) {
                s->limit = "line";
                close_with(s, 421, "4.7.0", "Line too long, closing connection");
                continue;
            }
            if (lf) {
                set_mode(s, M_CMD);
                fail(s, 500, "5.5.2", "Error: line too long");
            }
            continue;
        }
        case M_CMD:
        case M_AUTH: {
            char *start = s->in + s->in_pos;
            size_t avail = s->in_len - s->in_pos;
            char *lf = memchr(start, '\n', avail);
            if (!lf) {
                if (avail >= s->cfg.max_line) {
                    s->skipped = avail;
                    smtp_wipe(start, avail);
                    s->in_pos = s->in_len;
                    if (s->mode == M_AUTH) {
                        set_mode(s, M_SKIPLINE);
                        wipe_auth(s);
                    } else {
                        set_mode(s, M_SKIPLINE);
                    }
                    continue;
                }
                idle_trim(s);
                return SMTP_SRV_NONE;
            }
            size_t n = (size_t)(lf - start);
            s->in_pos += n + 1;
            /* Every command line is wiped from the input buffer once read: "AUTH PLAIN
             * <base64>" and AUTH responses carry credentials, and so may any line a confused
             * client sends (commands are short: this costs next to nothing; message data, the
             * bulk of the traffic, is left alone). Events never point into the line. */
            if (n + 1 > s->cfg.max_line) {
                smtp_wipe(start, n + 1);
                if (s->mode == M_AUTH) {
                    wipe_auth(s);
                    set_mode(s, M_CMD);
                }
                fail(s, 500, "5.5.2", "Error: line too long");
                continue;
            }
            size_t line_len = n + 1;
            if (n && start[n - 1] == '\r')
                n--;
            if (s->trace)
                trace_line(s, start, n);
            if (s->mode == M_AUTH)
                auth_line(s, start, n);
            else
                command(s, start, n);
            smtp_wipe(start, line_len);
            if (s->mode == M_CLOSED)
                continue;   /* its last reply is queued; nothing the command began goes on */
            if (s->await == A_MAIL || s->await == A_RCPT) {
                ev->kind = s->await == A_MAIL ? SMTP_SRV_MAIL : SMTP_SRV_RCPT;
                ev->a = s->pending.addr;
                ev->alen = strlen(s->pending.addr);
                ev->params = &s->pending.p;
                return ev->kind;
            }
            if (s->await == A_AUTH) {
                ev->kind = SMTP_SRV_AUTH;
                if (s->austep == AU_PLAIN) {
                    char *z1 = memchr(s->auth_buf, 0, s->auth_len);
                    char *z2 = memchr(z1 + 1, 0, s->auth_len - (size_t)(z1 + 1 - s->auth_buf));
                    ev->a = "PLAIN"; ev->alen = 5;
                    ev->b = z1 + 1; ev->blen = (size_t)(z2 - z1 - 1);
                    ev->c = z2 + 1; ev->clen = s->auth_len - (size_t)(z2 + 1 - s->auth_buf);
                } else {
                    size_t ul = strlen(s->auth_buf);
                    ev->a = "LOGIN"; ev->alen = 5;
                    ev->b = s->auth_buf; ev->blen = ul;
                    ev->c = s->auth_buf + ul + 1; ev->clen = s->auth_len - ul - 1;
                }
                return ev->kind;
            }
            if (s->await == A_HELO) {
                ev->kind = SMTP_SRV_HELO;
                ev->a = s->helo_pend;
                ev->alen = strlen(s->helo_pend);
                ev->b = s->helo_pend_ehlo ? (s->cfg.lmtp ? "LHLO" : "EHLO") : "HELO";
                ev->blen = 4;
                return ev->kind;
            }
            if (s->await == A_DATA || s->await == A_STARTTLS) {
                ev->kind = s->await == A_DATA ? SMTP_SRV_DATA_CMD : SMTP_SRV_STARTTLS_CMD;
                return ev->kind;
            }
            if (s->await == A_XCLIENT) {
                ev->kind = SMTP_SRV_XCLIENT;
                ev->a = s->xc;
                ev->alen = s->xc_len;
                return ev->kind;
            }
            if (s->tls_pending) {
                s->tls_pending = 0;
                ev->kind = SMTP_SRV_STARTTLS;
                return ev->kind;
            }
            continue;
        }
        case M_CLOSED:
            continue;
        }
    }
}

int smtp_server_decide(smtp_server *s, int accept, int code, const char *enh, const char *text)
{
    enum await a = s->await;
    if (a == A_NONE)
        return -1;
    s->await = A_NONE;
    if (code < 200 || code > 599)
        code = 0; /* the default: a reply code has three digits, the first 2 to 5 */
    switch (a) {
    case A_MAIL:
        if (accept)
            accept_mail(s);
        else {
            addr_clear(&s->pending);
            /* a refused sender counts as an error: harvesting is not free */
            fail(s, code ? code : 550, enh ? enh : "5.7.1", text ? text : "Sender rejected");
        }
        break;
    case A_RCPT:
        if (accept)
            accept_rcpt(s);
        else {
            addr_clear(&s->pending);
            if (code == 452) /* too many recipients: not an error (RFC 5321 4.5.3.1.10) */
                reply(s, code, enh ? enh : "4.5.3", "%s", text ? text : "Too many recipients");
            else
                fail(s, code ? code : 550, enh ? enh : "5.1.1", text ? text : "Recipient rejected");
        }
        break;
    case A_END:
        if (accept)
            reply(s, 250, "2.0.0", "%s", text ? text : "Ok: queued");
        else
            reply(s, code ? code : 554, enh ? enh : "5.6.0", "%s", text ? text : "Message rejected");
        if (s->lmtp_due > 1 && !s->oom) {
            s->lmtp_due--;
            s->await = A_END;   /* LMTP: the next recipient's reply */
            break;
        }
        s->lmtp_due = 0;
        reset_tx(s);
        break;
    case A_AUTH:
        if (accept) {
            const char *u = s->austep == AU_PLAIN ? (const char *)memchr(s->auth_buf, 0, s->auth_len) + 1
                                                  : s->auth_buf;
            snprintf(s->user, sizeof s->user, "%s", u);
            s->authed = 1;
            reply(s, 235, "2.7.0", "Authentication successful");
        } else {
            fail(s, code ? code : 535, enh ? enh : "5.7.8",
                 text ? text : "Authentication credentials invalid");
        }
        wipe_auth(s);
        break;
    case A_HELO:
        if (accept) {
            set_helo(s, s->helo_pend, strlen(s->helo_pend), s->helo_pend_ehlo);
            if (s->helo_pend_ehlo)
                ehlo_reply(s);
            else
                reply(s, 250, NULL, "%s", s->hostname);
        } else {
            fail(s, code ? code : 550, enh ? enh : "5.7.1", text ? text : "Helo command rejected");
        }
        break;
    case A_XCLIENT:
        if (accept)
            xclient_accept(s);
        else
            fail(s, code ? code : 550, enh ? enh : "5.7.0", text ? text : "XCLIENT rejected");
        xclient_clear(s);
        break;
    case A_DATA:
        if (accept)
            data_go(s);
        else
            fail(s, code ? code : 554, enh ? enh : "5.7.1", text ? text : "Transaction refused");
        break;
    case A_STARTTLS:
        if (accept)
            starttls_go(s);
        else
            reply(s, code ? code : 454, enh ? enh : "4.7.0", "%s",
                  text ? text : "TLS not available due to temporary reason");
        break;
    default:
        break;
    }
    return 0;
}

const char *smtp_server_output(const smtp_server *s, size_t *len)
{
    if (!s->out_len && s->tail_len) {
        *len = s->tail_len;
        return s->tail;
    }
    *len = s->out_len;
    return s->out;
}

void smtp_server_output_done(smtp_server *s, size_t n)
{
    if (!s->out_len) {
        n = n < s->tail_len ? n : s->tail_len;
        s->tail += n;
        s->tail_len -= n;
        return;
    }
    s->out_sealed = n < s->out_sealed ? s->out_sealed - n : 0;
    if (n >= s->out_len) {
        s->out_len = 0;
        if (s->out_alloc > 4096) { /* idle sessions keep no big buffer */
            free(s->out);
            s->out = NULL;
            s->out_alloc = 0;
        }
        return;
    }
    memmove(s->out, s->out + n, s->out_len - n);
    s->out_len -= n;
}

void smtp_server_shutdown(smtp_server *s, int code, const char *enh, const char *text)
{
    if (s->mode == M_CLOSED)
        return;
    s->await = A_NONE;
    /* a final reply is a 4xx or 5xx; anything else would go out as a malformed line ("042") */
    if (code < 400 || code > 599)
        code = 421;
    close_with(s, code, enh ? enh : "4.3.2", text ? text : "Service shutting down");
}

int smtp_server_closed(const smtp_server *s) { return s->mode == M_CLOSED; }
unsigned smtp_server_lmtp_due(const smtp_server *s) { return s->await == A_END ? s->lmtp_due : 0; }
int smtp_server_want_write(const smtp_server *s)
{
    return s->mode != M_CLOSED && s->await == A_NONE && s->out_len >= s->cfg.out_cap;
}
const char *smtp_server_state_name(const smtp_server *s)
{
    return s->oom ? "failed" : mode_names[s->mode];
}
const char *smtp_server_error(const smtp_server *s) { return s->oom ? "out of memory" : NULL; }
const char *smtp_server_helo(const smtp_server *s) { return s->helo ? s->helo_name : NULL; }
int smtp_server_helo_kind(const smtp_server *s) { return s->helo; }
const char *smtp_server_user(const smtp_server *s) { return s->authed ? s->user : NULL; }
int smtp_server_tls(const smtp_server *s) { return s->tls; }

void smtp_server_get_usage(const smtp_server *s, smtp_server_usage *u)
{
    u->commands = s->commands;
    u->transactions = s->transactions;
    u->errors = s->errors;
    u->partial = s->mode == M_SKIPLINE
        || ((s->mode == M_CMD || s->mode == M_AUTH) && s->in_len > s->in_pos);
    u->limit = s->limit;
}

const char *smtp_server_from(const smtp_server *s, const smtp_server_params **p)
{
    if (!s->in_tx)
        return NULL;
    if (p)
        *p = &s->from.p;
    return s->from.addr;
}

unsigned smtp_server_rcpt_count(const smtp_server *s) { return s->nrcpt; }

const char *smtp_server_rcpt(const smtp_server *s, unsigned i, const smtp_server_params **p)
{
    if (i >= s->nrcpt)
        return NULL;
    if (p)
        *p = &s->rcpts[i].p;
    return s->rcpts[i].addr;
}
