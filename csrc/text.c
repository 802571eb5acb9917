/* Text helpers shared by the engines and the codecs (see text.h): each question -- is this UTF-8,
 * is this 8-bit, what does this base64 or xtext say -- has one answer in the whole C core. */
#include <string.h>
#include <openssl/crypto.h>
#include "text.h"

void smtp_wipe(void *p, size_t n)
{
    if (p && n)
        OPENSSL_cleanse(p, n);
}

int smtp_hexdigit(int c, smtp_hex_mode mode)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (mode == SMTP_HEX_ANY && c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

int smtp_utf8_valid(const void *p0, size_t n)
{
    const unsigned char *s = p0;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned min, cp;
        if (c < 0x80) { i++; continue; }
        /* 0xC0, 0xC1 and 0xF5.. can only start overlong or out-of-range forms */
        else if (c >= 0xC2 && c <= 0xDF) { len = 2; min = 0x80; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; min = 0x800; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; min = 0x10000; cp = c & 0x07; }
        else return 0;
        if (len > n - i)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

int smtp_has_8bit(const void *p0, size_t n)
{
    const unsigned char *s = p0;
    for (size_t i = 0; i < n; i++)
        if (s[i] >= 0x80)
            return 1;
    return 0;
}

int smtp_is_7bit(const void *p0, size_t n)
{
    const unsigned char *s = p0;
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = s[i];
        if (ch == '\n') {
            col = 0;
            continue;
        }
        if (ch == 0 || ch >= 0x80 || (ch == '\r' && (i + 1 >= n || s[i + 1] != '\n')) ||
            (ch != '\r' && ++col > 998))
            return 0;
    }
    return 1;
}

/* ---- base64 ------------------------------------------------------------------------------ */

static const char b64chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* The alphabet's values, -1 elsewhere; a constant table, so no initialization order matters. */
#define B64_ROW_NONE -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1
static const signed char b64val[256] = {
    B64_ROW_NONE, B64_ROW_NONE,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 62, -1, -1, -1, 63,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, -1, -1, -1, -1, -1, -1,
    -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
    15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, -1, -1, -1, -1, -1,
    -1, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, -1, -1, -1, -1, -1,
    B64_ROW_NONE, B64_ROW_NONE, B64_ROW_NONE, B64_ROW_NONE,
    B64_ROW_NONE, B64_ROW_NONE, B64_ROW_NONE, B64_ROW_NONE,
};

size_t smtp_b64_encoded_len(size_t n, size_t linelen)
{
    size_t len = (n + 2) / 3 * 4;
    if (linelen && len > linelen)
        len += (len - 1) / linelen * 2;
    return len;
}

size_t smtp_b64_encode(const unsigned char *in, size_t n, char *out, size_t linelen)
{
    char *o = out;
    size_t col = 0, i = 0;
    /* linelen is a multiple of 4, so a line break never falls inside a quad. */
    for (; i + 3 <= n; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        if (linelen && col == linelen) {
            *o++ = '\r'; *o++ = '\n'; col = 0;
        }
        o[0] = b64chars[v >> 18];
        o[1] = b64chars[(v >> 12) & 63];
        o[2] = b64chars[(v >> 6) & 63];
        o[3] = b64chars[v & 63];
        o += 4; col += 4;
    }
    if (i < n) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < n ? (unsigned)in[i + 1] << 8 : 0);
        if (linelen && col == linelen) {
            *o++ = '\r'; *o++ = '\n';
        }
        o[0] = b64chars[v >> 18];
        o[1] = b64chars[(v >> 12) & 63];
        o[2] = i + 1 < n ? b64chars[(v >> 6) & 63] : '=';
        o[3] = '=';
        o += 4;
    }
    return (size_t)(o - out);
}

size_t smtp_b64_decode(const char *in, size_t n, unsigned char *out, smtp_b64_mode mode)
{
    unsigned char *o = out;
    unsigned v = 0;
    int k = 0, pad = 0;
    const int mime = mode == SMTP_B64_MIME;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (mime && (ch == '\r' || ch == '\n' || ch == ' ' || ch == '\t'))
            continue;
        if (ch == '=') {
            /* padding only completes a quad that has 2 or 3 characters */
            if (k < 2 || pad + k >= 4)
                return (size_t)-1;
            pad++;
            if (k + pad == 4) {
                if (k == 2) *o++ = (unsigned char)(v >> 4);
                else { *o++ = (unsigned char)(v >> 10); *o++ = (unsigned char)(v >> 2); }
                k = 0; v = 0;
                pad = -100;   /* nothing (but MIME whitespace) may follow */
            }
            continue;
        }
        if (pad != 0 || b64val[ch] < 0)
            return (size_t)-1;
        v = v << 6 | (unsigned)b64val[ch];
        if (++k == 4) {
            *o++ = (unsigned char)(v >> 16);
            *o++ = (unsigned char)(v >> 8);
            *o++ = (unsigned char)v;
            k = 0; v = 0;
        }
    }
    if (pad > 0 || k == 1)
        return (size_t)-1;
    if (k && !mime)
        return (size_t)-1;   /* strict: the last quad must be padded */
    if (k == 2) *o++ = (unsigned char)(v >> 4);
    else if (k == 3) { *o++ = (unsigned char)(v >> 10); *o++ = (unsigned char)(v >> 2); }
    return (size_t)(o - out);
}

/* ---- xtext (RFC 3461 4) ------------------------------------------------------------------ */

static const char hexdig[] = "0123456789ABCDEF";

size_t smtp_xtext_encode(const unsigned char *in, size_t n, char *out)
{
    char *o = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = in[i];
        if (ch >= 33 && ch <= 126 && ch != '+' && ch != '=') {
            *o++ = (char)ch;
        } else {
            *o++ = '+'; *o++ = hexdig[ch >> 4]; *o++ = hexdig[ch & 15];
        }
    }
    return (size_t)(o - out);
}

size_t smtp_xtext_decode(const char *in0, size_t n, unsigned char *out)
{
    const unsigned char *in = (const unsigned char *)in0;
    unsigned char *o = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = in[i];
        if (ch < 33 || ch > 126 || ch == '=')
            return (size_t)-1;
        if (ch == '+') {
            int h, l;
            if (n - i < 3)
                return (size_t)-1;
            if ((h = smtp_hexdigit(in[i + 1], SMTP_HEX_UPPER)) < 0 ||
                (l = smtp_hexdigit(in[i + 2], SMTP_HEX_UPPER)) < 0)
                return (size_t)-1;
            *o++ = (unsigned char)(h << 4 | l);
            i += 2;
        } else {
            *o++ = ch;
        }
    }
    return (size_t)(o - out);
}
