//! The layer split a run keeps (`placement.json`).  A model split over
//! several devices is placed by their free memory when its run starts; when
//! the run resumes, the same layers go to the same devices whatever is free
//! then, because where a layer runs decides its bits (a GPU's kernels are
//! not the CPU's, and torch's generator draws z on each GPU from that GPU's
//! own state).  A run moved to other devices (a spec that computes the same,
//! such as `cpu` and `[cpu, cpu]`) is placed afresh.

use std::path::Path;

use anyhow::Result;
use mezod_core::durable;
use mezod_core::model_ref::{DeviceRef, Dtype, ModelSource};
use mezod_core::placement::Split;

use crate::model::{torch_device, DeviceMap};

/// The file in a run folder.
pub const FILE: &str = "placement.json";

/// Where the parts of the run's model in `out` go on `devices`: the split
/// the run recorded for those devices, else a new one by their free memory
/// now, recorded.  One device needs no split and records nothing.
pub fn device_map(
    out: &Path,
    source: &ModelSource,
    dtype: Dtype,
    devices: &[DeviceRef],
) -> Result<DeviceMap> {
    if let [one] = devices {
        return Ok(DeviceMap::single(torch_device(*one)));
    }
    let path = out.join(FILE);
    let recorded = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str::<Split>(&text).ok())
        .filter(|split| split.devices == devices);
    if let Some(split) = recorded {
        tracing::info!("layers per device as the run started: {}", describe(&split));
        return Ok(DeviceMap::of_split(&split));
    }
    let (map, split) = DeviceMap::plan(source, dtype, devices)?;
    tracing::info!("layers per device, by free memory: {}", describe(&split));
    if split.layers.iter().any(|&n| n == 0) {
        tracing::warn!(
            "a device holds no layer ({}): the model has too few layers for its devices, or \
             the GPUs hold them all",
            describe(&split)
        );
    }
    durable::write(&path, serde_json::to_string_pretty(&split)?)?;
    Ok(map)
}

/// `cuda:0 12, cpu 4`.
fn describe(split: &Split) -> String {
    split
        .devices
        .iter()
        .zip(&split.layers)
        .map(|(d, n)| format!("{d} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
