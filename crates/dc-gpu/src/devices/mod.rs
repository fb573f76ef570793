//! GPU discovery: NVML or fake devices, narrowed by `CUDA_VISIBLE_DEVICES` and `--gpus`.
//!
//! NVML numbers GPUs by PCI bus while CUDA defaults to fastest-first, so everything past discovery
//! names a GPU by its full UUID (`GPU-…` or `MIG-…`), which both agree on.
//!
//! Discovery ([`discover_with`]) runs these steps; the first that leaves no GPU gives the reason
//! for running on CPU:
//!
//! 1. `--gpus none` stops at once, without opening NVML ([`GpuSelection`]).
//! 2. The source: `DC_FAKE_GPUS=N` fake devices ([`fake_devices`]), else NVML, MIG instances
//!    expanded, sorted by PCI bus id.
//! 3. An inherited `CUDA_VISIBLE_DEVICES`, parsed and applied with CUDA's rules
//!    ([`parse_visible_devices`], [`apply_visibility`]).
//! 4. The `--gpus` list, matched by NVML index or UUID prefix.
//!
//! Each worker process then gets the environment of its one device ([`worker_env`]).
//!
//! Files: `selection.rs` (`--gpus`), `fake.rs` (fake devices), `nvml.rs` (NVML enumeration),
//! `visibility.rs` (`CUDA_VISIBLE_DEVICES`), `isolation.rs` (the per-worker environment).

use std::time::{Duration, Instant};

mod fake;
mod isolation;
mod nvml;
mod selection;
#[cfg(test)]
mod test_support;
mod visibility;

pub use fake::fake_devices;
pub use isolation::worker_env;
pub use selection::{GpuSelection, GpuSelectionError};
pub use visibility::{Visibility, VisibleId, apply_visibility, parse_visible_devices};

use fake::fake_source;
use nvml::nvml_source;
use selection::apply_selection;
use visibility::narrow_to_visible;

const FAKE_GPUS_VAR: &str = "DC_FAKE_GPUS";
const NVML_LIB_VAR: &str = "DC_NVML_LIB";
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
const PCI_BUS_ID_ORDER: &str = "PCI_BUS_ID";

/// One GPU as seen by NVML (or a fake one), copied out as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GpuDevice {
    /// NVML index (PCI order); a MIG instance carries its parent's index.
    pub index: u32,
    /// Full canonical UUID, `GPU-…` or `MIG-…`: the only id handed to workers.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total device memory in bytes.
    pub memory_total: u64,
    /// PCI bus id such as `00000000:17:00.0`; a MIG instance carries its parent's.
    pub pci_bus_id: String,
}

/// A snapshot of the environment variables discovery reads, so tests never touch the process env.
#[derive(Debug, Clone, Default)]
pub struct EnvSnapshot {
    /// `DC_FAKE_GPUS`: a number of fake H100s to use instead of NVML.
    pub fake_gpus: Option<String>,
    /// `DC_NVML_LIB`: path of the NVML library to load instead of `libnvidia-ml.so.1`.
    pub nvml_lib: Option<String>,
    /// `CUDA_VISIBLE_DEVICES` inherited by the agent: the GPUs it may hand out.
    pub cuda_visible_devices: Option<String>,
    /// `CUDA_DEVICE_ORDER` inherited by the agent.
    pub cuda_device_order: Option<String>,
    /// `NVIDIA_VISIBLE_DEVICES`: only logged; the container runtime already applied it.
    pub nvidia_visible_devices: Option<String>,
}

impl EnvSnapshot {
    /// Reads `DC_FAKE_GPUS`, `DC_NVML_LIB`, `CUDA_VISIBLE_DEVICES`, `CUDA_DEVICE_ORDER` and
    /// `NVIDIA_VISIBLE_DEVICES` from this process.
    #[must_use]
    pub fn from_process() -> Self {
        // Non-UTF-8 values are kept (lossily) so a garbled variable is reported, not ignored.
        let read = |name: &str| {
            std::env::var_os(name).map(|v| {
                v.into_string()
                    .unwrap_or_else(|v| v.to_string_lossy().into_owned())
            })
        };
        Self {
            fake_gpus: read(FAKE_GPUS_VAR),
            nvml_lib: read(NVML_LIB_VAR),
            cuda_visible_devices: read(CUDA_VISIBLE_DEVICES),
            cuda_device_order: read(CUDA_DEVICE_ORDER),
            nvidia_visible_devices: read(NVIDIA_VISIBLE_DEVICES),
        }
    }
}

/// What discovery found.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// The GPUs this node may use, sorted by PCI bus id.
    pub gpus: Vec<GpuDevice>,
    /// Why there are no GPUs; `Some` exactly when `gpus` is empty.
    pub cpu_reason: Option<String>,
    /// Things the operator should fix; discovery went on regardless.
    pub warnings: Vec<String>,
    /// How long discovery took (opening a GPU without persistence mode can take seconds).
    pub took: Duration,
}

/// Discovers the GPUs this node may use and logs the result; never panics, never fails.
///
/// Reads the process environment ([`EnvSnapshot::from_process`]), then logs one INFO line with
/// the GPUs found or the reason for running on CPU, and one WARN line per warning.
pub fn discover(selection: &GpuSelection) -> Inventory {
    let env = EnvSnapshot::from_process();
    if let Some(nvidia) = &env.nvidia_visible_devices {
        tracing::debug!(
            nvidia_visible_devices = %nvidia,
            "NVIDIA_VISIBLE_DEVICES is applied by the container runtime; discovery ignores it"
        );
    }
    let inventory = discover_with(&env, selection);
    for warning in &inventory.warnings {
        tracing::warn!("{warning}");
    }
    let took_ms = inventory.took.as_secs_f64() * 1e3;
    match &inventory.cpu_reason {
        Some(reason) => tracing::info!(took_ms, "no GPUs, using CPU workers: {reason}"),
        None => {
            let uuids: Vec<&str> = inventory.gpus.iter().map(|g| g.uuid.as_str()).collect();
            tracing::info!(
                count = inventory.gpus.len(),
                took_ms,
                "found {} GPU(s): {}",
                uuids.len(),
                uuids.join(", ")
            );
        }
    }
    inventory
}

/// Discovers GPUs from an environment snapshot, without logging; never panics, never fails.
///
/// Source: `DC_FAKE_GPUS` if set, else NVML (from `DC_NVML_LIB` if set); any NVML error means
/// no GPUs, with the reason. Then `CUDA_VISIBLE_DEVICES` (CUDA's rules, see
/// [`parse_visible_devices`]) and `selection` narrow the set.
///
/// # Examples
/// ```
/// use dc_gpu::{EnvSnapshot, GpuSelection, discover_with};
///
/// let env = EnvSnapshot { fake_gpus: Some("2".into()), ..EnvSnapshot::default() };
/// assert_eq!(discover_with(&env, &GpuSelection::Auto).gpus.len(), 2);
/// let none = discover_with(&env, &GpuSelection::None);
/// assert_eq!(none.cpu_reason.as_deref(), Some("--gpus none"));
/// ```
#[must_use]
pub fn discover_with(env: &EnvSnapshot, selection: &GpuSelection) -> Inventory {
    let started = Instant::now();
    let mut warnings = Vec::new();
    let (gpus, cpu_reason) = match select(env, selection, &mut warnings) {
        Ok(gpus) => (gpus, None),
        Err(reason) => (Vec::new(), Some(reason)),
    };
    Inventory {
        gpus,
        cpu_reason,
        warnings,
        took: started.elapsed(),
    }
}

/// The whole pipeline; `Err` is the reason for having no GPUs.
fn select(
    env: &EnvSnapshot,
    selection: &GpuSelection,
    warnings: &mut Vec<String>,
) -> Result<Vec<GpuDevice>, String> {
    if matches!(selection, GpuSelection::None) {
        // Skip NVML entirely: opening a GPU initializes it, which costs time for nothing.
        return Err("--gpus none".to_owned());
    }
    let devices = match non_empty(env.fake_gpus.as_deref()) {
        Some(raw) => fake_source(raw, warnings)?,
        None => nvml_source(non_empty(env.nvml_lib.as_deref()), warnings)?,
    };
    let devices = narrow_to_visible(
        devices,
        env.cuda_visible_devices.as_deref(),
        env.cuda_device_order.as_deref(),
        warnings,
    )?;

    let visible = devices.len();
    let (selected, more) = apply_selection(devices, selection);
    warnings.extend(more);
    if selected.is_empty() {
        return Err(format!(
            "--gpus {selection} matches none of the {visible} visible GPU(s)"
        ));
    }
    Ok(selected)
}

/// `None` for an unset, empty or all-blank variable.
fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_support::{fake_env, indices, is_canonical_gpu_uuid};
    use super::*;

    #[test]
    fn fake_gpus_three_gives_three_distinct_canonical_uuids() {
        let inventory = discover_with(&fake_env("3"), &GpuSelection::Auto);
        assert_eq!(inventory.cpu_reason, None);
        assert!(inventory.warnings.is_empty());
        assert_eq!(indices(&inventory.gpus), [0, 1, 2]);
        let uuids: Vec<&str> = inventory.gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(
            uuids,
            [
                "GPU-00000000-0000-4000-8000-000000000000",
                "GPU-00000000-0000-4000-8000-000000000001",
                "GPU-00000000-0000-4000-8000-000000000002",
            ]
        );
        assert!(uuids.iter().all(|u| is_canonical_gpu_uuid(u)));
        let gpu = &inventory.gpus[1];
        assert_eq!(gpu.name, "NVIDIA H100 80GB HBM3 (fake)");
        assert_eq!(gpu.memory_total, 85_899_345_920);
        assert_eq!(gpu.pci_bus_id, "00000000:01:00.0");
    }

    #[test]
    fn fake_gpus_zero_means_none_with_reason() {
        let inventory = discover_with(&fake_env("0"), &GpuSelection::Auto);
        assert!(inventory.gpus.is_empty());
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("DC_FAKE_GPUS=0: no fake GPUs")
        );
        assert!(inventory.warnings.is_empty());
    }

    #[test]
    fn unparsable_fake_gpus_means_none_with_warning() {
        for raw in ["three", "-1", "2.5", "@gpus.json", "1025"] {
            let inventory = discover_with(&fake_env(raw), &GpuSelection::Auto);
            assert!(inventory.gpus.is_empty(), "{raw}");
            let reason = inventory.cpu_reason.unwrap();
            assert!(
                reason.contains(&format!("DC_FAKE_GPUS=\"{raw}\"")),
                "{reason}"
            );
            assert_eq!(inventory.warnings, [reason]);
        }
    }

    #[test]
    fn blank_fake_gpus_is_ignored() {
        let env = EnvSnapshot {
            fake_gpus: Some(" ".to_owned()),
            nvml_lib: Some("/nonexistent/libnvidia-ml.so.1".to_owned()),
            ..EnvSnapshot::default()
        };
        let reason = discover_with(&env, &GpuSelection::Auto).cpu_reason.unwrap();
        assert!(reason.starts_with("NVML not available"), "{reason}");
    }

    #[test]
    fn fake_gpus_with_inherited_uuid_keep_that_one() {
        let env = EnvSnapshot {
            cuda_visible_devices: Some("GPU-00000000-0000-4000-8000-000000000002".to_owned()),
            ..fake_env("3")
        };
        let inventory = discover_with(&env, &GpuSelection::Auto);
        assert_eq!(inventory.cpu_reason, None);
        assert!(inventory.warnings.is_empty());
        assert_eq!(inventory.gpus, vec![fake_devices(3)[2].clone()]);
    }

    #[test]
    fn fake_gpus_with_empty_visible_devices_fall_back_to_cpu() {
        let env = EnvSnapshot {
            cuda_visible_devices: Some(String::new()),
            ..fake_env("3")
        };
        let inventory = discover_with(&env, &GpuSelection::Auto);
        assert!(inventory.gpus.is_empty());
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("CUDA_VISIBLE_DEVICES is empty")
        );
        let env = EnvSnapshot {
            cuda_visible_devices: Some("NoDevFiles".to_owned()),
            ..fake_env("3")
        };
        let inventory = discover_with(&env, &GpuSelection::Auto);
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("CUDA_VISIBLE_DEVICES=NoDevFiles")
        );
    }

    #[test]
    fn discovery_explains_empty_and_truncated_visible_lists() {
        let with_visible = |raw: &str| EnvSnapshot {
            cuda_visible_devices: Some(raw.to_owned()),
            ..fake_env("3")
        };
        let inventory = discover_with(&with_visible("-1"), &GpuSelection::Auto);
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("CUDA_VISIBLE_DEVICES=\"-1\" selects no device (its first entry `-1` is invalid)")
        );
        let inventory = discover_with(&with_visible("1,1"), &GpuSelection::Auto);
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("CUDA_VISIBLE_DEVICES=\"1,1\" names `1` twice, so CUDA sees no device")
        );
        let inventory = discover_with(&with_visible("2,0,-1,1"), &GpuSelection::Auto);
        assert_eq!(indices(&inventory.gpus), [0, 2]);
        assert_eq!(
            inventory.warnings,
            [
                "CUDA_VISIBLE_DEVICES entry `-1` is invalid: CUDA ignores it and the 1 entry after it"
            ]
        );
        let inventory = discover_with(&with_visible("GPU-ffff"), &GpuSelection::Auto);
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("CUDA_VISIBLE_DEVICES=\"GPU-ffff\" selects none of the 3 GPU(s) found")
        );
        assert_eq!(inventory.warnings.len(), 1);
    }

    #[test]
    fn gpus_none_skips_discovery() {
        let inventory = discover_with(&fake_env("3"), &GpuSelection::None);
        assert!(inventory.gpus.is_empty());
        assert_eq!(inventory.cpu_reason.as_deref(), Some("--gpus none"));
    }

    #[test]
    fn selection_list_keeps_named_devices_and_warns_on_unknown_entries() {
        let selection: GpuSelection = "2,GPU-00000000-0000-4000-8000-000000000000,7,GPU-ff"
            .parse()
            .unwrap();
        let inventory = discover_with(&fake_env("4"), &selection);
        assert_eq!(indices(&inventory.gpus), [0, 2]);
        assert_eq!(inventory.cpu_reason, None);
        assert_eq!(
            inventory.warnings,
            [
                "--gpus entry `7` matches no visible GPU",
                "--gpus entry `GPU-ff` matches no visible GPU",
            ]
        );
    }

    #[test]
    fn selection_applies_after_visibility() {
        let env = EnvSnapshot {
            cuda_visible_devices: Some("1,2".to_owned()),
            ..fake_env("4")
        };
        let inventory = discover_with(&env, &"0,2".parse().unwrap());
        assert_eq!(indices(&inventory.gpus), [2]);
        assert_eq!(
            inventory.warnings,
            ["--gpus entry `0` matches no visible GPU"]
        );
        let inventory = discover_with(&env, &"3".parse().unwrap());
        assert_eq!(
            inventory.cpu_reason.as_deref(),
            Some("--gpus 3 matches none of the 2 visible GPU(s)")
        );
    }

    #[test]
    fn missing_nvml_library_means_no_gpus_fast() {
        let env = EnvSnapshot {
            nvml_lib: Some("/nonexistent".to_owned()),
            ..EnvSnapshot::default()
        };
        let inventory = discover_with(&env, &GpuSelection::Auto);
        assert!(inventory.gpus.is_empty());
        let reason = inventory.cpu_reason.unwrap();
        assert!(
            reason.starts_with("NVML not available (DC_NVML_LIB=/nonexistent) (/nonexistent"),
            "{reason}"
        );
        assert!(reason.ends_with("): no NVIDIA driver"), "{reason}");
        assert!(inventory.warnings.is_empty());
        assert!(
            inventory.took < Duration::from_millis(500),
            "{:?}",
            inventory.took
        );
    }

    #[test]
    fn default_nvml_finds_gpus_or_says_why() {
        // On CPU-only CI NVML fails to load; on a GPU host it must find canonical UUIDs.
        let inventory = discover_with(&EnvSnapshot::default(), &GpuSelection::Auto);
        if inventory.gpus.is_empty() {
            let reason = inventory.cpu_reason.unwrap();
            assert!(!reason.is_empty());
        } else {
            assert_eq!(inventory.cpu_reason, None);
            let mut uuids: Vec<&str> = inventory.gpus.iter().map(|g| g.uuid.as_str()).collect();
            assert!(
                uuids
                    .iter()
                    .all(|u| u.starts_with("GPU-") || u.starts_with("MIG-"))
            );
            assert!(inventory.gpus.iter().all(|g| g.memory_total > 0));
            uuids.sort_unstable();
            uuids.dedup();
            assert_eq!(uuids.len(), inventory.gpus.len());
        }
    }

    #[test]
    fn discover_reads_the_process_env_without_panicking() {
        let inventory = discover(&GpuSelection::None);
        assert_eq!(inventory.cpu_reason.as_deref(), Some("--gpus none"));
    }
}
