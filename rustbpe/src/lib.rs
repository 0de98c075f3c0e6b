//! rustbpe: nanochat's byte-level BPE trainer.
//!
//! Same Python surface as PyPI `rustbpe` 0.1.0 (`Tokenizer.train_from_iterator`, `get_pattern`,
//! `get_mergeable_ranks`, `encode`, `batch_encode`, `decode`, `vocab_size`) and the same merges
//! for the same input, pattern and vocab size, but faster: the default split pattern runs through
//! a hand-written scanner (pretok.rs) instead of a backtracking regex, chunks are counted in
//! borrowed-key hash tables (count.rs), and the merge loop keeps compact indexes (bpe.rs).

pub mod bpe;
pub mod count;
pub mod pretok;

use rustc_hash::FxHashMap;

use bpe::Pair;
use pretok::Splitter;

/// Our default split pattern: GPT-4's, with numbers in groups of at most two digits.
/// (PyPI rustbpe 0.1.0 defaults to GPT-4's original `\p{N}{1,3}`; pass the pattern explicitly
/// when the two must agree.)
pub const DEFAULT_PATTERN: &str = pretok::GPT4_PATTERN_N2;

/// The trained tokenizer, independent of Python.
pub struct Bpe {
    pub pattern: String,
    splitter: Splitter,
    pub merges: Vec<Pair>,
    ranks: FxHashMap<Pair, u32>,
    vocab: Vec<Vec<u8>>,
}

impl Default for Bpe {
    fn default() -> Self {
        Self::new()
    }
}

impl Bpe {
    /// An untrained tokenizer: the default pattern and the 256 byte tokens.
    pub fn new() -> Self {
        Bpe {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::new(DEFAULT_PATTERN).expect("default pattern compiles"),
            merges: Vec::new(),
            ranks: FxHashMap::default(),
            vocab: bpe::token_bytes(&[]),
        }
    }

    /// Learns merges from chunk counts until the vocabulary has `vocab_size` tokens
    /// (or no pair is left).
    pub fn train_from_counts(&mut self, pattern: &str, counts: count::ChunkCounts, vocab_size: u32) -> Result<(), String> {
        if vocab_size < 256 {
            return Err(format!("vocab_size must be at least 256 (the byte tokens), got {vocab_size}"));
        }
        let splitter = Splitter::new(pattern)?;
        let mut total_bytes = 0usize;
        counts.for_each(|c, _| total_bytes += c.len());
        let mut words = bpe::Words::with_capacity(counts.len(), total_bytes);
        counts.for_each(|c, n| words.push(c, n));
        drop(counts);
        let merges = bpe::learn_merges(words, (vocab_size - 256) as usize);
        self.set_merges(pattern.to_string(), splitter, merges);
        Ok(())
    }

    /// Trains on an in-memory list of documents (used by tests and benchmarks on the Rust side).
    pub fn train_from_texts(&mut self, texts: &[&str], vocab_size: u32, pattern: &str) -> Result<(), String> {
        let splitter = Splitter::new(pattern)?;
        let mut joined = String::new();
        let mut ends = Vec::with_capacity(texts.len());
        for t in texts {
            joined.push_str(t);
            ends.push(joined.len());
        }
        let mut counts = count::ChunkCounts::new();
        counts.add_documents(&splitter, &joined, &ends)?;
        self.train_from_counts(pattern, counts, vocab_size)
    }

    fn set_merges(&mut self, pattern: String, splitter: Splitter, merges: Vec<Pair>) {
        self.ranks = merges.iter().enumerate().map(|(i, &p)| (p, 256 + i as u32)).collect();
        self.vocab = bpe::token_bytes(&merges);
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
    }

    pub fn vocab_size(&self) -> u32 {
        self.vocab.len() as u32
    }

    pub fn token_bytes(&self) -> &[Vec<u8>] {
        &self.vocab
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each_chunk(text, |c| bpe::encode_chunk(c.as_bytes(), &self.ranks, &mut out))?;
        Ok(out)
    }

    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, u32> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.vocab.get(id as usize).ok_or(id)?);
        }
        Ok(out)
    }
}

#[cfg(feature = "python")]
mod python;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_round_trips() {
        let mut t = Bpe::new();
        let docs = ["the quick brown fox jumps over the lazy dog", "the dog's 12345 bones\n\n", "日本語のテキスト 😀"];
        t.train_from_texts(&docs, 300, DEFAULT_PATTERN).unwrap();
        assert!(t.vocab_size() > 256);
        for d in docs.iter().chain(["unseen text: Ωmega ß\t\r\n"].iter()) {
            let ids = t.encode(d).unwrap();
            assert_eq!(t.decode_bytes(&ids).unwrap(), d.as_bytes());
        }
    }

    #[test]
    fn vocab_size_below_256_is_rejected() {
        let mut t = Bpe::new();
        assert!(t.train_from_texts(&["abc"], 255, DEFAULT_PATTERN).is_err());
    }

    #[test]
    fn decoding_an_unknown_id_reports_it() {
        let t = Bpe::new();
        assert_eq!(t.decode_bytes(&[65, 300]), Err(300));
    }

    #[test]
    fn custom_patterns_use_the_regex_path() {
        let mut t = Bpe::new();
        t.train_from_texts(&["aaa bbb aaa"], 260, r"\w+|\s+").unwrap();
        assert_eq!(t.pattern, r"\w+|\s+");
        assert_eq!(t.merges[0], (b'a' as u32, b'a' as u32));
    }
}
