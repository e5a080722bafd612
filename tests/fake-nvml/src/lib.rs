//! A fake `libnvidia-ml.so` for tests: scripted GPUs instead of real ones.
//!
//! mezod admits jobs by the free GPU memory NVML reports, through the
//! `nvml-wrapper` crate, which `dlopen`s the NVML library at run time. The test
//! machines have no GPU, so without this library the admission path can only be
//! tested around NVML, never through it. This cdylib exports the few C symbols
//! that path calls, with NVML's exact ABI, so the daemon's real code
//! (`Nvml::init()`, nvml-wrapper's real loading) runs against GPUs a test scripts.
//!
//! # Loading it
//!
//! `Nvml::init()` (nvml-wrapper 0.13, Linux) calls `dlopen("libnvidia-ml.so.1")`,
//! a bare name, so the dynamic loader searches `LD_LIBRARY_PATH` first. A test
//! copies or symlinks the built `libnvidia_ml.so` to `<dir>/libnvidia-ml.so.1`
//! and starts the daemon with `LD_LIBRARY_PATH=<dir>` and `MEZOD_FAKE_NVML=<json>`
//! (`LD_LIBRARY_PATH` is read when a process starts, so it must be set for a
//! child process, not changed inside a running one). In-process, the library can
//! also be loaded by path: `Nvml::builder().lib_path(path).init()`.
//!
//! # The script
//!
//! Every call (re)reads the JSON file named by the env var `MEZOD_FAKE_NVML`, so
//! a test may rewrite it while the daemon runs (write a temp file and rename it
//! over, so no reader sees half a file):
//!
//! ```json
//! {"gpus": [{"uuid": "GPU-aaaa", "name": "Fake H100",
//!            "total_bytes": 85899345920, "free_bytes": 85899345920,
//!            "processes": [{"pid": 123, "used_bytes": 1073741824}]}]}
//! ```
//!
//! * `uuid` and `total_bytes` are required; `name` defaults to "Fake GPU",
//!   `processes` to none, and `gpus` to none (a driver with no GPUs).
//! * `free_bytes` omitted: `total_bytes` minus the processes' `used_bytes`.
//!   `used` in the memory info is always `total - free` (`reserved` is 0).
//! * `used_bytes` omitted or null: NVML's "not available" (`u64::MAX`), which
//!   nvml-wrapper turns into `UsedGpuMemory::Unavailable`.
//! * `"mig": [instance or null, …]` on a GPU puts it in MIG mode: each
//!   entry is one MIG device slot (the array's length is the GPU's
//!   `nvmlDeviceGetMaxMigDeviceCount`), an instance written like a GPU
//!   (`uuid` `MIG-…`, `name`, `total_bytes`, `free_bytes`, `processes`), or
//!   null for a slot without one (`NVML_ERROR_NOT_FOUND`, as NVML answers).
//!   A GPU without `mig` does not support MIG (`NVML_ERROR_NOT_SUPPORTED`).
//! * `"init_error": true`: `nvmlInit` fails with `NVML_ERROR_DRIVER_NOT_LOADED`
//!   (a machine whose driver is broken). It is only checked at init.
//! * No env var, or a missing or invalid file: `nvmlInit` and every other call
//!   fail with `NVML_ERROR_UNKNOWN`.
//!
//! # Semantics kept from NVML
//!
//! * Calls before `nvmlInit` (or after the matching `nvmlShutdown`; init is
//!   reference-counted) return `NVML_ERROR_UNINITIALIZED`.
//! * A device handle is not a real pointer: it is the GPU's index + 1 cast to a
//!   pointer (so null stays invalid); a MIG device's adds its slot + 1 times
//!   2^16.  Name, UUID, memory and processes answer for either kind of handle,
//!   a MIG device's with the instance's own. A handle whose GPU has since disappeared
//!   from the file returns `NVML_ERROR_GPU_IS_LOST`.
//! * String outputs are NUL-terminated; a buffer too short returns
//!   `NVML_ERROR_INSUFFICIENT_SIZE`. The process list follows NVML's two-call
//!   protocol: a count too small (or a null array) gets the needed count and
//!   `NVML_ERROR_INSUFFICIENT_SIZE`; no processes is `NVML_SUCCESS` with count 0.

// The exported functions are unsafe for the reason every C API is: callers pass
// valid pointers and buffer lengths, per nvml.h. Each checks for null pointers.
#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_uint, c_ulonglong, c_void, CStr};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use serde_json::Value;

/// `nvmlReturn_t` and the codes used here (values from nvml.h).
type Ret = c_uint;
const SUCCESS: Ret = 0;
const UNINITIALIZED: Ret = 1;
const INVALID_ARGUMENT: Ret = 2;
const NOT_SUPPORTED: Ret = 3;
const NOT_FOUND: Ret = 6;
const INSUFFICIENT_SIZE: Ret = 7;
const DRIVER_NOT_LOADED: Ret = 9;
const GPU_IS_LOST: Ret = 15;
const ARGUMENT_VERSION_MISMATCH: Ret = 25;
const UNKNOWN: Ret = 999;

/// `NVML_VALUE_NOT_AVAILABLE` (-1) as an `unsigned long long`.
const NOT_AVAILABLE: u64 = u64::MAX;
/// `gpuInstanceId` / `computeInstanceId` of a process on a GPU not in MIG mode.
const NO_INSTANCE: c_uint = 0xFFFF_FFFF;
const DRIVER_VERSION: &str = "550.54.15";

/// `nvmlDevice_t`: index + 1 of the GPU in the script, cast to a pointer.
type Device = *mut c_void;

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}
/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)`, size | (2 << 24).
const MEMORY_V2: c_uint = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;

/// `nvmlProcessInfo_t` (= `nvmlProcessInfo_v2_t`, the struct `_v3` functions fill).
#[repr(C)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

struct Gpu {
    uuid: String,
    name: String,
    total: u64,
    free: u64,
    /// (pid, bytes or None for "not available")
    processes: Vec<(u32, Option<u64>)>,
    /// MIG mode: its device slots, each an instance or empty. None: no MIG.
    mig: Option<Vec<Option<Gpu>>>,
}

struct Machine {
    init_error: bool,
    gpus: Vec<Gpu>,
}

/// Outstanding `nvmlInit`s not yet matched by `nvmlShutdown`.
static INITS: AtomicU32 = AtomicU32::new(0);

/// The script as it is in the file now, or None if there is none or it is invalid.
fn read_script() -> Option<Machine> {
    let path = std::env::var_os("MEZOD_FAKE_NVML")?;
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let init_error = match v.get("init_error") {
        None => false,
        Some(b) => b.as_bool()?,
    };
    let gpus = match v.get("gpus") {
        None => Vec::new(),
        Some(g) => g.as_array()?.iter().map(parse_gpu).collect::<Option<_>>()?,
    };
    Some(Machine { init_error, gpus })
}

fn parse_gpu(g: &Value) -> Option<Gpu> {
    let processes: Vec<(u32, Option<u64>)> = match g.get("processes") {
        None => Vec::new(),
        Some(p) => p
            .as_array()?
            .iter()
            .map(parse_process)
            .collect::<Option<_>>()?,
    };
    let total = g.get("total_bytes")?.as_u64()?;
    let free = match g.get("free_bytes") {
        Some(f) => f.as_u64()?,
        None => total.saturating_sub(processes.iter().filter_map(|p| p.1).sum()),
    };
    let name = match g.get("name") {
        None => "Fake GPU",
        Some(n) => n.as_str()?,
    };
    let mig = match g.get("mig") {
        None => None,
        Some(slots) => Some(
            slots
                .as_array()?
                .iter()
                .map(|slot| match slot {
                    Value::Null => Some(None),
                    instance => parse_gpu(instance).map(Some),
                })
                .collect::<Option<_>>()?,
        ),
    };
    Some(Gpu {
        uuid: g.get("uuid")?.as_str()?.to_owned(),
        name: name.to_owned(),
        total,
        free,
        processes,
        mig,
    })
}

fn parse_process(p: &Value) -> Option<(u32, Option<u64>)> {
    let pid = u32::try_from(p.get("pid")?.as_u64()?).ok()?;
    let bytes = match p.get("used_bytes") {
        None | Some(Value::Null) => None,
        Some(b) => Some(b.as_u64()?),
    };
    Some((pid, bytes))
}

/// The scripted GPUs, for any call after init.
fn gpus() -> Result<Vec<Gpu>, Ret> {
    if INITS.load(SeqCst) == 0 {
        return Err(UNINITIALIZED);
    }
    Ok(read_script().ok_or(UNKNOWN)?.gpus)
}

/// A MIG device's handle carries its slot + 1 from this bit on.
const MIG_SHIFT: u32 = 16;

/// (GPU index, MIG slot) of a handle.
fn decode(device: Device) -> Result<(usize, Option<usize>), Ret> {
    let raw = device as usize;
    let index = (raw & ((1 << MIG_SHIFT) - 1))
        .checked_sub(1)
        .ok_or(INVALID_ARGUMENT)?;
    Ok((index, (raw >> MIG_SHIFT).checked_sub(1)))
}

/// The physical GPU of a handle (a MIG device's parent), as the file says now.
fn parent(device: Device) -> Result<Gpu, Ret> {
    let (index, _) = decode(device)?;
    gpus()?.into_iter().nth(index).ok_or(GPU_IS_LOST)
}

/// The scripted GPU or MIG instance behind a handle, as the file says now.
fn gpu(device: Device) -> Result<Gpu, Ret> {
    let (_, slot) = decode(device)?;
    let g = parent(device)?;
    match slot {
        None => Ok(g),
        Some(s) => g
            .mig
            .and_then(|mut slots| (s < slots.len()).then(|| slots.swap_remove(s)))
            .flatten()
            .ok_or(GPU_IS_LOST),
    }
}

/// Turns a body written with `?` into an NVML return code.
fn code(body: impl FnOnce() -> Result<(), Ret>) -> Ret {
    body().err().unwrap_or(SUCCESS)
}

/// Writes `s` NUL-terminated into a caller's buffer of `len` bytes.
unsafe fn put_str(s: &str, buf: *mut c_char, len: c_uint) -> Result<(), Ret> {
    if buf.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    if s.as_bytes().contains(&0) {
        return Err(UNKNOWN);
    }
    if s.len() + 1 > len as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
    *buf.add(s.len()) = 0;
    Ok(())
}

/// Writes through an out-pointer the caller must supply.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), Ret> {
    if out.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    out.write(value);
    Ok(())
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> Ret {
    match read_script() {
        None => UNKNOWN,
        Some(m) if m.init_error => DRIVER_NOT_LOADED,
        Some(_) => {
            INITS.fetch_add(1, SeqCst);
            SUCCESS
        }
    }
}

/// Used by `Nvml::builder().flags(..).init()`; the flags are ignored.
#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    nvmlInit_v2()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> Ret {
    match INITS.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)) {
        Ok(_) => SUCCESS,
        Err(_) => UNINITIALIZED,
    }
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let text: &CStr = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        NOT_FOUND => c"Not Found",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        GPU_IS_LOST => c"GPU is lost",
        ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

/// Called by `Nvml::init()` itself, to pick the field-id numbering.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    code(|| {
        gpus()?;
        put_str(DRIVER_VERSION, version, length)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    code(|| put(count, gpus()?.len() as c_uint))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Device) -> Ret {
    code(|| {
        if index as usize >= gpus()?.len() {
            return Err(INVALID_ARGUMENT);
        }
        put(device, (index as usize + 1) as Device)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    code(|| put_str(&gpu(device)?.uuid, uuid, length))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    code(|| put_str(&gpu(device)?.name, name, length))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: Device, memory: *mut MemoryV2) -> Ret {
    code(|| {
        let g = gpu(device)?;
        if memory.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        if (*memory).version != MEMORY_V2 {
            return Err(ARGUMENT_VERSION_MISMATCH);
        }
        let used = g.total.saturating_sub(g.free);
        put(
            memory,
            MemoryV2 {
                version: MEMORY_V2,
                total: g.total,
                reserved: 0,
                free: g.free,
                used,
            },
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    info_count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    code(|| {
        let g = gpu(device)?;
        if info_count.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        let n = g.processes.len();
        let room = *info_count as usize;
        *info_count = n as c_uint;
        if n > 0 && (infos.is_null() || room < n) {
            return Err(INSUFFICIENT_SIZE);
        }
        // On a MIG device, its processes name the instance (here: its slot).
        let instance = decode(device)?.1.map_or(NO_INSTANCE, |s| s as c_uint);
        for (i, &(pid, bytes)) in g.processes.iter().enumerate() {
            infos.add(i).write(ProcessInfo {
                pid,
                used_gpu_memory: bytes.unwrap_or(NOT_AVAILABLE),
                gpu_instance_id: instance,
                compute_instance_id: if instance == NO_INSTANCE {
                    NO_INSTANCE
                } else {
                    0
                },
            });
        }
        Ok(())
    })
}

/// The MIG slots of a physical GPU's handle; a MIG device's handle, or a GPU
/// without MIG, does not support MIG queries.
fn mig_slots(device: Device) -> Result<Vec<Option<Gpu>>, Ret> {
    if decode(device)?.1.is_some() {
        return Err(NOT_SUPPORTED);
    }
    parent(device)?.mig.ok_or(NOT_SUPPORTED)
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Device,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    code(|| {
        mig_slots(device)?;
        // NVML_DEVICE_MIG_ENABLE
        put(current, 1)?;
        put(pending, 1)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: Device, count: *mut c_uint) -> Ret {
    code(|| put(count, mig_slots(device)?.len() as c_uint))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: Device,
    index: c_uint,
    mig_device: *mut Device,
) -> Ret {
    code(|| {
        let slots = mig_slots(device)?;
        match slots.get(index as usize) {
            None => Err(INVALID_ARGUMENT),
            Some(None) => Err(NOT_FOUND),
            Some(Some(_)) => put(
                mig_device,
                (device as usize | ((index as usize + 1) << MIG_SHIFT)) as Device,
            ),
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: Device, is_mig: *mut c_uint) -> Ret {
    code(|| {
        gpu(device)?;
        put(is_mig, decode(device)?.1.is_some() as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: Device,
    device: *mut Device,
) -> Ret {
    code(|| {
        gpu(mig_device)?;
        let (index, slot) = decode(mig_device)?;
        slot.ok_or(INVALID_ARGUMENT)?;
        put(device, (index + 1) as Device)
    })
}
