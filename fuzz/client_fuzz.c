/* libFuzzer harness for the client engine (csrc/client.c): a fixed pipelined session (EHLO,
 * STARTTLS, then EHLO, AUTH LOGIN, MAIL, RCPT, DATA after the upgrade) fed arbitrary server
 * bytes, whole and one byte at a time. Both runs must agree; replies only answer queued commands;
 * after the STARTTLS 220 nothing is parsed until the upgrade, which drops every held byte. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "client.h"

#define MAXR 256
typedef struct {
    int code[MAXR];
    int cmd[MAXR];
    int n;
    int failed;
    size_t dropped;
    int state;
} outcome;

static void queue_after_tls(smtp_client *c)
{
    const char *why;
    smtp_client_command(c, SMTP_CMD_EHLO, "client.test", 11, NULL, 0, &why);
    smtp_client_auth(c, SMTP_SASL_LOGIN, "user", 4, "secret", 6, NULL, 0, &why);
    smtp_client_command(c, SMTP_CMD_MAIL, "a@b.test", 8, "SIZE=10", 7, &why);
    smtp_client_command(c, SMTP_CMD_RCPT, "c@d.test", 8, NULL, 0, &why);
    smtp_client_command(c, SMTP_CMD_DATA, NULL, 0, NULL, 0, &why);
}

static void run(const uint8_t *data, size_t size, size_t step, outcome *o)
{
    memset(o, 0, sizeof *o);
    smtp_client *c = smtp_client_new();
    assert(c);
    const char *why;
    assert(smtp_client_command(c, SMTP_CMD_EHLO, "client.test", 11, NULL, 0, &why) == 0);
    assert(smtp_client_command(c, SMTP_CMD_STARTTLS, NULL, 0, NULL, 0, &why) == 0);
    smtp_client_taken(c, smtp_client_output(c)->len);
    int upgraded = 0;
    for (size_t off = 0; off < size;) {
        size_t n = size - off < step ? size - off : step;
        if (smtp_client_feed(c, (const char *)data + off, n) < 0) {
            o->failed = 1;
            break;
        }
        off += n;
        for (;;) {
            const smtp_reply *r;
            smtp_cmd cmd;
            size_t before = smtp_client_pending(c);
            int rc = smtp_client_next(c, &r, &cmd);
            if (rc < 0) {
                o->failed = 1;
                break;
            }
            if (rc == 0)
                break;
            assert(before >= 1 && smtp_client_pending(c) == before - 1);
            assert(cmd < SMTP_CMD__COUNT);
            if (o->n < MAXR) {
                o->code[o->n] = r->code;
                o->cmd[o->n] = cmd;
                o->n++;
            }
            if (cmd == SMTP_CMD_DATA && r->code == 354) {
                assert(smtp_client_get_state(c) == SMTP_CS_BODY);
                smtp_client_body(c, "x\r\n.\r\n", 6, &why);
                smtp_client_body_end(c, &why);
            }
            /* frees buffers only when idle, and must never change what follows */
            smtp_client_shrink(c);
        }
        if (o->failed)
            break;
        if (smtp_client_get_state(c) == SMTP_CS_TLS) {
            /* input is frozen: nothing parses until the upgrade */
            const smtp_reply *r;
            smtp_cmd cmd;
            assert(smtp_client_next(c, &r, &cmd) == 0);
            assert(!upgraded);
            /* the dropped count depends on how the bytes arrived; only the fact that
             * the engine holds nothing afterwards is compared */
            o->dropped = smtp_client_upgrade(c) > 0;
            upgraded = 1;
            assert(smtp_client_get_state(c) == SMTP_CS_READY);
            assert(smtp_client_pending(c) == 0);
            queue_after_tls(c);
            /* a second upgrade has nothing left to drop */
            smtp_client_taken(c, smtp_client_output(c)->len);
        }
        smtp_client_taken(c, smtp_client_output(c)->len);
        smtp_client_shrink(c);
    }
    o->state = smtp_client_get_state(c);
    smtp_client_free(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static outcome a, b;
    run(data, size, size ? size : 1, &a);
    run(data, size, 1, &b);
    /* Fed whole, the bytes after the STARTTLS 220 arrive with it and are dropped; fed one at a
     * time, the upgrade happens right after the 220 and later bytes are read as post-TLS
     * replies. Up to and including the STARTTLS reply both runs must agree exactly, and when
     * neither reached STARTTLS they agree on everything. */
    int k = 0, tls = 0;
    while (k < a.n && !tls) {
        assert(k < b.n && a.cmd[k] == b.cmd[k] && a.code[k] == b.code[k]);
        tls = a.cmd[k] == SMTP_CMD_STARTTLS && a.code[k] == 220;
        k++;
    }
    if (!tls) {
        assert(a.n == b.n || a.failed || b.failed || a.n == MAXR);
        assert(a.failed == b.failed || a.n == MAXR);
    }
    return 0;
}
