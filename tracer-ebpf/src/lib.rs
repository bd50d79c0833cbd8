#![no_std]
// The programs live in the `tracer` binary target (src/main.rs); this library
// target only exists so that host tools such as clippy have something to check.
