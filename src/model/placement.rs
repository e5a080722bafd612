//! Where each part of a network lives when one model is split over several
//! devices (`model.device: [cuda:0, cuda:1]`; the split itself is
//! `mezod_core::placement`'s): the embeddings on the first device, layer i
//! on its device, the final norm and an untied head on the last.  A tied
//! head is the embedding matrix, one parameter on the first device.
//!
//! The loader puts each weight on its part's device as it reads it
//! ([`super::weights::WeightLoader::place`]), and adapters are made where
//! their layer is.  Networks need no map in their forward pass: they move
//! the hidden states (and what every layer reads, see
//! [`super::layers::LayerInputs`]) to the device of the next weights they
//! use.  On one device every move is the tensor itself, so the split and
//! the unsplit forward pass are the same operations.

use anyhow::{bail, Result};
use tch::Device;

use mezod_core::model_ref::DeviceRef;
use mezod_core::placement::Split;

use super::{torch_device, ModelSource};
use crate::model::Dtype;

/// A part of a network, as the loader places it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Token and position tables, their norm, and a tied head with them.
    Embeddings,
    /// Transformer layer i, with its adapters.
    Layer(usize),
    /// The final norm, an untied head, a masked LM's head transform.
    Head,
}

/// The devices of a model and the device of each of its layers.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMap {
    devices: Vec<Device>,
    /// The index in `devices` of each layer (layers past its end: the last device).
    layer_slots: Vec<usize>,
}

impl DeviceMap {
    /// Everything on `device`.
    pub fn single(device: Device) -> Self {
        Self {
            devices: vec![device],
            layer_slots: Vec::new(),
        }
    }

    /// A split's devices and layers as libtorch names them.
    pub fn of_split(split: &Split) -> Self {
        Self {
            devices: split.devices.iter().map(|&d| torch_device(d)).collect(),
            layer_slots: split.layer_slots(),
        }
    }

    /// The split of the model `source` describes over `devices` by their free
    /// memory now (one device: no split to make).
    pub fn plan(
        source: &ModelSource,
        dtype: Dtype,
        devices: &[DeviceRef],
    ) -> Result<(Self, Split)> {
        match devices {
            [] => bail!("no device to place the model on"),
            [one] => Ok((
                Self::single(torch_device(*one)),
                Split {
                    devices: vec![*one],
                    layers: Vec::new(),
                },
            )),
            _ => {
                let (_, split, _) = mezod_core::placement::plan_model(
                    source,
                    dtype,
                    devices,
                    crate::estimate::shapes_of_config,
                )?;
                Ok((Self::of_split(&split), split))
            }
        }
    }

    /// The index in [`devices`](Self::devices) of the device holding `part`.
    pub fn slot(&self, part: Part) -> usize {
        let last = self.devices.len() - 1;
        match part {
            Part::Embeddings => 0,
            Part::Layer(i) => self.layer_slots.get(i).copied().unwrap_or(last),
            Part::Head => last,
        }
    }

    /// The device holding `part`.
    pub fn device(&self, part: Part) -> Device {
        self.devices[self.slot(part)]
    }

    /// Where inputs go: the first device (the embeddings').
    pub fn first(&self) -> Device {
        self.devices[0]
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    pub fn is_split(&self) -> bool {
        self.devices.len() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_go_to_the_first_their_own_or_the_last_device() {
        let split = Split {
            devices: vec![DeviceRef::Cuda(0), DeviceRef::Cuda(1), DeviceRef::Cpu],
            layers: vec![2, 0, 1],
        };
        let map = DeviceMap::of_split(&split);
        assert_eq!(map.device(Part::Embeddings), Device::Cuda(0));
        assert_eq!(map.device(Part::Layer(1)), Device::Cuda(0));
        assert_eq!(map.device(Part::Layer(2)), Device::Cpu);
        assert_eq!(map.slot(Part::Layer(2)), 2);
        assert_eq!(
            map.slot(Part::Layer(7)),
            2,
            "past the split: the last device"
        );
        assert_eq!(map.device(Part::Head), Device::Cpu);
        assert!(map.is_split());
        let one = DeviceMap::single(Device::Cpu);
        assert_eq!(one.slot(Part::Layer(3)), 0);
        assert_eq!(one.slot(Part::Head), 0);
        assert!(!one.is_split());
    }
}
