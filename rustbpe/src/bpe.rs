//! Byte-level BPE: learning merges from chunk counts, and encoding with them.
//!
//! Training is exact greedy BPE: each step merges the adjacent pair with the highest total count
//! over all chunks (weighted by how often each chunk occurs); ties go to the smaller pair
//! `(left id, right id)`. Token ids: 0..256 are the bytes, merge k creates id 256 + k.
//!
//! The loop is incremental: we keep the count of every pair, the list of chunks ("words") each
//! pair may occur in, and a max-heap of (count, pair) that is refreshed lazily: counts of
//! existing pairs only ever go down (a merge creates only pairs containing the new id), so a
//! popped entry whose count is still current is the true maximum.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

pub type Pair = (u32, u32);

/// All words (distinct chunks as token ids) packed into one buffer; words only shrink.
pub struct Words {
    ids: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    pub fn with_capacity(words: usize, bytes: usize) -> Self {
        Words {
            ids: Vec::with_capacity(bytes),
            start: Vec::with_capacity(words),
            len: Vec::with_capacity(words),
            count: Vec::with_capacity(words),
        }
    }

    /// Adds a chunk seen `count` times. Chunks shorter than 2 bytes hold no pairs and are skipped.
    pub fn push(&mut self, chunk: &[u8], count: u64) {
        if chunk.len() < 2 {
            return;
        }
        self.start.push(self.ids.len());
        self.len.push(chunk.len() as u32);
        self.count.push(count as i64);
        self.ids.extend(chunk.iter().map(|&b| b as u32));
    }

    pub fn len(&self) -> usize {
        self.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    #[inline]
    fn word(&self, w: usize) -> &[u32] {
        &self.ids[self.start[w]..self.start[w] + self.len[w] as usize]
    }
}

#[inline(always)]
fn add_count(pair_count: &mut FxHashMap<Pair, i64>, pair: Pair, delta: i64) {
    *pair_count.entry(pair).or_insert(0) += delta;
}

/// Learns up to `num_merges` merges; returns them in order (merge k makes token 256 + k).
/// Stops early when no pair occurs any more.
pub fn learn_merges(mut words: Words, num_merges: usize) -> Vec<Pair> {
    let mut merges: Vec<Pair> = Vec::with_capacity(num_merges);
    if num_merges == 0 {
        return merges;
    }

    // ---- initial pair counts and the words each pair occurs in
    let mut pair_count: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut pair_words: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for w in 0..words.len() {
        let n = words.count[w];
        for win in words.word(w).windows(2) {
            let p = (win[0], win[1]);
            add_count(&mut pair_count, p, n);
            let list = pair_words.entry(p).or_default();
            if list.last() != Some(&(w as u32)) {
                list.push(w as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        pair_count.iter().filter(|(_, &c)| c > 0).map(|(&p, &c)| (c, Reverse(p))).collect();

    // ---- merge loop
    let mut new_pairs: Vec<Pair> = Vec::new();
    while merges.len() < num_merges {
        let Some((count, Reverse(pair))) = heap.pop() else { break };
        let current = pair_count.get(&pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != count {
            heap.push((current, Reverse(pair)));
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);
        let (a, b) = pair;

        let where_list = pair_words.remove(&pair).unwrap_or_default();
        new_pairs.clear();
        for &w32 in &where_list {
            let w = w32 as usize;
            let n = words.count[w];
            let start = words.start[w];
            let len = words.len[w] as usize;
            let ids = &mut words.ids[start..start + len];
            // Merge left to right in place: `r` reads the old word, `o` writes the new one.
            let (mut r, mut o) = (0usize, 0usize);
            while r < len {
                if r + 1 < len && ids[r] == a && ids[r + 1] == b {
                    add_count(&mut pair_count, pair, -n);
                    if o > 0 {
                        let x = ids[o - 1];
                        add_count(&mut pair_count, (x, a), -n);
                        record_new_pair(&mut pair_count, &mut pair_words, &mut new_pairs, (x, new_id), n, w32);
                    }
                    if r + 2 < len {
                        let y = ids[r + 2];
                        add_count(&mut pair_count, (b, y), -n);
                        record_new_pair(&mut pair_count, &mut pair_words, &mut new_pairs, (new_id, y), n, w32);
                    }
                    ids[o] = new_id;
                    o += 1;
                    r += 2;
                } else {
                    ids[o] = ids[r];
                    o += 1;
                    r += 1;
                }
            }
            words.len[w] = o as u32;
        }
        for &p in &new_pairs {
            let c = pair_count.get(&p).copied().unwrap_or(0);
            if c > 0 {
                heap.push((c, Reverse(p)));
            }
        }
    }
    merges
}

/// A pair containing the new token gained `n` occurrences in word `w`.
#[inline(always)]
fn record_new_pair(
    pair_count: &mut FxHashMap<Pair, i64>,
    pair_words: &mut FxHashMap<Pair, Vec<u32>>,
    new_pairs: &mut Vec<Pair>,
    p: Pair,
    n: i64,
    w: u32,
) {
    add_count(pair_count, p, n);
    let list = pair_words.entry(p).or_default();
    if list.is_empty() {
        new_pairs.push(p);
    }
    if list.last() != Some(&w) {
        list.push(w);
    }
}

/// Bytes of every token id: the 256 bytes, then each merge's concatenation.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(l, r) in merges {
        let mut v = vocab[l as usize].clone();
        v.extend_from_slice(&vocab[r as usize]);
        vocab.push(v);
    }
    vocab
}

/// Encodes one chunk: repeatedly merge the adjacent pair with the lowest merge id (leftmost
/// first), as in tiktoken and PyPI rustbpe.
pub fn encode_chunk(chunk: &[u8], ranks: &FxHashMap<Pair, u32>, out: &mut Vec<u32>) {
    let mut ids: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
    while ids.len() >= 2 {
        let mut best: Option<(usize, u32)> = None;
        for i in 0..ids.len() - 1 {
            if let Some(&id) = ranks.get(&(ids[i], ids[i + 1])) {
                if best.is_none_or(|(_, b)| id < b) {
                    best = Some((i, id));
                }
            }
        }
        let Some((i, id)) = best else { break };
        ids[i] = id;
        ids.remove(i + 1);
    }
    out.extend_from_slice(&ids);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain greedy BPE, recounting everything at every step (the definition).
    fn naive_merges(chunks: &[(&[u8], u64)], num_merges: usize) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> =
            chunks.iter().map(|(c, n)| (c.iter().map(|&b| b as u32).collect(), *n as i64)).collect();
        let mut merges = Vec::new();
        for k in 0..num_merges {
            let mut counts: std::collections::BTreeMap<Pair, i64> = Default::default();
            for (w, n) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += n;
                }
            }
            // max count, then smallest pair
            let Some((&best, _)) = counts.iter().filter(|(_, &c)| c > 0).max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
            else {
                break;
            };
            merges.push(best);
            let new_id = 256 + k as u32;
            for (w, _) in words.iter_mut() {
                let mut out = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(new_id);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    fn fast_merges(chunks: &[(&[u8], u64)], num_merges: usize) -> Vec<Pair> {
        let mut words = Words::with_capacity(chunks.len(), 0);
        for (c, n) in chunks {
            words.push(c, *n);
        }
        learn_merges(words, num_merges)
    }

    #[test]
    fn incremental_merges_equal_naive_greedy_bpe() {
        let chunks: Vec<(&[u8], u64)> = vec![
            (b"aaaa", 3),
            (b"aaa", 2),
            (b"abab", 5),
            (b"ababab", 1),
            (b"banana", 4),
            (b" the", 7),
            (b"then", 2),
            (b"x", 9),
            (b"zzzzzzzzz", 1),
            (b"hello", 3),
            (b" hello", 3),
        ];
        for n in [0, 1, 5, 20, 100] {
            assert_eq!(fast_merges(&chunks, n), naive_merges(&chunks, n), "num_merges {n}");
        }
    }

    #[test]
    fn ties_go_to_the_smaller_pair() {
        // (b, c) and (a, b) both occur once; (a, b) = (97, 98) is smaller.
        assert_eq!(fast_merges(&[(b"cd", 1), (b"ab", 1)], 1), vec![(97, 98)]);
        assert_eq!(fast_merges(&[(b"ab", 1), (b"cd", 1)], 1), vec![(97, 98)]);
    }

    #[test]
    fn training_stops_when_no_pairs_are_left() {
        assert_eq!(fast_merges(&[(b"ab", 1)], 10), vec![(97, 98)]);
        assert!(fast_merges(&[(b"a", 5)], 10).is_empty());
    }

    #[test]
    fn encoding_a_training_chunk_uses_its_merges() {
        let merges = fast_merges(&[(b"hello", 10), (b"help", 3)], 10);
        let ranks: FxHashMap<Pair, u32> = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        let vocab = token_bytes(&merges);
        let mut out = Vec::new();
        encode_chunk(b"hello", &ranks, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(vocab[out[0] as usize], b"hello");
        out.clear();
        encode_chunk(b"help!", &ranks, &mut out);
        let bytes: Vec<u8> = out.iter().flat_map(|&t| vocab[t as usize].clone()).collect();
        assert_eq!(bytes, b"help!");
    }
}
