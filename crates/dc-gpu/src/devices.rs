//! GPU discovery: NVML or fake devices, narrowed by `CUDA_VISIBLE_DEVICES` and `--gpus`.
//!
//! NVML numbers GPUs by PCI bus while CUDA defaults to fastest-first, so everything past discovery
//! names a GPU by its full UUID (`GPU-…` or `MIG-…`), which both agree on.

use std::ffi::OsStr;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

const FAKE_GPUS_VAR: &str = "DC_FAKE_GPUS";
const NVML_LIB_VAR: &str = "DC_NVML_LIB";
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
const NVIDIA_VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
const PCI_BUS_ID_ORDER: &str = "PCI_BUS_ID";

/// Most fake GPUs `DC_FAKE_GPUS` may ask for; a larger value is a typo, not a test.
const MAX_FAKE_GPUS: u32 = 1024;
const FAKE_GPU_NAME: &str = "NVIDIA H100 80GB HBM3 (fake)";
const FAKE_GPU_MEMORY: u64 = 80 * 1024 * 1024 * 1024;

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

/// `count` fake H100s, as `DC_FAKE_GPUS=count` yields them.
///
/// Device `i` has UUID `GPU-00000000-0000-4000-8000-<i as 12 hex digits>` and bus id
/// `<i / 256 as 8 hex digits>:<i % 256 as 2 hex digits>:00.0`, so every UUID and bus id is
/// distinct and bus-id order is index order.
///
/// # Examples
/// ```
/// let gpus = dc_gpu::fake_devices(3);
/// assert_eq!(gpus[2].uuid, "GPU-00000000-0000-4000-8000-000000000002");
/// assert_eq!(gpus[2].pci_bus_id, "00000000:02:00.0");
/// ```
pub fn fake_devices(count: u32) -> Vec<GpuDevice> {
    (0..count)
        .map(|index| GpuDevice {
            index,
            uuid: format!("GPU-00000000-0000-4000-8000-{index:012x}"),
            name: FAKE_GPU_NAME.to_owned(),
            memory_total: FAKE_GPU_MEMORY,
            pci_bus_id: format!("{:08X}:{:02X}:00.0", index >> 8, index & 0xff),
        })
        .collect()
}

/// Which GPUs a node uses: what the user asked for with `--gpus auto|none|LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSelection {
    /// Every GPU discovery finds (`auto` or `all`).
    #[default]
    Auto,
    /// No GPU, CPU workers only (`none`).
    None,
    /// GPUs named by NVML index (`0`) or UUID prefix (`GPU-8a3…`, `MIG-…`), as typed.
    List(Vec<String>),
}

/// Why a `--gpus` value could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GpuSelectionError {
    /// The value was empty.
    #[error(
        "empty --gpus value: use auto, none, or a comma-separated list of GPU indices or UUID \
         prefixes (e.g. 0,2 or GPU-8a3)"
    )]
    Empty,
    /// The list has an empty entry, as in `0,,2`.
    #[error("--gpus `{value}` has an empty entry: separate GPUs with single commas (e.g. 0,2)")]
    EmptyEntry {
        /// The whole value, trimmed.
        value: String,
    },
    /// One list entry is neither an index nor a UUID prefix.
    #[error(
        "invalid --gpus entry `{entry}`: expected a GPU index (0), a UUID prefix (GPU-… or \
         MIG-…), or one of auto, all, none"
    )]
    BadEntry {
        /// The offending entry, trimmed.
        entry: String,
    },
}

impl FromStr for GpuSelection {
    type Err = GpuSelectionError;

    /// Parses `auto`, `all` (= `auto`), `none` (any case) or a list like `0,2` / `GPU-abc,MIG-def`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value = s.trim();
        if value.is_empty() {
            return Err(GpuSelectionError::Empty);
        }
        match value.to_ascii_lowercase().as_str() {
            "auto" | "all" => return Ok(Self::Auto),
            "none" => return Ok(Self::None),
            _ => {}
        }
        value
            .split(',')
            .map(str::trim)
            .map(|entry| {
                if entry.is_empty() {
                    Err(GpuSelectionError::EmptyEntry {
                        value: value.to_owned(),
                    })
                } else if parse_index(entry).is_some()
                    || entry.starts_with("GPU-")
                    || entry.starts_with("MIG-")
                {
                    Ok(entry.to_owned())
                } else {
                    Err(GpuSelectionError::BadEntry {
                        entry: entry.to_owned(),
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self::List)
    }
}

impl fmt::Display for GpuSelection {
    /// Writes the `--gpus` form; an empty list, which selects nothing, writes `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::None => f.write_str("none"),
            Self::List(entries) if entries.is_empty() => f.write_str("none"),
            Self::List(entries) => f.write_str(&entries.join(",")),
        }
    }
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
    let found = devices.len();

    let raw_visible = env.cuda_visible_devices.as_deref();
    let parsed = parse_visible_devices_detailed(raw_visible);
    let devices = match &parsed.visibility {
        Visibility::Unset => devices,
        Visibility::Nothing => return Err(nothing_reason(raw_visible)),
        Visibility::List(ids) if ids.is_empty() => {
            return Err(empty_list_reason(raw_visible, &parsed));
        }
        visibility @ Visibility::List(_) => {
            if let Some(ignored) = &parsed.ignored {
                warnings.push(ignored.warning());
            }
            let (visible, more) =
                apply_visibility(devices, visibility, env.cuda_device_order.as_deref());
            warnings.extend(more);
            if visible.is_empty() {
                return Err(format!(
                    "{CUDA_VISIBLE_DEVICES}=\"{}\" selects none of the {found} GPU(s) found",
                    raw_visible.unwrap_or_default().trim()
                ));
            }
            visible
        }
    };

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

/// Devices for `DC_FAKE_GPUS=raw`; `Err` is the reason for having none.
fn fake_source(raw: &str, warnings: &mut Vec<String>) -> Result<Vec<GpuDevice>, String> {
    match raw.parse::<u32>() {
        Ok(0) => Err(format!("{FAKE_GPUS_VAR}=0: no fake GPUs")),
        Ok(count) if count <= MAX_FAKE_GPUS => Ok(fake_devices(count)),
        _ => {
            let reason = format!(
                "{FAKE_GPUS_VAR}=\"{raw}\" is not a GPU count from 0 to {MAX_FAKE_GPUS}: \
                 using no GPUs"
            );
            warnings.push(reason.clone());
            Err(reason)
        }
    }
}

/// Devices NVML reports, MIG instances expanded, sorted by bus id; `Err` is the reason for none.
fn nvml_source(
    lib_path: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<GpuDevice>, String> {
    let nvml = match lib_path {
        Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
        None => Nvml::init(),
    }
    .map_err(|error| init_failure_reason(&error, lib_path))?;
    let count = nvml
        .device_count()
        .map_err(|error| format!("NVML could not count GPUs: {error}"))?;

    let mut devices = Vec::new();
    for index in 0..count {
        // `device_count` includes GPUs we may not open (NoPermission, GpuLost): skip those.
        let device = match nvml.device_by_index(index) {
            Ok(device) => device,
            Err(error) => {
                warnings.push(format!(
                    "skipping GPU {index}: NVML cannot open it ({error})"
                ));
                continue;
            }
        };
        let uuid = match device.uuid() {
            Ok(uuid) => uuid,
            Err(error) => {
                warnings.push(format!(
                    "skipping GPU {index}: NVML cannot read its UUID ({error})"
                ));
                continue;
            }
        };
        let name = device.name().unwrap_or_else(|error| {
            warnings.push(format!("GPU {index} ({uuid}): no name from NVML ({error})"));
            "NVIDIA GPU".to_owned()
        });
        let memory_total = device.memory_info().map_or_else(
            |error| {
                warnings.push(format!("GPU {index} ({uuid}): no memory size ({error})"));
                0
            },
            |memory| memory.total,
        );
        let pci_bus_id = device.pci_info().map_or_else(
            |error| {
                warnings.push(format!("GPU {index} ({uuid}): no PCI bus id ({error})"));
                String::new()
            },
            |pci| pci.bus_id,
        );
        // NotSupported (and any other error) means not a MIG GPU; never toggle the mode.
        let mig_enabled = device.mig_mode().is_ok_and(|mode| mode.current == 1);
        if !mig_enabled {
            devices.push(GpuDevice {
                index,
                uuid,
                name,
                memory_total,
                pci_bus_id,
            });
            continue;
        }
        // mig_device_count is a maximum, not the number of instances: probe each slot.
        let slots = device.mig_device_count().unwrap_or(0);
        let before = devices.len();
        for slot in 0..slots {
            let Ok(mig) = device.mig_device_by_index(slot) else {
                continue;
            };
            let Ok(mig_uuid) = mig.uuid() else {
                continue;
            };
            devices.push(GpuDevice {
                index,
                uuid: mig_uuid,
                name: mig.name().unwrap_or_else(|_| format!("{name} MIG")),
                memory_total: mig.memory_info().map_or(0, |memory| memory.total),
                pci_bus_id: pci_bus_id.clone(),
            });
        }
        if devices.len() == before {
            warnings.push(format!(
                "skipping GPU {index} ({uuid}): MIG is enabled but it has no MIG instance"
            ));
        }
    }

    if devices.is_empty() {
        return Err(if count == 0 {
            "no devices found: NVML reports no GPU".to_owned()
        } else {
            format!("no devices found: NVML reports {count} GPU(s) but none is usable")
        });
    }
    // Stable: MIG instances keep their slot order under their parent's bus id.
    devices.sort_by_cached_key(|device| device.pci_bus_id.to_ascii_lowercase());
    Ok(devices)
}

/// The reason given when NVML cannot start.
fn init_failure_reason(error: &NvmlError, lib_path: Option<&str>) -> String {
    let from = lib_path.map_or_else(String::new, |path| format!(" ({NVML_LIB_VAR}={path})"));
    match error {
        NvmlError::LibloadingError(load) => {
            format!("NVML not available{from} ({load}): no NVIDIA driver")
        }
        NvmlError::DriverNotLoaded => format!("NVIDIA driver not loaded{from}"),
        NvmlError::NoPermission => format!("no permission to use NVML{from}"),
        other => format!("NVML failed to start{from}: {other}"),
    }
}

/// `CUDA_VISIBLE_DEVICES` parsed with CUDA's own rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Not set: every device is visible.
    Unset,
    /// `""` or `NoDevFiles`: no device is visible.
    Nothing,
    /// The devices named, in order; empty when the first entry is invalid or one repeats.
    List(Vec<VisibleId>),
}

/// One `CUDA_VISIBLE_DEVICES` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VisibleId {
    /// A device index; the agent reads it as an NVML (PCI-order) index.
    Index(u32),
    /// A `GPU-…` or `MIG-…` UUID, or a prefix of one that must match exactly one device.
    UuidPrefix(String),
}

impl fmt::Display for VisibleId {
    /// Writes the entry as it appears in `CUDA_VISIBLE_DEVICES`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Index(index) => write!(f, "{index}"),
            Self::UuidPrefix(prefix) => f.write_str(prefix),
        }
    }
}

/// Parses `CUDA_VISIBLE_DEVICES` as the CUDA driver does.
///
/// Unset is [`Visibility::Unset`]; `""` and `NoDevFiles` are [`Visibility::Nothing`]. Otherwise
/// entries are trimmed and the first decides the kind (indices, `GPU-` or `MIG-` UUIDs); the
/// list stops at the first entry that is invalid or of another kind. Indices are read like
/// `strtoul` (`1gpu2` is 1, `-1` is invalid). A repeated entry makes the whole list empty.
///
/// # Examples
/// ```
/// use dc_gpu::{Visibility, VisibleId, parse_visible_devices};
///
/// assert_eq!(
///     parse_visible_devices(Some("0,2,-1,1")),
///     Visibility::List(vec![VisibleId::Index(0), VisibleId::Index(2)])
/// );
/// assert_eq!(parse_visible_devices(Some("1,1")), Visibility::List(vec![]));
/// assert_eq!(parse_visible_devices(Some("")), Visibility::Nothing);
/// ```
pub fn parse_visible_devices(raw: Option<&str>) -> Visibility {
    parse_visible_devices_detailed(raw).visibility
}

/// A parse with what CUDA dropped, so discovery can explain an empty or short list.
#[derive(Debug)]
struct ParsedVisibility {
    visibility: Visibility,
    ignored: Option<Ignored>,
    duplicate: Option<String>,
}

/// The first invalid `CUDA_VISIBLE_DEVICES` entry and how many entries follow it.
#[derive(Debug)]
struct Ignored {
    entry: String,
    after: usize,
}

impl Ignored {
    fn warning(&self) -> String {
        format!(
            "{CUDA_VISIBLE_DEVICES} entry `{}` is invalid: CUDA ignores it and the {} entr{} \
             after it",
            self.entry,
            self.after,
            if self.after == 1 { "y" } else { "ies" }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    Index,
    Gpu,
    Mig,
}

fn parse_visible_devices_detailed(raw: Option<&str>) -> ParsedVisibility {
    let parsed = |visibility| ParsedVisibility {
        visibility,
        ignored: None,
        duplicate: None,
    };
    let Some(raw) = raw else {
        return parsed(Visibility::Unset);
    };
    let raw = raw.trim();
    if raw.is_empty() || raw == "NoDevFiles" {
        return parsed(Visibility::Nothing);
    }
    let entries: Vec<&str> = raw.split(',').map(str::trim).collect();
    let kind = if raw.starts_with("GPU-") {
        EntryKind::Gpu
    } else if raw.starts_with("MIG-") {
        EntryKind::Mig
    } else {
        EntryKind::Index
    };
    let mut ids = Vec::new();
    let mut result = parsed(Visibility::Nothing);
    for (position, entry) in entries.iter().enumerate() {
        let id = match kind {
            EntryKind::Index => strtoul(entry).map(VisibleId::Index),
            EntryKind::Gpu if entry.starts_with("GPU-") => {
                Some(VisibleId::UuidPrefix((*entry).to_owned()))
            }
            EntryKind::Mig if entry.starts_with("MIG-") => {
                Some(VisibleId::UuidPrefix((*entry).to_owned()))
            }
            EntryKind::Gpu | EntryKind::Mig => None,
        };
        let Some(id) = id else {
            result.ignored = Some(Ignored {
                entry: (*entry).to_owned(),
                after: entries.len() - position - 1,
            });
            break;
        };
        if ids.contains(&id) {
            result.duplicate = Some(id.to_string());
            ids.clear();
            break;
        }
        ids.push(id);
    }
    result.visibility = Visibility::List(ids);
    result
}

/// C `strtoul` on a trimmed entry: optional sign, then leading digits; `None` if no digits,
/// negative, or too large for an index.
fn strtoul(entry: &str) -> Option<u32> {
    let (negative, rest) = match entry.as_bytes().first() {
        Some(b'-') => (true, &entry[1..]),
        Some(b'+') => (false, &entry[1..]),
        _ => (false, entry),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let value: u32 = rest[..digits].parse().ok()?;
    // strtoul wraps "-1" to ULONG_MAX, which no device has; "-0" is still 0.
    (!negative || value == 0).then_some(value)
}

/// `Some(n)` when `entry` is a plain decimal index.
fn parse_index(entry: &str) -> Option<u32> {
    if entry.bytes().all(|b| b.is_ascii_digit()) {
        entry.parse().ok()
    } else {
        None
    }
}

/// Keeps the devices `visibility` names, in their original (PCI) order, plus warnings.
///
/// An index is an NVML index ([`GpuDevice::index`]); a UUID prefix must match exactly one
/// device. As in CUDA, resolution stops at the first entry that names no device or is
/// ambiguous, and a device named twice leaves nothing. Indices draw a warning when
/// `device_order` is not `PCI_BUS_ID` and the GPU models differ, since CUDA's default
/// fastest-first numbering then differs from NVML's.
///
/// # Examples
/// ```
/// use dc_gpu::{Visibility, apply_visibility, fake_devices, parse_visible_devices};
///
/// let visible = parse_visible_devices(Some("GPU-00000000-0000-4000-8000-000000000002,0"));
/// let (gpus, warnings) = apply_visibility(fake_devices(3), &visible, None);
/// assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [2]);
/// assert_eq!(warnings, Vec::<String>::new());
/// ```
pub fn apply_visibility(
    devices: Vec<GpuDevice>,
    visibility: &Visibility,
    device_order: Option<&str>,
) -> (Vec<GpuDevice>, Vec<String>) {
    let ids = match visibility {
        Visibility::Unset => return (devices, Vec::new()),
        Visibility::Nothing => return (Vec::new(), Vec::new()),
        Visibility::List(ids) => ids,
    };
    let mut warnings = Vec::new();
    let mut chosen: Vec<usize> = Vec::new();
    for (position, id) in ids.iter().enumerate() {
        match resolve(&devices, id) {
            Ok(found) if chosen.contains(&found) => {
                warnings.push(format!(
                    "{CUDA_VISIBLE_DEVICES} names {} twice (entry `{id}`): CUDA then sees no \
                     device",
                    devices[found].uuid
                ));
                return (Vec::new(), warnings);
            }
            Ok(found) => chosen.push(found),
            Err(why) => {
                let after = ids.len() - position - 1;
                warnings.push(format!(
                    "{CUDA_VISIBLE_DEVICES} entry `{id}` {why}: CUDA ignores it and the {after} \
                     entr{} after it",
                    if after == 1 { "y" } else { "ies" }
                ));
                break;
            }
        }
    }
    let uses_index = ids.iter().any(|id| matches!(id, VisibleId::Index(_)));
    if uses_index && device_order.map(str::trim) != Some(PCI_BUS_ID_ORDER) {
        let mut models: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
        models.sort_unstable();
        models.dedup();
        if models.len() > 1 {
            warnings.push(format!(
                "{CUDA_VISIBLE_DEVICES} uses indices, which the agent reads in NVML (PCI) order, \
                 but {CUDA_DEVICE_ORDER} is not {PCI_BUS_ID_ORDER} and the GPU models differ \
                 ({}): CUDA may number them differently; set \
                 {CUDA_DEVICE_ORDER}={PCI_BUS_ID_ORDER} or use GPU UUIDs",
                models.join(", ")
            ));
        }
    }
    let kept = devices
        .into_iter()
        .enumerate()
        .filter(|(position, _)| chosen.contains(position))
        .map(|(_, device)| device)
        .collect();
    (kept, warnings)
}

/// The position of the one device `id` names, or why there is none.
fn resolve(devices: &[GpuDevice], id: &VisibleId) -> Result<usize, String> {
    match id {
        VisibleId::Index(index) => devices
            .iter()
            .position(|device| device.index == *index)
            .ok_or_else(|| format!("names no GPU (no device has NVML index {index})")),
        VisibleId::UuidPrefix(prefix) => {
            let matches: Vec<usize> = devices
                .iter()
                .enumerate()
                .filter(|(_, device)| device.uuid.starts_with(prefix.as_str()))
                .map(|(position, _)| position)
                .collect();
            match matches.as_slice() {
                [one] => Ok(*one),
                [] if prefix.starts_with("MIG-GPU-") => Err(
                    "uses the legacy MIG-GPU-…/gi/ci form, which the agent cannot resolve; \
                     use the MIG-<uuid> from nvidia-smi -L"
                        .to_owned(),
                ),
                [] => Err("matches no GPU UUID".to_owned()),
                many => Err(format!(
                    "is ambiguous: it prefixes {} GPU UUIDs",
                    many.len()
                )),
            }
        }
    }
}

/// Keeps the devices `selection` names, plus a warning per list entry that names none.
fn apply_selection(
    devices: Vec<GpuDevice>,
    selection: &GpuSelection,
) -> (Vec<GpuDevice>, Vec<String>) {
    let entries = match selection {
        GpuSelection::Auto => return (devices, Vec::new()),
        GpuSelection::None => return (Vec::new(), Vec::new()),
        GpuSelection::List(entries) => entries,
    };
    let names = |entry: &str, device: &GpuDevice| {
        parse_index(entry).map_or_else(
            || device.uuid.starts_with(entry),
            |index| index == device.index,
        )
    };
    let warnings = entries
        .iter()
        .filter(|entry| !devices.iter().any(|device| names(entry, device)))
        .map(|entry| format!("--gpus entry `{entry}` matches no visible GPU"))
        .collect();
    let kept = devices
        .into_iter()
        .filter(|device| entries.iter().any(|entry| names(entry, device)))
        .collect();
    (kept, warnings)
}

fn nothing_reason(raw: Option<&str>) -> String {
    match raw.map(str::trim) {
        Some("NoDevFiles") => format!("{CUDA_VISIBLE_DEVICES}=NoDevFiles"),
        _ => format!("{CUDA_VISIBLE_DEVICES} is empty"),
    }
}

fn empty_list_reason(raw: Option<&str>, parsed: &ParsedVisibility) -> String {
    let raw = raw.unwrap_or_default().trim();
    match (&parsed.duplicate, &parsed.ignored) {
        (Some(duplicate), _) => format!(
            "{CUDA_VISIBLE_DEVICES}=\"{raw}\" names `{duplicate}` twice, so CUDA sees no device"
        ),
        (None, Some(ignored)) => format!(
            "{CUDA_VISIBLE_DEVICES}=\"{raw}\" selects no device (its first entry `{}` is invalid)",
            ignored.entry
        ),
        (None, None) => format!("{CUDA_VISIBLE_DEVICES}=\"{raw}\" selects no device"),
    }
}

/// The environment a worker process gets for its device; `None` means a CPU worker.
///
/// A GPU worker sees only its device, by full UUID (never an index, whose meaning differs
/// between NVML and CUDA); a CPU worker sees no GPU at all.
///
/// # Examples
/// ```
/// let gpu = &dc_gpu::fake_devices(1)[0];
/// let env = dc_gpu::worker_env(Some(gpu));
/// assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), gpu.uuid.clone())));
/// let cpu = dc_gpu::worker_env(None);
/// assert!(cpu.contains(&("CUDA_VISIBLE_DEVICES".into(), String::new())));
/// ```
pub fn worker_env(device: Option<&GpuDevice>) -> Vec<(String, String)> {
    let pair = |key: &str, value: String| (key.to_owned(), value);
    match device {
        Some(device) => vec![
            pair(CUDA_VISIBLE_DEVICES, device.uuid.clone()),
            pair(CUDA_DEVICE_ORDER, PCI_BUS_ID_ORDER.to_owned()),
            pair("DC_GPU_UUID", device.uuid.clone()),
            pair("DC_GPU_NAME", device.name.clone()),
            pair("DC_GPU_MEMORY_BYTES", device.memory_total.to_string()),
        ],
        None => vec![
            pair(CUDA_VISIBLE_DEVICES, String::new()),
            pair(CUDA_DEVICE_ORDER, PCI_BUS_ID_ORDER.to_owned()),
        ],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn index(i: u32) -> VisibleId {
        VisibleId::Index(i)
    }

    fn prefix(p: &str) -> VisibleId {
        VisibleId::UuidPrefix(p.to_owned())
    }

    fn list(ids: Vec<VisibleId>) -> Visibility {
        Visibility::List(ids)
    }

    fn device(index: u32, uuid: &str, name: &str) -> GpuDevice {
        GpuDevice {
            index,
            uuid: uuid.to_owned(),
            name: name.to_owned(),
            memory_total: 1 << 30,
            pci_bus_id: format!("00000000:{:02X}:00.0", index + 0x10),
        }
    }

    /// Four GPUs whose UUIDs share prefixes: `GPU-8a3` is ambiguous, `GPU-8a31` is not.
    fn host() -> Vec<GpuDevice> {
        vec![
            device(0, "GPU-8a31c0de-1111-2222-3333-444455556666", "NVIDIA H100"),
            device(1, "GPU-8a3fffff-1111-2222-3333-444455556666", "NVIDIA H100"),
            device(2, "GPU-12345678-aaaa-bbbb-cccc-ddddeeeeffff", "NVIDIA H100"),
            device(3, "GPU-deadbeef-aaaa-bbbb-cccc-ddddeeeeffff", "NVIDIA H100"),
        ]
    }

    fn indices(devices: &[GpuDevice]) -> Vec<u32> {
        devices.iter().map(|d| d.index).collect()
    }

    fn fake_env(count: &str) -> EnvSnapshot {
        EnvSnapshot {
            fake_gpus: Some(count.to_owned()),
            ..EnvSnapshot::default()
        }
    }

    fn is_canonical_gpu_uuid(uuid: &str) -> bool {
        let Some(hex) = uuid.strip_prefix("GPU-") else {
            return false;
        };
        let groups: Vec<&str> = hex.split('-').collect();
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    // --- parse_visible_devices ---

    #[test]
    fn unset_means_every_device() {
        assert_eq!(parse_visible_devices(None), Visibility::Unset);
    }

    #[test]
    fn empty_blank_and_nodevfiles_mean_nothing() {
        assert_eq!(parse_visible_devices(Some("")), Visibility::Nothing);
        assert_eq!(parse_visible_devices(Some("  ")), Visibility::Nothing);
        assert_eq!(
            parse_visible_devices(Some("NoDevFiles")),
            Visibility::Nothing
        );
    }

    #[test]
    fn index_list_stops_at_first_invalid_entry() {
        assert_eq!(
            parse_visible_devices(Some("0,2,-1,1")),
            list(vec![index(0), index(2)])
        );
        assert_eq!(parse_visible_devices(Some("-1")), list(vec![]));
        assert_eq!(parse_visible_devices(Some("0,,1")), list(vec![index(0)]));
        assert_eq!(parse_visible_devices(Some("3,abc,1")), list(vec![index(3)]));
    }

    #[test]
    fn repeated_index_empties_the_list() {
        assert_eq!(parse_visible_devices(Some("1,1")), list(vec![]));
        assert_eq!(parse_visible_devices(Some("0,1,0")), list(vec![]));
        // "1gpu" reads as 1, so it repeats 1.
        assert_eq!(parse_visible_devices(Some("1,1gpu")), list(vec![]));
    }

    #[test]
    fn indices_are_read_like_strtoul() {
        assert_eq!(parse_visible_devices(Some("1gpu2")), list(vec![index(1)]));
        assert_eq!(
            parse_visible_devices(Some("1gpu2,2ampere")),
            list(vec![index(1), index(2)])
        );
        assert_eq!(parse_visible_devices(Some("+3")), list(vec![index(3)]));
        assert_eq!(parse_visible_devices(Some("-0")), list(vec![index(0)]));
        assert_eq!(parse_visible_devices(Some("gpu1")), list(vec![]));
        assert_eq!(
            parse_visible_devices(Some("0,99999999999")),
            list(vec![index(0)])
        );
    }

    #[test]
    fn whitespace_around_entries_is_trimmed() {
        assert_eq!(
            parse_visible_devices(Some(" 0 , 2 ")),
            list(vec![index(0), index(2)])
        );
        assert_eq!(
            parse_visible_devices(Some(" GPU-8a31 , GPU-1234 ")),
            list(vec![prefix("GPU-8a31"), prefix("GPU-1234")])
        );
        assert_eq!(parse_visible_devices(Some(" 1, 1")), list(vec![]));
    }

    #[test]
    fn uuid_lists_keep_their_prefixes_and_stop_at_another_kind() {
        assert_eq!(
            parse_visible_devices(Some("GPU-8a31,GPU-1234")),
            list(vec![prefix("GPU-8a31"), prefix("GPU-1234")])
        );
        assert_eq!(
            parse_visible_devices(Some("GPU-8a31,0,GPU-1234")),
            list(vec![prefix("GPU-8a31")])
        );
        assert_eq!(
            parse_visible_devices(Some("0,GPU-8a31")),
            list(vec![index(0)])
        );
        assert_eq!(
            parse_visible_devices(Some("GPU-8a31,GPU-8a31")),
            list(vec![])
        );
    }

    #[test]
    fn mig_uuids_canonical_and_legacy_parse_as_prefixes() {
        let canonical = "MIG-11111111-2222-3333-4444-555555555555";
        assert_eq!(
            parse_visible_devices(Some(canonical)),
            list(vec![prefix(canonical)])
        );
        let legacy = "MIG-GPU-8a31c0de-1111-2222-3333-444455556666/1/0";
        assert_eq!(
            parse_visible_devices(Some(legacy)),
            list(vec![prefix(legacy)])
        );
        assert_eq!(
            parse_visible_devices(Some("MIG-aaaa,GPU-bbbb")),
            list(vec![prefix("MIG-aaaa")])
        );
    }

    #[test]
    fn parse_details_name_the_ignored_entry_and_duplicate() {
        let parsed = parse_visible_devices_detailed(Some("0,2,-1,1"));
        let ignored = parsed.ignored.unwrap();
        assert_eq!((ignored.entry.as_str(), ignored.after), ("-1", 1));
        assert_eq!(
            ignored.warning(),
            "CUDA_VISIBLE_DEVICES entry `-1` is invalid: CUDA ignores it and the 1 entry after it"
        );
        let parsed = parse_visible_devices_detailed(Some("1,1"));
        assert_eq!(parsed.duplicate.as_deref(), Some("1"));
    }

    // --- apply_visibility ---

    #[test]
    fn unset_keeps_all_and_nothing_keeps_none() {
        let (all, warnings) = apply_visibility(host(), &Visibility::Unset, None);
        assert_eq!((indices(&all), warnings.len()), (vec![0, 1, 2, 3], 0));
        let (none, warnings) = apply_visibility(host(), &Visibility::Nothing, None);
        assert_eq!((none.len(), warnings.len()), (0, 0));
    }

    #[test]
    fn indices_are_nvml_indices_not_positions() {
        // NVML index 0 was skipped (e.g. NoPermission): index 1 is still the device numbered 1.
        let devices = host().split_off(1);
        let (kept, warnings) = apply_visibility(devices, &list(vec![index(3), index(1)]), None);
        assert_eq!(indices(&kept), [1, 3]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn index_and_uuid_pick_the_same_devices() {
        let by_index = apply_visibility(host(), &parse_visible_devices(Some("2,0")), None).0;
        let by_uuid = apply_visibility(
            host(),
            &parse_visible_devices(Some("GPU-12345678,GPU-8a31")),
            None,
        )
        .0;
        assert_eq!(indices(&by_index), [0, 2]);
        assert_eq!(by_index, by_uuid);
    }

    #[test]
    fn unique_uuid_prefix_selects_one_device() {
        let (kept, warnings) =
            apply_visibility(host(), &parse_visible_devices(Some("GPU-dead")), None);
        assert_eq!(kept, vec![host()[3].clone()]);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn ambiguous_uuid_prefix_stops_the_list() {
        let visibility = parse_visible_devices(Some("GPU-dead,GPU-8a3,GPU-1234"));
        let (kept, warnings) = apply_visibility(host(), &visibility, None);
        assert_eq!(indices(&kept), [3]);
        assert_eq!(
            warnings,
            [
                "CUDA_VISIBLE_DEVICES entry `GPU-8a3` is ambiguous: it prefixes 2 GPU UUIDs: CUDA \
              ignores it and the 1 entry after it"
            ]
        );
    }

    #[test]
    fn missing_uuid_prefix_stops_the_list() {
        let visibility = parse_visible_devices(Some("GPU-ffff,GPU-dead"));
        let (kept, warnings) = apply_visibility(host(), &visibility, None);
        assert!(kept.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("`GPU-ffff` matches no GPU UUID"),
            "{warnings:?}"
        );
    }

    #[test]
    fn unknown_index_stops_the_list() {
        let (kept, warnings) =
            apply_visibility(host(), &parse_visible_devices(Some("1,7,2")), None);
        assert_eq!(indices(&kept), [1]);
        assert!(
            warnings[0].contains("no device has NVML index 7"),
            "{warnings:?}"
        );
    }

    #[test]
    fn same_device_by_index_and_uuid_empties_the_set() {
        let visibility = list(vec![index(2), prefix("GPU-1234")]);
        let (kept, warnings) = apply_visibility(host(), &visibility, None);
        assert!(kept.is_empty());
        assert!(warnings[0].contains("twice"), "{warnings:?}");
    }

    #[test]
    fn kept_devices_stay_in_pci_order() {
        let (kept, _) = apply_visibility(host(), &parse_visible_devices(Some("3,1,2")), None);
        assert_eq!(indices(&kept), [1, 2, 3]);
    }

    #[test]
    fn mig_instances_match_by_mig_uuid() {
        let devices = vec![
            device(0, "GPU-aaaaaaaa-0000-0000-0000-000000000000", "NVIDIA H100"),
            device(
                1,
                "MIG-11111111-0000-0000-0000-000000000000",
                "NVIDIA H100 MIG 1g.10gb",
            ),
            device(
                1,
                "MIG-22222222-0000-0000-0000-000000000000",
                "NVIDIA H100 MIG 1g.10gb",
            ),
        ];
        let (kept, warnings) = apply_visibility(
            devices.clone(),
            &parse_visible_devices(Some("MIG-2222")),
            None,
        );
        assert_eq!(kept, vec![devices[2].clone()]);
        assert!(warnings.is_empty());
        let legacy = "MIG-GPU-aaaaaaaa-0000-0000-0000-000000000000/1/0";
        let (kept, warnings) =
            apply_visibility(devices, &parse_visible_devices(Some(legacy)), None);
        assert!(kept.is_empty());
        assert!(warnings[0].contains("legacy"), "{warnings:?}");
    }

    #[test]
    fn indices_on_mixed_models_warn_unless_pci_order() {
        let mut devices = host();
        devices[1].name = "NVIDIA A100".to_owned();
        let visibility = parse_visible_devices(Some("0"));
        for order in [None, Some("FASTEST_FIRST")] {
            let (kept, warnings) = apply_visibility(devices.clone(), &visibility, order);
            assert_eq!(indices(&kept), [0]);
            assert_eq!(warnings.len(), 1, "{order:?}");
            assert!(
                warnings[0].contains("NVIDIA A100, NVIDIA H100"),
                "{warnings:?}"
            );
        }
        let (_, warnings) = apply_visibility(devices.clone(), &visibility, Some("PCI_BUS_ID"));
        assert!(warnings.is_empty(), "{warnings:?}");
        // UUIDs are order-independent; identical models number the same in both orders.
        let (_, warnings) =
            apply_visibility(devices, &parse_visible_devices(Some("GPU-dead")), None);
        assert!(warnings.is_empty(), "{warnings:?}");
        let (_, warnings) = apply_visibility(host(), &visibility, None);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    // --- fake devices and discovery ---

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
    fn many_fake_gpus_stay_distinct_and_sorted() {
        let gpus = fake_devices(300);
        let mut uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        let mut buses: Vec<&str> = gpus.iter().map(|g| g.pci_bus_id.as_str()).collect();
        assert!(buses.is_sorted());
        uuids.sort_unstable();
        uuids.dedup();
        buses.dedup();
        assert_eq!((uuids.len(), buses.len()), (300, 300));
        assert_eq!(gpus[299].pci_bus_id, "00000001:2B:00.0");
        assert_eq!(gpus[299].uuid, "GPU-00000000-0000-4000-8000-00000000012b");
        assert!(is_canonical_gpu_uuid(&gpus[299].uuid));
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
    fn selection_prefix_keeps_every_matching_device() {
        let (kept, warnings) = apply_selection(host(), &"GPU-8a3".parse().unwrap());
        assert_eq!(indices(&kept), [0, 1]);
        assert!(warnings.is_empty());
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

    // --- GpuSelection ---

    #[test]
    fn selection_keywords_parse() {
        for (raw, expected) in [
            ("auto", GpuSelection::Auto),
            ("all", GpuSelection::Auto),
            (" AUTO ", GpuSelection::Auto),
            ("none", GpuSelection::None),
            ("None", GpuSelection::None),
        ] {
            assert_eq!(raw.parse::<GpuSelection>(), Ok(expected), "{raw}");
        }
        assert_eq!(GpuSelection::default(), GpuSelection::Auto);
    }

    #[test]
    fn selection_lists_parse_trimmed() {
        assert_eq!(
            " 0, 2 ".parse::<GpuSelection>(),
            Ok(GpuSelection::List(vec!["0".to_owned(), "2".to_owned()]))
        );
        assert_eq!(
            "GPU-abc,MIG-def".parse::<GpuSelection>(),
            Ok(GpuSelection::List(vec![
                "GPU-abc".to_owned(),
                "MIG-def".to_owned()
            ]))
        );
    }

    #[test]
    fn selection_errors_name_the_bad_entry() {
        assert_eq!("".parse::<GpuSelection>(), Err(GpuSelectionError::Empty));
        assert_eq!(" ".parse::<GpuSelection>(), Err(GpuSelectionError::Empty));
        let bad = "0,gpu1,2".parse::<GpuSelection>().unwrap_err();
        assert_eq!(
            bad,
            GpuSelectionError::BadEntry {
                entry: "gpu1".to_owned()
            }
        );
        assert!(bad.to_string().contains("`gpu1`"), "{bad}");
        for raw in ["-1", "0,auto", "1gpu2", "99999999999"] {
            let error = raw.parse::<GpuSelection>().unwrap_err();
            assert!(matches!(error, GpuSelectionError::BadEntry { .. }), "{raw}");
        }
        assert_eq!(
            "0,,2".parse::<GpuSelection>(),
            Err(GpuSelectionError::EmptyEntry {
                value: "0,,2".to_owned()
            })
        );
    }

    #[test]
    fn selection_display_round_trips() {
        for raw in ["auto", "none", "0", "0,2", "GPU-abc,MIG-def", "3,GPU-8a3"] {
            let selection: GpuSelection = raw.parse().unwrap();
            assert_eq!(selection.to_string(), raw);
            assert_eq!(selection.to_string().parse::<GpuSelection>(), Ok(selection));
        }
        assert_eq!("all".parse::<GpuSelection>().unwrap().to_string(), "auto");
        assert_eq!(GpuSelection::List(vec![]).to_string(), "none");
    }

    // --- worker_env ---

    #[test]
    fn gpu_worker_env_names_its_device_by_uuid() {
        let gpu = &fake_devices(3)[1];
        let env = worker_env(Some(gpu));
        let expected: Vec<(String, String)> = [
            (
                "CUDA_VISIBLE_DEVICES",
                "GPU-00000000-0000-4000-8000-000000000001",
            ),
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
            ("DC_GPU_UUID", "GPU-00000000-0000-4000-8000-000000000001"),
            ("DC_GPU_NAME", "NVIDIA H100 80GB HBM3 (fake)"),
            ("DC_GPU_MEMORY_BYTES", "85899345920"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn cpu_worker_env_hides_every_gpu() {
        assert_eq!(
            worker_env(None),
            [
                ("CUDA_VISIBLE_DEVICES".to_owned(), String::new()),
                ("CUDA_DEVICE_ORDER".to_owned(), "PCI_BUS_ID".to_owned()),
            ]
        );
    }

    #[test]
    fn nvml_init_reasons_are_specific() {
        assert_eq!(
            init_failure_reason(&NvmlError::DriverNotLoaded, None),
            "NVIDIA driver not loaded"
        );
        assert_eq!(
            init_failure_reason(&NvmlError::NoPermission, Some("/x.so")),
            "no permission to use NVML (DC_NVML_LIB=/x.so)"
        );
        assert_eq!(
            init_failure_reason(&NvmlError::Unknown, None),
            "NVML failed to start: an internal driver error occurred"
        );
    }
}
