# pyspf (Debian python3-spf) as the reference for spec/spf_spec.lua: its DNS pointed at the spec's
# loopback server. Reads tab-separated lines from stdin and prints one answer line per input:
#   check <name> <ip> <mail_from> <helo>  ->  <name> <result> <explanation (fail only)>
#   expand <name> <ip> <sender> <helo> <macro-string> [exp]  ->  <name> <expansion | !error>
# An empty mail_from is the null sender.
import sys
import dns.resolver

resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(sys.argv[1])
resolver.timeout = resolver.lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
dns.resolver.default_resolver = resolver

import spf  # noqa: E402  (after the resolver is in place)

for line in sys.stdin:
    f = line.rstrip("\n").split("\t")
    if f[0] == "check":
        name, ip, mail_from, helo = f[1:5]
        q = spf.query(i=ip, s=mail_from, h=helo, receiver="mx.receiver.test",
                      querytime=resolver.lifetime)
        q.set_default_explanation("DEFAULT")
        res, _code, exp = q.check()
        print("%s\t%s\t%s" % (name, res, exp if res == "fail" else ""), flush=True)
    elif f[0] == "expand":
        name, ip, sender, helo, text = f[1:6]
        q = spf.query(i=ip, s=sender, h=helo, receiver="mx.receiver.test")
        try:
            out = q.expand(text, stripdot=len(f) < 7)
        except spf.PermError as e:
            out = "!" + str(e)
        print("%s\t%s" % (name, out), flush=True)
