//! Fake GPUs for tests: `DC_FAKE_GPUS=N` stands in for NVML with N H100s that have distinct
//! canonical UUIDs and PCI bus ids.

use super::{FAKE_GPUS_VAR, GpuDevice};

/// Most fake GPUs `DC_FAKE_GPUS` may ask for; a larger value is a typo, not a test.
const MAX_FAKE_GPUS: u32 = 1024;
const FAKE_GPU_NAME: &str = "NVIDIA H100 80GB HBM3 (fake)";
const FAKE_GPU_MEMORY: u64 = 80 * 1024 * 1024 * 1024;

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
#[must_use]
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

/// Devices for `DC_FAKE_GPUS=raw`; `Err` is the reason for having none.
pub(super) fn fake_source(raw: &str, warnings: &mut Vec<String>) -> Result<Vec<GpuDevice>, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::is_canonical_gpu_uuid;
    use super::*;

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
}
