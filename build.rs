//! Embeds libtorch's library folder as an rpath in every binary, test and bench of this package,
//! so `dlpipe` and `cargo test` run without LD_LIBRARY_PATH. torch-sys (a direct dependency for
//! exactly this reason) reports the folder as `DEP_TCH_LIBTORCH_LIB`. That path is the build
//! machine's: `scripts/dist` (`make dist`) replaces it with `$ORIGIN/../lib` in the release,
//! beside the libraries it copies there.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}"),
        Err(_) => println!("cargo:warning=torch-sys did not report libtorch's folder; set LD_LIBRARY_PATH to run"),
    }
}
