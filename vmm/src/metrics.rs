//! Counters, in one place, read by the CLI (and later the control socket and Prometheus).
