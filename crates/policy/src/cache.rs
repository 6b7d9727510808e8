//! A bounded cache of classifications by statement text.
//!
//! Drivers send the same texts again and again (prepared statement bodies, ORM queries); a
//! parse costs tens of microseconds, a lookup well under one. Two generations approximate
//! LRU without per-hit bookkeeping: when the young map is full it becomes the old one (the
//! previous old one is dropped), and a hit in the old map moves the entry back. Keys are the
//! full text, so two texts never share a classification, whatever their hash.

use crate::classify::{classify, Classified};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Texts longer than this are classified every time (they are rarely repeated verbatim).
pub const MAX_CACHED_TEXT: usize = 4 * 1024;

pub struct ClassifyCache {
    generation: usize,
    maps: Mutex<[HashMap<Arc<str>, Arc<Classified>>; 2]>,
}

impl ClassifyCache {
    /// Keeps between `capacity` and `2 * capacity` recent texts.
    pub fn new(capacity: usize) -> Self {
        ClassifyCache {
            generation: capacity.max(1),
            maps: Mutex::new([HashMap::new(), HashMap::new()]),
        }
    }

    pub fn classify(&self, sql: &str) -> Arc<Classified> {
        if sql.len() > MAX_CACHED_TEXT {
            return Arc::new(classify(sql).into());
        }
        {
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = maps[0].get(sql) {
                return c.clone();
            }
            if let Some((k, c)) = maps[1].remove_entry(sql) {
                self.insert(&mut maps, k, c.clone());
                return c;
            }
        }
        // Parse outside the lock; two sessions racing on one new text both parse it once.
        let c: Arc<Classified> = Arc::new(classify(sql).into());
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        self.insert(&mut maps, Arc::from(sql), c.clone());
        c
    }

    fn insert(
        &self,
        maps: &mut [HashMap<Arc<str>, Arc<Classified>>; 2],
        k: Arc<str>,
        c: Arc<Classified>,
    ) {
        if maps[0].len() >= self.generation {
            maps[1] = std::mem::take(&mut maps[0]);
        }
        maps[0].insert(k, c);
    }

    pub fn len(&self) -> usize {
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps[0].len() + maps[1].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_exact() {
        let cache = ClassifyCache::new(4);
        for i in 0..20 {
            cache.classify(&format!("SELECT {i}"));
        }
        assert!(cache.len() <= 8, "{}", cache.len());
        let a = cache.classify("SELECT 1");
        let b = cache.classify("DROP TABLE t");
        assert_ne!(**a, **b);
        assert!(Arc::ptr_eq(&b, &cache.classify("DROP TABLE t")));
    }
}
