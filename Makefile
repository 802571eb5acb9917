# lua-smtp: builds smtp/core.so once per interpreter and runs the specs on each.
# Every variable below can be overridden: make CC=clang LUAS="lua5.4".

CC          ?= cc
PKG_CONFIG  ?= pkg-config
CFLAGS      ?= -O2 -g
WARN        := -Wall -Wextra -Werror -Wshadow -Wpointer-arith -Wno-unused-parameter
BASEFLAGS   := -std=gnu11 -fPIC -fvisibility=hidden -D_GNU_SOURCE $(WARN)
LIBS        := -lssl -lcrypto -lcares -lidn2
LUAS        ?= lua5.4 luajit
PREFIX      ?= /usr/local
DESTDIR     ?=
LUA_VERSION ?= 5.4
LUA_LMOD    ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LUA_CMOD    ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
SANFLAGS    := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
FUZZ_SECONDS ?= 60

SRC  := $(wildcard csrc/*.c)
HDR  := $(wildcard csrc/*.h)

# Interpreter name -> include flags.  LuaJIT gets lua-compat53 for the 5.3 C API.
INC_lua5.4  := $(shell $(PKG_CONFIG) --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
INC_luajit  := $(shell $(PKG_CONFIG) --cflags luajit 2>/dev/null || echo -I/usr/include/luajit-2.1) -idirafter /usr/include/lua5.1
EXTRA_luajit := /usr/include/lua5.1/compat-5.3.c

.PHONY: all deps test test-asan test-fresh test-valgrind bench fuzz demo install clean check-exports

all: $(foreach l,$(LUAS),build/$(l)/smtp/core.so)

build/%/smtp/core.so: $(SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(BASEFLAGS) $(INC_$*) -shared -o $@ $(SRC) $(EXTRA_$*) $(LIBS)

# AddressSanitizer + UBSan build of the same sources (loaded with the ASan runtime preloaded).
build/asan-%/smtp/core.so: $(SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) -O1 -g $(SANFLAGS) $(BASEFLAGS) $(INC_$*) -shared -o $@ $(SRC) $(EXTRA_$*) $(LIBS)

deps:
	@sh scripts/deps.sh

check-exports: all
	@sh scripts/check-exports.sh $(foreach l,$(LUAS),build/$(l)/smtp/core.so)

test: deps all check-exports
	@sh scripts/run-specs.sh $(LUAS)

test-asan: deps all $(foreach l,$(LUAS),build/asan-$(l)/smtp/core.so)
	@SMTP_BUILD=asan sh scripts/run-specs.sh $(LUAS)

# `make test` from nothing in a minimal Debian 12 root (as root; see scripts/test-fresh.sh).
test-fresh:
	@sh scripts/test-fresh.sh

test-valgrind: deps build/lua5.4/smtp/core.so
	@sh scripts/valgrind-specs.sh

bench: deps all
	@sh bench/run.sh

fuzz: deps
	@$(MAKE) -C fuzz -j2 all
	@$(MAKE) -C fuzz run FUZZ_SECONDS=$(FUZZ_SECONDS)

demo: deps build/lua5.4/smtp/core.so
	@lua5.4 examples/demo.lua

install: build/lua5.4/smtp/core.so
	install -d $(DESTDIR)$(LUA_LMOD)/smtp/transport $(DESTDIR)$(LUA_LMOD)/smtp/cli $(DESTDIR)$(LUA_LMOD)/smtp/inbox $(DESTDIR)$(LUA_CMOD)/smtp $(DESTDIR)$(PREFIX)/bin
	install -m 644 lua/smtp/*.lua $(DESTDIR)$(LUA_LMOD)/smtp/
	install -m 644 lua/smtp/transport/*.lua $(DESTDIR)$(LUA_LMOD)/smtp/transport/
	install -m 644 lua/smtp/cli/*.lua $(DESTDIR)$(LUA_LMOD)/smtp/cli/
	install -m 644 lua/smtp/inbox/*.lua $(DESTDIR)$(LUA_LMOD)/smtp/inbox/
	install -m 755 build/lua5.4/smtp/core.so $(DESTDIR)$(LUA_CMOD)/smtp/core.so
	install -m 755 bin/lua-smtp $(DESTDIR)$(PREFIX)/bin/lua-smtp

clean:
	rm -rf build
