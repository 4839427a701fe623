"""Why is it stuck: blocked threads, off-CPU time, file I/O, TCP trouble and memory growth."""
