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

.PHONY: all setup bpf java test test-kernels demo bench clean wheel install-units

all: bpf java

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

# The JVM TLS agent (java/), one jar. The bridge classes are compiled into java.base's
# sun.security.ssl package (the agent defines them there at run time) and stored in the jar
# under gridbpf-bridge/. The agent compiles against the JDK's internal ASM, which javac refuses
# together with --release, hence -source/-target 17 there.
JAVADIR := src/gridbpf/_java
JAVA_BRIDGE_SRCS := $(shell find java/bridge -name '*.java' 2>/dev/null)
JAVA_AGENT_SRCS := $(shell find java/agent -name '*.java' 2>/dev/null)
JAVA_JAR := $(JAVADIR)/gridbpf-jvm-agent.jar

$(JAVA_JAR): $(JAVA_BRIDGE_SRCS) $(JAVA_AGENT_SRCS) java/agent/MANIFEST.MF
	@rm -rf build/java && mkdir -p build/java/agent/gridbpf-bridge $(JAVADIR)
	javac -nowarn --release 17 --patch-module java.base=java/bridge -d build/java/bridge $(JAVA_BRIDGE_SRCS)
	cp build/java/bridge/sun/security/ssl/*.class build/java/agent/gridbpf-bridge/
	javac -nowarn -source 17 -target 17 --add-exports java.base/jdk.internal.org.objectweb.asm=ALL-UNNAMED \
	  -d build/java/agent $(JAVA_AGENT_SRCS)
	jar --create --file $@ --manifest java/agent/MANIFEST.MF -C build/java/agent .

java: $(JAVA_JAR)

test: setup
	@$(MAKE) --no-print-directory bpf java
	$(PYTHON) -m pytest -q tests

# the kernel-facing tests inside Debian 12's stock 6.1 kernel in a VM (minutes: not in `make test`)
test-kernels: setup
	@$(MAKE) --no-print-directory bpf
	tools/test-kernels/run

demo: setup
	@$(MAKE) --no-print-directory bpf java
	$(PYTHON) -m gridbpf.demo

bench: setup
	@$(MAKE) --no-print-directory bpf java
	$(PYTHON) -m bench

# A wheel carrying the compiled CO-RE objects and the JVM agent's jar: a node installs
# it with pip and needs neither clang nor the source tree. Built from a copy of the tree's
# files (tracked or not ignored) plus the objects, never from stale build state.
WHEEL_DIR ?= dist
PLAT := linux_$(shell uname -m)
wheel: bpf java
	rm -rf build/wheel-src && mkdir -p build/wheel-src $(WHEEL_DIR)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -P --parents -t build/wheel-src 2>/dev/null || true
	cp --parents $(OBJDIR)/*.bpf.o build/wheel-src/
	cp --parents $(JAVADIR)/*.jar build/wheel-src/
	cd build/wheel-src && $(PYTHON) -m pip wheel -q --no-deps -C--build-option=--plat-name=$(PLAT) -w $(abspath $(WHEEL_DIR)) .

# systemd units into $(UNITDIR), pointing at the gridbpf of $(BINDIR) (e.g. a venv made with
# `python3 -m venv /opt/gridbpf && /opt/gridbpf/bin/pip install dist/gridbpf-*.whl`);
# example configs into $(CONFDIR) when none is there yet.
UNITDIR ?= /etc/systemd/system
BINDIR  ?= /opt/gridbpf/bin
CONFDIR ?= /etc/gridbpf
install-units:
	install -d $(UNITDIR) $(CONFDIR)
	for u in packaging/systemd/*.service; do \
	  sed -e 's|/opt/gridbpf/bin/gridbpf|$(BINDIR)/gridbpf|g' -e 's|/etc/gridbpf/|$(CONFDIR)/|g' \
	    $$u > $(UNITDIR)/$$(basename $$u); done
	[ -e $(CONFDIR)/agent.toml ] || install -m 644 packaging/examples/agent-storm-webdav.toml $(CONFDIR)/agent.toml
	[ -e $(CONFDIR)/scitags.toml ] || install -m 644 packaging/examples/scitags-storm-webdav.toml $(CONFDIR)/scitags.toml
	[ -e $(CONFDIR)/lb.toml ] || install -m 644 packaging/examples/lb.toml $(CONFDIR)/lb.toml
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

clean:
	rm -rf $(OBJDIR) $(TEST_OBJS) $(VMLINUX) $(JAVADIR) build/java build/wheel-src
