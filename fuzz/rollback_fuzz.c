/* libFuzzer harness for the client engine's mark and rollback (csrc/client.c): the input is a
 * program of queue, body, mark, rollback, partial take and server-reply steps. A model keeps every
 * byte the engine has put out (taken or not) and the end of each pending command. Invariants: a
 * rollback never takes back a byte already taken, leaves exactly the bytes before the mark and
 * the commands that end there, and a refused one changes nothing; a rollback to a mark made just
 * now always succeeds. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "client.h"

#define MAXP 4096
#define MAXS (1 << 20)

typedef struct {
    char *s;                       /* every output byte so far: [0, taken) went, the rest waits */
    size_t len, taken;
    unsigned long long end[MAXP];  /* pending commands' ends, oldest first */
    size_t head, n;
} model;

/* Adds what the engine appended since the model last looked (its old bytes must be unchanged). */
static void sync(model *m, smtp_client *c)
{
    smtp_buf *o = smtp_client_output(c);
    size_t have = m->len - m->taken;
    assert(o->len >= have && (have == 0 || !memcmp(o->p, m->s + m->taken, have)));
    size_t add = o->len - have;
    assert(m->len + add <= MAXS);
    if (add)
        memcpy(m->s + m->len, o->p + have, add);
    m->len += add;
}

static void push(model *m)
{
    assert(m->head + m->n < MAXP);
    m->end[m->head + m->n++] = m->len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static model m;
    static char buf[MAXS];
    memset(&m, 0, sizeof m);
    m.s = buf;
    smtp_client *c = smtp_client_new();
    assert(c);
    push(&m);   /* the greeting */
    smtp_client_mark marks[8] = { 0 };
    const char *why;
    static const char *const replies[] = { "250 ok\r\n", "354 go\r\n", "334 VXNlcg==\r\n",
                                           "220 hi\r\n", "550 no\r\n" };
    for (size_t i = 0; i + 1 < size; i += 2) {
        uint8_t op = data[i], arg = data[i + 1];
        int rc = 0, queued = 0;
        switch (op % 9) {
        case 0: rc = smtp_client_command(c, SMTP_CMD_MAIL, "a@x.test", 8, "SIZE=1", 6, &why); queued = 1; break;
        case 1: rc = smtp_client_command(c, SMTP_CMD_RCPT, "b@y.test", arg & 1 ? 9 : 8, NULL, 0, &why);
                queued = 1; break;   /* arg & 1: the length takes the NUL, a refused value */
        case 2: rc = smtp_client_command(c, arg & 1 ? SMTP_CMD_DATA : SMTP_CMD_RSET, NULL, 0, NULL, 0, &why);
                queued = 1; break;
        case 3: rc = smtp_client_auth(c, SMTP_SASL_LOGIN, "u", 1, "p", 1, NULL, 0, &why); queued = 1; break;
        case 4: rc = smtp_client_bdat(c, "chunk", arg % 6, arg & 0x80, &why); queued = 1; break;
        case 5:
            if (smtp_client_get_state(c) == SMTP_CS_BODY) {
                if (arg & 1)
                    rc = smtp_client_body_end(c, &why), queued = rc == 0;
                else
                    smtp_client_body(c, "line\n.x\r\n", 9, &why);
            }
            break;
        case 6: {   /* mark, and a rollback to it at once must succeed */
            smtp_client_mark k = smtp_client_mark_now(c);
            assert(k == m.len);
            marks[arg % 8] = k;
            assert(smtp_client_rollback(c, k, &why) == 0);
            break;
        }
        case 7: {
            smtp_client_mark k = marks[arg % 8];
            size_t before = smtp_client_output(c)->len, pend = smtp_client_pending(c);
            if (smtp_client_rollback(c, k, &why) == 0) {
                assert(k >= m.taken && k <= m.len);
                m.len = (size_t)k;
                smtp_buf *o = smtp_client_output(c);
                assert(o->len == m.len - m.taken);
                assert(o->len == 0 || !memcmp(o->p, m.s + m.taken, o->len));
                while (m.n && m.end[m.head + m.n - 1] > k)
                    m.n--;
                assert(smtp_client_pending(c) == m.n);
            } else {
                assert(why);
                assert(smtp_client_output(c)->len == before && smtp_client_pending(c) == pend);
                if (k < m.taken)
                    assert(!strcmp(why, "already written"));
            }
            break;
        }
        case 8:
            if (arg & 0x80) {   /* take some bytes */
                size_t t = arg & 0x7f;
                smtp_buf *o = smtp_client_output(c);
                t = t < o->len ? t : o->len;
                smtp_client_taken(c, t);
                m.taken += t;
            } else {            /* a server reply */
                const char *r = replies[arg % 5];
                if (smtp_client_feed(c, r, strlen(r)) < 0)
                    goto out;
                const smtp_reply *rep;
                smtp_cmd cmd;
                int got;
                while ((got = smtp_client_next(c, &rep, &cmd)) == 1) {
                    assert(m.n > 0);
                    m.head++;
                    m.n--;
                }
                if (got < 0)
                    goto out;
                if (smtp_client_get_state(c) == SMTP_CS_TLS)
                    goto out;
            }
            break;
        }
        if (queued && rc == 0) {
            sync(&m, c);
            push(&m);
        } else {
            sync(&m, c);
        }
        assert(smtp_client_pending(c) == m.n);
    }
out:
    smtp_client_free(c);
    return 0;
}
