//! Reset and power-off ports.
