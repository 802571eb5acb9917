# Test utility for spec/authres_spec.lua: parses Authentication-Results fields with python3-authres
# (as a mail reader would: unfolded first) and prints what it read, hex-encoded, one fact a line:
#   AR <authserv-id>   RES <method> <result> <reason|->   PROP <type> <name> <value>   END
# or ERR <message> when a field does not parse.
import re, sys
import authres, authres.dmarc

def hx(s):
    return "-" if s is None else (s.encode().hex() or "=")

for path in sys.argv[1:]:
    raw = open(path, "rb").read().decode("utf-8")
    field = re.sub(r"\r\n(?=[ \t])", "", raw).rstrip("\r\n")
    try:
        h = authres.AuthenticationResultsHeader.parse(field)
    except Exception as e:
        print("ERR", hx(str(e)))
        continue
    print("AR", hx(h.authserv_id))
    for r in h.results:
        print("RES", hx(r.method), hx(r.result), hx(r.reason))
        for p in r.properties:
            print("PROP", hx(p.type), hx(p.name), hx(p.value))
    print("END", flush=True)
