//! The stack files under `examples/stacks/` are documentation users copy: they must parse.

use edgible::stack::Stack;

#[test]
fn every_example_stack_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/stacks");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/stacks exists") {
        let path = entry.expect("readable directory").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).expect("readable file");
            let stack = Stack::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!stack.applications.is_empty(), "{} declares no application", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example stacks in {}", dir.display());
}
