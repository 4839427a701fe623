"""`gridbpf agent run`: long-running request tracing exported to Prometheus and OTLP."""
