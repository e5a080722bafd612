//! Loads the built fake NVML through nvml-wrapper's real loading path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

const GIB: u64 = 1 << 30;

/// Tests in this process share `MEZOD_FAKE_NVML`; each holds this while it uses it.
static ENV: Mutex<()> = Mutex::new(());

/// The cdylib, `<target>/<profile>/libnvidia_ml.so`.  `cargo test` does not
/// build a cdylib-only crate's library for its integration tests, so it is
/// built here when a workspace build has not made it yet.
fn fake_lib() -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let lib = profile_dir.join("libnvidia_ml.so");
    let _once = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !lib.is_file() {
        let profile = profile_dir.file_name().unwrap().to_str().unwrap();
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "build",
                "-p",
                "fake-nvml",
                "--profile",
                profile,
                "--target-dir",
            ])
            .arg(profile_dir.parent().unwrap())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building the fake NVML failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

/// Writes the script atomically (temp file + rename), as a test of a running daemon would.
fn write_script(path: &Path, json: serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn two_gpus() -> serde_json::Value {
    serde_json::json!({"gpus": [
        {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "Fake H100",
         "total_bytes": 80 * GIB,
         "processes": [{"pid": 4242, "used_bytes": 30 * GIB}]},
        {"uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "name": "Fake A100",
         "total_bytes": 40 * GIB, "free_bytes": 39 * GIB}
    ]})
}

#[test]
fn loads_by_path_and_rereads_the_script() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gpus.json");
    write_script(&script, two_gpus());
    std::env::set_var("MEZOD_FAKE_NVML", &script);

    let lib = fake_lib();
    let nvml = Nvml::builder().lib_path(lib.as_os_str()).init().unwrap();
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.device_count().unwrap(), 2);

    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(
        d0.uuid().unwrap(),
        "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    );
    assert_eq!(d0.name().unwrap(), "Fake H100");
    let m = d0.memory_info().unwrap();
    assert_eq!((m.total, m.free, m.used), (80 * GIB, 50 * GIB, 30 * GIB));
    let p = d0.running_compute_processes().unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].pid, 4242);
    assert_eq!(p[0].used_gpu_memory, UsedGpuMemory::Used(30 * GIB));
    assert_eq!(
        (p[0].gpu_instance_id, p[0].compute_instance_id),
        (None, None)
    );

    let d1 = nvml.device_by_index(1).unwrap();
    assert_eq!(
        d1.uuid().unwrap(),
        "GPU-bbbbbbbb-0000-0000-0000-000000000000"
    );
    assert_eq!(d1.name().unwrap(), "Fake A100");
    let m = d1.memory_info().unwrap();
    assert_eq!((m.total, m.free, m.used), (40 * GIB, 39 * GIB, GIB));
    assert!(d1.running_compute_processes().unwrap().is_empty());
    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));

    // The script changes under the running process: the same handles see it.
    write_script(
        &script,
        serde_json::json!({"gpus": [
            {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "Fake H100",
             "total_bytes": 80 * GIB,
             "processes": [{"pid": 4242, "used_bytes": 10 * GIB}, {"pid": 77}]}
        ]}),
    );
    assert_eq!(nvml.device_count().unwrap(), 1);
    let m = d0.memory_info().unwrap();
    assert_eq!((m.free, m.used), (70 * GIB, 10 * GIB));
    let p = d0.running_compute_processes().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0].pid, &p[0].used_gpu_memory),
        (4242, &UsedGpuMemory::Used(10 * GIB))
    );
    assert_eq!(
        (p[1].pid, &p[1].used_gpu_memory),
        (77, &UsedGpuMemory::Unavailable)
    );
    assert!(matches!(d1.uuid(), Err(NvmlError::GpuLost)));

    // An unreadable script fails calls, it does not crash the caller.
    std::fs::write(&script, "{not json").unwrap();
    assert!(matches!(nvml.device_count(), Err(NvmlError::Unknown)));

    nvml.shutdown().unwrap();
}

/// A GPU in MIG mode, as NVML shows one: the parent answers MIG queries, each
/// populated slot is a device handle with its own memory, UUID and processes,
/// an empty slot is `NotFound`, and a GPU without `mig` does not support MIG.
#[test]
fn mig_instances_are_devices_of_their_own() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gpus.json");
    write_script(
        &script,
        serde_json::json!({"gpus": [
            {"uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "Fake H100",
             "total_bytes": 80 * GIB,
             "mig": [
                {"uuid": "MIG-11111111-0000-0000-0000-000000000000",
                 "name": "Fake H100 MIG 3g.40gb", "total_bytes": 40 * GIB,
                 "processes": [{"pid": 4242, "used_bytes": 8 * GIB}]},
                null,
                {"uuid": "MIG-22222222-0000-0000-0000-000000000000",
                 "name": "Fake H100 MIG 1g.10gb", "total_bytes": 10 * GIB}
             ]},
            {"uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "total_bytes": 40 * GIB}
        ]}),
    );
    std::env::set_var("MEZOD_FAKE_NVML", &script);
    let lib = fake_lib();
    let nvml = Nvml::builder().lib_path(lib.as_os_str()).init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);

    let gpu = nvml.device_by_index(0).unwrap();
    let mode = gpu.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(gpu.mig_device_count().unwrap(), 3);
    assert!(!gpu.mig_is_mig_device_handle().unwrap());

    let a = gpu.mig_device_by_index(0).unwrap();
    assert!(a.mig_is_mig_device_handle().unwrap());
    assert_eq!(
        a.uuid().unwrap(),
        "MIG-11111111-0000-0000-0000-000000000000"
    );
    assert_eq!(a.name().unwrap(), "Fake H100 MIG 3g.40gb");
    let m = a.memory_info().unwrap();
    assert_eq!((m.total, m.free), (40 * GIB, 32 * GIB));
    let p = a.running_compute_processes().unwrap();
    assert_eq!((p.len(), p[0].pid), (1, 4242));
    assert_eq!(p[0].gpu_instance_id, Some(0));
    assert_eq!(
        a.mig_parent_device().unwrap().uuid().unwrap(),
        "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    );
    assert!(matches!(
        gpu.mig_device_by_index(1),
        Err(NvmlError::NotFound)
    ));
    let c = gpu.mig_device_by_index(2).unwrap();
    assert_eq!(c.memory_info().unwrap().free, 10 * GIB);
    assert!(c.running_compute_processes().unwrap().is_empty());
    assert!(matches!(
        gpu.mig_device_by_index(3),
        Err(NvmlError::InvalidArg)
    ));
    // A MIG device is no parent of more MIG devices.
    assert!(matches!(a.mig_mode(), Err(NvmlError::NotSupported)));

    let plain = nvml.device_by_index(1).unwrap();
    assert!(matches!(plain.mig_mode(), Err(NvmlError::NotSupported)));
    nvml.shutdown().unwrap();
}

#[test]
fn init_fails_when_scripted_or_unconfigured() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gpus.json");
    let lib = fake_lib();
    let init = || Nvml::builder().lib_path(lib.as_os_str()).init();

    write_script(&script, serde_json::json!({"init_error": true, "gpus": []}));
    std::env::set_var("MEZOD_FAKE_NVML", &script);
    assert!(matches!(init(), Err(NvmlError::DriverNotLoaded)));

    std::env::set_var("MEZOD_FAKE_NVML", dir.path().join("missing.json"));
    assert!(matches!(init(), Err(NvmlError::Unknown)));

    write_script(&script, serde_json::json!({"gpus": []}));
    std::env::set_var("MEZOD_FAKE_NVML", &script);
    assert_eq!(init().unwrap().device_count().unwrap(), 0);
}

/// What the daemon does: plain `Nvml::init()`, which dlopens "libnvidia-ml.so.1"
/// by bare name. The dynamic loader reads LD_LIBRARY_PATH only at process start,
/// so this re-runs this test binary as a child with it set, running only
/// `child_plain_init`.
#[test]
fn plain_init_finds_it_on_ld_library_path() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(fake_lib(), dir.path().join("libnvidia-ml.so.1")).unwrap();
    let script = dir.path().join("gpus.json");
    write_script(&script, two_gpus());

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_plain_init",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LD_LIBRARY_PATH", dir.path())
        .env("MEZOD_FAKE_NVML", &script)
        .env("FAKE_NVML_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "child test did not run:\n{stdout}"
    );
}

/// Runs only as the child of `plain_init_finds_it_on_ld_library_path`.
#[test]
fn child_plain_init() {
    if std::env::var_os("FAKE_NVML_CHILD").is_none() {
        return;
    }
    let nvml = Nvml::init().unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);
    let d0 = nvml.device_by_index(0).unwrap();
    assert_eq!(
        d0.uuid().unwrap(),
        "GPU-aaaaaaaa-0000-0000-0000-000000000000"
    );
    assert_eq!(d0.memory_info().unwrap().free, 50 * GIB);
    assert_eq!(d0.running_compute_processes().unwrap()[0].pid, 4242);
}
