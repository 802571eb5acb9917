# Test utility for spec/dkim_verify_spec.lua: signs and verifies with dkimpy, driven by a job
# file so that one Python process serves a whole table of cases. Lines of space-separated hex
# fields ("-" for none):
#   DNS name record                       a TXT record the dnsfunc answers
#   SIGN in out selector domain key alg canon headers length identity   (alg: rsa, rsa-sha1, ed25519)
#                                         writes dkimpy's DKIM-Signature + the message to out
#   VERIFY id path                        prints "VERIFY id r..." with 1 (pass), 0 (fail) or
#                                         E (dkimpy raised) for each signature, top first
import base64, re, sys
import dkim

def unhex(s):
    return None if s == "-" else bytes.fromhex(s)

records = {}

def dnsfunc(name, timeout=5):
    return records.get(name.rstrip(b"."))

def ed25519_seed(pem):
    der = base64.b64decode(b"".join(l for l in pem.splitlines() if not l.startswith(b"-----")))
    return base64.b64encode(der[-32:])

for line in open(sys.argv[1]):
    w = line.split()
    if not w:
        continue
    if w[0] == "DNS":
        records[unhex(w[1])] = unhex(w[2])
    elif w[0] == "SIGN":
        src, out, sel, dom, keyp, kt, canon, hdrs, length, ident = [unhex(x) for x in w[1:]]
        msg = open(src, "rb").read()
        pem = open(keyp, "rb").read()
        d = dkim.DKIM(msg)
        d.should_not_sign = set()   # let a case sign Received and the like
        if kt == b"ed25519":
            alg, key = b"ed25519-sha256", ed25519_seed(pem)
        else:
            alg, key = b"rsa-sha1" if kt == b"rsa-sha1" else b"rsa-sha256", pem
        sig = d.sign(sel, dom, key, signature_algorithm=alg, identity=ident,
                     canonicalize=tuple(canon.split(b"/")),
                     include_headers=hdrs.split(b",") if hdrs else None,
                     length=length == b"1")
        open(out, "wb").write(sig + msg)
    elif w[0] == "VERIFY":
        msg = open(unhex(w[2]), "rb").read()
        d = dkim.DKIM(msg)
        n = len([1 for k, v in d.headers if k.lower() == b"dkim-signature"])
        res = []
        for i in range(n):
            try:
                res.append("1" if dkim.DKIM(msg).verify(idx=i, dnsfunc=dnsfunc) else "0")
            except Exception:
                # dkimpy raises more than DKIMException: nacl's ValueError for an RSA-sized
                # signature under an Ed25519 key
                res.append("E")
        print(" ".join(["VERIFY", w[1]] + res), flush=True)
