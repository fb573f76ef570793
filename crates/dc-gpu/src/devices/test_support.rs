//! Devices and environments shared by the discovery tests.

use super::{EnvSnapshot, GpuDevice};

pub(super) fn device(index: u32, uuid: &str, name: &str) -> GpuDevice {
    GpuDevice {
        index,
        uuid: uuid.to_owned(),
        name: name.to_owned(),
        memory_total: 1 << 30,
        pci_bus_id: format!("00000000:{:02X}:00.0", index + 0x10),
    }
}

/// Four GPUs whose UUIDs share prefixes: `GPU-8a3` is ambiguous, `GPU-8a31` is not.
pub(super) fn host() -> Vec<GpuDevice> {
    vec![
        device(0, "GPU-8a31c0de-1111-2222-3333-444455556666", "NVIDIA H100"),
        device(1, "GPU-8a3fffff-1111-2222-3333-444455556666", "NVIDIA H100"),
        device(2, "GPU-12345678-aaaa-bbbb-cccc-ddddeeeeffff", "NVIDIA H100"),
        device(3, "GPU-deadbeef-aaaa-bbbb-cccc-ddddeeeeffff", "NVIDIA H100"),
    ]
}

pub(super) fn indices(devices: &[GpuDevice]) -> Vec<u32> {
    devices.iter().map(|d| d.index).collect()
}

pub(super) fn fake_env(count: &str) -> EnvSnapshot {
    EnvSnapshot {
        fake_gpus: Some(count.to_owned()),
        ..EnvSnapshot::default()
    }
}

pub(super) fn is_canonical_gpu_uuid(uuid: &str) -> bool {
    let Some(hex) = uuid.strip_prefix("GPU-") else {
        return false;
    };
    let groups: Vec<&str> = hex.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}
