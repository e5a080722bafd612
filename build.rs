//! Link libtorch into the engine so that CUDA is really there on a GPU machine,
//! let it find libtorch without `LD_LIBRARY_PATH` on the machine that built it,
//! and compile csrc/c10d_shim.cpp (the replicas' c10d, see src/replicas/c10d.rs)
//! against the same PyTorch's headers.
use std::process::Command;

/// The PyTorch install that torch-sys links against: `LIBTORCH` if set, else
/// the one the interpreter imports (`LIBTORCH_USE_PYTORCH=1`, torch-sys's lookup).
struct Torch {
    /// Folders holding `torch/`, `ATen/`, `c10/` and the C++ API headers.
    include: Vec<String>,
    lib: String,
    /// Its `_GLIBCXX_USE_CXX11_ABI`: `std::string` in the c10d signatures
    /// only links when the shim is compiled with the same value.
    cxx11_abi: bool,
}

fn python() -> String {
    std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into())
}

/// `LIBTORCH` with torch-sys's meaning: headers under `$LIBTORCH_INCLUDE/include`
/// (default `$LIBTORCH`), libraries under `$LIBTORCH/lib`, the C++ ABI from
/// `LIBTORCH_CXX11_ABI` (default 1).
fn torch_from_libtorch(dir: &str) -> Torch {
    let include = std::env::var("LIBTORCH_INCLUDE").unwrap_or_else(|_| dir.to_string());
    Torch {
        include: vec![
            format!("{include}/include"),
            format!("{include}/include/torch/csrc/api/include"),
        ],
        lib: format!("{dir}/lib"),
        cxx11_abi: std::env::var("LIBTORCH_CXX11_ABI").map_or(true, |v| v.trim() != "0"),
    }
}

/// The PyTorch the interpreter imports, or why there is none.
fn torch_from_python() -> Result<Torch, String> {
    let python = python();
    let out = Command::new(&python)
        .args([
            "-c",
            "import torch, os; print(os.path.dirname(torch.__file__)); \
             print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
        ])
        .output()
        .map_err(|e| format!("could not run `{python}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{python} -c 'import torch'` failed:\n{}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(str::trim);
    match (lines.next(), lines.next()) {
        (Some(dir), Some(abi)) if !dir.is_empty() => Ok(Torch {
            include: vec![
                format!("{dir}/include"),
                format!("{dir}/include/torch/csrc/api/include"),
            ],
            lib: format!("{dir}/lib"),
            cxx11_abi: abi == "1",
        }),
        _ => Err(format!("`{python}` printed no torch folder: {text:?}")),
    }
}

/// The PyTorch version linked, recorded in every run's determinism fingerprint.
fn torch_version() -> String {
    Command::new(python())
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// csrc/c10d_shim.cpp into a static library that cargo links into the `mezod`
/// lib crate, hence into every binary that uses it (the engine, the tests);
/// the `mezod` binary does not use the lib crate and stays free of libtorch.
fn compile_c10d_shim(torch: &Torch) {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/gloo_stub");
    let header = "torch/csrc/distributed/c10d/ProcessGroupGloo.hpp";
    if !torch
        .include
        .iter()
        .any(|dir| std::path::Path::new(dir).join(header).exists())
    {
        panic!(
            "mezod's build found PyTorch's headers in {:?} but no {header} there: \
             the replicas' c10d shim needs a PyTorch with its C++ headers (the pip wheel has them)",
            torch.include
        );
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/c10d_shim.cpp")
        .includes(&torch.include)
        // The wheel ships no gloo/*.h; ProcessGroupGloo.hpp needs a few names.
        .include("csrc/gloo_stub")
        // ProcessGroupGloo.hpp is empty without it.
        .define("USE_C10D_GLOO", None)
        .define(
            "_GLIBCXX_USE_CXX11_ABI",
            if torch.cxx11_abi { "1" } else { "0" },
        )
        // torch's headers are noisy (unused parameters, deprecations).
        .warnings(false)
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter")
        .compile("c10d_shim");
    // What the shim itself needs (torch-sys links these too); after the
    // static library on the link line.
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-env=MEZOD_TORCH_VERSION={}", torch_version());
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=PYTHON_SYS_EXECUTABLE");
    let torch = match std::env::var("LIBTORCH") {
        Ok(dir) => torch_from_libtorch(&dir),
        Err(_) => torch_from_python().unwrap_or_else(|why| {
            panic!(
                "mezod's build could not find PyTorch: {why}\n\
                 Build with the venv's python first on PATH and LIBTORCH_USE_PYTORCH=1 \
                 (`make build` does both after `make setup` installs PyTorch into .venv), \
                 or set LIBTORCH to a libtorch folder."
            )
        }),
    };
    println!("cargo:rustc-link-search=native={}", torch.lib);
    // RUNPATH (not RPATH): LD_LIBRARY_PATH still wins, so the same binary
    // runs on another machine whose torch lives elsewhere.
    println!(
        "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
        torch.lib
    );
    compile_c10d_shim(&torch);
    // libtorch_cuda.so is only reached through static initialisers; with the
    // default --as-needed the linker drops it and CUDA is silently missing.
    // Only the engine gets these: `mezod` itself must not load libtorch.
    for arg in ["-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10"] {
        println!("cargo:rustc-link-arg-bin=mezod-engine={arg}");
    }
}
