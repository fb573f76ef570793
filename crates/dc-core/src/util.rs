//! Small helpers every crate of the workspace shares.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, taking the value over if a thread panicked while holding it: every value these
/// locks guard stays consistent between statements (counters, maps, free-lists), so a panic
/// elsewhere must not take the whole process down with a poisoned lock.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `x` as a count: rounded toward zero, 0 for NaN and negatives, `usize::MAX` past it.
pub fn saturating_count(x: f64) -> usize {
    // The one float-to-count conversion: `as` saturates and maps NaN to 0, which is exactly
    // what a count derived from measured averages needs.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "float-to-int `as` saturates; that is the intent"
    )]
    let n = x as usize;
    n
}

#[cfg(test)]
mod tests {
    use super::saturating_count;

    #[test]
    fn counts_saturate() {
        assert_eq!(saturating_count(2.9), 2);
        assert_eq!(saturating_count(-1.0), 0);
        assert_eq!(saturating_count(f64::NAN), 0);
        assert_eq!(saturating_count(1e300), usize::MAX);
    }
}
