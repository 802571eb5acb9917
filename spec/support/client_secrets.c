/* Test driver for spec/client_secrets_spec.lua: runs AUTH with every mechanism on the plain C
 * client engine (csrc/client.c, reply.c, text.c; no Lua) with a long secret, grows the buffers
 * that hold it (initial response, pipelined commands behind AUTH, LOGIN / CRAM-MD5 answers),
 * takes the output in pieces, rolls back and frees the engine. It is linked with
 * -Wl,--wrap=malloc,--wrap=realloc,--wrap=free,--wrap=calloc so that every block the engine
 * hands back to the allocator, and every block it asks realloc to move, is searched first for
 * the secret, raw or base64 at any alignment. Prints "ok <blocks checked>" or "LEAK ...". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "client.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);

/* The secret is a run of 'Q': its base64 is a run of "UVFR" whatever its alignment. */
#define SECRET_LEN 6000
static const char *const MARKS[] = { "QQQQQQQQQQQQ", "UVFRUVFRUVFR", "RUVFRUVFRUVF", "FRUVFRUVFRUV",
                                     "VFRUVFRUVFRU" };

#define MAXBLOCKS 4096
static struct { void *p; size_t n; } live[MAXBLOCKS];
static long checked, leaks;
static const char *where = "";

static void track(void *p, size_t n)
{
    if (!p)
        return;
    for (int i = 0; i < MAXBLOCKS; i++)
        if (!live[i].p) {
            live[i].p = p;
            live[i].n = n;
            return;
        }
    fprintf(stderr, "too many blocks\n");
    abort();
}

static void search(int i, const char *op)
{
    checked++;
    for (size_t m = 0; m < sizeof MARKS / sizeof *MARKS; m++)
        if (memmem(live[i].p, live[i].n, MARKS[m], strlen(MARKS[m]))) {
            printf("LEAK %s: a %s block of %zu bytes still holds the secret\n", where, op,
                   live[i].n);
            leaks++;
            return;
        }
}

static void check(void *p, const char *op)
{
    if (!p)
        return;
    for (int i = 0; i < MAXBLOCKS; i++)
        if (live[i].p == p) {
            search(i, op);
            live[i].p = NULL;
            return;
        }
}

void *__wrap_malloc(size_t n) { void *p = __real_malloc(n); track(p, n); return p; }
void *__wrap_calloc(size_t k, size_t n) { void *p = __real_calloc(k, n); track(p, k * n); return p; }
void __wrap_free(void *p) { check(p, "freed"); __real_free(p); }
void *__wrap_realloc(void *p, size_t n)
{
    /* realloc may move the block and free the old one as it is */
    check(p, "reallocated");
    void *q = __real_realloc(p, n);
    track(q, n);
    return q;
}

#define REQUIRE(x) do { if (!(x)) { printf("FAIL %s: %s\n", where, #x); exit(1); } } while (0)

static void feed(smtp_client *c, const char *s)
{
    const smtp_reply *r;
    smtp_cmd cmd;
    REQUIRE(smtp_client_feed(c, s, strlen(s)) == 0);
    while (smtp_client_next(c, &r, &cmd) == 1)
        ;
    REQUIRE(smtp_client_get_state(c) != SMTP_CS_FAILED);
}

/* Takes the output in uneven pieces, as short writes would. */
static void drain(smtp_client *c)
{
    smtp_buf *o = smtp_client_output(c);
    while (o->len)
        smtp_client_taken(c, o->len > 1000 ? 777 : o->len);
}

/* slen: XOAUTH2 and OAUTHBEARER initial responses fill 8192 bytes exactly with a 5174-byte
 * secret, so the two bytes after it grow the buffer that holds it. */
static void session(smtp_sasl mech, const char *name, int pipelined, int rollback, size_t slen)
{
    static char secret[SECRET_LEN];
    static char user[3000];
    const char *why = NULL;
    memset(secret, 'Q', sizeof secret);
    memset(user, 'u', sizeof user);
    where = name;
    smtp_client *c = smtp_client_new();
    REQUIRE(c);
    feed(c, "220 mx.test\r\n");
    REQUIRE(smtp_client_command(c, SMTP_CMD_EHLO, "client.test", 11, NULL, 0, &why) == 0);
    drain(c);
    feed(c, "250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2 OAUTHBEARER\r\n");
    smtp_client_mark mark = smtp_client_mark_now(c);
    REQUIRE(smtp_client_auth(c, mech, user, sizeof user, secret, slen, "", 0, &why) == 0);
    if (rollback) {
        /* taken back unsent: the queued AUTH line is wiped, the engine stays usable */
        REQUIRE(smtp_client_rollback(c, mark, &why) == 0);
        REQUIRE(smtp_client_auth(c, mech, user, sizeof user, secret, slen, NULL, 0, &why) == 0);
    }
    if (pipelined) {
        /* commands queued behind the AUTH line grow the buffer that holds it */
        static const char addr[] = "someone-with-a-long-address@example.test";
        for (int i = 0; i < 400; i++)
            REQUIRE(smtp_client_command(c, SMTP_CMD_RCPT, addr, sizeof addr - 1, NULL, 0, &why) == 0);
    }
    drain(c);
    if (mech == SMTP_SASL_LOGIN) {
        feed(c, "334 VXNlcm5hbWU6\r\n");
        drain(c);
        feed(c, "334 UGFzc3dvcmQ6\r\n");
        drain(c);
    } else if (mech == SMTP_SASL_CRAM_MD5) {
        feed(c, "334 PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n");
        drain(c);
    }
    feed(c, "235 2.7.0 ok\r\n");
    /* once answered and written, no block the engine still holds has the secret either
     * (the bytes a short write moved forward leave no copy behind) */
    for (int i = 0; i < MAXBLOCKS; i++)
        if (live[i].p)
            search(i, "live");
    smtp_client_free(c);
}

int main(void)
{
    static const struct { smtp_sasl mech; const char *name; } mechs[] = {
        { SMTP_SASL_PLAIN, "PLAIN" }, { SMTP_SASL_LOGIN, "LOGIN" },
        { SMTP_SASL_CRAM_MD5, "CRAM-MD5" }, { SMTP_SASL_XOAUTH2, "XOAUTH2" },
        { SMTP_SASL_OAUTHBEARER, "OAUTHBEARER" },
    };
    for (size_t i = 0; i < sizeof mechs / sizeof *mechs; i++)
        for (int pipelined = 0; pipelined < 2; pipelined++)
            for (int rollback = 0; rollback < 2; rollback++)
                for (size_t slen = 5174; slen <= SECRET_LEN; slen += SECRET_LEN - 5174)
                    session(mechs[i].mech, mechs[i].name, pipelined, rollback, slen);
    if (leaks)
        return 1;
    printf("ok %ld\n", checked);
    return 0;
}
