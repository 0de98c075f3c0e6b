//! Splitting text into chunks ("pre-tokenization") before BPE.
//!
//! The default split is GPT-4's regex with numbers in groups of at most `max_digits`:
//!
//! ```text
//! '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+
//! ```
//!
//! Running it through a backtracking regex engine is what makes training slow, so for this
//! pattern (K = 2 or 3) we use a hand-written scanner that makes the same leftmost-first choice
//! among the alternatives at each position. Every character is exactly one of: letter (\p{L}),
//! number (\p{N}), white space (\s) or other, so some alternative always matches and the chunks
//! tile the text. Any other pattern goes through `fancy_regex`, as in PyPI rustbpe.
//! The equivalence is checked by the tests below (against fancy-regex) and by
//! tests/test_rustbpe.py (against Python's `regex` module).

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

/// GPT-4's split pattern with numbers split into groups of at most two digits (our default).
pub const GPT4_PATTERN_N2: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// GPT-4's original split pattern (groups of up to three digits; PyPI rustbpe 0.1.0's default).
pub const GPT4_PATTERN_N3: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub const OTHER: u8 = 0;
pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 3;

/// Character classes for all of Unicode, as a two-level table: `blocks[index[cp >> 8]][cp & 0xff]`.
/// Built from regex-syntax's own Unicode tables, so \p{L}, \p{N} and \s mean exactly what they
/// mean to the regex engine.
pub struct ClassTable {
    index: Vec<u16>,
    blocks: Vec<[u8; 256]>,
    ascii: [u8; 128],
}

fn unicode_ranges(class_syntax: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new().parse(class_syntax).expect("valid class syntax");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => {
            cls.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        other => panic!("{class_syntax} did not parse to a Unicode class: {other:?}"),
    }
}

impl ClassTable {
    fn build() -> Self {
        let mut flat = vec![OTHER; 0x110000];
        for (syntax, cls) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in unicode_ranges(syntax) {
                for cp in lo..=hi {
                    flat[cp as usize] = cls;
                }
            }
        }
        // Deduplicate the 256-codepoint blocks (most of the code space is unassigned/"other").
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut seen: std::collections::HashMap<[u8; 256], u16> = std::collections::HashMap::new();
        let mut index = Vec::with_capacity(0x1100);
        for chunk in flat.chunks_exact(256) {
            let block: [u8; 256] = chunk.try_into().unwrap();
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                (blocks.len() - 1) as u16
            });
            index.push(id);
        }
        let mut ascii = [OTHER; 128];
        ascii.copy_from_slice(&flat[..128]);
        ClassTable { index, blocks, ascii }
    }

    #[inline(always)]
    pub fn class_of(&self, cp: u32) -> u8 {
        self.blocks[self.index[(cp >> 8) as usize] as usize][(cp & 0xff) as usize]
    }
}

pub fn class_table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(ClassTable::build)
}

/// Decode the char starting at byte `i` of valid UTF-8: (code point, byte length).
#[inline(always)]
fn decode_at(s: &[u8], i: usize) -> (u32, usize) {
    let b0 = s[i] as u32;
    if b0 < 0x80 {
        (b0, 1)
    } else if b0 < 0xE0 {
        (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
    } else if b0 < 0xF0 {
        (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
    } else {
        (
            ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F),
            4,
        )
    }
}

/// Splits text with the GPT-4 pattern (numbers grouped by at most `max_digits`).
pub struct Gpt4Splitter {
    table: &'static ClassTable,
    max_digits: usize,
}

impl Gpt4Splitter {
    pub fn new(max_digits: usize) -> Self {
        Gpt4Splitter { table: class_table(), max_digits }
    }

    /// (code point, class, byte length) of the char at byte `i`.
    #[inline(always)]
    fn at(&self, s: &[u8], i: usize) -> (u32, u8, usize) {
        let b = s[i];
        if b < 0x80 {
            (b as u32, self.table.ascii[b as usize], 1)
        } else {
            let (cp, n) = decode_at(s, i);
            (cp, self.table.class_of(cp), n)
        }
    }

    #[inline(always)]
    fn class_at(&self, s: &[u8], i: usize) -> u8 {
        self.at(s, i).1
    }

    /// End of the run of chars of class `cls` starting at byte `i`.
    #[inline(always)]
    fn run_end(&self, s: &[u8], mut i: usize, cls: u8) -> usize {
        while i < s.len() {
            let (_, c, n) = self.at(s, i);
            if c != cls {
                break;
            }
            i += n;
        }
        i
    }

    /// `'(?i:[sdmt]|ll|ve|re)` after the apostrophe at `i - 1`: end of the match, if any.
    /// (?i) uses Unicode simple case folding, so U+017F (long s) also matches `s`.
    #[inline]
    fn contraction_end(&self, s: &[u8], i: usize) -> Option<usize> {
        if i >= s.len() {
            return None;
        }
        let (c1, _, n1) = self.at(s, i);
        let lower = |c: u32| -> u32 {
            match c {
                0x41..=0x5A => c + 32,
                0x17F => 's' as u32,
                _ => c,
            }
        };
        let c1 = lower(c1);
        if c1 == 's' as u32 || c1 == 'd' as u32 || c1 == 'm' as u32 || c1 == 't' as u32 {
            return Some(i + n1);
        }
        let second = match char::from_u32(c1) {
            Some('l') => 'l',
            Some('v') | Some('r') => 'e',
            _ => return None,
        };
        let j = i + n1;
        if j < s.len() {
            let (c2, _, n2) = self.at(s, j);
            if lower(c2) == second as u32 {
                return Some(j + n2);
            }
        }
        None
    }

    /// Byte end of the chunk that starts at byte `i` (< s.len()).
    #[inline]
    pub fn chunk_end(&self, s: &[u8], i: usize) -> usize {
        let len = s.len();
        let (c, cls, n) = self.at(s, i);
        // '(?i:[sdmt]|ll|ve|re)
        if c == '\'' as u32 {
            if let Some(e) = self.contraction_end(s, i + n) {
                return e;
            }
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}+
        if cls == LETTER {
            return self.run_end(s, i + n, LETTER);
        }
        let is_newline = c == '\r' as u32 || c == '\n' as u32;
        if cls != NUMBER && !is_newline && i + n < len && self.class_at(s, i + n) == LETTER {
            return self.run_end(s, i + n, LETTER);
        }
        // \p{N}{1,K}
        if cls == NUMBER {
            let mut j = i + n;
            let mut k = 1;
            while k < self.max_digits && j < len {
                let (_, c2, n2) = self.at(s, j);
                if c2 != NUMBER {
                    break;
                }
                j += n2;
                k += 1;
            }
            return j;
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
        let others_start = if cls == OTHER {
            Some(i + n)
        } else if c == ' ' as u32 && i + 1 < len && self.class_at(s, i + 1) == OTHER {
            let (_, _, n2) = self.at(s, i + 1);
            Some(i + 1 + n2)
        } else {
            None
        };
        if let Some(j) = others_start {
            let mut j = self.run_end(s, j, OTHER);
            while j < len && (s[j] == b'\r' || s[j] == b'\n') {
                j += 1;
            }
            return j;
        }
        // Now `c` is white space. Scan the whole run of white space from i.
        let mut j = i;
        let mut last_char_start = i;
        let mut after_last_newline = None;
        while j < len {
            let (c2, cls2, n2) = self.at(s, j);
            if cls2 != SPACE {
                break;
            }
            if c2 == '\r' as u32 || c2 == '\n' as u32 {
                after_last_newline = Some(j + n2);
            }
            last_char_start = j;
            j += n2;
        }
        // \s*[\r\n]: greedy, so it ends just after the run's last newline.
        if let Some(e) = after_last_newline {
            return e;
        }
        // \s+(?!\S): the whole run at the end of the text, else the run minus its last char
        if j == len {
            return j;
        }
        if last_char_start > i {
            return last_char_start;
        }
        // \s+: a single white-space char before a non-space
        j
    }

    /// Calls `f` with each chunk of `text`, in order.
    #[inline]
    pub fn for_each_chunk<'a, F: FnMut(&'a str)>(&self, text: &'a str, mut f: F) {
        let s = text.as_bytes();
        let mut i = 0;
        while i < s.len() {
            let e = self.chunk_end(s, i);
            // SAFETY: chunk boundaries always fall on char boundaries (we step whole chars).
            f(unsafe { text.get_unchecked(i..e) });
            i = e;
        }
    }
}

/// A compiled split pattern: the fast scanner for the GPT-4 patterns, fancy-regex otherwise.
#[derive(Clone)]
pub enum Splitter {
    Gpt4 { max_digits: usize },
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern == GPT4_PATTERN_N2 {
            Ok(Splitter::Gpt4 { max_digits: 2 })
        } else if pattern == GPT4_PATTERN_N3 {
            Ok(Splitter::Gpt4 { max_digits: 3 })
        } else {
            fancy_regex::Regex::new(pattern)
                .map(Splitter::Regex)
                .map_err(|e| format!("Invalid regex pattern: {e}"))
        }
    }

    /// Calls `f` with each chunk of `text`, in order. Regex runtime errors (backtrack limit)
    /// end the split early, as there is no way to continue past them.
    pub fn for_each_chunk<'a, F: FnMut(&'a str)>(&self, text: &'a str, mut f: F) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { max_digits } => {
                Gpt4Splitter::new(*max_digits).for_each_chunk(text, f);
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("regex match failed: {e}"))?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }

    pub fn split(&self, text: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_split(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        re.find_iter(text).map(|m| m.unwrap().as_str().to_string()).collect()
    }

    fn fast_split(max_digits: usize, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        Gpt4Splitter::new(max_digits).for_each_chunk(text, |c| out.push(c.to_string()));
        out
    }

    /// Small deterministic PRNG (xorshift64*), so the tests need no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Characters chosen to hit every branch of the pattern: contractions (any case, long s),
    /// letters/numbers/space/punctuation from several scripts, CR/LF and exotic white space.
    const ALPHABET: &[char] = &[
        'a', 'b', 's', 'S', 'd', 'D', 'm', 't', 'T', 'l', 'L', 'v', 'V', 'e', 'E', 'r', 'R', 'ſ', 'K',
        '\'', '\'', '’', '0', '1', '9', '٣', '²', 'Ⅻ', '½', ' ', ' ', ' ', '\t', '\n', '\n', '\r',
        '\u{b}', '\u{c}', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}', '\u{200b}', '\u{1c}', '.', ',', '!',
        '-', '(', '"', '$', '€', '😀', '👍', '\u{301}', '\u{200d}', 'é', 'ß', 'Ω', 'ж', '中', '文', 'ア',
        '한', 'ـ', 'ا', '\u{0}', '\u{7f}', '\u{feff}', '𝔸', '𐍈',
    ];

    #[test]
    fn fast_splitter_matches_fancy_regex_on_random_strings() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        let re2 = fancy_regex::Regex::new(GPT4_PATTERN_N2).unwrap();
        let re3 = fancy_regex::Regex::new(GPT4_PATTERN_N3).unwrap();
        for round in 0..20000 {
            let n = rng.below(24);
            let text: String = (0..n).map(|_| ALPHABET[rng.below(ALPHABET.len())]).collect();
            for (k, re) in [(2, &re2), (3, &re3)] {
                assert_eq!(fast_split(k, &text), regex_split(re, &text), "round {round}, text {text:?}");
            }
        }
    }

    #[test]
    fn fast_splitter_matches_fancy_regex_on_every_codepoint_in_context() {
        // Each scalar value, alone and in contexts that exercise each alternative (the "'" ones
        // check contraction case folding in both positions).
        let contexts = [
            "{}", "a{}", "{}a", " {}", "{} ", "'{}", "'l{}", "'v{}", "'r{}", "1{}1", "\n{}", "{}\n", "  {}x", ".{}.",
        ];
        let re = fancy_regex::Regex::new(GPT4_PATTERN_N2).unwrap();
        let mut text = String::new();
        let mut cp = 0u32;
        while cp < 0x110000 {
            if let Some(c) = char::from_u32(cp) {
                for ctx in contexts {
                    text.clear();
                    text.push_str(&ctx.replace("{}", &c.to_string()));
                    assert_eq!(fast_split(2, &text), regex_split(&re, &text), "text {text:?}");
                }
            }
            // All of the BMP, then a sparser sweep of the astral planes.
            cp += if cp < 0x10000 { 1 } else { 7 };
        }
    }

    #[test]
    fn splitter_picks_fast_path_only_for_gpt4_patterns() {
        assert!(matches!(Splitter::new(GPT4_PATTERN_N2).unwrap(), Splitter::Gpt4 { max_digits: 2 }));
        assert!(matches!(Splitter::new(GPT4_PATTERN_N3).unwrap(), Splitter::Gpt4 { max_digits: 3 }));
        assert!(matches!(Splitter::new(r"\w+|\s+").unwrap(), Splitter::Regex(_)));
        assert!(Splitter::new("(").is_err());
    }

    #[test]
    fn chunks_tile_the_text() {
        let text = "Hello, world! It's 2024 — 12345 apples\r\n\n  and 😀 emoji   ";
        let chunks = fast_split(2, text);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| !c.is_empty()));
        assert!(chunks.contains(&"'s".to_string()));
        assert!(chunks.contains(&"12".to_string()) && chunks.contains(&"34".to_string()));
    }
}
