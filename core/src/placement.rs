//! One model over several devices (`model.device: [cuda:0, cuda:1]`): which
//! of its consecutive layers each device holds.
//!
//! As accelerate's `device_map="auto"`: the embeddings on the first device,
//! the final norm and an untied head on the last, and the transformer layers
//! in between by free memory.  A tied head is the embedding matrix itself
//! (one parameter, perturbed and updated once), so it stays with the
//! embeddings on the first device and the last hidden states travel back to
//! it for the projection: a few positions × hidden per forward pass, where a
//! copy of the matrix on the last device would be vocabulary × hidden.
//!
//! GPUs share the layers in proportion to their free memory.  CPU entries,
//! which may only come last, hold what the GPUs cannot: the CPU is many
//! times slower, and a machine's memory is usually larger than its GPUs',
//! so in proportion it would take most of a model that fits the GPUs.
//! Entries of one kind alone share in proportion, so `[cpu, cpu]` (each
//! entry an equal part of the machine's memory) splits the layers evenly.
//!
//! The split is a pure function of the layers' bytes and the devices' free
//! bytes ([`split_layers`]).  Free memory changes from one start to the
//! next, and where a layer runs decides its bits (a GPU's matmul is not the
//! CPU's; torch's generator draws on each GPU from its own state), so a run
//! records the split it started with and keeps it when it resumes.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::estimate::{Shapes, GPU_RUNTIME_BYTES};
use crate::model_ref::{DeviceRef, Dtype, ModelSource};

/// A model's bytes by where they must go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelParts {
    /// Embeddings (and with them a tied head): on the first device.
    pub first: u64,
    /// Each transformer layer, in order.
    pub layers: Vec<u64>,
    /// The final norm, an untied head and a masked LM's head transform: on the last device.
    pub last: u64,
}

impl ModelParts {
    /// The parts of a model stored as `shapes` (Hugging Face names) at
    /// `elem` bytes per element.
    pub fn of(shapes: &Shapes, elem: u64) -> ModelParts {
        let mut parts = ModelParts::default();
        for (name, shape) in shapes {
            let bytes = shape.iter().map(|&d| d as u64).product::<u64>() * elem;
            match layer_index(name) {
                Some(i) => {
                    if parts.layers.len() <= i {
                        parts.layers.resize(i + 1, 0);
                    }
                    parts.layers[i] += bytes;
                }
                None if on_first_device(name) => parts.first += bytes,
                // Copies of a tied decoder some masked-LM checkpoints store: never loaded.
                None if name.ends_with("decoder.weight") => {}
                None => parts.last += bytes,
            }
        }
        parts
    }

    pub fn total(&self) -> u64 {
        self.first + self.layers.iter().sum::<u64>() + self.last
    }
}

/// The transformer layer a tensor belongs to, from its Hugging Face name:
/// `model.layers.3.…` (LLaMA, OPT's `decoder.layers`), `transformer.h.3.…`
/// (GPT-2), `encoder.layer.3.…` (BERT, RoBERTa).
pub fn layer_index(name: &str) -> Option<usize> {
    let segments: Vec<&str> = name.split('.').collect();
    segments.windows(2).find_map(|w| match w[0] {
        "layers" | "layer" | "h" => w[1].parse().ok(),
        _ => None,
    })
}

/// Whether a tensor outside the layers goes on the first device: the
/// embeddings, and a tied masked-LM decoder's bias with its weight (the
/// word embeddings).  The others go on the last.
pub fn on_first_device(name: &str) -> bool {
    is_embedding(name) || is_tied_decoder_bias(name)
}

/// Whether a tensor outside the layers belongs to the embeddings (token and
/// position tables, their norm, OPT's `project_in`).
fn is_embedding(name: &str) -> bool {
    name.split('.')
        .any(|s| s.contains("embed") || matches!(s, "wte" | "wpe" | "project_in"))
}

/// The bias of a masked LM's decoder, whose weight is the word embeddings
/// (BERT's `cls.predictions.bias`, RoBERTa's `lm_head.bias`).
fn is_tied_decoder_bias(name: &str) -> bool {
    name.ends_with("predictions.bias") || name == "lm_head.bias"
}

/// One device's room for layers as the split sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub cpu: bool,
    /// Free bytes (the parts pinned to it not yet taken off).
    pub free: u64,
}

/// How many consecutive layers each device holds, in device order (a
/// device may hold none).  Each device's room is its free bytes less the
/// parts pinned to it (embeddings on the first, the head on the last); the
/// layers' bytes are shared among the GPUs in proportion to their rooms, up
/// to what they hold, and what remains among the CPU entries in proportion
/// to theirs (a list of one kind shares everything in proportion; rooms all
/// zero share equally).  Layer i goes to the device whose share of the
/// running total its middle byte falls in, so the split follows the
/// proportions as closely as whole layers allow.
pub fn split_layers(parts: &ModelParts, rooms: &[Room]) -> Vec<usize> {
    let n = rooms.len();
    let mut counts = vec![0usize; n];
    if n == 0 {
        return counts;
    }
    let room: Vec<u64> = rooms
        .iter()
        .enumerate()
        .map(|(d, r)| {
            let pinned =
                if d == 0 { parts.first } else { 0 } + if d == n - 1 { parts.last } else { 0 };
            r.free.saturating_sub(pinned)
        })
        .collect();
    let total: u64 = parts.layers.iter().sum();
    let gpus: Vec<usize> = (0..n).filter(|&d| !rooms[d].cpu).collect();
    let cpus: Vec<usize> = (0..n).filter(|&d| rooms[d].cpu).collect();
    let mut target = vec![0f64; n];
    if gpus.is_empty() || cpus.is_empty() {
        share(total, &(0..n).collect::<Vec<_>>(), &room, &mut target);
    } else {
        let on_gpus = total.min(gpus.iter().map(|&d| room[d]).sum());
        share(on_gpus, &gpus, &room, &mut target);
        share(total - on_gpus, &cpus, &room, &mut target);
    }
    let (mut device, mut bound, mut start) = (0, target[0], 0u64);
    for &bytes in &parts.layers {
        let middle = start as f64 + bytes as f64 / 2.0;
        while device + 1 < n && middle >= bound {
            device += 1;
            bound += target[device];
        }
        counts[device] += 1;
        start += bytes;
    }
    counts
}

/// `amount` bytes shared among `members` in proportion to their `room`
/// (equally when they have none), added into `target`.
fn share(amount: u64, members: &[usize], room: &[u64], target: &mut [f64]) {
    let sum: u64 = members.iter().map(|&d| room[d]).sum();
    for &d in members {
        target[d] += if sum == 0 {
            amount as f64 / members.len() as f64
        } else {
            amount as f64 * (room[d] as f64 / sum as f64)
        };
    }
}

/// Which device holds how many consecutive layers: what a run records in
/// its folder and keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub devices: Vec<DeviceRef>,
    /// Layers per device, in device order.
    pub layers: Vec<usize>,
}

impl Split {
    /// The device (its index in `devices`) of each layer, in order.
    pub fn layer_slots(&self) -> Vec<usize> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(d, &n)| std::iter::repeat_n(d, n))
            .collect()
    }

    /// Each device's layers and the bytes of weights it holds.
    pub fn shares(&self, parts: &ModelParts, free: &[Option<u64>]) -> Vec<DeviceShare> {
        let n = self.devices.len();
        let mut layers = parts.layers.iter();
        self.devices
            .iter()
            .enumerate()
            .map(|(d, &device)| {
                let held: u64 = layers.by_ref().take(self.layers[d]).sum();
                let pinned =
                    if d == 0 { parts.first } else { 0 } + if d == n - 1 { parts.last } else { 0 };
                DeviceShare {
                    device,
                    layers: self.layers[d],
                    weights: held + pinned,
                    free: free.get(d).copied().flatten(),
                }
            })
            .collect()
    }
}

/// One device's part of a split model, for `mezod estimate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceShare {
    pub device: DeviceRef,
    pub layers: usize,
    /// Bytes of the model's weights it holds (its layers, and the embeddings
    /// or the head where it is the first or last device).
    pub weights: u64,
    /// Its free memory as measured when the split was made (None: unknown).
    pub free: Option<u64>,
}

/// The free bytes of each listed device as this machine reports them now:
/// `MemAvailable` for the CPU, each `cpu` entry an equal part of it; NVML's
/// free memory for a GPU (`cuda:N` is the N-th of `CUDA_VISIBLE_DEVICES`
/// where that is set), less the CUDA context; None where unknown.
pub fn free_bytes(devices: &[DeviceRef]) -> Vec<Option<u64>> {
    let cpus = devices.iter().filter(|d| !d.is_gpu()).count().max(1) as u64;
    let available = crate::procfs::kb_field("/proc/meminfo", "MemAvailable");
    let gpus = if devices.iter().any(DeviceRef::is_gpu) {
        crate::gpu::list().unwrap_or_default()
    } else {
        Vec::new()
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    devices
        .iter()
        .map(|d| match *d {
            DeviceRef::Cpu => (available > 0).then_some(available / cpus),
            DeviceRef::Cuda(n) => cuda_gpu(n, &gpus, visible.as_deref())
                .map(|g| g.free_bytes.saturating_sub(GPU_RUNTIME_BYTES)),
        })
        .collect()
}

/// The GPU CUDA calls `cuda:n`: the n-th entry of `CUDA_VISIBLE_DEVICES`
/// (an index, or a UUID or its prefix), else the n-th GPU NVML lists.
fn cuda_gpu<'g>(
    n: usize,
    gpus: &'g [crate::gpu::GpuInfo],
    visible: Option<&str>,
) -> Option<&'g crate::gpu::GpuInfo> {
    let Some(visible) = visible else {
        return gpus.get(n);
    };
    let entry = visible.split(',').map(str::trim).nth(n)?;
    match entry.parse::<u32>() {
        Ok(index) => gpus.iter().find(|g| g.index == index && g.mig.is_none()),
        Err(_) => gpus
            .iter()
            .find(|g| !entry.is_empty() && g.uuid.starts_with(entry)),
    }
}

/// The rooms of `devices` from their measured free bytes.  A GPU whose free
/// memory is unknown (no NVML) makes every GPU's unknown: they then count
/// as equal and large, sharing the layers evenly and leaving a CPU entry
/// only the head.  An unknown CPU figure counts as none.
pub fn rooms(devices: &[DeviceRef], free: &[Option<u64>]) -> Vec<Room> {
    let gpus_known = devices
        .iter()
        .zip(free)
        .all(|(d, f)| !d.is_gpu() || f.is_some());
    devices
        .iter()
        .zip(free)
        .map(|(d, f)| Room {
            cpu: !d.is_gpu(),
            free: match (d.is_gpu(), f) {
                (true, _) if !gpus_known => u64::MAX >> 16,
                (_, f) => f.unwrap_or(0),
            },
        })
        .collect()
}

/// The split of a model of `parts` over `devices` by their free memory now,
/// and those figures.
pub fn plan(parts: &ModelParts, devices: &[DeviceRef]) -> (Split, Vec<Option<u64>>) {
    let free = free_bytes(devices);
    let layers = split_layers(parts, &rooms(devices, &free));
    (
        Split {
            devices: devices.to_vec(),
            layers,
        },
        free,
    )
}

/// [`plan`] for the model `source` describes at `dtype`, its parts read from
/// the checkpoint's headers (a config's shapes from `shapes_of_config`).
pub fn plan_model(
    source: &ModelSource,
    dtype: Dtype,
    devices: &[DeviceRef],
    shapes_of_config: impl Fn(&Path) -> Result<Shapes>,
) -> Result<(ModelParts, Split, Vec<Option<u64>>)> {
    let (_, shapes) = crate::estimate::config_and_shapes(source, shapes_of_config)?;
    let parts = ModelParts::of(&shapes, dtype.bytes() as u64);
    let (split, free) = plan(&parts, devices);
    Ok((parts, split, free))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn parts(first: u64, layers: usize, each: u64, last: u64) -> ModelParts {
        ModelParts {
            first,
            layers: vec![each; layers],
            last,
        }
    }

    fn gpu(free: u64) -> Room {
        Room { cpu: false, free }
    }

    fn cpu(free: u64) -> Room {
        Room { cpu: true, free }
    }

    #[test]
    fn equal_rooms_split_the_layers_evenly() {
        let model = parts(0, 30, GIB, 0);
        assert_eq!(
            split_layers(&model, &[cpu(64 * GIB), cpu(64 * GIB)]),
            [15, 15]
        );
        assert_eq!(split_layers(&model, &[gpu(80 * GIB); 3]), [10, 10, 10]);
        // Pinned parts far below the free memory change nothing.
        let model = parts(GIB / 8, 4, GIB / 16, GIB / 8);
        assert_eq!(split_layers(&model, &[cpu(8 * GIB), cpu(8 * GIB)]), [2, 2]);
        // An odd count leaves the extra layer to the later device (each
        // layer goes where its middle byte falls).
        assert_eq!(
            split_layers(&parts(0, 3, GIB, 0), &[gpu(GIB), gpu(GIB)]),
            [1, 2]
        );
    }

    #[test]
    fn gpus_share_in_proportion_to_their_room_less_what_is_pinned_to_them() {
        let model = parts(0, 30, GIB, 0);
        assert_eq!(
            split_layers(&model, &[gpu(20 * GIB), gpu(40 * GIB)]),
            [10, 20]
        );
        // The embeddings take 10 GiB of the first GPU's 30: both have 20 left.
        let model = parts(10 * GIB, 30, GIB, 0);
        assert_eq!(
            split_layers(&model, &[gpu(30 * GIB), gpu(20 * GIB)]),
            [15, 15]
        );
        // The head on the last likewise.
        let model = parts(0, 30, GIB, 10 * GIB);
        assert_eq!(
            split_layers(&model, &[gpu(20 * GIB), gpu(30 * GIB)]),
            [15, 15]
        );
        // Layers stay consecutive and every layer is placed.
        let model = parts(GIB, 7, 3 * GIB, 2 * GIB);
        let counts = split_layers(&model, &[gpu(5 * GIB), gpu(11 * GIB), gpu(9 * GIB)]);
        assert_eq!(counts.iter().sum::<usize>(), 7);
        assert_eq!(counts, [1, 4, 2]);
    }

    #[test]
    fn the_cpu_holds_only_what_the_gpus_cannot() {
        // Fits the GPU: the CPU entry gets no layer (it keeps the head).
        let model = parts(GIB, 10, GIB, GIB);
        assert_eq!(
            split_layers(&model, &[gpu(40 * GIB), cpu(500 * GIB)]),
            [10, 0]
        );
        // 10 of 20 GiB of layers fit the GPU (11 GiB less the embeddings).
        let model = parts(GIB, 20, GIB, GIB);
        assert_eq!(
            split_layers(&model, &[gpu(11 * GIB), cpu(500 * GIB)]),
            [10, 10]
        );
        // Two GPUs in proportion, the CPU entries even with each other.
        let model = parts(0, 40, GIB, 0);
        assert_eq!(
            split_layers(
                &model,
                &[gpu(10 * GIB), gpu(20 * GIB), cpu(100 * GIB), cpu(100 * GIB)]
            ),
            [10, 20, 5, 5]
        );
        // Full GPUs: everything on the CPU.
        assert_eq!(split_layers(&model, &[gpu(0), cpu(GIB)]), [0, 40]);
    }

    #[test]
    fn more_devices_than_layers_leave_a_device_empty() {
        let model = parts(GIB, 2, GIB, GIB);
        assert_eq!(
            split_layers(&model, &[cpu(64 * GIB), cpu(64 * GIB), cpu(64 * GIB)]),
            [1, 0, 1]
        );
        let split = Split {
            devices: vec![DeviceRef::Cpu; 3],
            layers: vec![1, 0, 1],
        };
        assert_eq!(split.layer_slots(), [0, 2]);
        let shares = split.shares(&model, &[Some(64 * GIB); 3]);
        let weights: Vec<u64> = shares.iter().map(|s| s.weights).collect();
        assert_eq!(weights, [2 * GIB, 0, 2 * GIB]);
        // No room anywhere (nothing known): an equal split.
        assert_eq!(
            split_layers(&parts(0, 4, GIB, 0), &[cpu(0), cpu(0)]),
            [2, 2]
        );
        assert_eq!(split_layers(&parts(0, 4, GIB, 0), &[]), Vec::<usize>::new());
    }

    #[test]
    fn tensors_are_sorted_into_embeddings_layers_and_head_by_name() {
        let shapes: Shapes = [
            ("model.embed_tokens.weight", vec![100, 8]),
            ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
            ("model.layers.1.mlp.up_proj.weight", vec![16, 8]),
            ("model.layers.1.input_layernorm.weight", vec![8]),
            ("model.norm.weight", vec![8]),
            ("lm_head.weight", vec![100, 8]),
            ("transformer.wpe.weight", vec![4, 8]),
            ("transformer.h.2.ln_1.weight", vec![8]),
            ("bert.encoder.layer.0.output.dense.bias", vec![8]),
            ("model.decoder.project_in.weight", vec![8, 4]),
            ("model.decoder.project_out.weight", vec![4, 8]),
            ("cls.predictions.decoder.weight", vec![100, 8]),
            ("cls.predictions.bias", vec![100]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        let p = ModelParts::of(&shapes, 2);
        assert_eq!(p.first, 2 * (800 + 32 + 32 + 100));
        assert_eq!(p.layers, [2 * (64 + 8), 2 * (128 + 8), 2 * 8]);
        assert_eq!(p.last, 2 * (8 + 800 + 32));
        assert_eq!(
            layer_index("model.layers.12.mlp.down_proj.weight"),
            Some(12)
        );
        assert_eq!(layer_index("model.norm.weight"), None);
    }

    #[test]
    fn unknown_gpu_memory_shares_evenly_and_keeps_layers_off_the_cpu() {
        let devices = [DeviceRef::Cuda(0), DeviceRef::Cuda(1), DeviceRef::Cpu];
        let r = rooms(&devices, &[Some(10 * GIB), None, Some(GIB)]);
        assert_eq!(r[0].free, r[1].free);
        assert_eq!(split_layers(&parts(0, 8, GIB, 0), &r), [4, 4, 0]);
        let gpus = vec![
            crate::gpu::GpuInfo {
                index: 0,
                mig: None,
                uuid: "GPU-aaa".into(),
                name: "A".into(),
                total_bytes: 0,
                free_bytes: 0,
                processes: vec![],
            },
            crate::gpu::GpuInfo {
                index: 1,
                mig: None,
                uuid: "GPU-bbb".into(),
                name: "B".into(),
                total_bytes: 0,
                free_bytes: 0,
                processes: vec![],
            },
        ];
        let name = |n, visible| cuda_gpu(n, &gpus, visible).map(|g| g.name.clone());
        assert_eq!(name(1, None).as_deref(), Some("B"));
        assert_eq!(name(0, Some("1,0")).as_deref(), Some("B"));
        assert_eq!(name(1, Some("GPU-bbb, GPU-a")).as_deref(), Some("A"));
        assert_eq!(name(1, Some("0")), None);
    }
}
