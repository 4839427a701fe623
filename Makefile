# gridbpf: setup, build the BPF objects, test, demo, bench.
PYTHON  ?= python3
CLANG   ?= clang
BPFTOOL ?= bpftool
ARCH    := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

VMLINUX  := bpf/include/vmlinux.h
OBJDIR   := src/gridbpf/_objects
BPF_SRCS := $(wildcard bpf/*.bpf.c)
BPF_OBJS := $(patsubst bpf/%.bpf.c,$(OBJDIR)/%.bpf.o,$(BPF_SRCS))
TEST_SRCS := $(wildcard tests/bpf/*.bpf.c)
TEST_OBJS := $(TEST_SRCS:.bpf.c=.bpf.o)
HEADERS  := $(wildcard bpf/include/gridbpf/*.h) $(VMLINUX)
CFLAGS_BPF := -target bpf -O2 -g -Wall -Werror -Wno-unused-function -D__TARGET_ARCH_$(ARCH) -Ibpf/include

.PHONY: all setup bpf test test-kernels demo bench clean

all: bpf

setup:
	@tools/setup.sh

$(VMLINUX):
	$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(OBJDIR)/%.bpf.o: bpf/%.bpf.c $(HEADERS)
	@mkdir -p $(OBJDIR)
	$(CLANG) $(CFLAGS_BPF) -c $< -o $@

tests/bpf/%.bpf.o: tests/bpf/%.bpf.c $(HEADERS)
	$(CLANG) $(CFLAGS_BPF) -c $< -o $@

bpf: $(BPF_OBJS) $(TEST_OBJS)

test: setup
	@$(MAKE) --no-print-directory bpf
	$(PYTHON) -m pytest -q tests

# the kernel-facing tests inside Debian 12's stock 6.1 kernel in a VM (minutes: not in `make test`)
test-kernels: setup
	@$(MAKE) --no-print-directory bpf
	tools/test-kernels/run

demo: setup
	@$(MAKE) --no-print-directory bpf
	$(PYTHON) -m gridbpf.demo

bench: setup
	@$(MAKE) --no-print-directory bpf
	$(PYTHON) -m bench

clean:
	rm -rf $(OBJDIR) $(TEST_OBJS) $(VMLINUX)
