"""One worker process: building it (bootstrap), its lifecycle, the service, the watchdog."""
