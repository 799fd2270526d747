"""Events and alerts out of the warehouse in the security ecosystem's formats: OCSF records
(`ocsf`, `ocsf_files`) and OpenTelemetry traces (`otel`, the one module that imports the
OpenTelemetry SDK)."""
