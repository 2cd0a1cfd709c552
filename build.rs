//! Link flags for the `mpc-gateway` binary: both only shrink what a running gateway
//! keeps resident (benches/RESULTS.md, session 5); neither changes what it does.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The functions a serving gateway runs, hottest first (`scripts/symbol-order` makes it).
const SYMBOL_ORDER: &str = "scripts/symbol-order.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={SYMBOL_ORDER}");

    // Pack the binary's relative relocations (DT_RELR). A position-independent Rust
    // binary otherwise carries ~200 KiB of `.rela.dyn` that the loader reads at every
    // start and that stays resident. Only when the linked binary then requires glibc's
    // `GLIBC_ABI_DT_RELR` (2.36 and later): a loader that cannot apply packed relocations
    // must refuse the binary, not run it unrelocated.
    let relr = "-Wl,-z,pack-relative-relocs";
    if probe_link("relr", &[relr]).is_some_and(|binary| requires_glibc_relr(&binary)) {
        println!("cargo:rustc-link-arg-bins={relr}");
    }

    // Place the functions a serving gateway runs next to each other, hottest first. The
    // kernel maps an executable's pages 64 KiB at a time around each one touched, so with
    // those functions spread over 4 MiB of code nearly all of it became resident; packed,
    // idle RSS falls by about 1.1 MiB and peak RSS by 1.3 to 1.5. Release builds only
    // (the names carry hashes that differ between profiles), and only with a linker that
    // takes the option (lld, the default for this target since Rust 1.90; GNU ld refuses
    // it). Names the binary no longer has are skipped, so a stale list costs memory,
    // never a build.
    let order = Path::new(env("CARGO_MANIFEST_DIR").as_str()).join(SYMBOL_ORDER);
    let order_args = [
        format!("-Wl,--symbol-ordering-file={}", order.display()),
        "-Wl,--no-warn-symbol-ordering".to_owned(),
    ];
    if env("PROFILE") == "release"
        && order.is_file()
        && probe_link("symbol_order", &order_args).is_some()
    {
        for arg in order_args {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// Links an empty program with the same rustc, target, flags and linker as the real
/// build, plus `link_args`: the only reliable way to know what the linker takes. Returns
/// the linked program.
fn probe_link(name: &str, link_args: &[impl AsRef<str>]) -> Option<PathBuf> {
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let source = out_dir.join("link_probe.rs");
    let binary = out_dir.join(format!("link_probe_{name}"));
    std::fs::write(&source, "fn main() {}\n").ok()?;
    let mut rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    rustc
        .arg("--target")
        .arg(env("TARGET"))
        .arg("--crate-type=bin")
        .arg("-o")
        .arg(&binary);
    for arg in link_args {
        rustc.arg(format!("-Clink-arg={}", arg.as_ref()));
    }
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    let flags = env("CARGO_ENCODED_RUSTFLAGS");
    rustc.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    let output = rustc.arg(&source).output().ok()?;
    output.status.success().then_some(binary)
}

/// True when `binary` names glibc's `GLIBC_ABI_DT_RELR` version, which the linker adds
/// only when it packed relocations against a C library that can apply them.
fn requires_glibc_relr(binary: &Path) -> bool {
    let needle = b"GLIBC_ABI_DT_RELR";
    std::fs::read(binary).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
}
