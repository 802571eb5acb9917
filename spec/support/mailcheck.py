#!/usr/bin/python3
# Parses messages with Python's email package (policy.default) and prints what a mail reader sees,
# one fact per line with values hex-encoded, for spec/support/message.lua to compare in Lua.
#   MSG <path> / DEFECT <hex text> / HDR <name> <hex decoded value> / ADDR <field> <hex name> <hex addr>
#   PART <hex content-type> <hex disposition|-> <hex filename|-> <hex cid|-> <hex content> / END
# Optional DKIM check: "--dkim <dns record>" verifies each message with dkimpy (VERIFY 1|0).
import sys
import email
import email.policy
from email.parser import BytesParser


def h(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        x = x.encode("utf-8", "surrogateescape")
    return x.hex() or "="


def allowed(d, header=None):
    # Python's own complaint about an RFC 2047 word inside a quoted name= parameter (the word
    # ends at the closing quote, with no whitespace after it)
    return header == "Content-Type" and ("encoded-word" in str(d) or "encoded word" in str(d))


def defects(part, out):
    for d in part.defects:
        if not allowed(d):
            out.append(type(d).__name__ + ": " + str(d))
    for k, v in part.items():
        for d in getattr(v, "defects", ()):
            if not allowed(d, k):
                out.append(k + ": " + type(d).__name__ + ": " + str(d))


def main():
    args = sys.argv[1:]
    dns = None
    if args and args[0] == "--dkim":
        dns = args[1].encode()
        args = args[2:]
        import dkim
    for path in args:
        raw = open(path, "rb").read()
        print("MSG", path)
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        ds = []
        for part in msg.walk():
            defects(part, ds)
        for d in ds:
            print("DEFECT", h(d))
        for name in ("subject", "from", "to", "cc", "reply-to", "sender", "message-id", "date",
                     "x-test", "bcc", "in-reply-to", "references", "list-id", "list-unsubscribe",
                     "list-unsubscribe-post"):
            for v in msg.get_all(name) or []:
                print("HDR", name, h(str(v)))
                for a in getattr(v, "addresses", ()):
                    print("ADDR", name, h(a.display_name or ""), h(a.addr_spec))
        print("TYPE", msg.get_content_type())
        for part in msg.walk():
            if part.is_multipart():
                print("MULTI", part.get_content_type())
                continue
            ct = part.get_content_type()
            disp = part.get_content_disposition()
            if ct.startswith("text/") and disp != "attachment":
                content = part.get_content().replace("\r\n", "\n")
            else:
                content = part.get_payload(decode=True)
            print("PART", h(ct), h(disp), h(part.get_filename()), h(part.get("content-id")),
                  h(content))
        if dns is not None:
            ok = dkim.verify(raw, dnsfunc=lambda name, timeout=5: dns)
            print("VERIFY", 1 if ok else 0)
        print("END")


main()
