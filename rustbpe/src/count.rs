//! Counting distinct chunks: text -> {chunk bytes: occurrences}.
//!
//! Workers split their share of a buffer of documents into chunks and count them in a local
//! table whose keys borrow from the buffer (no allocation per chunk). The local tables are then
//! folded into one global table whose keys live in a single byte arena, so memory grows with the
//! number of *distinct* chunks, not with the text.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rayon::prelude::*;
use rustc_hash::FxBuildHasher;

use crate::pretok::Splitter;

#[inline(always)]
fn hash_bytes(b: &[u8]) -> u64 {
    FxBuildHasher.hash_one(b)
}

/// Chunk counts for one slice of a buffer; keys borrow from the buffer's text.
struct LocalCounts<'a> {
    table: HashTable<(u64, &'a str, u64)>,
}

impl<'a> LocalCounts<'a> {
    fn new() -> Self {
        LocalCounts { table: HashTable::with_capacity(1 << 12) }
    }

    #[inline(always)]
    fn add(&mut self, chunk: &'a str) {
        let h = hash_bytes(chunk.as_bytes());
        match self.table.find_mut(h, |e| e.1 == chunk) {
            Some(e) => e.2 += 1,
            None => {
                self.table.insert_unique(h, (h, chunk, 1), |e| e.0);
            }
        }
    }
}

struct Entry {
    hash: u64,
    offset: usize,
    len: u32,
    count: u64,
}

/// Global chunk -> count table. Chunk bytes are stored back to back in `arena`.
pub struct ChunkCounts {
    arena: Vec<u8>,
    table: HashTable<Entry>,
}

impl Default for ChunkCounts {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkCounts {
    pub fn new() -> Self {
        ChunkCounts { arena: Vec::new(), table: HashTable::new() }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    #[inline]
    fn add_hashed(&mut self, hash: u64, chunk: &[u8], count: u64) {
        let arena = &self.arena;
        match self
            .table
            .find_mut(hash, |e| &arena[e.offset..e.offset + e.len as usize] == chunk)
        {
            Some(e) => e.count += count,
            None => {
                let offset = self.arena.len();
                self.arena.extend_from_slice(chunk);
                let entry = Entry { hash, offset, len: chunk.len() as u32, count };
                self.table.insert_unique(hash, entry, |e| e.hash);
            }
        }
    }

    /// Adds `count` occurrences of `chunk`.
    pub fn add(&mut self, chunk: &[u8], count: u64) {
        self.add_hashed(hash_bytes(chunk), chunk, count);
    }

    /// Splits every document of a buffer (`text[ends[i-1]..ends[i]]`) and counts the chunks,
    /// in parallel on the rayon pool.
    pub fn add_documents(&mut self, splitter: &Splitter, text: &str, ends: &[usize]) -> Result<(), String> {
        if ends.is_empty() {
            return Ok(());
        }
        // Contiguous groups of documents of roughly equal byte size, a few per thread so that
        // a slow (preempted) worker does not hold up the others for long.
        let groups = (rayon::current_num_threads() * 4).max(1);
        let target = text.len() / groups + 1;
        let mut bounds = vec![0usize]; // indices into `ends`
        let mut next_cut = target;
        for (i, &e) in ends.iter().enumerate() {
            if e >= next_cut && i + 1 < ends.len() {
                bounds.push(i + 1);
                next_cut = e + target;
            }
        }
        bounds.push(ends.len());
        let doc_start = |i: usize| if i == 0 { 0 } else { ends[i - 1] };

        let locals: Vec<Result<LocalCounts, String>> = bounds
            .par_windows(2)
            .map(|w| {
                let mut local = LocalCounts::new();
                for d in w[0]..w[1] {
                    let doc = &text[doc_start(d)..ends[d]];
                    splitter.for_each_chunk(doc, |c| local.add(c))?;
                }
                Ok(local)
            })
            .collect();
        for local in locals {
            for (h, chunk, c) in local?.table {
                self.add_hashed(h, chunk.as_bytes(), c);
            }
        }
        Ok(())
    }

    /// Consumes the table: (chunk bytes, count) for each distinct chunk, in no particular order.
    pub fn into_iter_chunks(self) -> impl Iterator<Item = (Vec<u8>, u64)> {
        let arena = self.arena;
        self.table
            .into_iter()
            .map(move |e| (arena[e.offset..e.offset + e.len as usize].to_vec(), e.count))
    }

    /// Visits (chunk bytes, count) for each distinct chunk, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        for e in self.table.iter() {
            f(&self.arena[e.offset..e.offset + e.len as usize], e.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn parallel_counts_equal_sequential_counts() {
        let docs: Vec<String> = (0..300)
            .map(|i| format!("doc {i}: the cat's hat, the cat's mat {} \n", "ab ".repeat(i % 7)))
            .collect();
        let mut text = String::new();
        let mut ends = Vec::new();
        for d in &docs {
            text.push_str(d);
            ends.push(text.len());
        }
        let splitter = Splitter::new(crate::pretok::GPT4_PATTERN_N2).unwrap();
        let mut counts = ChunkCounts::new();
        counts.add_documents(&splitter, &text, &ends).unwrap();

        let mut expected: HashMap<String, u64> = HashMap::new();
        for d in &docs {
            for c in splitter.split(d).unwrap() {
                *expected.entry(c).or_default() += 1;
            }
        }
        let mut got: HashMap<String, u64> = HashMap::new();
        counts.for_each(|b, c| {
            got.insert(String::from_utf8(b.to_vec()).unwrap(), c);
        });
        assert_eq!(got, expected);
        assert_eq!(counts.len(), expected.len());
    }

    #[test]
    fn documents_are_split_separately() {
        // "ab" + "cd" as two documents must not produce the chunk "abcd".
        let splitter = Splitter::new(crate::pretok::GPT4_PATTERN_N2).unwrap();
        let mut counts = ChunkCounts::new();
        counts.add_documents(&splitter, "abcd", &[2, 4]).unwrap();
        let mut got = Vec::new();
        counts.for_each(|b, c| got.push((b.to_vec(), c)));
        got.sort();
        assert_eq!(got, vec![(b"ab".to_vec(), 1), (b"cd".to_vec(), 1)]);
    }
}
