//! Small helpers around `std::sync` shared by the modules that guard plain state with a
//! std mutex.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking over a poisoned one as it is.
///
/// For mutexes whose critical sections only read, push or swap a value: a panic in one
/// cannot leave the value half-changed, so refusing every later lock (and so failing
/// every later request) would turn one panic into an outage for no gain.
pub(crate) fn lock_unpoisoned<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_locked_with_its_value() {
        let mutex = Mutex::new(vec![1]);
        let _ = std::panic::catch_unwind(|| {
            let mut guard = mutex.lock().expect("not poisoned yet");
            guard.push(2);
            panic!("poison it");
        });
        assert!(mutex.is_poisoned());
        assert_eq!(*lock_unpoisoned(&mutex), vec![1, 2]);
    }
}
