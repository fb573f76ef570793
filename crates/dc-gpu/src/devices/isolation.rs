//! The environment that pins one worker process to one device: its full UUID in
//! `CUDA_VISIBLE_DEVICES`, or no GPU at all for a CPU worker.

use super::{CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES, GpuDevice, PCI_BUS_ID_ORDER};

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
#[must_use]
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
    use super::super::fake_devices;
    use super::*;

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
}
