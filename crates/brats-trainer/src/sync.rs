//! The crate's one rule for poisoned `std::sync` locks: recover the guard and go on.
//!
//! A std lock is poisoned when a thread panicked while holding it. Turning that into a panic at
//! every later `lock()` (`.expect("jobs lock")`) would make one bug in one request fail every
//! later RPC of the service until a restart. Every critical section in this crate is a short
//! read, insert, remove or replace of a whole value (a map entry, a record snapshot, a set of
//! device ids, a pipe handle) that cannot be observed half-done, so the data behind a poisoned
//! lock is as consistent as after any other critical section, and it is used as it is.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, recovering the guard if a panicking thread poisoned it (see the module docs).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, recovering the guard if it is poisoned (see the module docs).
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, recovering the guard if it is poisoned (see the module docs).
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_serves_later_callers() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let l = std::sync::Arc::new(RwLock::new(7));
        let (m2, l2) = (m.clone(), l.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = l2.write().unwrap();
            panic!("a bug in one request");
        })
        .join();
        assert!(m.is_poisoned() && l.is_poisoned());
        lock(&m).push(2);
        assert_eq!(*lock(&m), [1, 2]);
        *write(&l) += 1;
        assert_eq!(*read(&l), 8);
    }
}
