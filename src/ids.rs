//! User-id lists held compactly: the canary's `allow` and `deny` lists can hold 100,000 ids,
//! and every wasm VM (one per Envoy worker, one on the main thread) keeps its own copy in a
//! linear memory that never shrinks.
//!
//! [`IdList`] is a list as written: the ids end to end in one buffer and where each ends, about
//! 4 bytes per id beyond its text, where a `Vec<String>` takes 24 and an allocation each (and
//! serde_json's tree 32 more). [`IdSet`] is the validated set: the list and a table of indexes
//! into it, one probe and one comparison per lookup. The configuration parser fills an
//! [`IdList`] straight from the JSON text (`crate::json::parse_lists`), so the ids are never
//! held as a tree of strings.

use std::fmt;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

/// Ids in the order written.
#[derive(Default, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(from = "Vec<String>")]
pub struct IdList {
    text: String,
    /// `ends[i]` is where id `i` ends in `text` (it starts where id `i - 1` ends).
    ends: Vec<usize>,
}

impl IdList {
    pub fn push(&mut self, id: &str) {
        self.text.push_str(id);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Id `i`; `i` must be below [`IdList::len`].
    pub fn get(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            _ => self.ends[i - 1],
        };
        &self.text[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Gives back what growing the buffers left unused.
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

/// As the list of strings it was written as (the JSON Schema's default, `[]`, is written so).
impl serde::Serialize for IdList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl fmt::Debug for IdList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for IdList {
    fn from_iter<I: IntoIterator<Item = S>>(ids: I) -> IdList {
        let mut list = IdList::default();
        ids.into_iter().for_each(|id| list.push(id.as_ref()));
        list
    }
}

impl From<Vec<String>> for IdList {
    fn from(ids: Vec<String>) -> IdList {
        ids.into_iter().collect()
    }
}

/// A set of ids: membership costs one hash of the id looked up, and nothing when empty.
#[derive(Default, Clone)]
pub struct IdSet {
    ids: IdList,
    /// Indexes into `ids`, by the hash of the id; an id written twice is indexed once.
    table: HashTable<usize>,
    hasher: DefaultHashBuilder,
}

impl IdSet {
    pub fn new(mut ids: IdList) -> IdSet {
        ids.shrink_to_fit();
        let hasher = DefaultHashBuilder::default();
        let mut table = HashTable::with_capacity(ids.len());
        for i in 0..ids.len() {
            let id = ids.get(i);
            let hash = hasher.hash_one(id);
            if table.find(hash, |&j| ids.get(j) == id).is_none() {
                table.insert_unique(hash, i, |&j| hasher.hash_one(ids.get(j)));
            }
        }
        IdSet { ids, table, hasher }
    }

    pub fn contains(&self, id: &str) -> bool {
        if self.table.is_empty() {
            return false;
        }
        let hash = self.hasher.hash_one(id);
        self.table.find(hash, |&i| self.ids.get(i) == id).is_some()
    }

    /// The number of distinct ids.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

impl fmt::Debug for IdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.table.iter().map(|&i| self.ids.get(i)))
            .finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for IdSet {
    fn from_iter<I: IntoIterator<Item = S>>(ids: I) -> IdSet {
        IdSet::new(ids.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn a_list_keeps_order_and_empty_ids() {
        let list: IdList = ["b", "", "a", "b"].into_iter().collect();
        assert_eq!(list.len(), 4);
        assert_eq!(list.iter().collect::<Vec<_>>(), ["b", "", "a", "b"]);
        assert_eq!(format!("{list:?}"), r#"["b", "", "a", "b"]"#);
        assert_eq!(
            list,
            IdList::from(vec!["b".into(), "".into(), "a".into(), "b".into()])
        );
    }

    #[test]
    fn a_set_answers_exactly_and_counts_an_id_twice_once() {
        let set: IdSet = ["alice", "bob", "alice", "ali"].into_iter().collect();
        assert_eq!(set.len(), 3);
        assert!(set.contains("alice") && set.contains("bob") && set.contains("ali"));
        assert!(!set.contains("alic") && !set.contains("alicee") && !set.contains(""));
        assert!(!IdSet::default().contains("alice"));
        assert!(IdSet::default().is_empty());
    }

    #[test]
    fn a_large_set_finds_every_member_and_nothing_else() {
        let set: IdSet = (0..100_000).map(|i| format!("allow-{i:06}")).collect();
        assert_eq!(set.len(), 100_000);
        assert!((0..100_000).all(|i| set.contains(&format!("allow-{i:06}"))));
        assert!((100_000..110_000).all(|i| !set.contains(&format!("allow-{i:06}"))));
        assert!(!set.contains("allow-00000") && !set.contains("allow-0000000"));
    }

    proptest! {
        #[test]
        fn the_set_agrees_with_std(ids in proptest::collection::vec(".{0,12}", 0..60),
                                   probes in proptest::collection::vec(".{0,12}", 0..30)) {
            let set: IdSet = ids.iter().collect();
            let std: HashSet<&String> = ids.iter().collect();
            prop_assert_eq!(set.len(), std.len());
            for id in ids.iter().chain(&probes) {
                prop_assert_eq!(set.contains(id), std.contains(id));
            }
            let list: IdList = ids.iter().collect();
            prop_assert_eq!(list.iter().collect::<Vec<_>>(), ids.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
