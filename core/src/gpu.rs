//! What NVML says about the GPUs: identity, free memory, and memory per process.
//!
//! nvml-wrapper loads `libnvidia-ml.so` at run time, so a machine without the
//! NVIDIA driver is not an error here, only a machine with no GPUs; callers get
//! the reason as text to say once.

use std::sync::OnceLock;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

/// One GPU as the admission logic sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// (pid, bytes) of every compute process on this GPU, ours or not.
    pub processes: Vec<(u32, u64)>,
}

/// The process-wide NVML handle, or why there is none.
pub fn nvml() -> Result<&'static Nvml, String> {
    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().map_err(|e| format!("NVML unavailable: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// Every GPU NVML can see, with its memory right now.
pub fn list() -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml()?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for index in 0..count {
        let d = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        // Processes before memory: one that allocates in between then shows
        // less than it holds while free memory already lacks it, so the
        // daemon's reservations err on the safe side (counting it twice).
        let processes = d
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .map(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => (p.pid, b),
                UsedGpuMemory::Unavailable => (p.pid, 0),
            })
            .collect();
        let mem = d.memory_info().map_err(|e| e.to_string())?;
        out.push(GpuInfo {
            index,
            uuid: d.uuid().map_err(|e| e.to_string())?,
            name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
            total_bytes: mem.total,
            free_bytes: mem.free,
            processes,
        });
    }
    Ok(out)
}

/// GPU memory held by `pid` on the GPU `uuid`, or on all GPUs (None without NVML).
pub fn process_memory(pid: u32, uuid: Option<&str>) -> Option<u64> {
    let gpus = list().ok()?;
    Some(
        gpus.iter()
            .filter(|g| uuid.is_none_or(|u| g.uuid == u))
            .flat_map(|g| g.processes.iter())
            .filter(|(p, _)| *p == pid)
            .map(|(_, b)| b)
            .sum(),
    )
}

/// The GPU model for the determinism fingerprint: the daemon names the one it
/// assigned (`MEZOD_GPU_NAME`); otherwise the distinct models NVML sees.
pub fn model_name() -> Option<String> {
    if let Ok(name) = std::env::var("MEZOD_GPU_NAME") {
        return Some(name);
    }
    let mut names: Vec<String> = list().ok()?.into_iter().map(|g| g.name).collect();
    names.sort();
    names.dedup();
    (!names.is_empty()).then(|| names.join(" + "))
}
