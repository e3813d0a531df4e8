//! Envoy's shared data as a policy sees it: a process-wide map of byte values, each with a
//! compare-and-swap token, common to every worker of one Envoy (and kept across a
//! configuration update of the same VM). No delete, no eviction: callers bound their keys.
//!
//! The filter implements [`SharedData`] over the host (`filter::shared::HostShared`); tests use
//! [`Memory`], which can also lose races on purpose. Every read-modify-write goes through
//! [`update`], the one compare-and-swap loop in the crate.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteError {
    /// Another worker wrote the key since it was read.
    CasMismatch,
    /// The host refused the write for another reason (named for the log).
    Host(&'static str),
}

/// Shared data, key by key.
pub trait SharedData {
    /// The value and its CAS token. A key never written is `(None, None)`; the host reads an
    /// empty value as missing, so callers never store empty values.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value` if the key's token is still `cas` (`None`: write whatever is there).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), WriteError>;
}

/// The outcome of [`update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update<T> {
    /// `f` asked for a write and it was made: the value written, decoded by `f`'s caller.
    Written(T),
    /// `f` decided nothing needs writing, given the value it last saw.
    Unchanged(T),
    /// Every attempt lost its race, or the host refused the write.
    Failed(WriteError),
}

/// What `f` decides, given the current value (`None` when the key was never written).
pub enum Step<T> {
    /// Write these bytes; report `T` once written.
    Write(Vec<u8>, T),
    /// Leave the value as it is and report `T`.
    Keep(T),
}

/// Reads `key`, lets `f` decide, and writes the result with the token it read; a lost race
/// reads again and asks `f` again, up to `attempts` times. `f` must be a pure function of the
/// value it is given: it may run several times.
pub fn update<T>(
    store: &dyn SharedData,
    key: &str,
    attempts: usize,
    mut f: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Update<T> {
    let mut last = WriteError::CasMismatch;
    for _ in 0..attempts.max(1) {
        let (value, cas) = store.get(key);
        match f(value.as_deref()) {
            Step::Keep(t) => return Update::Unchanged(t),
            Step::Write(bytes, t) => match store.set(key, &bytes, cas) {
                Ok(()) => return Update::Written(t),
                Err(WriteError::CasMismatch) => last = WriteError::CasMismatch,
                Err(e) => return Update::Failed(e),
            },
        }
    }
    Update::Failed(last)
}

/// An in-memory [`SharedData`] with the host's CAS semantics: every write bumps the key's
/// token; a write with a stale token fails; a write with `None` always succeeds.
#[derive(Default)]
pub struct Memory {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    /// Writes still to fail with a CAS mismatch, as if another worker had just written.
    lose_races: Cell<usize>,
    /// Writes still to be refused by the "host".
    refuse: Cell<usize>,
    writes: Cell<usize>,
}

impl Memory {
    pub fn new() -> Memory {
        Memory::default()
    }

    /// The next `n` writes that carry a token fail with [`WriteError::CasMismatch`]; the value
    /// is bumped as another worker's write would.
    pub fn lose_next_races(&self, n: usize) {
        self.lose_races.set(n);
    }

    /// The next `n` writes fail with [`WriteError::Host`].
    pub fn refuse_next_writes(&self, n: usize) {
        self.refuse.set(n);
    }

    /// Writes made so far (a cost check for callers that must not write on every call).
    pub fn writes(&self) -> usize {
        self.writes.get()
    }

    pub fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.map.borrow().get(key).map(|(v, _)| v.clone())
    }

    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.map.borrow().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn bump(&self) -> u32 {
        let n = self.next_cas.get().wrapping_add(1).max(1);
        self.next_cas.set(n);
        n
    }
}

impl SharedData for Memory {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), WriteError> {
        if self.refuse.get() > 0 {
            self.refuse.set(self.refuse.get() - 1);
            return Err(WriteError::Host("refused by the test"));
        }
        if cas.is_some() && self.lose_races.get() > 0 {
            self.lose_races.set(self.lose_races.get() - 1);
            let token = self.bump();
            if let Some(entry) = self.map.borrow_mut().get_mut(key) {
                entry.1 = token;
            }
            return Err(WriteError::CasMismatch);
        }
        let mut map = self.map.borrow_mut();
        if let (Some(c), Some((_, cur))) = (cas, map.get(key)) {
            if c != *cur {
                return Err(WriteError::CasMismatch);
            }
        }
        let token = self.bump();
        map.insert(key.to_string(), (value.to_vec(), token));
        self.writes.set(self.writes.get() + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_one(v: Option<&[u8]>) -> Step<u8> {
        let n = v.and_then(|b| b.first().copied()).unwrap_or(0) + 1;
        Step::Write(vec![n], n)
    }

    #[test]
    fn writes_with_the_token_it_read() {
        let m = Memory::new();
        assert_eq!(update(&m, "k", 4, add_one), Update::Written(1));
        assert_eq!(update(&m, "k", 4, add_one), Update::Written(2));
        assert_eq!(m.value("k"), Some(vec![2]));
    }

    #[test]
    fn a_lost_race_reads_again_and_decides_again() {
        let m = Memory::new();
        update(&m, "k", 4, add_one);
        m.lose_next_races(2);
        let mut seen = 0;
        let out = update(&m, "k", 4, |v| {
            seen += 1;
            add_one(v)
        });
        assert_eq!(out, Update::Written(2));
        assert_eq!(seen, 3, "two lost races, then the write");
    }

    #[test]
    fn gives_up_after_the_attempts() {
        let m = Memory::new();
        update(&m, "k", 4, add_one);
        m.lose_next_races(10);
        assert_eq!(
            update(&m, "k", 3, add_one),
            Update::Failed(WriteError::CasMismatch)
        );
        assert_eq!(m.value("k"), Some(vec![1]), "nothing written");
    }

    #[test]
    fn a_host_refusal_is_not_retried() {
        let m = Memory::new();
        m.refuse_next_writes(1);
        assert!(matches!(
            update(&m, "k", 4, add_one),
            Update::Failed(WriteError::Host(_))
        ));
        assert_eq!(update(&m, "k", 4, add_one), Update::Written(1));
    }

    #[test]
    fn keep_writes_nothing() {
        let m = Memory::new();
        assert_eq!(update(&m, "k", 4, |_| Step::Keep(7)), Update::Unchanged(7));
        assert_eq!(m.writes(), 0);
    }

    #[test]
    fn a_stale_token_is_refused() {
        let m = Memory::new();
        m.set("k", b"a", None).unwrap();
        let (_, cas) = m.get("k");
        m.set("k", b"b", cas).unwrap();
        assert_eq!(m.set("k", b"c", cas), Err(WriteError::CasMismatch));
        assert_eq!(m.value("k"), Some(b"b".to_vec()));
    }
}
