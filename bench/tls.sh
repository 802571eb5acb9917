#!/bin/sh
# TLS benchmarks (bench/tls.lua): smtp.server on Lua 5.4 and LuaJIT beside a private Postfix
# smtpd and aiosmtpd, full and resumed handshakes, a bare OpenSSL handshake as the floor, long-lived
# TLS sessions; then our client beside Python smtplib. Figures per CPU-second of each process tree.
# TLS_SESSIONS (default 400), TLS_ROUNDS (default 3: the servers take turns, medians are printed)
# and TLS_MESSAGES (default 2000) set the sizes.
set -u
cd "$(dirname "$0")/.."
top=$(pwd)
export LUA_PATH="$top/lua/?.lua;$top/lua/?/init.lua;$top/spec/?.lua;;" LUA_CPATH="$top/build/lua5.4/?.so;;"
status=0
lua5.4 bench/tls.lua server || status=1
lua5.4 bench/tls.lua client || status=1
exit $status
