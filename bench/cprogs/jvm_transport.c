/*
 * How a JVM record can reach BPF without kprobes: N calls of one transport, ns per call.
 *   write   write(2) of the record to /dev/null (what the agent does)
 *   ioctl   ioctl(-1, MAGIC, &record): fails with EBADF before any driver
 *   uprobe  a call of the no-op marker function jvm_record_marker(&record)
 *   recv    read(2) of the record on an unbound non-blocking UDP socket: EAGAIN, nothing
 *           copied (the agent's transport where the socket tracepoints exist)
 * Usage: jvm_transport MODE N   (prints "ready FD" on stdout and waits for a line on stdin)
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x314d564a42524700ULL

__attribute__((noinline)) void jvm_record_marker(const void *rec, unsigned long len)
{
	__asm__ volatile("" : : "r"(rec), "r"(len) : "memory");
}

int main(int argc, char **argv)
{
	unsigned char rec[48 + 64] = {0};
	uint64_t magic = MAGIC;
	struct timespec a, b;
	char line[16];
	long n = argc > 2 ? atol(argv[2]) : 1000000;
	int fd;

	if (argc < 2)
		return 2;
	fd = argv[1][0] == 'r' ? socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0)
			       : open("/dev/null", O_WRONLY);
	if (fd < 0)
		return 2;
	memcpy(rec, &magic, 8);
	printf("ready %d\n", fd);
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (argv[1][0] == 'w')
			write(fd, rec, sizeof(rec));
		else if (argv[1][0] == 'r')
			read(fd, rec, sizeof(rec));
		else if (argv[1][0] == 'i')
			ioctl(-1, (unsigned long)MAGIC, rec);
		else
			jvm_record_marker(rec, sizeof(rec));
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
