//! Small helpers every crate of the workspace shares.

use std::sync::{Mutex, MutexGuard};

/// Lock `m`, taking the value over if a thread panicked while holding it: every value these
/// locks guard stays consistent between statements (counters, maps, free-lists), so a panic
/// elsewhere must not take the whole process down with a poisoned lock.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
