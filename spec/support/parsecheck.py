#!/usr/bin/python3
# Reads messages with Python's email package (policy.default) and prints each one's tree as
# spec/parse_spec.lua compares it with smtp.message.parse: one fact per line, values hex-encoded.
#   MSG <path> / DEFECT <class name> / HDR <hex name> <hex decoded value>
#   NODE <multi 0|1> <hex type> <hex disposition|-> <hex filename|-> <hex cid|-> <hex charset|->
#        <hex decoded content|-> <hex text|-|!>     (! : Python cannot name the charset)
#   END
import sys
import email
import email.policy
from email.parser import BytesParser


def h(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        x = x.encode("utf-8", "surrogatepass")
    return x.hex() or "="


def main():
    for path in sys.argv[1:]:
        raw = open(path, "rb").read()
        print("MSG", path)
        msg = BytesParser(policy=email.policy.default).parsebytes(raw)
        for part in msg.walk():
            for d in part.defects:
                print("DEFECT", type(d).__name__)
        for name, value in msg.items():
            try:
                v = str(value)
            except Exception:   # a header Python's policy cannot render
                v = None
            print("HDR", h(name), h(v))
        for part in msg.walk():
            multi = part.is_multipart()
            content = text = None
            if not multi:
                content = part.get_payload(decode=True)
                if part.get_content_maintype() == "text":
                    try:
                        text = part.get_content()
                    except LookupError:
                        text = "!"
            cid = part.get("content-id")
            print("NODE", 1 if multi else 0, h(part.get_content_type()),
                  h(part.get_content_disposition()), h(part.get_filename()),
                  h(str(cid).strip() if cid is not None else None),
                  h(part.get_param("charset")) if not multi else "-",
                  h(content), "21" if text == "!" else h(text))
        print("END")


main()
