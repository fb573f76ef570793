//! The worker slots of a node: one per GPU and worker (`workers_per_gpu`), or, with no GPU,
//! the CPU workers asked for (none by default: a CPU box must not silently take GPU jobs).

use dc_core::agent::SlotSpec;

use super::NodeOptions;

pub(super) fn node_slots(options: &NodeOptions) -> Vec<SlotSpec> {
    let slots = SlotSpec::plan(&options.gpus, options.workers_per_gpu, options.cpu_workers);
    if slots.is_empty() && options.cpu_workers == 0 {
        tracing::warn!(
            "no GPU here and no CPU workers asked for: this node runs no workers (pass --cpu-workers N, or NodeOptions::cpu_workers, to run jobs on the CPU)"
        );
    }
    slots
}
