//! End-to-end benchmark (placeholder replaced by the benchmark work).
fn main() {}
