#!/bin/sh
# Message composition benchmark: a message with a 50 MB attachment built and written out by
# smtp.message (streamed) and by Python's email package (EmailMessage.add_attachment, as_bytes),
# in the same run. Prints wall time, peak RSS (/usr/bin/time -v) and the ratios.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
LUA=${LUA:-lua5.4}
MB=${BENCH_MB:-50}
dir=$(mktemp -d /tmp/lua-smtp-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
head -c $((MB * 1024 * 1024)) /dev/urandom > "$dir/data.bin"

cat > "$dir/ours.lua" <<'LUA'
local message = require "smtp.message"
local m = assert(message.new{ from = "Alice <alice@example.com>", to = { "bob@example.org" },
  subject = "Report", text = "See the attachment.\n",
  attachments = { { path = arg[1], filename = "data.bin" } } })
local out = assert(io.open(arg[2], "wb"))
for chunk in m:source() do out:write(chunk) end
out:close()
LUA

cat > "$dir/py.py" <<'PY'
import sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "Alice <alice@example.com>"
m["To"] = "bob@example.org"
m["Subject"] = "Report"
m.set_content("See the attachment.\n")
with open(sys.argv[1], "rb") as f:
    data = f.read()
m.add_attachment(data, maintype="application", subtype="octet-stream", filename="data.bin")
with open(sys.argv[2], "wb") as f:
    f.write(m.as_bytes())
PY

# runs a command under /usr/bin/time -v; prints "seconds kilobytes"
measure() {
  /usr/bin/time -v "$@" 2>"$dir/time.txt" >/dev/null
  s=$(sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$dir/time.txt" |
      awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')
  k=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$dir/time.txt")
  echo "$s $k"
}

export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;;"
export LUA_CPATH="$top/build/$LUA/?.so;;"
set -- $(measure "$LUA" "$dir/ours.lua" "$dir/data.bin" "$dir/ours.eml"); ours_s=$1; ours_k=$2
set -- $(measure /usr/bin/python3 "$dir/py.py" "$dir/data.bin" "$dir/py.eml"); py_s=$1; py_k=$2

# both outputs must carry the same attachment bytes
/usr/bin/python3 - "$dir/ours.eml" "$dir/py.eml" "$dir/data.bin" <<'PY'
import sys, email, email.policy
from email.parser import BytesParser
data = open(sys.argv[3], "rb").read()
for p in sys.argv[1:3]:
    m = BytesParser(policy=email.policy.default).parse(open(p, "rb"))
    att = [x for x in m.iter_attachments()][0]
    assert att.get_payload(decode=True) == data, p
PY

echo "message with a ${MB} MB attachment, built and written out ($LUA):"
printf '  smtp.message  %6.2f s  %8d KB peak RSS  (%s bytes)\n' "$ours_s" "$ours_k" "$(wc -c < "$dir/ours.eml")"
printf '  python email  %6.2f s  %8d KB peak RSS  (%s bytes)\n' "$py_s" "$py_k" "$(wc -c < "$dir/py.eml")"
awk -v a="$ours_s" -v b="$py_s" -v c="$ours_k" -v d="$py_k" 'BEGIN {
  sp = (a > 0) ? b / a : 0; mem = c / d;
  printf "  speed: %.1fx faster than Python (target >= 3x)  %s\n", sp, (sp >= 3 ? "ok" : "MISSED");
  printf "  memory: %.3f of Python peak (target <= 0.2)  %s\n", mem, (mem <= 0.2 ? "ok" : "MISSED");
}'
