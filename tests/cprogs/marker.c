/* Calls marker(i) for i in 1..N after reading a line on stdin, so a test can attach first. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) uint64_t marker(uint64_t value)
{
	__asm__ volatile("" ::: "memory");   /* keep the call */
	return value * 2;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 10;
	char line[16];
	uint64_t sum = 0;
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (int i = 1; i <= n; i++)
		sum += marker(i);
	printf("%llu\n", (unsigned long long)sum);
	return 0;
}
