-- smtp.spf: every mechanism, qualifier, modifier, macro and limit of RFC 7208, checked against
-- pyspf (Debian python3-spf) with both asking the same dnsmasq on loopback; then what only our
-- API shows (the matched mechanism, counts, explanations, misuse, temperror, the time limit)
-- through an injected resolver.
local helper = require "helper"
local peers = require "support.dnsmasq"
local spf = require "smtp.spf"

local V4, V4X, V4P, V4Q = "192.0.2.10", "192.0.2.99", "192.0.2.20", "192.0.2.21"
local V6, V6X, V6P = "2001:db8::10", "2001:db8:1::10", "2001:db8::20"

local function txt(name, text) return "--txt-record=" .. name .. "," .. text end
local function host(name, ...) return "--host-record=" .. table.concat({ name, ... }, ",") end

-- The policies. dnsmasq splits a TXT argument at commas into character-strings, so none of the
-- texts has one except split.test, which is about exactly that.
local ZONE = {
  txt("pass-all.test", "v=spf1 +all"), txt("fail-all.test", "v=spf1 -all"),
  txt("soft-all.test", "v=spf1 ~all"), txt("neutral-all.test", "v=spf1 ?all"),
  txt("empty.test", "v=spf1"), txt("case.test", "V=SPF1 IP4:192.0.2.10 -ALL"),
  txt("spaces.test", "v=spf1   ip4:192.0.2.10    -all   "),
  txt("ip4.test", "v=spf1 ip4:192.0.2.0/24 -all"), txt("ip4-host.test", "v=spf1 ip4:192.0.2.10 -all"),
  txt("ip4-zero.test", "v=spf1 ip4:10.0.0.0/0 -all"),
  txt("ip6.test", "v=spf1 ip6:2001:db8::/48 -all"), txt("ip6-host.test", "v=spf1 ip6:2001:db8::10 ~all"),
  txt("a.test", "v=spf1 a -all"), host("a.test", V4, V6),
  txt("a-other.test", "v=spf1 a:host.a-other.test -all"), host("host.a-other.test", V4),
  txt("a-cidr.test", "v=spf1 a:net.a-cidr.test/24 -all"), host("net.a-cidr.test", "192.0.2.1"),
  txt("a-dual.test", "v=spf1 a:net.a-dual.test/24//64 -all"), host("net.a-dual.test", "192.0.2.1", "2001:db8::1"),
  txt("a-v6cidr.test", "v=spf1 a:net.a-dual.test//64 -all"),
  txt("a-v6only.test", "v=spf1 a:v6.a-v6only.test -all"), host("v6.a-v6only.test", V6),
  txt("mx.test", "v=spf1 mx -all"), "--mx-host=mx.test,mail.mx.test,10", host("mail.mx.test", V4, V6),
  txt("mx-cidr.test", "v=spf1 mx/24 -all"), "--mx-host=mx-cidr.test,mail.mx-cidr.test,10",
  host("mail.mx-cidr.test", "192.0.2.1"),
  txt("mx-other.test", "v=spf1 mx:mx.test -all"),
  txt("mx-second.test", "v=spf1 mx -all"), "--mx-host=mx-second.test,one.mx-second.test,10",
  "--mx-host=mx-second.test,two.mx-second.test,20", host("one.mx-second.test", "192.0.2.77"),
  host("two.mx-second.test", V4),
  txt("mx-null.test", "v=spf1 mx -all"), "--mx-host=mx-null.test,.,0",
  txt("mx-none.test", "v=spf1 mx ?all"),
  txt("mx-many.test", "v=spf1 mx -all"),
  txt("ptr.test", "v=spf1 ptr -all"), "--ptr-record=20.2.0.192.in-addr.arpa,mail.ptr.test",
  host("mail.ptr.test", V4P, V6P), "--ptr-record=21.2.0.192.in-addr.arpa,mail.ptr.test",
  txt("ptr-other.test", "v=spf1 ptr:ptr.test -all"),
  txt("exists.test", "v=spf1 exists:%{i}.allow.exists.test -all"), host("192.0.2.10.allow.exists.test", "127.0.0.2"),
  txt("exists-l.test", "v=spf1 exists:%{l}.users.exists-l.test -all"), host("alice.users.exists-l.test", "127.0.0.2"),
  txt("exists-ir.test", "v=spf1 -exists:%{ir}.%{v}.block.exists-ir.test +all"),
  host("10.2.0.192.in-addr.block.exists-ir.test", "127.0.0.2"),
  txt("exists-a.test", "v=spf1 exists:yes.exists-a.test -all"), host("yes.exists-a.test", "127.0.0.2"),
  txt("email.macro.test", "v=spf1 exists:%{lr-}.lp.%{ir}.%{v}._spf.%{d2} -all"),
  host("bad.strong.lp.10.2.0.192.in-addr._spf.macro.test", "127.0.0.2"),
  txt("d-macro.test", "v=spf1 exists:%{d1r}.%{o}.%{h}.dm.test -all"), host("d-macro.d-macro.test.helo.test.dm.test", "127.0.0.2"),
  txt("pmacro.test", "v=spf1 exists:%{p}.ok.pmacro.test -all"), host("mail.ptr.test.ok.pmacro.test", "127.0.0.2"),
  txt("include-pass.test", "v=spf1 include:pass-all.test -all"),
  txt("include-fail.test", "v=spf1 include:fail-all.test ~all"),
  txt("include-soft.test", "v=spf1 include:soft-all.test -all"),
  txt("include-neutral.test", "v=spf1 include:neutral-all.test -all"),
  txt("include-none.test", "v=spf1 include:nospf.test -all"), host("nospf.test", V4),
  txt("include-nx.test", "v=spf1 include:nx.test -all"),
  txt("include-perm.test", "v=spf1 include:syn-mech.test +all"),
  txt("include-temp.test", "v=spf1 include:x.broken.test -all"),
  txt("include-loop.test", "v=spf1 include:include-loop.test -all"),
  txt("include-uscore.test", "v=spf1 include:_spf.uscore.test -all"), txt("_spf.uscore.test", "v=spf1 ip4:192.0.2.10 -all"),
  txt("include-ip.test", "v=spf1 include:ip4.test ?all"),
  txt("redirect.test", "v=spf1 redirect=ip4.test"),
  txt("redirect-none.test", "v=spf1 redirect=nospf.test"),
  txt("redirect-ignored.test", "v=spf1 -all redirect=pass-all.test"),
  txt("redirect-exp.test", "v=spf1 exp=why.exp.test redirect=exp-target.test"),
  txt("exp-target.test", "v=spf1 -all exp=other.exp.test"), txt("other.exp.test", "the redirect target says no"),
  txt("redirect-noexp.test", "v=spf1 exp=why.exp.test redirect=fail-all.test"),
  txt("exp.test", "v=spf1 -all exp=why.exp.test"),
  txt("why.exp.test", "%{i} is not one of %{d}'s designated mail servers"),
  txt("exp-macros.test", "v=spf1 -all exp=macros.exp.test"),
  txt("macros.exp.test", "%{c} asked %{r} for %{s} (%{l} at %{o} via %{h}): %% %_%- %{d2} %{ir}"),
  txt("exp-multi.test", "v=spf1 -all exp=multi.exp.test"), txt("multi.exp.test", "one"), txt("multi.exp.test", "two"),
  txt("exp-nx.test", "v=spf1 -all exp=nx.exp.test"),
  txt("exp-syntax.test", "v=spf1 -all exp=bad.exp.test"), txt("bad.exp.test", "bad %{x} macro"),
  txt("exp-soft.test", "v=spf1 ~all exp=why.exp.test"),
  txt("exp-include.test", "v=spf1 include:exp.test -all"),
  txt("lim10.test", "v=spf1 a a a a a a a a a a ip4:192.0.2.10 -all"), host("lim10.test", "192.0.2.1"),
  txt("lim11.test", "v=spf1 a a a a a a a a a a a ip4:192.0.2.10 -all"), host("lim11.test", "192.0.2.1"),
  txt("lim-inc.test", "v=spf1 a include:lim-inc2.test ip4:192.0.2.10 -all"), host("lim-inc.test", "192.0.2.1"),
  txt("lim-inc2.test", "v=spf1 a a a a a a a a"), host("lim-inc2.test", "192.0.2.1"),
  txt("lim-inc11.test", "v=spf1 a include:lim-inc2.test a ip4:192.0.2.10 -all"), host("lim-inc11.test", "192.0.2.1"),
  txt("lim-match-first.test", "v=spf1 ip4:192.0.2.10 a a a a a a a a a a a -all"), host("lim-match-first.test", "192.0.2.1"),
  txt("void2.test", "v=spf1 a:nx1.test a:nx2.test -all"),
  txt("void3.test", "v=spf1 a:nx1.test a:nx2.test a:nx3.test -all"),
  txt("void-nodata.test", "v=spf1 a:nospf-v6.test mx:nospf.test exists:nx4.test -all"), host("nospf-v6.test", V6),
  txt("multi.test", "v=spf1 +all"), txt("multi.test", "v=spf1 -all"),
  txt("mixed.test", "hello world"), txt("mixed.test", "v=spf1 ip4:192.0.2.10 -all"), txt("mixed.test", "v=spf10 -all"),
  txt("spf10.test", "v=spf10 +all"),
  txt("split.test", "v=spf1 ip4:192.0.2.0/24, -all"),
  txt("syn-ip4.test", "v=spf1 ip4:192.0.2.300 -all"), txt("syn-mech.test", "v=spf1 foo:bar -all"),
  txt("syn-cidr.test", "v=spf1 ip4:192.0.2.0/33 -all"), txt("syn-cidr6.test", "v=spf1 a//129 -all"),
  txt("syn-exp2.test", "v=spf1 -all exp=a.test exp=b.test"),
  txt("syn-redirect2.test", "v=spf1 redirect=a.test redirect=b.test"),
  txt("syn-a-ip.test", "v=spf1 a:192.0.2.10 -all"), txt("syn-macro.test", "v=spf1 exists:%{z}.x.test -all"),
  txt("syn-pct.test", "v=spf1 exists:%(i).x.test -all"), txt("syn-crt.test", "v=spf1 exists:%{c}.x.test -all"),
  txt("syn-all.test", "v=spf1 -all:foo"), txt("syn-late.test", "v=spf1 +all foo:bar"),
  txt("syn-include-empty.test", "v=spf1 include: -all"), txt("syn-qual.test", "v=spf1 !all"),
  txt("syn-ptr-cidr.test", "v=spf1 ptr/24 -all"), txt("syn-toplabel.test", "v=spf1 a:foo.123 -all"),
  txt("syn-delim.test", "v=spf1 exists:%{d2a}.x.test -all"),
  txt("syn-unterminated.test", "v=spf1 exists:%{d.x.test -all"),
  txt("syn-zero.test", "v=spf1 exists:%{d0}.x.test -all"),
  txt("syn-lead0.test", "v=spf1 ip4:192.0.2.0/024 -all"),
  txt("unknown-mod.test", "v=spf1 foo=bar ip4:192.0.2.10 -all"),
  txt("helo.test", "v=spf1 a -all"), host("helo.test", V4),
  "--server=/broken.test/127.0.0.1#9",
  "--local=/in-addr.arpa/", "--local=/ip6.arpa/",
}
for i = 1, 11 do
  ZONE[#ZONE + 1] = ("--mx-host=mx-many.test,m%d.mx-many.test,%d"):format(i, i)
  ZONE[#ZONE + 1] = host(("m%d.mx-many.test"):format(i), V4)
end

-- { name, ip, mail_from, helo, expected result } (the expected result is what RFC 7208 says;
-- pyspf must say the same). The limit for a whole check is 30 s (slow runs under valgrind must
-- not turn into temperrors), 2 s where the answer is a timeout.
local CASES = {
  { "pass-all", V4, "u@pass-all.test", "h.test", "pass" },
  { "fail-all", V4, "u@fail-all.test", "h.test", "fail" },
  { "softfail-all", V4, "u@soft-all.test", "h.test", "softfail" },
  { "neutral-all", V4, "u@neutral-all.test", "h.test", "neutral" },
  { "empty record", V4, "u@empty.test", "h.test", "neutral" },
  { "upper case record", V4, "u@case.test", "h.test", "pass" },
  { "extra spaces", V4, "u@spaces.test", "h.test", "pass" },
  { "ip4 net", V4, "u@ip4.test", "h.test", "pass" },
  { "ip4 net miss", "198.51.100.1", "u@ip4.test", "h.test", "fail" },
  { "ip4 host", V4, "u@ip4-host.test", "h.test", "pass" },
  { "ip4 host miss", V4X, "u@ip4-host.test", "h.test", "fail" },
  { "ip4 /0", V4, "u@ip4-zero.test", "h.test", "pass" },
  { "ip4 from IPv6", V6, "u@ip4.test", "h.test", "fail" },
  { "ip4 from IPv4-mapped IPv6", "::ffff:192.0.2.10", "u@ip4.test", "h.test", "pass" },
  { "ip6 net", V6, "u@ip6.test", "h.test", "pass" },
  { "ip6 net miss", V6X, "u@ip6.test", "h.test", "fail" },
  { "ip6 from IPv4", V4, "u@ip6.test", "h.test", "fail" },
  { "ip6 host softfail", V6X, "u@ip6-host.test", "h.test", "softfail" },
  { "ip6 host", V6, "u@ip6-host.test", "h.test", "pass" },
  { "a", V4, "u@a.test", "h.test", "pass" },
  { "a IPv6", V6, "u@a.test", "h.test", "pass" },
  { "a miss", V4X, "u@a.test", "h.test", "fail" },
  { "a:other", V4, "u@a-other.test", "h.test", "pass" },
  { "a/24", V4, "u@a-cidr.test", "h.test", "pass" },
  { "a/24 miss", "192.0.3.1", "u@a-cidr.test", "h.test", "fail" },
  { "a/24//64 IPv4", V4, "u@a-dual.test", "h.test", "pass" },
  { "a/24//64 IPv6", V6, "u@a-dual.test", "h.test", "pass" },
  { "a/24//64 IPv6 miss", V6X, "u@a-dual.test", "h.test", "fail" },
  { "a//64 IPv4 exact only", V4, "u@a-v6cidr.test", "h.test", "fail" },
  { "a//64 IPv6", V6, "u@a-v6cidr.test", "h.test", "pass" },
  { "a AAAA only, IPv4 client", V4, "u@a-v6only.test", "h.test", "fail" },
  { "a AAAA only, IPv6 client", V6, "u@a-v6only.test", "h.test", "pass" },
  { "mx", V4, "u@mx.test", "h.test", "pass" },
  { "mx IPv6", V6, "u@mx.test", "h.test", "pass" },
  { "mx miss", V4X, "u@mx.test", "h.test", "fail" },
  { "mx/24", V4, "u@mx-cidr.test", "h.test", "pass" },
  { "mx:other", V4, "u@mx-other.test", "h.test", "pass" },
  { "mx second host", V4, "u@mx-second.test", "h.test", "pass" },
  { "mx null MX", V4, "u@mx-null.test", "h.test", "fail" },
  { "mx without MX records", V4, "u@mx-none.test", "h.test", "neutral" },
  { "mx more than 10", V4, "u@mx-many.test", "h.test", "permerror" },
  { "ptr", V4P, "u@ptr.test", "h.test", "pass" },
  { "ptr IPv6", V6P, "u@ptr.test", "h.test", "pass" },
  { "ptr not validated", V4Q, "u@ptr.test", "h.test", "fail" },
  { "ptr no PTR", V4X, "u@ptr.test", "h.test", "fail" },
  { "ptr:domain", V4P, "u@ptr-other.test", "h.test", "pass" },
  { "exists %{i}", V4, "u@exists.test", "h.test", "pass" },
  { "exists %{i} miss", V4X, "u@exists.test", "h.test", "fail" },
  { "exists %{l}", V4, "alice@exists-l.test", "h.test", "pass" },
  { "exists %{l} miss", V4, "bob@exists-l.test", "h.test", "fail" },
  { "-exists %{ir}.%{v}", V4, "u@exists-ir.test", "h.test", "fail" },
  { "-exists %{ir}.%{v} miss", V4X, "u@exists-ir.test", "h.test", "pass" },
  { "exists asks A from an IPv6 client", V6, "u@exists-a.test", "h.test", "pass" },
  { "RFC 7208 7.4 macros in exists", V4, "strong-bad@email.macro.test", "h.test", "pass" },
  { "d1r, o, h macros", V4, "u@d-macro.test", "helo.test", "pass" },
  { "%{p}", V4P, "u@pmacro.test", "h.test", "pass" },
  { "%{p} unknown", V4X, "u@pmacro.test", "h.test", "fail" },
  { "include pass", V4, "u@include-pass.test", "h.test", "pass" },
  { "include fail is no match", V4, "u@include-fail.test", "h.test", "softfail" },
  { "include softfail is no match", V4, "u@include-soft.test", "h.test", "fail" },
  { "include neutral is no match", V4, "u@include-neutral.test", "h.test", "fail" },
  { "include none", V4, "u@include-none.test", "h.test", "permerror" },
  { "include NXDOMAIN", V4, "u@include-nx.test", "h.test", "permerror" },
  { "include permerror", V4, "u@include-perm.test", "h.test", "permerror" },
  { "include temperror", V4, "u@include-temp.test", "h.test", "temperror", timeout = 2 },
  { "include loop", V4, "u@include-loop.test", "h.test", "permerror" },
  { "include _spf name", V4, "u@include-uscore.test", "h.test", "pass" },
  { "include ip4 match", V4X, "u@include-ip.test", "h.test", "pass" },
  { "include ip4 miss (outside)", "198.51.100.1", "u@include-ip.test", "h.test", "neutral" },
  { "redirect", V4, "u@redirect.test", "h.test", "pass" },
  { "redirect miss", "198.51.100.1", "u@redirect.test", "h.test", "fail" },
  { "redirect to none", V4, "u@redirect-none.test", "h.test", "permerror" },
  { "redirect ignored after all", V4, "u@redirect-ignored.test", "h.test", "fail" },
  { "exp", V4, "u@exp.test", "h.test", "fail", exp = true },
  { "exp after redirect is the target's", V4, "u@redirect-exp.test", "h.test", "fail", exp = true },
  { "exp before redirect is dropped", V4, "u@redirect-noexp.test", "h.test", "fail", exp = true },
  { "exp macros", V4, "someone@exp-macros.test", "helo.test", "fail", exp = true },
  -- pyspf writes %{i} of an IPv6 client in upper case ("8.B.D.0"); RFC 7208 7.4's example has
  -- lower case ("8.b.d.0"), as reverse zones do. DNS does not mind; explanation text shows it.
  { "exp IPv6 %{c}", V6, "someone@exp-macros.test", "helo.test", "fail", exp = "case" },
  { "exp two TXT records", V4, "u@exp-multi.test", "h.test", "fail", exp = true },
  { "exp NXDOMAIN", V4, "u@exp-nx.test", "h.test", "fail", exp = true },
  { "exp syntax error", V4, "u@exp-syntax.test", "h.test", "fail", exp = true },
  { "exp on softfail", V4, "u@exp-soft.test", "h.test", "softfail" },
  { "exp of an included record", V4, "u@exp-include.test", "h.test", "fail", exp = true },
  { "10 lookups", V4, "u@lim10.test", "h.test", "pass" },
  { "11 lookups", V4, "u@lim11.test", "h.test", "permerror" },
  { "10 lookups through include", V4, "u@lim-inc.test", "h.test", "pass" },
  { "11 lookups through include", V4, "u@lim-inc11.test", "h.test", "permerror" },
  { "match before the limit", V4, "u@lim-match-first.test", "h.test", "pass" },
  { "2 void lookups", V4, "u@void2.test", "h.test", "fail" },
  { "3 void lookups", V4, "u@void3.test", "h.test", "permerror" },
  { "3 void lookups, NODATA ones", V4, "u@void-nodata.test", "h.test", "permerror" },
  { "two SPF records", V4, "u@multi.test", "h.test", "permerror" },
  { "SPF among other TXT", V4, "u@mixed.test", "h.test", "pass" },
  { "v=spf10 is not SPF", V4, "u@spf10.test", "h.test", "none" },
  { "split TXT strings joined", V4, "u@split.test", "h.test", "pass" },
  { "syntax: ip4 octet", V4, "u@syn-ip4.test", "h.test", "permerror" },
  { "syntax: unknown mechanism", V4, "u@syn-mech.test", "h.test", "permerror" },
  { "syntax: ip4 CIDR 33", V4, "u@syn-cidr.test", "h.test", "permerror" },
  { "syntax: a//129", V6, "u@syn-cidr6.test", "h.test", "permerror" },
  { "syntax: exp twice", V4, "u@syn-exp2.test", "h.test", "permerror" },
  { "syntax: redirect twice", V4, "u@syn-redirect2.test", "h.test", "permerror" },
  { "syntax: a:address", V4, "u@syn-a-ip.test", "h.test", "permerror" },
  { "syntax: unknown macro", V4, "u@syn-macro.test", "h.test", "permerror" },
  { "syntax: %(", V4, "u@syn-pct.test", "h.test", "permerror" },
  { "syntax: %{c} outside exp", V4, "u@syn-crt.test", "h.test", "permerror" },
  { "syntax: all with argument", V4, "u@syn-all.test", "h.test", "permerror" },
  { "syntax: error after a match", V4, "u@syn-late.test", "h.test", "permerror" },
  { "syntax: include without domain", V4, "u@syn-include-empty.test", "h.test", "permerror" },
  { "syntax: bad qualifier", V4, "u@syn-qual.test", "h.test", "permerror" },
  { "syntax: ptr/24", V4, "u@syn-ptr-cidr.test", "h.test", "permerror" },
  { "syntax: numeric top label", V4, "u@syn-toplabel.test", "h.test", "permerror" },
  { "syntax: CIDR leading zero", V4, "u@syn-lead0.test", "h.test", "permerror" },
  -- Macros outside RFC 7208 7.1's grammar ("a" is no delimiter, "%{" needs its "}") and a zero
  -- digit transformer (7.3: "MUST be nonzero") make the record a permerror (4.6). pyspf reads
  -- past them and evaluates the record.
  { "syntax: %{d2a}", V4, "u@syn-delim.test", "h.test", "permerror", pyspf = "fail" },
  { "syntax: unterminated macro", V4, "u@syn-unterminated.test", "h.test", "permerror", pyspf = "fail" },
  { "syntax: %{d0}", V4, "u@syn-zero.test", "h.test", "permerror", pyspf = "fail" },
  { "unknown modifier ignored", V4, "u@unknown-mod.test", "h.test", "pass" },
  { "no SPF record", V4, "u@nospf.test", "h.test", "none" },
  { "NXDOMAIN", V4, "u@nx.test", "h.test", "none" },
  -- RFC 7208 4.3: a domain that is not multi-label is "none" without a query. pyspf asks DNS,
  -- and dnsmasq refuses names outside its zones.
  { "not a domain", V4, "u@localhost", "h.test", "none", pyspf = "temperror" },
  { "DNS timeout", V4, "u@x.broken.test", "h.test", "temperror", timeout = 2 },
  { "null sender: postmaster@helo", V4, "", "helo.test", "pass" },
  { "null sender: postmaster@helo miss", V4X, "", "helo.test", "fail" },
  { "no local part", V4, "@a.test", "h.test", "pass" },
}

local function pyspf_available()
  return helper.sh("/usr/bin/python3 -c 'import spf' >/dev/null 2>&1 && echo yes"):match("yes") ~= nil
end

-- Runs pyspf over `lines` (tab-separated requests), one answer line each: { [name] = fields }.
local function pyspf(port, lines)
  if not pyspf_available() then
    error("missing peer: pyspf (install the Debian package python3-spf; `make deps` does)", 2)
  end
  local dir = helper.tmpdir()
  helper.write(dir .. "/in.txt", table.concat(lines, "\n") .. "\n")
  local out = helper.sh(("timeout 300 %s %s %d 3 < %s 2>%s"):format(helper.python,
    helper.quote(helper.root .. "/spec/support/pyspf_check.py"), port, helper.quote(dir .. "/in.txt"),
    helper.quote(dir .. "/err.txt")))
  local res = {}
  for line in out:gmatch("[^\n]+") do
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do f[#f + 1] = field end
    res[f[1]] = f
  end
  assert(next(res), "pyspf printed nothing: " .. (helper.read(dir .. "/err.txt") or ""))
  return res
end

describe("smtp.spf against pyspf over a loopback DNS server", function()
  local zone, theirs
  setup(function()
    zone = peers.start(ZONE)
    local lines = {}
    for _, c in ipairs(CASES) do
      lines[#lines + 1] = table.concat({ "check", c[1], c[2], c[3], c[4] }, "\t")
    end
    theirs = pyspf(zone.port, lines)
  end)
  teardown(function() zone:stop() end)

  for _, c in ipairs(CASES) do
    it(c[1], function()
      local r = assert(spf.check(c[2], c[3], c[4], {
        nameservers = { zone.nameserver }, timeout = c.timeout or 30, receiver = "mx.receiver.test",
        default_explanation = "DEFAULT",
      }))
      local t = assert(theirs[c[1]], "no answer from pyspf")
      assert.same({ c[5], c.pyspf or c[5] }, { r.result, t[2] }, r.reason)
      if c.exp == "case" then
        assert.equal(t[3]:lower(), r.explanation)
        assert.are_not.equal(t[3], r.explanation)
      elseif c.exp then
        assert.equal(t[3], r.explanation)
      end
    end)
  end
end)

-- RFC 7208 7.4: the sender strong-bad@email.example.com, the client 192.0.2.3 or 2001:db8::cb01.
local RFC_EXAMPLES = {
  { "%{s}", "strong-bad@email.example.com" }, { "%{o}", "email.example.com" },
  { "%{d}", "email.example.com" }, { "%{d4}", "email.example.com" }, { "%{d3}", "email.example.com" },
  { "%{d2}", "example.com" }, { "%{d1}", "com" }, { "%{dr}", "com.example.email" },
  { "%{d2r}", "example.email" }, { "%{l}", "strong-bad" }, { "%{l-}", "strong.bad" },
  { "%{lr}", "strong-bad" }, { "%{lr-}", "bad.strong" }, { "%{l1r-}", "strong" },
  { "%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com" },
  { "%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com" },
  { "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com" },
  { "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com" },
  { "%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net" },
  { "%{ir}.%{v}._spf.%{d2}", "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com",
    ip = "2001:db8::cb01" },
}

-- More of the macro language: escapes, delimiters, URL escaping of upper-case macros, exp-only
-- macros; each also given to pyspf's expander.
local MORE_MACROS = {
  { "x%%y%_z%-w", "x%y z%20w" },
  { "%{L}", "a%2Bb%2Fc~d_e.f", sender = "a+b/c~d_e.f@example.com" },
  { "%{l+/}", "a.b.c~d_e.f", sender = "a+b/c~d_e.f@example.com" },
  { "%{l2r+/}", "b.a", sender = "a+b/c~d_e.f@example.com" },
  { "%{S}", "strong-bad%40email.example.com" },
  { "%{o9}", "email.example.com" }, { "%{d200r}", "com.example.email" },
  { "%{h}", "mx.example.org" }, { "%{hr}", "org.example.mx" },
  { "%{c} %{r}", "192.0.2.3 mx.receiver.test", exp = true },
  { "%{c}", "2001:db8::cb01", ip = "2001:db8::cb01", exp = true },
  { "%{i}", "192.0.2.3", ip = "::ffff:192.0.2.3" },
  { "%{v}", "in-addr", ip = "::ffff:192.0.2.3" },
}

-- Macro strings that are syntax errors.
local BAD_MACROS = { "%{x}", "%{c}", "%{d0}", "%", "%{d", "%a", "%{d2a}", "%{ d}", "%{}" }

describe("smtp.spf macro expansion", function()
  local base = { ip = "192.0.2.3", sender = "strong-bad@email.example.com", helo = "mx.example.org",
                 receiver = "mx.receiver.test" }
  local function ctx(c)
    local t = {}
    for k, v in pairs(base) do t[k] = v end
    for k, v in pairs(c) do if type(k) == "string" then t[k] = v end end
    return t
  end

  it("gives the RFC 7208 7.4 examples", function()
    for _, c in ipairs(RFC_EXAMPLES) do
      assert.equal(c[2], spf.expand(c[1], ctx(c)))
    end
  end)

  it("expands the rest of the language", function()
    for _, c in ipairs(MORE_MACROS) do
      assert.equal(c[2], spf.expand(c[1], ctx(c)), c[1])
    end
    assert.equal("1234567890", spf.expand("%{t}", ctx { exp = true, now = 1234567890 }))
  end)

  it("rejects bad macros", function()
    for _, m in ipairs(BAD_MACROS) do
      local out, why = spf.expand(m, ctx {})
      assert.is_nil(out, m)
      assert.is_string(why)
    end
  end)

  it("agrees with pyspf's expander (but for the case of IPv6 nibbles)", function()
    local lines = {}
    local all = {}
    for _, list in ipairs { RFC_EXAMPLES, MORE_MACROS } do
      for _, c in ipairs(list) do all[#all + 1] = c end
    end
    for i, c in ipairs(all) do
      local t = ctx(c)
      lines[#lines + 1] = table.concat({ "expand", tostring(i), t.ip, t.sender, t.helo, c[1],
        c.exp and "exp" or nil }, "\t")
    end
    for i, m in ipairs(BAD_MACROS) do
      -- pyspf's expander does not check the exp-only letters or a zero digit (its record
      -- parser does), reads an unterminated "%{d" as text and skips "a" after the digits of
      -- "%{d2a}"; RFC 7208 7.1's grammar has no place for any of them (see syn-delim.test)
      if m ~= "%{c}" and m ~= "%{d0}" and m ~= "%{d" and m ~= "%{d2a}" then
        lines[#lines + 1] = table.concat({ "expand", "bad" .. i, base.ip, base.sender, base.helo, m }, "\t")
      end
    end
    local theirs = pyspf(9, lines)
    for i, c in ipairs(all) do
      local want = theirs[tostring(i)][2]
      if c.ip == "2001:db8::cb01" and c[1]:find("%{i", 1, true) then want = want:lower() end
      assert.equal(want, spf.expand(c[1], ctx(c)), c[1])
    end
    for i, m in ipairs(BAD_MACROS) do
      if theirs["bad" .. i] then assert.matches("^!", theirs["bad" .. i][2], nil, false, m) end
    end
  end)
end)

describe("smtp.spf results through an injected resolver", function()
  local suite = require "support.spf_suite"
  -- zone: name -> { { type, value }, ... } as support.spf_suite's resolver takes it
  local function resolver(zone, log)
    local q = suite.resolver(zone)
    return function(name, qtype, timeout)
      if log then log[#log + 1] = qtype .. " " .. name end
      return q(name, qtype, timeout)
    end
  end
  local ZONE = {
    ["example.test"] = { { "TXT", "v=spf1 ip4:192.0.2.0/24 a:mail.example.test include:inc.test -all exp=why.example.test" } },
    ["mail.example.test"] = { { "A", "198.51.100.7" } },
    ["inc.test"] = { { "TXT", "v=spf1 ip6:2001:db8::/32 ~all" } },
    ["why.example.test"] = { { "TXT", "%{c} may not send for %{o} (%{d}, seen by %{r} at %{t})" } },
    ["noexp.test"] = { { "TXT", "v=spf1 -all" } },
    ["helo.test"] = { { "TXT", "v=spf1 ip4:192.0.2.1 -all" } },
    ["redirect.test"] = { { "TXT", "v=spf1 redirect=example.test" } },
  }

  local function check(ip, from, helo, extra)
    local opts = { dns = resolver(ZONE), now = 1000, receiver = "mx.receiver.test" }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return assert(spf.check(ip, from, helo, opts))
  end

  it("names the mechanism that matched, the domain, identity and counts", function()
    assert.same({ result = "pass", mechanism = "ip4:192.0.2.0/24", domain = "example.test",
                  identity = "mailfrom", sender = "u@example.test", lookups = 0, void_lookups = 0,
                  queries = 1, reason = "pass matched ip4:192.0.2.0/24 in the record of example.test" },
      check("192.0.2.9", "u@example.test", "h.test"))
    local r = check("198.51.100.7", "u@example.test", "h.test")
    assert.same({ "pass", "a:mail.example.test", 1 }, { r.result, r.mechanism, r.lookups })
    r = check("2001:db8::5", "u@example.test", "h.test")
    assert.same({ "pass", "include:inc.test", 2 }, { r.result, r.mechanism, r.lookups })
  end)

  it("explains a fail with exp= (all macros), from the redirect target too", function()
    local r = check("198.51.100.8", "u@example.test", "h.test")
    assert.same({ "fail", "-all" }, { r.result, r.mechanism })
    assert.equal("198.51.100.8 may not send for example.test (example.test, seen by mx.receiver.test at 1000)",
      r.explanation)
    r = check("198.51.100.8", "u@redirect.test", "h.test")
    assert.equal("198.51.100.8 may not send for redirect.test (example.test, seen by mx.receiver.test at 1000)",
      r.explanation)
  end)

  it("explains a fail without exp= by the default or the caller's text; nothing for other results", function()
    assert.equal("198.51.100.8 is not allowed to send mail for noexp.test",
      check("198.51.100.8", "u@noexp.test", "h.test").explanation)
    assert.equal("see https://example.test/spf?ip=198.51.100.8",
      check("198.51.100.8", "u@noexp.test", "h.test",
        { default_explanation = "see https://example.test/spf?ip=%{c}" }).explanation)
    assert.is_nil(check("2001:db8:1::1", "u@inc.test", "h.test").explanation)   -- softfail
  end)

  it("checks postmaster@HELO for the null sender, and the HELO identity on request", function()
    local r = check("192.0.2.1", "", "helo.test.")
    assert.same({ "pass", "postmaster@helo.test", "mailfrom", "helo.test" }, { r.result, r.sender, r.identity, r.domain })
    r = check("192.0.2.1", nil, "helo.test")
    assert.equal("pass", r.result)
    r = check("192.0.2.9", "u@example.test", "helo.test", { identity = "helo" })
    assert.same({ "fail", "postmaster@helo.test", "helo" }, { r.result, r.sender, r.identity })
    r = check("192.0.2.9", "<u@example.test>", "helo.test")
    assert.same({ "pass", "u@example.test" }, { r.result, r.sender })
  end)

  it("checks an international domain as its A-labels (RFC 7208 4.3)", function()
    local log = {}
    local zone = { ["xn--bcher-kva.example"] = { { "TXT", "v=spf1 ip4:192.0.2.1 -all" } } }
    local r = assert(spf.check("192.0.2.1", "u@bücher.example", "h", { dns = resolver(zone, log) }))
    assert.same({ "pass", "xn--bcher-kva.example", "u@xn--bcher-kva.example" }, { r.result, r.domain, r.sender })
    assert.same({ "TXT xn--bcher-kva.example" }, log)
    r = assert(spf.check("192.0.2.1", "u@a\255b.example", "h", { dns = resolver(zone, log) }))
    assert.same({ "none", 1 }, { r.result, #log })
  end)

  it("turns DNS failures into temperror, keeping the error", function()
    local function servfail(name)
      return nil, require("smtp.dnsutil").error(name, "servfail")
    end
    local r = assert(spf.check("192.0.2.1", "u@example.test", "h.test", { dns = servfail }))
    assert.equal("temperror", r.result)
    assert.equal("servfail", r.error.rcode)
    assert.matches("example.test TXT", r.reason, 1, true)
  end)

  it("gives up with temperror when the time for the check runs out", function()
    local t = 0
    local function slow(name, qtype, timeout)
      assert.is_number(timeout)
      t = t + 10
      return suite.resolver(ZONE)(name, qtype)
    end
    local r = assert(spf.check("198.51.100.8", "u@example.test", "h.test",
      { dns = slow, clock = function() return t end, timeout = 15 }))
    assert.same({ "temperror", "time limit for the SPF check exceeded" }, { r.result, r.reason })
  end)

  it("asks each name once per check", function()
    local log = {}
    local zone = {
      ["twice.test"] = { { "TXT", "v=spf1 a:x.twice.test a:x.twice.test mx:twice.test mx:twice.test -all" },
                         { "MX", { 10, "x.twice.test" } } },
      ["x.twice.test"] = { { "A", "198.51.100.1" } },
    }
    local r = assert(spf.check("192.0.2.1", "u@twice.test", "h", { dns = resolver(zone, log) }))
    assert.same({ "fail", 4 }, { r.result, r.lookups })
    assert.same({ "TXT twice.test", "A x.twice.test", "MX twice.test" }, log)
  end)

  it("cuts a long macro-made name from the left to 253 bytes", function()
    local log = {}
    local long = ("a"):rep(60)
    local domain = ("%s.%s.%s.test"):format(long, long, long)
    local zone = { [domain] = { { "TXT", "v=spf1 exists:%{d}.%{d}.example.test -all" } } }
    assert.equal("fail", assert(spf.check("192.0.2.1", "u@" .. domain, "h", { dns = resolver(zone, log) })).result)
    -- 388 bytes expanded; the first three labels go
    assert.equal("A test." .. domain .. ".example.test", log[2])
  end)

  it("returns nil, err for an address that is not one, or no identity to check", function()
    local r, err = spf.check("192.0.2.256", "u@example.test", "h.test", { dns = resolver(ZONE) })
    assert.is_nil(r)
    assert.same({ "invalid", false }, { err.kind, err.temporary })
    assert.matches("not an IP address", tostring(err))
    r, err = spf.check("192.0.2.1", "", nil, { dns = resolver(ZONE) })
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
    r, err = spf.check("192.0.2.1", "u@example.test", nil, { dns = resolver(ZONE), identity = "helo" })
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
  end)

  it("raises on misuse", function()
    assert.has_error(function() spf.check(nil, "u@x.test", "h") end,
      "bad argument #1 to 'check' (string expected, got nil)")
    assert.has_error(function() spf.check("192.0.2.1", 5, "h") end,
      "bad argument #2 to 'check' (string or nil expected, got number)")
    assert.has_error(function() spf.check("192.0.2.1", "u@x.test", {}) end,
      "bad argument #3 to 'check' (string or nil expected, got table)")
    assert.has_error(function() spf.check("192.0.2.1", "u@x.test", "h", "x") end,
      "bad argument #4 to 'check' (table expected, got string)")
    assert.has_error(function() spf.check("192.0.2.1", "u@x.test", "h", { dns = "x" }) end,
      "bad argument #4 to 'check' (option 'dns': function expected, got string)")
    assert.has_error(function() spf.check("192.0.2.1", "u@x.test", "h", { identity = "rcpt" }) end,
      "bad argument #4 to 'check' (option 'identity': \"mailfrom\" or \"helo\" expected)")
    assert.has_error(function() spf.check("192.0.2.1", "u@x.test", "h", { dns = function() return "v=spf1" end }) end,
      "bad argument #4 to 'check' (dns: returned string, expected a table or nil, err)")
  end)
end)

-- As the other nginx specs: once, in the lua5.4 run, not under ASan (nginx runs its own LuaJIT
-- with the plain LuaJIT build).
if helper.lua ~= "lua5.4" or os.getenv("SMTP_BUILD") == "asan" then
  describe("smtp.spf inside nginx (the cosocket resolver)", function()
    pending("runs once, in the lua5.4 run, not under ASan")
  end)
  return
end

describe("smtp.spf inside nginx (the cosocket resolver)", function()
  local nginx = require "support.nginx"
  local zone, srv
  setup(function()
    helper.need("nginx lua")
    zone = peers.start(ZONE)
    srv = nginx.start {
      locations = [[ location = /spf { content_by_lua_block { require("support.spf_nginx").run() } } ]],
    }
  end)
  teardown(function()
    if srv then srv:stop() end
    if zone then zone:stop() end
  end)

  it("gives every policy's result, as outside nginx", function()
    local lines = {}
    for _, c in ipairs(CASES) do
      lines[#lines + 1] = table.concat({ c[1], c[2], c[3], c[4], c.timeout or 30 }, "\t")
    end
    local status, body = nginx.request(srv:url("/spf?ns=" .. zone.nameserver),
      table.concat(lines, "\n") .. "\n", 120)
    assert.equal(200, status, body)
    local got = {}
    for line in body:gmatch("[^\n]+") do
      local name, result, _, via = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$")
      assert.equal("ngx_dns", via, line)
      got[name] = result
    end
    for _, c in ipairs(CASES) do assert.equal(c[5], got[c[1]], c[1]) end
  end)
end)
