use which::which;

/// Rebuild when bpf-linker changes: cargo cannot see this undeclared dependency.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
