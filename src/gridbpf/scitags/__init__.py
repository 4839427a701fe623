"""SciTags: mark registered flows' IPv6 flow label at tc egress and send firefly packets.

A drop-in for flowd: reads flowd's named pipe (what StoRM WebDAV writes), a local HTTP API
and, optionally, traced storage requests; see docs/scitags.md.
"""
