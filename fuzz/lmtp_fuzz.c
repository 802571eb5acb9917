/* libFuzzer harness for LMTP (RFC 2033) in both engines at once: the client engine (client.c)
 * and the server engine (server.c), both in LMTP mode, talk to each other through memory. The
 * input decides the transactions (recipients, DATA or BDAT chunks of what sizes, a bare LF, the
 * size limit), every MAIL/RCPT decision and each recipient's answer after the data. The two
 * engines count the replies to the end of a message independently (the client from the RCPT
 * replies it saw, the server from the recipients it accepted): they must agree, so the client
 * never fails, every command it queued is answered, and the replies it matches to the end of each
 * message are exactly the answers given for it, in order. */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "client.h"
#include "server.h"

typedef struct {
    const uint8_t *p;
    size_t n, i;
} input;

static unsigned take(input *in, unsigned mod)
{
    unsigned v = in->i < in->n ? in->p[in->i] : 0;
    in->i++;
    return mod ? v % mod : v;
}

#define MAXANS 4096
typedef struct {
    int code[MAXANS];     /* answers the server was given for ends of messages, in order */
    size_t n;
} answers;

/* The server's turn: take what the client wrote, answer every event. */
static void server_step(smtp_server *s, smtp_client *c, input *in, answers *given)
{
    smtp_buf *out = smtp_client_output(c);
    size_t off = 0;
    for (int guard = 0; guard < 100000; guard++) {
        if (off < out->len)
            off += smtp_server_feed(s, out->p + off, out->len - off);
        smtp_server_event ev;
        int kind = smtp_server_next(s, &ev);
        if (kind == SMTP_SRV_NONE) {
            if (off >= out->len || smtp_server_closed(s) || smtp_server_space(s) == 0)
                break;
            continue;
        }
        switch (kind) {
        case SMTP_SRV_MAIL:
        case SMTP_SRV_RCPT:
            smtp_server_decide(s, take(in, 4) != 0, 0, NULL, NULL);
            break;
        case SMTP_SRV_END:
            if (ev.code == 0) {
                do {
                    static const int codes[4] = { 250, 250, 452, 550 };
                    int code = codes[take(in, 4)];
                    smtp_server_decide(s, code == 250, code == 250 ? 0 : code, NULL, NULL);
                    if (given->n < MAXANS)
                        given->code[given->n++] = code;
                } while (smtp_server_lmtp_due(s));
            }
            break;
        default:
            break;
        }
    }
    smtp_client_taken(c, off);
}

/* The harness's own record of the BDAT chunks queued, in order: which ones were LAST. */
#define MAXQ 64
typedef struct {
    int last[MAXQ];
    size_t head, n;
} bdatq;

/* Queues one transaction: MAIL, RCPTs, then DATA (the body follows its 354) or all its BDAT
 * chunks. Returns 1 when it ends with DATA (nothing may be queued behind it before the body). */
static int queue_tx(smtp_client *c, input *in, bdatq *q)
{
    const char *why;
    unsigned nrcpt = 1 + take(in, 5);
    int bdat = take(in, 2);
    unsigned nchunks = 1 + take(in, 3);
    smtp_client_command(c, SMTP_CMD_MAIL, "a@x.test", 8, NULL, 0, &why);
    for (unsigned r = 0; r < nrcpt; r++) {
        char addr[16];
        int n = snprintf(addr, sizeof addr, "r%u@x.test", r);
        assert(smtp_client_command(c, SMTP_CMD_RCPT, addr, (size_t)n, NULL, 0, &why) == 0);
    }
    if (!bdat) {
        assert(smtp_client_command(c, SMTP_CMD_DATA, NULL, 0, NULL, 0, &why) == 0);
        return 1;
    }
    for (unsigned k = 0; k < nchunks; k++) {
        char chunk[64];
        unsigned len = take(in, 30);
        for (unsigned j = 0; j < len; j++)
            chunk[j] = (char)('a' + j % 26);
        if (len >= 2) {
            chunk[len - 2] = '\r';
            chunk[len - 1] = take(in, 8) ? '\n' : 'x';   /* now and then a bare CR */
        }
        assert(smtp_client_bdat(c, chunk, len, k + 1 == nchunks, &why) == 0);
        assert(q->n < MAXQ);
        q->last[(q->head + q->n++) % MAXQ] = k + 1 == nchunks;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = { data, size, 0 };
    smtp_server_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.hostname = "lmtp.test";
    cfg.lmtp = 1;
    cfg.hook_mail = cfg.hook_rcpt = 1;
    cfg.max_errors = 100000;   /* refusals are the point here: no 421 for them */
    cfg.max_message_size = take(&in, 2) ? 40 : 0;
    smtp_server *s = smtp_server_new(&cfg);
    smtp_client *c = smtp_client_new();
    assert(s && c);
    smtp_client_set_lmtp(c, 1);
    const char *why;
    static answers given;
    static int seen[MAXANS];
    given.n = 0;
    size_t nseen = 0;
    bdatq q = { .head = 0, .n = 0 };
    unsigned rcpt_ok = 0;      /* the harness's own count: RCPTs of this transaction accepted */
    int chunk_failed = 0, end_last = 0;
    size_t end_replies = 0, end_expected = 0;

    assert(smtp_client_command(c, SMTP_CMD_EHLO, "client.test", 11, NULL, 0, &why) == 0);
    unsigned ntx = 1 + take(&in, 3), queued = 0;
    int wait_data = 0;
    while (queued < ntx && !wait_data) {
        wait_data = queue_tx(c, &in, &q);
        queued++;
    }
    if (queued == ntx && !wait_data)
        smtp_client_command(c, SMTP_CMD_QUIT, NULL, 0, NULL, 0, &why);

    /* Both engines in turn until the conversation is over. */
    for (int round = 0; round < 1000 && smtp_client_get_state(c) != SMTP_CS_CLOSED; round++) {
        server_step(s, c, &in, &given);
        size_t olen;
        const char *o;
        while ((o = smtp_server_output(s, &olen)) != NULL && olen) {
            assert(smtp_client_feed(c, o, olen) == 0);
            smtp_server_output_done(s, olen);
        }
        const smtp_reply *r;
        smtp_cmd cmd;
        int rc;
        while ((rc = smtp_client_next(c, &r, &cmd)) == 1) {
            int ok = r->code >= 200 && r->code < 300;
            int is_end = 0;
            assert(r->code != 421);
            switch (cmd) {
            case SMTP_CMD_MAIL:
                rcpt_ok = 0;
                chunk_failed = 0;
                break;
            case SMTP_CMD_RCPT:
                rcpt_ok += ok;
                break;
            case SMTP_CMD_DATA:
                if (r->code == 354) {
                    /* the body, with a bare LF now and then: the server's own refusal, per recipient */
                    const char *body = take(&in, 8) ? "Subject: x\r\n\r\nhi\r\n" : "Subject: x\n\nhi\r\n";
                    assert(smtp_client_body(c, body, strlen(body), &why) == 0);
                    assert(smtp_client_body_end(c, &why) == 0);
                }
                /* the next transactions may go now */
                wait_data = 0;
                while (queued < ntx && !wait_data) {
                    wait_data = queue_tx(c, &in, &q);
                    queued++;
                }
                if (queued == ntx && !wait_data)
                    smtp_client_command(c, SMTP_CMD_QUIT, NULL, 0, NULL, 0, &why);
                break;
            case SMTP_CMD_DATA_END:
                is_end = 1;
                break;
            case SMTP_CMD_BDAT:
                if (end_replies == 0) {
                    assert(q.n > 0);
                    end_last = q.last[q.head];
                    q.head = (q.head + 1) % MAXQ;
                    q.n--;
                }
                if (end_last)
                    is_end = 1;
                else if (!ok)
                    chunk_failed = 1;
                break;
            default:
                break;
            }
            if (is_end) {
                if (end_replies == 0)
                    end_expected = (rcpt_ok && !chunk_failed) ? rcpt_ok : 1;
                end_replies++;
                if (nseen < MAXANS)
                    seen[nseen++] = r->code;
                assert((smtp_client_lmtp_due(c) > 0) == (end_replies < end_expected));
                if (end_replies == end_expected) {
                    end_replies = 0;
                    rcpt_ok = 0;
                    chunk_failed = 0;
                }
            }
        }
        assert(rc == 0);   /* the client never met a reply it could not place */
    }
    assert(smtp_client_get_state(c) == SMTP_CS_CLOSED);
    assert(smtp_client_pending(c) == 0 && q.n == 0 && end_replies == 0);
    /* Every answer given for a message's end reached the client as a reply to that end, in order
     * (the server's own refusals at the end and lone replies to LAST come between them). */
    size_t j = 0;
    for (size_t i = 0; i < nseen && j < given.n; i++)
        if (seen[i] == given.code[j])
            j++;
    assert(j == given.n || nseen == MAXANS);
    smtp_client_free(c);
    smtp_server_free(s);
    return 0;
}
