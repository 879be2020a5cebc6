use which::which;

fn main() {
    // Rebuild when bpf-linker changes: cargo cannot see this undeclared dependency.
    let bpf_linker = which("bpf-linker").expect("bpf-linker not on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());

    // Packet headers sit at 2-byte offsets and our keys are byte arrays: unless LLVM may emit
    // misaligned accesses, every multi-byte load and store is split into single bytes and shifts.
    // The kernel allows misaligned packet and stack access on the architectures we run on.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    }
}
