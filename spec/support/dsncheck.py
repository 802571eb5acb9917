# Reads a delivery status notification (RFC 3464) on stdin with Python's email package and prints
# what spec/dsn_spec.lua compares, one tab-separated record a line: the types of the parts, the
# per-message and per-recipient fields of the message/delivery-status part (which Python parses
# into blocks of fields), the headers part, the defects. Values have no tabs or line ends.
import email, email.policy, sys

def clean(s):
    return " ".join(str(s).split())

raw = sys.stdin.buffer.read()
m = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
print("type\t" + m.get_content_type())
print("report-type\t" + clean(m.get_param("report-type")))
for k in ("Subject", "To", "From", "Auto-Submitted"):
    print("header\t%s\t%s" % (k, clean(m[k])))
for d in m.defects:
    print("defect\t" + type(d).__name__)
for p in m.get_payload():
    print("part\t" + p.get_content_type())
    for d in p.defects:
        print("defect\t" + type(d).__name__)
    if p.get_content_type() == "message/delivery-status":
        blocks = p.get_payload()
        for k, v in blocks[0].items():
            print("msg\t%s\t%s" % (k, clean(v)))
        for i, b in enumerate(blocks[1:]):
            for k, v in b.items():
                print("rcpt\t%d\t%s\t%s" % (i + 1, k, clean(v)))
    elif p.get_content_type() == "text/rfc822-headers":
        for line in p.get_payload().splitlines():
            if line:
                print("orig\t" + clean(line))
    elif p.get_content_type() == "text/plain":
        print("text\t" + clean(p.get_payload(decode=True).decode("utf-8")))
