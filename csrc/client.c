/* The SMTP client engine (sans-I/O): queues commands as bytes to write, matches server replies
 * to the commands that caused them, runs the SASL exchanges, freezes its input at STARTTLS so
 * nothing read before the handshake survives it, and dot-stuffs bodies as a stream. The plain C
 * engine comes first; the Lua binding (core.client_engine, core.stuffer) is at the bottom. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "core.h"
#include "client.h"
#include "net.h"

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

struct smtp_client {
    smtp_client_state state;
    const char *error;
    smtp_buf in;           /* server bytes not parsed yet, from in_pos */
    size_t in_pos;
    smtp_reply_parser parser;
    smtp_buf out;          /* bytes to write */
    int out_secret;        /* out holds credentials: wipe it once taken */
    unsigned char *pending; /* ring of smtp_cmd awaiting replies */
    size_t pcap, phead, pcount;
    smtp_stuffer stuffer;
    /* SASL exchange in progress */
    smtp_sasl mech;
    int auth_step;
    smtp_buf user, secret;
    size_t taken_total;    /* output bytes ever taken (a mark is void once any is taken) */
};

static void set_state(smtp_client *c, smtp_client_state s)
{
#ifdef SMTP_TRACE
    fprintf(stderr, "client %s -> %s\n", smtp_client_state_names[c->state],
            smtp_client_state_names[s]);
#endif
    c->state = s;
}

static int push_pending(smtp_client *c, smtp_cmd cmd)
{
    if (c->pcount == c->pcap) {
        size_t ncap = c->pcap ? c->pcap * 2 : 16;
        unsigned char *p = malloc(ncap);
        if (!p)
            return -1;
        for (size_t i = 0; i < c->pcount; i++)
            p[i] = c->pending[(c->phead + i) % c->pcap];
        free(c->pending);
        c->pending = p;
        c->pcap = ncap;
        c->phead = 0;
    }
    c->pending[(c->phead + c->pcount) % c->pcap] = (unsigned char)cmd;
    c->pcount++;
    return 0;
}

static smtp_cmd pop_pending(smtp_client *c)
{
    smtp_cmd cmd = (smtp_cmd)c->pending[c->phead];
    c->phead = (c->phead + 1) % c->pcap;
    c->pcount--;
    return cmd;
}

smtp_client *smtp_client_new(void)
{
    smtp_client *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    smtp_reply_parser_init(&c->parser);
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
    smtp_reply_parser_free(&c->parser);
    free(c->pending);
    free(c);
}

smtp_client_state smtp_client_get_state(const smtp_client *c) { return c->state; }
const char *smtp_client_error(const smtp_client *c) { return c->error; }
smtp_buf *smtp_client_output(smtp_client *c) { return &c->out; }
size_t smtp_client_pending(const smtp_client *c) { return c->pcount; }

void smtp_client_taken(smtp_client *c, size_t n)
{
    if (c->out_secret)
        smtp_wipe(c->out.p, n < c->out.len ? n : c->out.len);
    smtp_buf_consume(&c->out, n);
    c->taken_total += n;
    if (c->out.len == 0)
        c->out_secret = 0;
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

/* Bytes a base64 encoding of n bytes takes, NUL included. */
static size_t b64len(size_t n) { return 4 * ((n + 2) / 3) + 1; }

/* Appends base64(data) CRLF to out. */
static int add_b64_line(smtp_client *c, const unsigned char *data, size_t n)
{
    size_t need = b64len(n) + 2;
    if (smtp_buf_reserve(&c->out, need) < 0)
        return -1;
    int w = EVP_EncodeBlock((unsigned char *)c->out.p + c->out.len, data, (int)n);
    c->out.len += (size_t)w;
    memcpy(c->out.p + c->out.len, "\r\n", 2);
    c->out.len += 2;
    c->out_secret = 1;
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
        if (c->auth_step == 1)
            return add_b64_line(c, (unsigned char *)c->user.p, c->user.len);
        if (c->auth_step == 2)
            return add_b64_line(c, (unsigned char *)c->secret.p, c->secret.len);
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
            if (tl == 0 || tl > 4096 || tl % 4)
                break;
            unsigned char chal[3 * 4096 / 4 + 4];
            int cl = EVP_DecodeBlock(chal, (const unsigned char *)t, (int)tl);
            if (cl < 0)
                break;
            if (t[tl - 1] == '=')
                cl--;
            if (t[tl - 2] == '=')
                cl--;
            unsigned char md[EVP_MAX_MD_SIZE];
            unsigned int mdlen = 0;
            if (!HMAC(EVP_md5(), c->secret.p ? c->secret.p : "", (int)c->secret.len, chal,
                      (size_t)cl, md, &mdlen))
                break;
            smtp_buf resp = {0};
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
            smtp_buf_free(&resp);
            smtp_wipe(md, sizeof md);
            smtp_wipe(hx, sizeof hx);
            return rc;
        }
        break;
    case SMTP_SASL_XOAUTH2:
        /* a 334 here carries a JSON error; an empty line makes the server send its 5xx */
        if (c->auth_step == 1)
            return add(c, "\r\n", 2);
        break;
    case SMTP_SASL_OAUTHBEARER:
        /* RFC 7628 §3.2.3: the client answers the error with a single %x01 */
        if (c->auth_step == 1)
            return add(c, "AQ==\r\n", 6);
        break;
    default:
        break;
    }
    /* A challenge the mechanism does not expect: cancel the exchange (RFC 4954 §4). */
    return add(c, "*\r\n", 3);
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
        smtp_cmd head = (smtp_cmd)c->pending[c->phead];
        if (head == SMTP_CMD_AUTH && rep->code == 334) {
            if (auth_continue(c, rep) < 0)
                return fail(c, "out of memory");
            continue;
        }
        pop_pending(c);
        if (head == SMTP_CMD_AUTH)
            wipe_credentials(c);
        if (rep->code == 421) {
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
    size_t mark = c->out.len;
    int rc = add_str(c, verbs[cmd]);
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
    if (cmd == SMTP_CMD_DATA)
        smtp_stuffer_init(&c->stuffer, 1);
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
    smtp_buf ir = {0};
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
    smtp_buf_free(&ir);
    if (rc || push_pending(c, SMTP_CMD_AUTH) < 0) {
        smtp_wipe(c->out.p + mark, c->out.len - mark);
        c->out.len = mark;
        wipe_credentials(c);
        *why = "out of memory";
        return -1;
    }
    return 0;
}

int smtp_client_body(smtp_client *c, const char *data, size_t n, const char **why)
{
    if (c->state != SMTP_CS_BODY) {
        *why = "no DATA accepted (354) to send a body for";
        return -1;
    }
    if (smtp_stuff(&c->stuffer, data, n, &c->out) < 0) {
        *why = "out of memory";
        return -1;
    }
    return 0;
}

int smtp_client_body_end(smtp_client *c, const char **why)
{
    if (c->state != SMTP_CS_BODY) {
        *why = "no DATA accepted (354) to end";
        return -1;
    }
    if (smtp_stuff_finish(&c->stuffer, &c->out) < 0 || push_pending(c, SMTP_CMD_DATA_END) < 0) {
        *why = "out of memory";
        return -1;
    }
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
    return 0;
}

/* ---- Lua binding ------------------------------------------------------------------------ */

#define ENGINE "smtp.client_engine"
#define STUFFER "smtp.stuffer"

typedef struct {
    smtp_client *c;
} engine_ud;

static smtp_client *check_engine(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    if (!u->c)
        luaL_error(L, "client engine is closed");
    return u->c;
}

static int l_engine_new(lua_State *L)
{
    engine_ud *u = lua_newuserdata(L, sizeof *u);
    u->c = NULL;
    luaL_setmetatable(L, ENGINE);
    u->c = smtp_client_new();
    if (!u->c)
        return luaL_error(L, "out of memory");
    return 1;
}

static int l_engine_gc(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    smtp_client_free(u->c);
    u->c = NULL;
    return 0;
}

static int l_engine_tostring(lua_State *L)
{
    engine_ud *u = luaL_checkudata(L, 1, ENGINE);
    lua_pushfstring(L, ENGINE " (%s)",
                    u->c ? smtp_client_state_names[u->c->state] : "closed");
    return 1;
}

static int result(lua_State *L, int rc, const char *why)
{
    if (rc == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
}

/* e:feed(bytes) -> true | nil, err */
static int l_engine_feed(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    int rc = smtp_client_feed(c, s, n);
    return result(L, rc, c->error);
}

/* e:reply() -> reply table (with .command) | nil (more input needed) | nil, err */
static int l_engine_reply(lua_State *L)
{
    smtp_client *c = check_engine(L);
    const smtp_reply *r;
    smtp_cmd cmd;
    int rc = smtp_client_next(c, &r, &cmd);
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, c->error);
        return 2;
    }
    if (rc == 0) {
        lua_pushnil(L);
        return 1;
    }
    smtp_reply_push(L, r, (cmd == SMTP_CMD_EHLO && r->code / 100 == 2));
    lua_pushstring(L, smtp_cmd_names[cmd]);
    lua_setfield(L, -2, "command");
    return 1;
}

static const char *opt_value(lua_State *L, int i, size_t *n)
{
    if (lua_isnoneornil(L, i)) {
        *n = 0;
        return NULL;
    }
    return luaL_checklstring(L, i, n);
}

static int command(lua_State *L, smtp_cmd cmd, int has_arg, int has_params)
{
    smtp_client *c = check_engine(L);
    size_t alen = 0, plen = 0;
    const char *arg = has_arg ? luaL_checklstring(L, 2, &alen) : NULL;
    const char *params = has_params ? opt_value(L, 3, &plen) : NULL;
    const char *why = NULL;
    int rc = smtp_client_command(c, cmd, arg, alen, params, plen, &why);
    return result(L, rc, why);
}

static int l_ehlo(lua_State *L) { return command(L, SMTP_CMD_EHLO, 1, 0); }
static int l_helo(lua_State *L) { return command(L, SMTP_CMD_HELO, 1, 0); }
static int l_starttls(lua_State *L) { return command(L, SMTP_CMD_STARTTLS, 0, 0); }
static int l_mail(lua_State *L) { return command(L, SMTP_CMD_MAIL, 1, 1); }
static int l_rcpt(lua_State *L) { return command(L, SMTP_CMD_RCPT, 1, 1); }
static int l_data(lua_State *L) { return command(L, SMTP_CMD_DATA, 0, 0); }
static int l_rset(lua_State *L) { return command(L, SMTP_CMD_RSET, 0, 0); }
static int l_noop(lua_State *L) { return command(L, SMTP_CMD_NOOP, 0, 0); }
static int l_quit(lua_State *L) { return command(L, SMTP_CMD_QUIT, 0, 0); }

/* e:auth(mechanism, user, secret [, authzid]) -> true | nil, err */
static int l_auth(lua_State *L)
{
    smtp_client *c = check_engine(L);
    int mech = luaL_checkoption(L, 2, NULL, smtp_sasl_names);
    size_t ul, sl, zl;
    const char *user = luaL_checklstring(L, 3, &ul);
    const char *secret = luaL_checklstring(L, 4, &sl);
    const char *authz = opt_value(L, 5, &zl);
    const char *why = NULL;
    int rc = smtp_client_auth(c, (smtp_sasl)mech, user, ul, secret, sl, authz, zl, &why);
    return result(L, rc, why);
}

/* e:body(chunk) -> true | nil, err   (dot-stuffed, CRLF-normalized) */
static int l_body(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    return result(L, smtp_client_body(c, s, n, &why), why);
}

static int l_body_end(lua_State *L)
{
    smtp_client *c = check_engine(L);
    const char *why = NULL;
    return result(L, smtp_client_body_end(c, &why), why);
}

/* e:bdat(chunk, last) -> true | nil, err */
static int l_bdat(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    return result(L, smtp_client_bdat(c, s, n, lua_toboolean(L, 3), &why), why);
}

/* e:bdat_last(message) -> true | nil, err: a whole message as one "BDAT n LAST" chunk, CRLF-
 * normalized (send_many's pipelined window). A message already in CRLF form, the usual case, is
 * queued without a copy; otherwise it is normalized into a scratch buffer first, since the chunk
 * size has to be known before the chunk. */
static int l_bdat_last(lua_State *L)
{
    smtp_client *c = check_engine(L);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    const char *why = NULL;
    int clean = 1;
    for (size_t i = 0; i < n && clean; i++) {
        if (s[i] == '\r') {
            if (i + 1 < n && s[i + 1] == '\n')
                i++;
            else
                clean = 0;
        } else if (s[i] == '\n') {
            clean = 0;
        }
    }
    if (clean)
        return result(L, smtp_client_bdat(c, s, n, 1, &why), why);
    smtp_stuffer st;
    smtp_buf b = {0};
    smtp_stuffer_init(&st, 0);
    if (smtp_stuff(&st, s, n, &b) < 0 || smtp_stuff_finish(&st, &b) < 0) {
        smtp_buf_free(&b);
        return luaL_error(L, "out of memory");
    }
    int rc = smtp_client_bdat(c, b.p ? b.p : "", b.len, 1, &why);
    smtp_buf_free(&b);
    return result(L, rc, why);
}

/* e:take() -> the bytes to write ("" when none); they leave the engine */
static int l_take(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushlstring(L, c->out.p ? c->out.p : "", c->out.len);
    smtp_client_taken(c, c->out.len);
    return 1;
}

/* e:write_to(sock) -> nwritten | nil, want | nil, msg, code: one write of the pending output
 * straight from the engine's buffer to a native socket, no Lua string in between (a big body
 * leaves no garbage, AUTH secrets never reach the Lua heap); what went leaves the engine. */
static int l_write_to(lua_State *L)
{
    smtp_client *c = check_engine(L);
    smtp_buf *o = smtp_client_output(c);
    size_t put;
    int n = smtp_sock_write(L, 2, o->p ? o->p : "", o->len, &put);
    smtp_client_taken(c, put);
    return n;
}

static int l_outlen(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushinteger(L, (lua_Integer)c->out.len);
    return 1;
}

/* e:upgrade() -> number of bytes dropped (anything > 0 after the STARTTLS 220 is an attack) */
static int l_upgrade(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushinteger(L, (lua_Integer)smtp_client_upgrade(c));
    return 1;
}

static int l_state(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushstring(L, smtp_client_state_names[c->state]);
    return 1;
}

/* TEMPORARY (replaced by the engine split): e:mark() / e:rollback(m) */
static int l_mark(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_createtable(L, 3, 0);
    lua_pushinteger(L, (lua_Integer)c->out.len); lua_rawseti(L, -2, 1);
    lua_pushinteger(L, (lua_Integer)c->pcount); lua_rawseti(L, -2, 2);
    lua_pushinteger(L, (lua_Integer)c->taken_total); lua_rawseti(L, -2, 3);
    return 1;
}

static int l_rollback(lua_State *L)
{
    smtp_client *c = check_engine(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_rawgeti(L, 2, 1); lua_rawgeti(L, 2, 2); lua_rawgeti(L, 2, 3);
    size_t len = (size_t)lua_tointeger(L, -3), pc = (size_t)lua_tointeger(L, -2);
    size_t tk = (size_t)lua_tointeger(L, -1);
    if (tk != c->taken_total || len > c->out.len || pc > c->pcount) {
        lua_pushnil(L); lua_pushstring(L, "already written"); return 2;
    }
    c->out.len = len;
    c->pcount = pc;
    lua_pushboolean(L, 1);
    return 1;
}

static int l_pending(lua_State *L)
{
    smtp_client *c = check_engine(L);
    lua_pushinteger(L, (lua_Integer)c->pcount);
    return 1;
}

/* ---- core.stuffer([dot = true]) --------------------------------------------------------- */

typedef struct {
    smtp_stuffer s;
    smtp_buf out;
} stuffer_ud;

static int l_stuffer_new(lua_State *L)
{
    int dot = lua_isnoneornil(L, 1) ? 1 : lua_toboolean(L, 1);
    stuffer_ud *u = lua_newuserdata(L, sizeof *u);
    memset(u, 0, sizeof *u);
    smtp_stuffer_init(&u->s, dot);
    luaL_setmetatable(L, STUFFER);
    return 1;
}

static int push_out(lua_State *L, stuffer_ud *u, int rc)
{
    if (rc < 0)
        return luaL_error(L, "out of memory");
    lua_pushlstring(L, u->out.p ? u->out.p : "", u->out.len);
    u->out.len = 0;
    /* a big chunk should not pin a big buffer for the whole message */
    if (u->out.cap > (1u << 20))
        smtp_buf_free(&u->out);
    return 1;
}

/* st:feed(s) and st:add(s): stuff s into the stuffer's buffer */
static stuffer_ud *stuff_arg(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (u->s.finished)
        luaL_error(L, "stuffer already finished");
    if (smtp_stuff(&u->s, s, n, &u->out) < 0)
        luaL_error(L, "out of memory");
    return u;
}

static int l_stuffer_feed(lua_State *L)
{
    return push_out(L, stuff_arg(L), 0);
}

static int l_stuffer_finish(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    return push_out(L, u, smtp_stuff_finish(&u->s, &u->out));
}

/* st:add(s) -> bytes held: like feed, but the output stays in the stuffer (a BDAT chunk being
 * gathered; e:bdat_from(st, last) sends it). st:add_end() -> bytes held, after finishing. */
static int l_stuffer_add(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)stuff_arg(L)->out.len);
    return 1;
}

static int l_stuffer_add_end(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    if (!u->s.finished && smtp_stuff_finish(&u->s, &u->out) < 0)
        return luaL_error(L, "out of memory");
    lua_pushinteger(L, (lua_Integer)u->out.len);
    return 1;
}

/* e:bdat_from(st, last) -> true | nil, err: queues what the stuffer holds as one BDAT chunk
 * (copied into the output, the stuffer's buffer emptied and kept for the next chunk). */
static int l_bdat_from(lua_State *L)
{
    smtp_client *c = check_engine(L);
    stuffer_ud *u = luaL_checkudata(L, 2, STUFFER);
    const char *why = NULL;
    int rc = smtp_client_bdat(c, u->out.p ? u->out.p : "", u->out.len, lua_toboolean(L, 3), &why);
    if (rc == 0)
        u->out.len = 0;
    return result(L, rc, why);
}

static int l_stuffer_gc(lua_State *L)
{
    stuffer_ud *u = luaL_checkudata(L, 1, STUFFER);
    smtp_buf_free(&u->out);
    return 0;
}

/* core.has_8bit(s) -> true when any byte is >= 0x80 (SMTPUTF8 / 8BITMIME decisions; a Lua
 * pattern class is far slower on large header sections) */
static int l_has_8bit(lua_State *L)
{
    size_t n;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    int found = 0;
    for (size_t i = 0; i < n && !found; i++)
        found = s[i] >= 0x80;
    lua_pushboolean(L, found);
    return 1;
}

int smtp_open_client(lua_State *L)
{
    static const luaL_Reg engine_methods[] = {
        {"feed", l_engine_feed}, {"reply", l_engine_reply}, {"ehlo", l_ehlo},
        {"helo", l_helo}, {"starttls", l_starttls}, {"mail", l_mail}, {"rcpt", l_rcpt},
        {"data", l_data}, {"rset", l_rset}, {"noop", l_noop}, {"quit", l_quit},
        {"auth", l_auth}, {"body", l_body}, {"body_end", l_body_end}, {"bdat", l_bdat},
        {"bdat_last", l_bdat_last}, {"bdat_from", l_bdat_from}, {"take", l_take},
        {"write_to", l_write_to}, {"outlen", l_outlen}, {"upgrade", l_upgrade}, {"state", l_state},
        {"pending", l_pending}, {"mark", l_mark}, {"rollback", l_rollback}, {NULL, NULL},
    };
    static const luaL_Reg engine_meta[] = {
        {"__gc", l_engine_gc}, {"__tostring", l_engine_tostring}, {NULL, NULL},
    };
    static const luaL_Reg stuffer_methods[] = {
        {"feed", l_stuffer_feed}, {"finish", l_stuffer_finish}, {"add", l_stuffer_add},
        {"add_end", l_stuffer_add_end}, {NULL, NULL},
    };
    static const luaL_Reg stuffer_meta[] = {{"__gc", l_stuffer_gc}, {NULL, NULL}};
    smtp_newclass(L, ENGINE, engine_methods, engine_meta);
    smtp_newclass(L, STUFFER, stuffer_methods, stuffer_meta);
    lua_pushcfunction(L, l_engine_new);
    lua_setfield(L, -2, "client_engine");
    lua_pushcfunction(L, l_stuffer_new);
    lua_setfield(L, -2, "stuffer");
    lua_pushcfunction(L, l_has_8bit);
    lua_setfield(L, -2, "has_8bit");
    return 0;
}
