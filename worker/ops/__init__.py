"""Fleet operations: metrics and health over HTTP, liveness, diagnostics."""
