//! A plain WASI command: a real component, but of the `wasi:cli/command` world rather than a
//! Sluice plugin world, so the host must refuse it with a clear error.

fn main() {
    println!("hello from a component that is not a Sluice plugin");
}
