//! `--gpus auto|none|LIST`: what the user asked for, parsed, and applied to the visible GPUs.
//!
//! A list entry is an NVML index (`0`) or a UUID prefix (`GPU-8a3…`, `MIG-…`); a prefix keeps
//! every device it matches, and an entry that matches none draws a warning.

use std::fmt;
use std::str::FromStr;

use super::GpuDevice;

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

/// `Some(n)` when `entry` is a plain decimal index.
fn parse_index(entry: &str) -> Option<u32> {
    if entry.bytes().all(|b| b.is_ascii_digit()) {
        entry.parse().ok()
    } else {
        None
    }
}

/// Keeps the devices `selection` names, plus a warning per list entry that names none.
pub(super) fn apply_selection(
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::{host, indices};
    use super::*;

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

    #[test]
    fn selection_prefix_keeps_every_matching_device() {
        let (kept, warnings) = apply_selection(host(), &"GPU-8a3".parse().unwrap());
        assert_eq!(indices(&kept), [0, 1]);
        assert!(warnings.is_empty());
    }
}
