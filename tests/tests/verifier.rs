//! A kernel program that reads through an offset BTF never resolved must end in
//! the verifier's refusal, explained, and never in a crash. The kernel matrix
//! runs this on every kernel: verifiers differ, and each must catch it.

use std::process::Command;

use integration_tests::{require_root, tracer_bin};

#[test]
fn the_verifier_refuses_a_read_through_an_unresolved_offset() {
    require_root();
    let out = Command::new(tracer_bin())
        .args(["probe", "--broken-program"])
        .output()
        .expect("running tracer probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    // An error exit of its own: not a panic (101), not a signal.
    assert_eq!(out.status.code(), Some(1), "{context}");
    // The real programs loaded first, so the refusal is the broken one's alone.
    assert!(
        stdout.lines().any(|line| line.starts_with("mode ")),
        "{context}"
    );
    assert!(
        stderr.contains(
            "broken_unresolved_offset (deliberately broken, never attached): \
             the kernel refused the program"
        ),
        "the error names the program: {context}"
    );
    // The verifier's log, down to its reason: arithmetic on the context pointer.
    let log = stderr
        .split_once("Verifier output:")
        .unwrap_or_else(|| panic!("no verifier log: {context}"))
        .1;
    assert!(
        log.contains("math between ctx pointer"),
        "the verifier's reason: {context}"
    );
    assert!(!stderr.contains("panicked"), "{context}");
}
