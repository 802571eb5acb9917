/* Text helpers with one meaning each, shared by the engines (client.c, server.c), the codecs
 * (codec.c) and their Lua bindings: hex digits, UTF-8 validation, 8-bit and 7-bit checks, base64,
 * xtext, and wiping secrets. Plain C: no Lua, no c-ares (only OpenSSL's cleanse). */
#ifndef SMTP_TEXT_H
#define SMTP_TEXT_H

#include <stddef.h>

/* Overwrites n bytes so that the compiler cannot drop the store (credentials, keys). */
void smtp_wipe(void *p, size_t n);

/* The value 0..15 of a hex digit, or -1. SMTP_HEX_UPPER takes only 0-9 A-F (xtext, RFC 3461);
 * SMTP_HEX_ANY takes a-f too (quoted-printable, RFC 2045 6.7 asks decoders to be robust). */
typedef enum { SMTP_HEX_UPPER, SMTP_HEX_ANY } smtp_hex_mode;
int smtp_hexdigit(int c, smtp_hex_mode mode);

/* 1 when p[0..n) is well-formed UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF. */
int smtp_utf8_valid(const void *p, size_t n);
/* 1 when some byte is >= 0x80. */
int smtp_has_8bit(const void *p, size_t n);
/* 1 when p can go as 7bit once bare LFs become CRLF: ASCII without NUL, CR only in CRLF, no line
 * over 998 octets. */
int smtp_is_7bit(const void *p, size_t n);

/* Base64 (RFC 4648 alphabet). With linelen > 0 (a multiple of 4), the output is cut into lines of
 * linelen characters joined by CRLF, with no CRLF after the last line; feeding blocks whose size
 * is a multiple of linelen/4*3 and joining the outputs with CRLF gives the same bytes as encoding
 * the whole. */
size_t smtp_b64_encoded_len(size_t n, size_t linelen);
size_t smtp_b64_encode(const unsigned char *in, size_t n, char *out, size_t linelen);

/* One decoder, two modes, because the two users differ in what the standards give them:
 * - SMTP_B64_STRICT: exactly the RFC 4648 form: whole quads, '=' padding required, no other
 *   character (not even a space or line break). SASL (RFC 4954 4) has the server reject a
 *   response that is not valid base64 with 501, and a credential must have one spelling only.
 *   The AUTH server and the client's CRAM-MD5 challenge use it.
 * - SMTP_B64_MIME: a MIME body part (RFC 2045 6.8) is broken into lines, so CR, LF, space and
 *   tab are skipped; a missing final padding is accepted (as common decoders do). core.b64decode.
 * In both modes a character outside the alphabet, '=' anywhere but closing a quad of 2 or 3
 * characters, data after the padding, or a single dangling character fails.
 * Returns the decoded length, or (size_t)-1. out holds n/4*3+3 bytes. */
typedef enum { SMTP_B64_STRICT, SMTP_B64_MIME } smtp_b64_mode;
size_t smtp_b64_decode(const char *in, size_t n, unsigned char *out, smtp_b64_mode mode);

/* xtext (RFC 3461 4): '+', '=', and bytes outside 33..126 become "+XX" with upper-case hex.
 * out holds 3n bytes. */
size_t smtp_xtext_encode(const unsigned char *in, size_t n, char *out);
/* Decoding takes exactly RFC 3461's grammar: xchar (33..126 but '+' and '=') or '+' and two
 * upper-case hex digits. Lower-case hex is refused, not folded: no conforming encoder writes it,
 * and an ENVID or ORCPT is passed on (in DSNs, to the next hop) as written, so a value must have
 * one spelling. Any decoded byte is allowed (callers that store the value refuse controls
 * themselves). Returns the decoded length or (size_t)-1; out holds n bytes. */
size_t smtp_xtext_decode(const char *in, size_t n, unsigned char *out);

#endif
