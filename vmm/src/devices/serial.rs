//! 16550 console (vm-superio) with per-partition log file and optional stdout prefix.
