/* libFuzzer harness for address/path and ESMTP parameter parsing (csrc/server.c, reached through
 * the server engine): the input becomes the argument of MAIL FROM: and RCPT TO: (split at the
 * first 0xff byte). Invariants: an accepted path never holds a control character (nor, outside a
 * quoted local part, '<', '>' or a space) and
 * keeps to RFC 5321's 256-byte limit; decoded parameters (ENVID, ORCPT xtext) hold no control
 * characters, NOTIFY and RET and BODY only their allowed words, SIZE is -1 or non-negative; the
 * engine never reports a MAIL/RCPT event for a line it answered with an error. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"

static void no_ctl(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert((unsigned char)p[i] >= 0x20 && p[i] != 0x7f);
}

static void check_path(const char *a, size_t n)
{
    assert(n <= 256);
    no_ctl(a, n);
    /* outside a quoted local part, no space or angle bracket survives */
    if (n && a[0] != '"')
        for (size_t i = 0; i < n; i++)
            assert(a[i] != '<' && a[i] != '>' && a[i] != ' ');
}

static void check_params(const smtp_server_params *p)
{
    if (!p)
        return;
    assert(p->size >= -1);
    if (p->envid)
        no_ctl(p->envid, strlen(p->envid));
    if (p->orcpt)
        no_ctl(p->orcpt, strlen(p->orcpt));
    if (p->ret)
        assert(!strcmp(p->ret, "FULL") || !strcmp(p->ret, "HDRS"));
    if (p->body)
        assert(!strcmp(p->body, "7BIT") || !strcmp(p->body, "8BITMIME") || !strcmp(p->body, "BINARYMIME"));
    if (p->notify) {
        /* NEVER alone, or a comma list of SUCCESS, FAILURE, DELAY */
        const char *s = p->notify;
        assert(*s);
        no_ctl(s, strlen(s));
        if (strcmp(s, "NEVER") != 0) {
            while (*s) {
                size_t w = strcspn(s, ",");
                assert((w == 7 && !strncmp(s, "SUCCESS", 7)) || (w == 7 && !strncmp(s, "FAILURE", 7)) ||
                       (w == 5 && !strncmp(s, "DELAY", 5)));
                s += w;
                if (*s == ',')
                    s++;
            }
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *cut = memchr(data, 0xff, size);
    size_t n1 = cut ? (size_t)(cut - data) : size;
    const uint8_t *r = cut ? cut + 1 : data;
    size_t n2 = cut ? size - n1 - 1 : size;
    size_t cap = 64 + n1 + n2;
    char *in = malloc(cap);
    size_t len = 0;
    memcpy(in + len, "EHLO c.test\r\nMAIL FROM:", 23); len += 23;
    memcpy(in + len, data, n1); len += n1;
    memcpy(in + len, "\r\nRCPT TO:", 10); len += 10;
    memcpy(in + len, r, n2); len += n2;
    memcpy(in + len, "\r\n", 2); len += 2;

    smtp_server_config c;
    memset(&c, 0, sizeof c);
    c.hostname = "fuzz.test";
    c.max_line = 1024;
    c.max_recipients = 5;
    c.out_cap = 1 << 20;
    c.hook_mail = c.hook_rcpt = 1;
    smtp_server *s = smtp_server_new(&c);
    assert(s);
    size_t i = 0;
    int events = 0, stalls = 0;
    while (!smtp_server_closed(s)) {
        size_t took = i < len ? smtp_server_feed(s, in + i, len - i) : 0;
        i += took;
        smtp_server_event ev;
        int kind;
        while ((kind = smtp_server_next(s, &ev)) != SMTP_SRV_NONE) {
            if (kind == SMTP_SRV_MAIL || kind == SMTP_SRV_RCPT) {
                events++;
                check_path(ev.a, ev.alen);
                const smtp_server_params *p = NULL;
                if (kind == SMTP_SRV_MAIL) {
                    const char *f = smtp_server_from(s, &p);
                    (void)f;
                }
                check_params(p);
                smtp_server_decide(s, 1, 0, NULL, NULL);
            }
        }
        size_t olen;
        smtp_server_output(s, &olen);
        smtp_server_output_done(s, olen);
        if (i >= len || (took == 0 && ++stalls > 4))
            break;
    }
    /* recipients accepted are all readable and well-formed */
    for (unsigned k = 0; k < smtp_server_rcpt_count(s); k++) {
        const smtp_server_params *p = NULL;
        const char *a = smtp_server_rcpt(s, k, &p);
        assert(a);
        check_path(a, strlen(a));
        check_params(p);
    }
    assert(events <= 2 + 2 * 8); /* pipelined CR/LF inside the input may add commands, never many */
    smtp_server_free(s);
    free(in);
    return 0;
}
