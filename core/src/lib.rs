//! mezod's control plane: the job file, memory estimates, NVML, the daemon and
//! its queue protocol — everything that does not need libtorch.  Both binaries
//! use it: `mezod` (daemon and queue commands) and `mezod-engine` (training).
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod cli;
pub mod crash;
pub mod daemon;
pub mod data_file;
pub mod durable;
pub mod engine;
pub mod estimate;
pub mod estimator;
pub mod gguf_header;
pub mod gpu;
pub mod hf_cache;
pub mod identity;
pub mod job_check;
pub mod mezo_options;
pub mod model_ref;
pub mod placement;
pub mod printable;
pub mod procfs;
pub mod prompts;
pub mod safe_fs;
pub mod seedlog;
pub mod spec;
pub mod tuning;
pub mod weight_files;
