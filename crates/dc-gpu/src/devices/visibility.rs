//! `CUDA_VISIBLE_DEVICES`, parsed and applied with the CUDA driver's own rules, so the agent
//! hands out exactly the GPUs CUDA would let it see, and explains an empty or short list.

use std::fmt;

use super::{CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES, GpuDevice, PCI_BUS_ID_ORDER};

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
#[must_use]
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

/// Narrows `devices` to those an inherited `CUDA_VISIBLE_DEVICES` (`raw`) lets CUDA see, adding
/// warnings; `Err` is the reason none is left.
pub(super) fn narrow_to_visible(
    devices: Vec<GpuDevice>,
    raw: Option<&str>,
    device_order: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<GpuDevice>, String> {
    let found = devices.len();
    let parsed = parse_visible_devices_detailed(raw);
    match &parsed.visibility {
        Visibility::Unset => Ok(devices),
        Visibility::Nothing => Err(nothing_reason(raw)),
        Visibility::List(ids) if ids.is_empty() => Err(empty_list_reason(raw, &parsed)),
        visibility @ Visibility::List(_) => {
            if let Some(ignored) = &parsed.ignored {
                warnings.push(ignored.warning());
            }
            let (visible, more) = apply_visibility(devices, visibility, device_order);
            warnings.extend(more);
            if visible.is_empty() {
                return Err(format!(
                    "{CUDA_VISIBLE_DEVICES}=\"{}\" selects none of the {found} GPU(s) found",
                    raw.unwrap_or_default().trim()
                ));
            }
            Ok(visible)
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::{device, host, indices};
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
}
