//! Python bindings: the `rustbpe` module with class `Tokenizer` (PyPI rustbpe 0.1.0's surface).

use pyo3::exceptions::{PyUnicodeDecodeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

use crate::count::ChunkCounts;
use crate::pretok::Splitter;
use crate::{Bpe, DEFAULT_PATTERN};

/// Byte-level BPE tokenizer: train on an iterator of strings, then encode/decode or export
/// the mergeable ranks (e.g. for tiktoken).
#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    inner: Bpe,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer { inner: Bpe::new() }
    }

    /// Train from an iterator of strings. Documents are pulled `buffer_size` at a time under
    /// the GIL; splitting and counting then run in parallel with the GIL released, so the whole
    /// text is never held in memory at once. `vocab_size` counts the 256 byte tokens.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: u32,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(|| DEFAULT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;
        let mut docs = iterator.try_iter()?;
        let buffer_size = buffer_size.max(1);

        // One buffer = up to `buffer_size` documents copied back to back into `text`.
        let mut counts = ChunkCounts::new();
        let mut text = String::new();
        let mut ends: Vec<usize> = Vec::with_capacity(buffer_size);
        loop {
            text.clear();
            ends.clear();
            let mut exhausted = false;
            while ends.len() < buffer_size {
                match docs.next() {
                    Some(doc) => {
                        let doc = doc?;
                        let s = doc.downcast::<PyString>()?;
                        text.push_str(s.to_str()?);
                        ends.push(text.len());
                    }
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            py.allow_threads(|| counts.add_documents(&splitter, &text, &ends))
                .map_err(PyValueError::new_err)?;
            if exhausted {
                break;
            }
        }
        drop(text);

        let inner = &mut self.inner;
        py.allow_threads(|| inner.train_from_counts(&pattern, counts, vocab_size))
            .map_err(PyValueError::new_err)
    }

    /// The split pattern (the default until trained with another one).
    fn get_pattern(&self) -> String {
        self.inner.pattern.clone()
    }

    /// Number of tokens: 256 bytes + the merges learned.
    #[getter]
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size()
    }

    /// [(token bytes, token id)] for every token, in id order (the tiktoken mergeable ranks).
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.inner
            .token_bytes()
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// Encode a string into token ids.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let inner = &self.inner;
        py.allow_threads(|| inner.encode(text)).map_err(PyValueError::new_err)
    }

    /// Encode several strings in parallel; one list of ids per string.
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let inner = &self.inner;
        py.allow_threads(|| texts.par_iter().map(|t| inner.encode(t)).collect::<Result<Vec<_>, _>>())
            .map_err(PyValueError::new_err)
    }

    /// Decode token ids back to a string (ValueError for an unknown id, UnicodeDecodeError
    /// if the ids stop in the middle of a UTF-8 character).
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        let bytes = self
            .inner
            .decode_bytes(&ids)
            .map_err(|id| PyValueError::new_err(format!("Unknown token id: {id}")))?;
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(PyErr::from_value(PyUnicodeDecodeError::new_utf8(py, &bytes, e)?.into_any())),
        }
    }
}

/// Split `text` into the chunks BPE sees, with `pattern` (default: DEFAULT_PATTERN).
#[pyfunction]
#[pyo3(signature = (text, pattern=None))]
fn split_text(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(PyValueError::new_err)?;
    splitter.split(text).map_err(PyValueError::new_err)
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add("GPT4_PATTERN", crate::pretok::GPT4_PATTERN_N3)?;
    Ok(())
}
