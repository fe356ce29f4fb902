# asyncllm: an asynchronous LLM API in C on Kafka and Redis.
#
#   make            build build/asyncllm and build/fakellm (optimised)
#   make run        install what is missing, build, start Kafka + Redis + asyncllm (foreground)
#   make test       install what is missing, build with ASan+UBSan, run unit and end-to-end tests
#   make format     clang-format every C file;  make lint: format check + banned functions

CC      ?= gcc
PKGS    := rdkafka hiredis libevent libcurl jansson
WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-unused-parameter
BASE    := -std=c17 -D_GNU_SOURCE -Isrc $(WARN) $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS    := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lcrypto -lm -lpthread
OPT     := -O2 -g
SAN     := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

SRC     := $(sort $(wildcard src/*/*.c))
LIBSRC  := $(filter-out src/core/main.c,$(SRC))
HDR     := $(wildcard src/*/*.h)
UNIT    := $(wildcard tests/unit/test_*.c)
UNITH   := $(wildcard tests/unit/*.h)
FAKE    := tests/fakellm/fakellm.c

.PHONY: all asan deps docs model run test unit e2e chaos chaos-short format lint clean stack-up stack-down bench bench-smoke
all: build/asyncllm build/fakellm

build/asyncllm: $(SRC) $(HDR) | build
	$(CC) $(BASE) $(OPT) -o $@ $(SRC) $(LIBS)

build/fakellm: $(FAKE) | build
	$(CC) -std=c17 -D_GNU_SOURCE $(OPT) -Wall -Wextra -Werror -o $@ $(FAKE) $$(pkg-config --cflags --libs libevent jansson) -lm -lpthread

build/asan/asyncllm: $(SRC) $(HDR) | build/asan
	$(CC) $(BASE) $(SAN) -o $@ $(SRC) $(LIBS)

build/asan/fakellm: $(FAKE) | build/asan
	$(CC) -std=c17 -D_GNU_SOURCE $(SAN) -Wall -Wextra -Werror -o $@ $(FAKE) $$(pkg-config --cflags --libs libevent jansson) -lm -lpthread

build/asan/test_%: tests/unit/test_%.c $(LIBSRC) $(HDR) $(UNITH) | build/asan
	$(CC) $(BASE) $(SAN) -Itests/unit -o $@ $< $(LIBSRC) $(LIBS) -lcmocka

build build/asan:
	mkdir -p $@

asan: build/asan/asyncllm build/asan/fakellm

deps:
	@scripts/deps.sh

run: deps all
	@scripts/run.sh

unit: $(patsubst tests/unit/%.c,build/asan/%,$(UNIT))
	@set -e; for t in $^; do echo "== $$t"; $$t; done

model:
	@scripts/model.sh install

e2e: asan build/fakellm model
	@scripts/check-docs.sh build/asan/asyncllm
	@scripts/e2e.sh

docs: build/asyncllm
	@scripts/update-docs.py build/asyncllm

# Chaos: worker SIGKILLs, a Kafka and a Redis restart under continuous submissions, on its own stack.
chaos: asan build/fakellm
	@scripts/chaos.sh

chaos-short: asan build/fakellm
	@scripts/chaos.sh --short

# Benchmarks against the real local stack (bench/run.sh; figures in docs/PERFORMANCE.md). make test runs
# the smoke: every step for a few seconds, to keep the harness working (it asserts no performance).
bench:
	@bench/run.sh

bench-smoke:
	@bench/run.sh --smoke

test: deps lint unit e2e chaos-short bench-smoke

format:
	clang-format -i $(SRC) $(HDR) $(UNIT) $(UNITH) $(FAKE)

lint:
	@scripts/lint.sh

stack-up:
	@scripts/stack.sh up
stack-down:
	@scripts/stack.sh down

clean:
	rm -rf build
