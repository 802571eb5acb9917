# Checks a TLS-RPT aggregate report (RFC 8460 §4.4) read from stdin: parses it with Python's json
# and checks each field's presence and type; prints "ok" or the first problem.
import json, re, sys

RESULT_TYPES = {"starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"}
DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def need(cond, why):
    if not cond:
        print("bad: " + why)
        sys.exit(0)


def strs(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


r = json.loads(sys.stdin.read())
need(isinstance(r, dict), "not an object")
for k in ("organization-name", "contact-info", "report-id"):
    need(isinstance(r.get(k), str) and r[k], k)
dr = r.get("date-range")
need(isinstance(dr, dict), "date-range")
for k in ("start-datetime", "end-datetime"):
    need(isinstance(dr.get(k), str) and DATETIME.match(dr[k]), "date-range " + k)
need(isinstance(r.get("policies"), list), "policies")
for p in r["policies"]:
    pol = p.get("policy")
    need(isinstance(pol, dict), "policy")
    need(pol.get("policy-type") in ("sts", "tlsa", "no-policy-found"), "policy-type")
    need(isinstance(pol.get("policy-domain"), str), "policy-domain")
    # a policy that could not be fetched or parsed has no string to quote
    no_policy = {"sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"}
    fetch_only = p.get("failure-details") and all(d.get("result-type") in no_policy for d in p["failure-details"])
    if pol["policy-type"] != "no-policy-found" and not fetch_only:
        need(strs(pol.get("policy-string")), "policy-string")
    elif "policy-string" in pol:
        need(strs(pol["policy-string"]), "policy-string")
    if "mx-host" in pol:
        need(strs(pol["mx-host"]), "mx-host")
    s = p.get("summary")
    need(isinstance(s, dict), "summary")
    for k in ("total-successful-session-count", "total-failure-session-count"):
        need(isinstance(s.get(k), int) and s[k] >= 0, k)
    total = 0
    for d in p.get("failure-details", []):
        need(d.get("result-type") in RESULT_TYPES, "result-type %r" % d.get("result-type"))
        need(isinstance(d.get("failed-session-count"), int) and d["failed-session-count"] > 0, "failed-session-count")
        total += d["failed-session-count"]
        for k in ("sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo", "receiving-ip",
                  "additional-information", "failure-reason-code"):
            if k in d:
                need(isinstance(d[k], str), k)
    need(total == s["total-failure-session-count"], "failure counts do not add up")
print("ok")
