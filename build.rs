//! Link flags for the `mpc-gateway` binary.

fn main() {
    // Pack the binary's relative relocations (DT_RELR, glibc ≥ 2.36, binutils ≥ 2.38).
    // A position-independent Rust binary otherwise carries ~200 KiB of `.rela.dyn`
    // entries that the loader reads at every start and that stay resident: about a
    // twentieth of the gateway's idle RSS (benches/RESULTS.md, session 5). Linkers that
    // do not know the option warn and ignore it, and GNU ld packs only when the C
    // library it links against can read packed relocations.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
