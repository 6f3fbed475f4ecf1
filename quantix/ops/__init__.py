"""Operations: systemd notify and watchdog, log output, Prometheus metrics, orderly shutdown."""
