"""The namespace lab shared by tests, benchmarks and the demo (knows no capability)."""
from .core import Host, Lab, LabError, Process, labs, namespaces, remove_lab
from .topologies import TOPOLOGIES, Topology, ecmp, http_server, web

__all__ = ["Host", "Lab", "LabError", "Process", "TOPOLOGIES", "Topology", "ecmp", "http_server",
           "labs", "namespaces", "remove_lab", "web"]
