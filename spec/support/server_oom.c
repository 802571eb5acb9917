/* Test driver for spec/server_oom_spec.lua: runs one scripted SMTP session on the plain C server
 * engine (csrc/server.c, no Lua) once per allocation, making that allocation fail, and checks
 * that the engine neither aborts nor crashes, closes, says "failed" / "out of memory", and ends
 * its output with well-formed replies, the last one "421 4.3.0". The session runs twice: with the
 * output taken after every step, and taken only at the end (so that replies, too, must grow the
 * output buffer). Prints "ok <runs> <allocs>" (of the last pass). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"

static const char SCRIPT[] =
    "EHLO client.test\r\n"
    "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n"
    "AUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\n"
    "MAIL FROM:<a@x.test> SIZE=100 ENVID=e+2B1 RET=HDRS\r\n"
    "RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40y.test\r\n"
    "RCPT TO:<c@y.test>\r\nRCPT TO:<d@y.test>\r\nRCPT TO:<e@y.test>\r\nRCPT TO:<f@y.test>\r\n"
    "DATA\r\nSubject: t\r\n\r\n..body\r\n.\r\n"
    "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5\r\nabcdeBDAT 2 LAST\r\nfg"
    "QUIT\r\n";
static const char OOM[] = "421 4.3.0 Out of memory, closing connection\r\n";

typedef struct { long left; long calls; int failed; } ctl;

static void *test_realloc(void *ud, void *p, size_t n)
{
    ctl *c = ud;
    c->calls++;
    if (c->left-- == 0) {
        c->failed = 1;
        return NULL;
    }
    return realloc(p, n);
}

#define CHECK(x) do { if (!(x)) { printf("FAIL run %ld: %s\n", k, #x); return 1; } } while (0)

static int pass(int drain, long *runs, long *allocs_out)
{
    long k, allocs = -1;
    for (k = 0;; k++) {
        ctl c = { k, 0, 0 };
        smtp_server_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.hostname = "mx.test";
        cfg.auth_enabled = cfg.auth_plaintext = 1;
        cfg.hook_mail = cfg.hook_rcpt = 1;
        cfg.realloc_fn = test_realloc;
        cfg.alloc_ud = &c;
        smtp_server *s = smtp_server_new(&cfg);
        if (!s) {
            CHECK(c.failed && k == 0);
            continue;
        }
        char out[65536];
        size_t olen = 0, i = 0, len;
        const char *o;
        int closed_seen = 0, guard = 0, nauth = 0;
        while (!closed_seen && guard++ < 10000) {
            smtp_server_event ev;
            int kind = smtp_server_next(s, &ev);
            if (kind == SMTP_SRV_CLOSE)
                closed_seen = 1;
            else if (kind == SMTP_SRV_MAIL || kind == SMTP_SRV_RCPT || kind == SMTP_SRV_AUTH ||
                     (kind == SMTP_SRV_END && ev.code == 0))
                /* the PLAIN attempt is refused so that LOGIN runs too */
                CHECK(smtp_server_decide(s, kind != SMTP_SRV_AUTH || nauth++ > 0, 0, NULL, NULL) == 0);
            while ((drain || kind == SMTP_SRV_CLOSE ||
                    (kind == SMTP_SRV_NONE && i == sizeof SCRIPT - 1)) &&
                   (o = smtp_server_output(s, &len)) != NULL && len) {
                CHECK(olen + len <= sizeof out);
                memcpy(out + olen, o, len);
                olen += len;
                smtp_server_output_done(s, len);
            }
            if (kind == SMTP_SRV_NONE) {
                if (i == sizeof SCRIPT - 1)
                    break;
                i += smtp_server_feed(s, SCRIPT + i, sizeof SCRIPT - 1 - i);
            }
        }
        CHECK(guard < 10000);
        /* every reply line well-formed */
        for (size_t p = 0; p < olen;) {
            const char *lf = memchr(out + p, '\n', olen - p);
            CHECK(lf && lf > out + p + 4 && lf[-1] == '\r');
            CHECK(out[p] >= '2' && out[p] <= '5' && (out[p + 3] == ' ' || out[p + 3] == '-'));
            p = (size_t)(lf - out) + 1;
        }
        if (c.failed) {
            CHECK(smtp_server_closed(s));
            CHECK(!strcmp(smtp_server_state_name(s), "failed"));
            CHECK(smtp_server_error(s) && !strcmp(smtp_server_error(s), "out of memory"));
            CHECK(olen >= sizeof OOM - 1 && !memcmp(out + olen - (sizeof OOM - 1), OOM, sizeof OOM - 1));
            /* the 421 is the only reply that mentions memory, and comes once */
            CHECK(memmem(out, olen, "421 4.3.0", 9) == out + olen - (sizeof OOM - 1));
        } else {
            CHECK(smtp_server_error(s) == NULL);
            static const char bye[] = "221 2.0.0 Bye\r\n";
            CHECK(olen >= sizeof bye - 1 && !memcmp(out + olen - (sizeof bye - 1), bye, sizeof bye - 1));
            CHECK(memmem(out, olen, "250 2.0.0", 9) != NULL);   /* the DATA message was queued */
            allocs = c.calls;
        }
        smtp_server_free(s);
        if (!c.failed)
            break;
    }
    *runs = k + 1;
    *allocs_out = allocs;
    return 0;
}

int main(void)
{
    long runs = 0, allocs = 0;
    for (int drain = 1; drain >= 0; drain--)
        if (pass(drain, &runs, &allocs))
            return 1;
    printf("ok %ld %ld\n", runs, allocs);
    return 0;
}
