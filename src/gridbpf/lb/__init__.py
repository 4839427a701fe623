"""gridbpf lb: XDP load balancer (Maglev, connection tracking, DSR and IP-in-IP/GUE) and its control plane."""
