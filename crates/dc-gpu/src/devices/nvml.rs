//! GPU enumeration through NVML, loaded at run time: no driver means no GPU and a reason, never
//! a crash. A GPU in MIG mode counts as its MIG instances; GPUs NVML cannot open are skipped
//! with a warning.

use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::{GpuDevice, NVML_LIB_VAR};

/// Devices NVML reports, MIG instances expanded, sorted by bus id; `Err` is the reason for none.
pub(super) fn nvml_source(
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
