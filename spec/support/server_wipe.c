/* Test driver for spec/server_wipe_spec.lua: proves the server engine (csrc/server.c, no Lua)
 * leaves no AUTH secret in memory it gives back or keeps once the exchange is decided. The spec
 * builds server.c with -Dfree=wipe_checked_free, so every block the engine frees (and every
 * block it grows, through the realloc_fn seam) is scanned here before it is released; live
 * blocks are scanned after each session step. The needles are every 8-byte window of the base64
 * the client sent and the decoded password. Prints "ok <sessions> <blocks checked>" or the
 * first "FAIL ..." line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"

void wipe_checked_free(void *p);

#define MAX_BLOCKS 64
#define MAX_NEEDLES 256

static struct { void *p; size_t n; } blocks[MAX_BLOCKS];
static const char *needles[MAX_NEEDLES];
static size_t needle_len[MAX_NEEDLES];
static int nneedles;
static long checked;
static char failure[512];
static const char *session = "";

static void add_needle(const char *s, size_t n)
{
    if (nneedles < MAX_NEEDLES) {
        needles[nneedles] = s;
        needle_len[nneedles++] = n;
    }
}

/* A base64 string: every 8-byte window, so a half-moved copy of it is found too. */
static void add_b64(const char *b)
{
    size_t n = strlen(b);
    for (size_t i = 0; i + 8 <= n; i++)
        add_needle(b + i, 8);
}

static const char *holds_secret(const void *p, size_t n)
{
    for (int k = 0; k < nneedles; k++)
        if (n >= needle_len[k] && memmem(p, n, needles[k], needle_len[k]))
            return needles[k];
    return NULL;
}

static void check_block(const void *p, size_t n, const char *when)
{
    checked++;
    const char *hit = holds_secret(p, n);
    if (hit && !failure[0])
        snprintf(failure, sizeof failure, "FAIL %s: a block of %zu bytes %s holds \"%.8s\"",
                 session, n, when, hit);
}

static int find_block(void *p)
{
    for (int i = 0; i < MAX_BLOCKS; i++)
        if (blocks[i].p == p)
            return i;
    return -1;
}

/* Grows by copy so that the old block, too, is checked before it is released. */
static void *test_realloc(void *ud, void *p, size_t n)
{
    (void)ud;
    void *q = malloc(n);
    if (!q)
        return NULL;
    int i = p ? find_block(p) : find_block(NULL);
    if (i < 0) {
        fprintf(stderr, "driver: block table full or unknown block\n");
        abort();
    }
    if (p) {
        memcpy(q, p, blocks[i].n < n ? blocks[i].n : n);
        check_block(p, blocks[i].n, "given back by growing");
        free(p);
    }
    blocks[i].p = q;
    blocks[i].n = n;
    return q;
}

void wipe_checked_free(void *p)
{
    if (!p)
        return;
    int i = find_block(p);
    if (i >= 0) {
        check_block(p, blocks[i].n, "freed");
        blocks[i].p = NULL;
        blocks[i].n = 0;
    }
    free(p);
}

static void check_live(const char *when)
{
    for (int i = 0; i < MAX_BLOCKS; i++)
        if (blocks[i].p)
            check_block(blocks[i].p, blocks[i].n, when);
}

static smtp_server *start(int tls)
{
    smtp_server_config c;
    memset(&c, 0, sizeof c);
    c.hostname = "mx.test";
    c.max_line = 512;
    c.auth_enabled = 1;
    c.auth_plaintext = 1;
    c.tls_available = tls;
    c.realloc_fn = test_realloc;
    return smtp_server_new(&c);
}

/* Runs the engine until it needs input, answering AUTH with `accept` and everything else yes,
 * then takes the output. */
static void pump(smtp_server *s, int accept)
{
    smtp_server_event ev;
    int kind;
    while ((kind = smtp_server_next(s, &ev)) != SMTP_SRV_NONE) {
        if (kind == SMTP_SRV_AUTH)
            smtp_server_decide(s, accept, 0, NULL, NULL);
        else if (kind == SMTP_SRV_MAIL || kind == SMTP_SRV_RCPT || kind == SMTP_SRV_END)
            smtp_server_decide(s, 1, 0, NULL, NULL);
        else if (kind == SMTP_SRV_CLOSE || kind == SMTP_SRV_STARTTLS)
            break;
    }
    size_t len;
    while (smtp_server_output(s, &len) && len)
        smtp_server_output_done(s, len);
}

static void feed(smtp_server *s, const char *p, size_t n, size_t step, int accept)
{
    size_t i = 0;
    while (i < n && !smtp_server_closed(s)) {
        size_t k = n - i < step ? n - i : step;
        size_t took = smtp_server_feed(s, p + i, k);
        i += took;
        pump(s, accept);
        if (!took && !smtp_server_space(s))
            break;
    }
}

/* Feeds whole lines; then nothing the engine keeps may hold the secret (`partial`: the input
 * ends inside an AUTH line, which the engine rightly still holds). */
static void feeds(smtp_server *s, const char *p, size_t step, int accept, int partial)
{
    feed(s, p, strlen(p), step, accept);
    if (!partial)
        check_live("kept after the exchange");
}

/* The credentials: user "alice", password "pw-Secret-7". */
#define PLAIN_B64 "AGFsaWNlAHB3LVNlY3JldC03"      /* "\0alice\0pw-Secret-7" */
#define USER_B64 "YWxpY2U="                       /* "alice" */
#define PASS_B64 "cHctU2VjcmV0LTc="               /* "pw-Secret-7" */

int main(void)
{
    static const size_t steps[] = { 1, 3, 1 << 20 };
    int sessions = 0;
    add_b64(PLAIN_B64);
    add_b64(PASS_B64);
    add_needle("pw-Secret-7", 11);
    char longline[2048];
    snprintf(longline, sizeof longline, "AUTH PLAIN %s", PLAIN_B64);
    while (strlen(longline) < 1500)
        strcat(longline, PLAIN_B64);
    strcat(longline, "\r\nNOOP\r\n");
    for (size_t si = 0; si < sizeof steps / sizeof steps[0]; si++) {
        size_t st = steps[si];
        for (int accept = 0; accept <= 1; accept++) {
            smtp_server *s;
#define SESSION(name) session = name; sessions++
            SESSION("PLAIN with an initial response");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH PLAIN " PLAIN_B64 "\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("PLAIN, then half a command waiting in the buffer");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH PLAIN " PLAIN_B64 "\r\nNO", st, accept, 0);
            feeds(s, "OP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("PLAIN after 334");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH PLAIN\r\n", st, accept, 0);
            feeds(s, PLAIN_B64 "\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("LOGIN step by step");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH LOGIN\r\n" USER_B64 "\r\n", st, accept, 0);
            feeds(s, PASS_B64 "\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("LOGIN with the user name, pipelined");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH LOGIN " USER_B64 "\r\n" PASS_B64 "\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("an AUTH line that arrives in two pieces after other commands");
            s = start(0);
            feeds(s, "EHLO c.test\r\nNOOP\r\nNOOP\r\nAUTH PLAIN AGFsaWNlAHB3", st, accept, 1);
            feeds(s, "LVNlY3JldC03\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("an over-long AUTH line");
            s = start(0);
            feeds(s, "EHLO c.test\r\n", st, accept, 0);
            feeds(s, longline, st, accept, 0);
            smtp_server_free(s);

            SESSION("an over-long LOGIN password");
            s = start(0);
            feeds(s, "EHLO c.test\r\nAUTH LOGIN " USER_B64 "\r\n", st, accept, 0);
            feeds(s, longline + 11, st, accept, 0);
            smtp_server_free(s);

            SESSION("AUTH refused before TLS-less mechanisms are checked (HELO first)");
            s = start(0);
            feeds(s, "AUTH PLAIN " PLAIN_B64 "\r\nNOOP\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("AUTH in clear right behind STARTTLS (dropped unread)");
            s = start(1);
            feeds(s, "EHLO c.test\r\nSTARTTLS\r\nAUTH PLAIN " PLAIN_B64 "\r\n", st, accept, 0);
            smtp_server_free(s);

            SESSION("AUTH unread when the session is freed");
            s = start(0);
            smtp_server_feed(s, "EHLO c.test\r\nAUTH PLAIN " PLAIN_B64 "\r\n",
                             strlen("EHLO c.test\r\nAUTH PLAIN " PLAIN_B64 "\r\n"));
            smtp_server_free(s);
            if (failure[0]) {
                printf("%s (input in pieces of %zu, AUTH %s)\n", failure, st,
                       accept ? "accepted" : "refused");
                return 1;
            }
        }
    }
    printf("ok %d %ld\n", sessions, checked);
    return 0;
}
