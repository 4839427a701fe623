"""gridbpf: eBPF load balancing and monitoring for grid storage services."""
__version__ = "0.1.0"
