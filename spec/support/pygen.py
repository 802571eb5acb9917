#!/usr/bin/python3
# Writes a deterministic corpus of varied MIME messages built with Python's email package
# (email.mime classes and EmailMessage) into a directory, one file each, for spec/parse_spec.lua:
#   pygen.py <dir> [count]
# Shapes: text in many charsets (iso-2022-jp, shift_jis, euc-jp, koi8-r, windows-1252, ...) and
# transfer encodings, encoded subjects, alternative/related/mixed/digest nesting, message/rfc822
# attachments, RFC 2231 file names, binary attachments, preambles, epilogues, "--" body lines.
import random
import sys
from email import policy
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.image import MIMEImage
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.header import Header

TEXTS = [
    ("utf-8", "Grüße aus Köln — naïve café, ☃ and 日本語\n"),
    ("iso-8859-1", "Ça va? Déjà vu, façade, Latin-1 ÿ\n"),
    ("iso-8859-15", "Prix: 10 € (euro sign in latin-9)\n"),
    ("windows-1252", "“Smart quotes” – dashes — and … ellipsis €\n"),
    ("koi8-r", "Привет, мир! Съешь же ещё этих мягких булок.\n"),
    ("windows-1251", "Широкая электрификация южных губерний\n"),
    ("iso-2022-jp", "こんにちは、世界。メールのテストです。\n"),
    ("shift_jis", "日本語のテキスト、シフトJIS。\n"),
    ("euc-jp", "東京都の天気は晴れです。\n"),
    ("gb2312", "中文邮件测试，你好。\n"),
    ("big5", "繁體中文郵件測試。\n"),
    ("euc-kr", "안녕하세요 메일 테스트\n"),
    ("iso-8859-7", "Καλημέρα κόσμε\n"),
    ("us-ascii", "Plain ASCII text.\n-- \nsignature line\n--not a boundary\n"),
]

NAMES = ["report.pdf", "résumé.docx", "日本語のファイル名.txt", "a very long file name that certainly "
         "needs rfc 2231 continuations because it is longer than seventy-eight characters.bin",
         "données;été=chaud.csv", "plain.txt"]


def body(rng, cs, text):
    lines = [text] * rng.randint(1, 4)
    if rng.random() < 0.3:
        lines.append("x" * rng.randint(70, 200) + "\n")
    return "".join(lines)


def text_part(rng):
    cs, text = rng.choice(TEXTS)
    sub = rng.choice(["plain", "plain", "html"])
    t = body(rng, cs, text)
    if sub == "html":
        t = "<p>" + t.replace("\n", "<br>\n") + "</p>\n"
    if rng.random() < 0.25 and cs == "utf-8":
        m = EmailMessage(policy=policy.SMTP)
        m.set_content(t, subtype=sub, cte=rng.choice(["quoted-printable", "base64", "8bit"]))
        return m
    if rng.random() < 0.4:
        # the charset as labelled, not the one Python's Charset table would convert it to
        # (MIMEText turns shift_jis and euc-jp into iso-2022-jp)
        from email import encoders
        p = MIMEBase("text", sub, charset=cs)
        p.set_payload(t.encode(cs))
        cte = rng.choice(["base64", "quoted-printable", "8bit"])
        if cte == "base64":
            encoders.encode_base64(p)
        elif cte == "quoted-printable":
            import quopri
            p.set_payload(quopri.encodestring(t.encode(cs)).decode("ascii"))
            p["Content-Transfer-Encoding"] = "quoted-printable"
        else:
            p["Content-Transfer-Encoding"] = "8bit"
        return p
    return MIMEText(t, sub, cs)


def attachment(rng):
    name = rng.choice(NAMES)
    kind = rng.randint(0, 3)
    data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
    if kind == 0:
        p = MIMEApplication(data, "octet-stream")
    elif kind == 1:
        p = MIMEImage(b"\x89PNG\r\n\x1a\n" + data, "png")
    elif kind == 2:
        cs, text = rng.choice(TEXTS)
        p = MIMEText(body(rng, cs, text), "plain", cs)
    else:
        p = MIMEBase("application", "x-custom")
        p.set_payload(data)
        from email import encoders
        encoders.encode_base64(p)
    if rng.random() < 0.5 and not name.isascii():
        p.add_header("Content-Disposition", "attachment", filename=("utf-8", "", name))
    else:
        p.add_header("Content-Disposition", rng.choice(["attachment", "inline"]), filename=name)
    return p


def headers(rng, m, depth):
    cs, text = rng.choice(TEXTS)
    subj = " ".join(text.split())[:40]
    try:
        m["Subject"] = Header(subj, cs) if rng.random() < 0.7 else subj
    except Exception:
        m["Subject"] = subj
    m["From"] = "Ann <ann@example.com>"
    m["To"] = "bob@example.org"
    m["X-Depth"] = str(depth)
    if rng.random() < 0.3:
        m["X-Long"] = " ".join("word%d" % i for i in range(rng.randint(10, 60)))


def tree(rng, depth):
    r = rng.random()
    if depth >= 3 or r < 0.3:
        return text_part(rng) if rng.random() < 0.7 else attachment(rng)
    if r < 0.45:
        alt = MIMEMultipart("alternative")
        alt.attach(MIMEText("plain version\n", "plain", "utf-8"))
        alt.attach(MIMEText("<p>html version</p>\n", "html", "utf-8"))
        return alt
    if r < 0.55:
        rel = MIMEMultipart("related")
        rel.attach(MIMEText("<img src=cid:img1@x>\n", "html", "utf-8"))
        img = MIMEImage(b"GIF89a" + bytes(range(256)), "gif")
        img.add_header("Content-ID", "<img1@x>")
        rel.attach(img)
        return rel
    if r < 0.65:
        inner = MIMEMultipart("mixed")
        headers(rng, inner, depth + 1)
        inner.attach(text_part(rng))
        return MIMEMessage(inner)
    if r < 0.7:
        dig = MIMEMultipart("digest")
        for _ in range(rng.randint(1, 3)):
            im = MIMEText("digest member\n", "plain", "utf-8")
            headers(rng, im, depth + 1)
            dig.attach(MIMEMessage(im))
        return dig
    m = MIMEMultipart(rng.choice(["mixed", "mixed", "alternative", "report"]))
    for _ in range(rng.randint(1, 4)):
        m.attach(tree(rng, depth + 1))
    if rng.random() < 0.3:
        m.preamble = "This is a multi-part message in MIME format.\n-- not a boundary"
    if rng.random() < 0.3:
        m.epilogue = "epilogue text\n"
    return m


def main():
    out = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rng = random.Random(17)
    for i in range(count):
        m = tree(rng, 0)
        headers(rng, m, 0)
        pol = rng.choice([policy.compat32, policy.compat32.clone(linesep="\r\n")])
        raw = m.as_bytes(policy=pol)
        with open("%s/py%03d.eml" % (out, i), "wb") as f:
            f.write(raw)


main()
