//! Link libtorch into the engine so that CUDA is really there on a GPU machine,
//! and let it find libtorch without `LD_LIBRARY_PATH` on the machine that built it.
use std::process::Command;

/// The `lib` folder of the PyTorch install that torch-sys links against
/// (`LIBTORCH_USE_PYTORCH=1`): same interpreter lookup as torch-sys.
fn torch_lib_dir() -> Option<String> {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .args([
            "-c",
            "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The PyTorch version linked, recorded in every run's determinism fingerprint.
fn torch_version() -> String {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=MEZOD_TORCH_VERSION={}", torch_version());
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-search=native={dir}/lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    } else if let Some(dir) = torch_lib_dir() {
        println!("cargo:rustc-link-search=native={dir}");
        // RUNPATH (not RPATH): LD_LIBRARY_PATH still wins, so the same binary
        // runs on another machine whose torch lives elsewhere.
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{dir}");
    }
    // libtorch_cuda.so is only reached through static initialisers; with the
    // default --as-needed the linker drops it and CUDA is silently missing.
    // Only the engine gets these: `mezod` itself must not load libtorch.
    for arg in ["-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10"] {
        println!("cargo:rustc-link-arg-bin=mezod-engine={arg}");
    }
}
