"""Tracing of unmodified services, in two capabilities: request tracing (`http/`) and "why is it
stuck" (`stuck/`: blocked threads, off-CPU, file I/O, TCP, memory). This package keeps what they
share: target selection (targets), symbols, the BPF session, the `gridbpf trace` command."""
