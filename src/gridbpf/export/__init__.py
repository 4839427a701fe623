"""Exporters shared by the capabilities: numpy-aggregated families (metrics), Prometheus
/metrics (prometheus), OTLP/HTTP metrics and spans (otlp)."""
from .metrics import CounterFamily, HistogramFamily, Registry, prometheus_name

__all__ = ["CounterFamily", "HistogramFamily", "Registry", "prometheus_name"]
