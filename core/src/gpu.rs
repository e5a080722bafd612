//! What NVML says about the GPUs: identity, free memory, and memory per process.
//!
//! A GPU in MIG mode is not one pool but several: each MIG instance has its
//! own memory, its own processes and its own UUID (`MIG-…`), which CUDA takes
//! in `CUDA_VISIBLE_DEVICES` as it takes a GPU's.  So [`list`] gives every MIG
//! instance in place of its parent, and a GPU in MIG mode with no instance
//! gives nothing to run on.
//!
//! nvml-wrapper loads `libnvidia-ml.so` at run time, so a machine without the
//! NVIDIA driver is not an error here, only a machine with no GPUs; callers get
//! the reason as text to say once.

use std::sync::OnceLock;

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use serde::{Deserialize, Serialize};

/// One GPU (or one MIG instance of a GPU) as the admission logic sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML's index of the physical GPU (a MIG instance's parent's).
    pub index: u32,
    /// Which MIG instance of that GPU this is; None for a whole GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<MigSlot>,
    /// `GPU-…`, or `MIG-…` for an instance: what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: String,
    pub name: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// (pid, bytes) of every compute process on this GPU, ours or not.
    pub processes: Vec<(u32, u64)>,
}

/// Where a MIG instance is: its slot on its parent GPU (NVML's MIG device
/// index) and that GPU's UUID, so `gpus:` in the config can name the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigSlot {
    pub slot: u32,
    pub parent_uuid: String,
}

impl GpuInfo {
    /// "GPU 0 (NVIDIA H100 80GB HBM3)", or "GPU 0 MIG 2 (NVIDIA H100 80GB
    /// HBM3 MIG 1g.10gb)" for a MIG instance: how people and `nvidia-smi`
    /// point at it.
    pub fn label(&self) -> String {
        match &self.mig {
            None => format!("GPU {} ({})", self.index, self.name),
            Some(m) => format!("GPU {} MIG {} ({})", self.index, m.slot, self.name),
        }
    }

    /// The label and the UUID: the whole identity, for status.
    pub fn describe(&self) -> String {
        format!("{} {}", self.label(), self.uuid)
    }

    /// Whether `uuid` names this pool: its own UUID, or its parent's.
    pub(crate) fn is_named_by(&self, uuid: &str) -> bool {
        self.uuid == uuid || self.mig.as_ref().is_some_and(|m| m.parent_uuid == uuid)
    }
}

/// The process-wide NVML handle, or why there is none.
pub fn nvml() -> Result<&'static Nvml, String> {
    static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();
    NVML.get_or_init(|| Nvml::init().map_err(|e| why_no_nvml(&e)))
        .as_ref()
        .map_err(Clone::clone)
}

/// Why there is no NVML, in a user's words: a machine without the NVIDIA
/// driver is the common case, and the loader's own error text says nothing
/// to someone who never asked for a GPU.
fn why_no_nvml(e: &nvml_wrapper::error::NvmlError) -> String {
    match e {
        nvml_wrapper::error::NvmlError::LibloadingError(_) => {
            "no NVIDIA driver: libnvidia-ml.so.1 is not installed".into()
        }
        other => format!("NVML unavailable: {other}"),
    }
}

/// Every GPU NVML can see (each MIG instance in place of its GPU), with its
/// memory right now.
pub fn list() -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml()?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut without_instances = Vec::new();
    for index in 0..count {
        let d = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        // NVML_DEVICE_MIG_ENABLE is 1; a GPU without MIG answers NotSupported.
        if d.mig_mode().is_ok_and(|m| m.current == 1) {
            let parent_uuid = d.uuid().map_err(|e| e.to_string())?;
            let before = out.len();
            // Slots without an instance answer NotFound.
            for slot in 0..d.mig_device_count().unwrap_or(0) {
                if let Ok(m) = d.mig_device_by_index(slot) {
                    let mig = MigSlot {
                        slot,
                        parent_uuid: parent_uuid.clone(),
                    };
                    out.push(read_device(&m, index, Some(mig))?);
                }
            }
            if out.len() == before {
                without_instances.push(index);
            }
        } else {
            out.push(read_device(&d, index, None)?);
        }
    }
    if out.is_empty() && !without_instances.is_empty() {
        return Err(format!(
            "GPU {without_instances:?} in MIG mode without MIG instances (create some with \
             `nvidia-smi mig -cgi … -C`)"
        ));
    }
    Ok(out)
}

/// One GPU or MIG instance: its identity, memory and compute processes.
fn read_device(
    d: &nvml_wrapper::Device,
    index: u32,
    mig: Option<MigSlot>,
) -> Result<GpuInfo, String> {
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
    Ok(GpuInfo {
        index,
        mig,
        uuid: d.uuid().map_err(|e| e.to_string())?,
        name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
        total_bytes: mem.total,
        free_bytes: mem.free,
        processes,
    })
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
