//! [`Cache`]: metric handles looked up once per label set, then reused.
//!
//! A `counter!` with labels builds a key (each label value copied into a
//! `String`), hashes it and looks it up in the recorder's registry: several
//! microseconds, paid by every task on the create, attempt and command paths
//! (about a tenth of `bmw run`'s instructions while it takes batches, under
//! callgrind). The handles the hot paths use are kept here by their label
//! values instead, and registered with the recorder on first use, exactly as
//! the macros would have: a series that was never recorded is still not
//! rendered.
//!
//! Handles belong to the recorder installed when they are made, so nothing
//! is kept until [`super::install`] has run: before that, the callers record
//! through the macros (and the no-op recorder), as before.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

/// Values of `V` by key, made on first use and kept for the process's life.
/// Keys are label values from bounded sets (kinds, queues, routes, codes),
/// as the series themselves are.
#[derive(Debug)]
pub(super) struct Cache<K, V> {
    map: RwLock<HashMap<K, Arc<V>>>,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache {
            map: RwLock::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Default> Cache<K, V> {
    /// The value for `key`, made (empty) if it is not there yet.
    pub(super) fn get<Q>(&self, key: &Q) -> Arc<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return value.clone();
        }
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default()
            .clone()
    }
}

/// One handle, registered on first use.
pub(super) type Handle<T> = OnceLock<T>;

/// Whether handles may be kept: only once the recorder is installed.
pub(super) fn enabled() -> bool {
    super::HANDLE.get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_one_value_whoever_asks() {
        let cache: Cache<String, Handle<u32>> = Cache::default();
        let first = cache.get("kind");
        first.get_or_init(|| 7);
        assert_eq!(cache.get("kind").get(), Some(&7));
        assert_eq!(cache.get("other").get(), None);
        assert!(Arc::ptr_eq(&first, &cache.get("kind")));
    }
}
