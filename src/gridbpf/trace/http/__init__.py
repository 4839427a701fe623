"""HTTP request tracing: requests rebuilt in the kernel from socket syscalls and TLS plaintext."""
