//! The worker slots of a node: one per GPU and worker (`workers_per_gpu`), or, with no GPU,
//! the CPU workers asked for (none by default: a CPU box must not silently take GPU jobs).

use dc_core::agent::SlotSpec;

use super::NodeOptions;

pub(super) fn node_slots(options: &NodeOptions) -> Vec<SlotSpec> {
    let inventory = dc_gpu::discover(&options.gpus);
    if !inventory.gpus.is_empty() {
        return inventory
            .gpus
            .iter()
            .flat_map(|gpu| {
                std::iter::repeat_n(SlotSpec::for_device(Some(gpu)), options.workers_per_gpu)
            })
            .collect();
    }
    if options.cpu_workers == 0 {
        tracing::warn!(
            "no GPU here and no CPU workers asked for: this node runs no workers (pass --cpu-workers N, or NodeOptions::cpu_workers, to run jobs on the CPU)"
        );
    }
    vec![SlotSpec::for_device(None); options.cpu_workers]
}
