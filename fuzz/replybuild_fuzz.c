/* libFuzzer harness for reply building: the server engine's replies made from a code, an
 * enhanced code and a text that the application gives (smtp_server_decide for MAIL, RCPT, the
 * message and AUTH; smtp_server_shutdown) and from a configured host name (greeting, EHLO).
 * (csrc/reply.c only parses replies: reply_fuzz.c covers it.) Inputs keep to what the Lua binding
 * lets through (server_lua.c: code 200..599, no CR or LF in the text, an enhanced code of at most
 * 12 bytes without CR, LF or space); the harness checks that every output line is a well-formed
 * reply line, that a refusal carries the code, enhanced code and text asked for, and that a text
 * is cut only where the line reaches its cap.
 * Input: host name length and bytes, then one decision record per decision the session asks for:
 * flags (accept, code, enhanced, text given), code (2 bytes), enhanced (length, bytes), text
 * (length in 2 bytes, bytes). The last record also answers shutdown. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "server.h"

#define LINE_CAP 597 /* longest reply line without CRLF: the engine's 600-byte line buffer */

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static uint8_t byte(input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

/* A NUL-terminated string of up to `len` bytes from the input (a NUL in it ends it early). */
static size_t take_str(input *in, char *dst, size_t len)
{
    size_t i = 0;
    while (i < len && in->n)
        dst[i++] = (char)byte(in);
    dst[i] = 0;
    return strlen(dst);
}

static void check_lines(const char *out, size_t n)
{
    size_t i = 0;
    while (i < n) {
        const char *lf = memchr(out + i, '\n', n - i);
        assert(lf);
        size_t len = (size_t)(lf - (out + i));
        assert(len >= 4 && out[i + len - 1] == '\r');
        assert(len - 1 <= LINE_CAP);
        for (int j = 0; j < 3; j++)
            assert(out[i + j] >= '0' && out[i + j] <= '9');
        assert(out[i] >= '2' && out[i] <= '5');
        assert(out[i + 3] == ' ' || out[i + 3] == '-');
        for (size_t j = 0; j + 1 < len; j++)
            assert(out[i + j] != '\r' && out[i + j] != '\n' && out[i + j] != 0);
        i += len + 1;
    }
}

typedef struct {
    int accept, code;
    const char *enh, *text;
    char enh_buf[16], text_buf[1100];
} verdict;

static void read_verdict(input *in, verdict *v)
{
    uint8_t f = byte(in);
    v->accept = f & 1;
    unsigned c = (unsigned)byte(in) << 8;
    c |= byte(in);
    v->code = (f & 2) ? (int)(200 + c % 400) : 0;
    size_t el = take_str(in, v->enh_buf, byte(in) % 16);
    v->enh = (f & 4) ? v->enh_buf : NULL;
    /* what the binding refuses never reaches the engine */
    if (v->enh && (el > 12 || strpbrk(v->enh, "\r\n ")))
        v->enh = NULL;
    size_t tl = ((size_t)byte(in) << 8 | byte(in)) % 1024;
    take_str(in, v->text_buf, tl);
    v->text = (f & 8) ? v->text_buf : NULL;
    if (v->text && strpbrk(v->text, "\r\n"))
        v->text = NULL;
}

/* The first reply line in out[0..n): its code, enhanced code and text say what was asked. */
static void check_verdict(const char *out, size_t n, const verdict *v, int default_accept_code)
{
    assert(n >= 6);
    const char *lf = memchr(out, '\n', n);
    size_t len = (size_t)(lf - out) - 1; /* without CRLF */
    int code = (out[0] - '0') * 100 + (out[1] - '0') * 10 + (out[2] - '0');
    if (v->accept) {
        assert(code == default_accept_code);
        return;
    }
    if (v->code)
        assert(code == v->code);
    size_t pos = 4;
    if (v->enh) {
        size_t el = strlen(v->enh);
        assert(len >= pos + el + 1 && memcmp(out + pos, v->enh, el) == 0 && out[pos + el] == ' ');
        pos += el + 1;
    } else { /* the engine's default enhanced code for the event */
        const char *sp = memchr(out + pos, ' ', len - pos);
        assert(sp && sp - (out + pos) >= 5);
        pos = (size_t)(sp - out) + 1;
    }
    if (v->text) {
        size_t tl = strlen(v->text), shown = len - pos;
        assert(shown <= tl && memcmp(out + pos, v->text, shown) == 0);
        assert(shown == tl || len == LINE_CAP); /* cut only at the cap */
    }
}

static void take_output(smtp_server *s, char **buf, size_t *len)
{
    size_t n;
    const char *o;
    *len = 0;
    while ((o = smtp_server_output(s, &n)) != NULL && n) {
        *buf = realloc(*buf, *len + n + 1);
        assert(*buf);
        memcpy(*buf + *len, o, n);
        *len += n;
        smtp_server_output_done(s, n);
    }
}

static const char SCRIPT[] =
    "AUTH PLAIN AHUAcA==\r\n"
    "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\nx\r\n.\r\n"
    "RSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 1 LAST\r\ny";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = { data, size };
    char host[80];
    take_str(&in, host, byte(&in) % 72);
    smtp_server_config c;
    memset(&c, 0, sizeof c);
    c.hostname = host;
    c.auth_enabled = c.auth_plaintext = 1;
    c.hook_mail = c.hook_rcpt = 1;
    c.max_errors = 1000;
    smtp_server *s = smtp_server_new(&c);
    assert(s);
    char *out = NULL;
    size_t olen;
    int rounds = 0;
    verdict v;
    memset(&v, 0, sizeof v);
    smtp_server_feed(s, "EHLO client.test\r\n", 18);
    /* one round of the script per 64 input bytes, at least one, at most 16 */
    int want = 1 + (int)(size / 64);
    while (rounds < (want < 16 ? want : 16) && !smtp_server_closed(s)) {
        rounds++;
        size_t off = 0;
        while (off < sizeof SCRIPT - 1 && !smtp_server_closed(s)) {
            off += smtp_server_feed(s, SCRIPT + off, sizeof SCRIPT - 1 - off);
            smtp_server_event ev;
            int kind;
            while ((kind = smtp_server_next(s, &ev)) != SMTP_SRV_NONE) {
                if (kind == SMTP_SRV_CLOSE || kind == SMTP_SRV_STARTTLS)
                    break;
                int accept_code;
                if (kind == SMTP_SRV_MAIL || kind == SMTP_SRV_RCPT)
                    accept_code = 250;
                else if (kind == SMTP_SRV_AUTH)
                    accept_code = 235;
                else if (kind == SMTP_SRV_END && ev.code == 0)
                    accept_code = 250;
                else
                    continue;
                take_output(s, &out, &olen);
                check_lines(out, olen);
                read_verdict(&in, &v);
                assert(smtp_server_decide(s, v.accept, v.code, v.enh, v.text) == 0);
                take_output(s, &out, &olen);
                check_lines(out, olen);
                check_verdict(out, olen, &v, accept_code);
            }
            take_output(s, &out, &olen);
            check_lines(out, olen);
        }
    }
    /* shutdown with the last record's code (a 4xx or 5xx: it closes), enhanced code and text */
    read_verdict(&in, &v);
    v.accept = 0;
    v.code = v.code ? 400 + v.code % 200 : 421;
    int was_closed = smtp_server_closed(s);
    smtp_server_shutdown(s, v.code, v.enh ? v.enh : "4.3.2", v.text ? v.text : "Bye");
    take_output(s, &out, &olen);
    check_lines(out, olen);
    if (!was_closed) {
        if (!v.enh)
            v.enh = "4.3.2";
        if (!v.text)
            v.text = "Bye";
        check_verdict(out, olen, &v, 0);
        assert(smtp_server_closed(s));
    } else {
        assert(olen == 0);
    }
    free(out);
    smtp_server_free(s);
    return 0;
}
