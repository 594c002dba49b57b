fn main() {
    // Rebuild the program when the linker changes: cargo cannot see that dependency itself.
    let bpf_linker = which::which("bpf-linker").expect("bpf-linker not on PATH: run ./x.sh setup");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
