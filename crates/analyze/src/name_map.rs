//! [`NameMap`]: what a scope or a class binds, by name.
//!
//! Every file's scopes and classes are kept to the end of a run, and most
//! bind a handful of names. A `BTreeMap<String, _>` allocated a node of
//! eleven slots for each, plus each key on the heap: 6.9 of the 22.6 MB of
//! facts for Debian's standard library. A sorted vector of parser names
//! (short ones inline) holds the same entries in the same (byte-wise)
//! order in 3.4 MB.

use crate::facts::Name;

/// Entries sorted by name, each name once.
#[derive(Clone, Debug)]
pub struct NameMap<V> {
    entries: Vec<(Name, V)>,
}

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        NameMap {
            entries: Vec::new(),
        }
    }
}

impl<V> NameMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.entries[i].1)
    }

    /// The value bound to `name`, binding `value()` first if there is none
    /// (the first binding wins, as `entry(..).or_insert_with(..)`).
    pub fn or_insert_with(&mut self, name: &Name, value: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(name) {
            Ok(i) => i,
            Err(i) => {
                self.entries.insert(i, (name.clone(), value()));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// Binds `name` to `value`, replacing (and returning) any earlier value.
    pub fn insert(&mut self, name: &Name, value: V) -> Option<V> {
        match self.find(name) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (name.clone(), value));
                None
            }
        }
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, &V)> {
        self.into_iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Every entry, mutably. A key may be replaced only by a name with the
    /// same text (the order is kept): [`crate::detach`] copies names.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut Name, &mut V)) {
        for (k, v) in &mut self.entries {
            f(k, v);
        }
    }
}

impl<'a, V> IntoIterator for &'a NameMap<V> {
    type Item = (&'a Name, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (Name, V)>, fn(&'a (Name, V)) -> (&'a Name, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_names_sorted_and_the_first_binding() {
        let mut m = NameMap::new();
        for (i, n) in ["b", "a", "c", "a"].into_iter().enumerate() {
            m.or_insert_with(&Name::new(n), || i);
        }
        let got: Vec<(&str, usize)> = m.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        assert_eq!(got, [("a", 1), ("b", 0), ("c", 2)]);
        assert_eq!(m.insert(&Name::new("b"), 9), Some(0));
        assert_eq!(m.get("b"), Some(&9));
        assert_eq!(m.get("d"), None);
        assert_eq!(m.iter().count(), 3);
    }
}
