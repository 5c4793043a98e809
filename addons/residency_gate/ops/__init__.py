"""Operations: run the proxy, reload, admin endpoints, metrics, logs, workers, CA files."""
