//! `nanorun._bpe`: the Python binding of the BPE trainer (PyO3, abi3).
//!
//! ```text
//! from nanorun._bpe import train
//! out = train(iter_of_str, vocab_size=32768, pattern=SPLIT_PATTERN)
//! out["merges"]  # [(left_id, right_id), ...]; merge i makes token id 256 + i
//! ```
//!
//! The iterator is consumed in batches: the GIL is held only to pull a batch of strings, then released
//! while rayon counts that batch's chunks. Every error (bad regex, bad vocab size, an item that is not
//! a str, an exception raised by the iterator) comes back as a Python exception; nothing here unwraps.

mod bpe;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Trains byte-level BPE merges from an iterable of str.
///
/// Args:
///     texts: any iterable of str; it is read once, batch by batch, never held in memory whole.
///     vocab_size: 256 byte tokens plus the number of merges to learn (at most 2**17).
///     pattern: the split regex (PCRE2 syntax: look-arounds and possessive quantifiers work).
///     batch_size: texts pulled from the iterator per parallel counting round.
///     num_threads: rayon threads; 0 means one per core. The result does not depend on it.
///
/// Returns a dict: merges (list of (left, right) id pairs), chars_seen, unique_chunks.
#[pyfunction]
#[pyo3(signature = (texts, vocab_size, pattern, batch_size = 8192, num_threads = 0))]
fn train<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    vocab_size: usize,
    pattern: &str,
    batch_size: usize,
    num_threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    if vocab_size < 256 {
        return Err(PyValueError::new_err(format!(
            "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
        )));
    }
    if vocab_size > bpe::MAX_VOCAB {
        return Err(PyValueError::new_err(format!(
            "vocab_size must be at most {} (2**17), got {vocab_size}",
            bpe::MAX_VOCAB
        )));
    }
    if batch_size == 0 {
        return Err(PyValueError::new_err("batch_size must be at least 1"));
    }
    let mut counter = bpe::ChunkCounter::new(pattern).map_err(PyValueError::new_err)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("could not start {num_threads} threads: {e}")))?;

    let iter = texts.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "texts must be an iterable of str, got {}",
            texts.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let mut batch: Vec<String> = Vec::with_capacity(batch_size);
    let mut index: usize = 0;
    let mut count_batch = |py: Python<'_>, batch: &mut Vec<String>| -> PyResult<()> {
        let result = py.allow_threads(|| pool.install(|| counter.add_batch(batch)));
        batch.clear();
        result.map_err(PyRuntimeError::new_err)
    };
    for item in iter {
        // An exception raised inside the iterator propagates unchanged (`?`).
        let item = item?;
        let text: String = item.extract().map_err(|e| {
            let type_name = item.get_type().name().map(|n| n.to_string()).unwrap_or_default();
            PyTypeError::new_err(format!("texts must yield str; item {index} is {type_name}: {e}"))
        })?;
        batch.push(text);
        index += 1;
        if batch.len() >= batch_size {
            count_batch(py, &mut batch)?;
        }
    }
    count_batch(py, &mut batch)?;
    drop(count_batch);

    let chars_seen = counter.chars_seen();
    let unique_chunks = counter.unique_chunks();
    let merges = py.allow_threads(|| pool.install(|| bpe::train_merges(counter.into_sorted(), vocab_size)));

    let out = PyDict::new(py);
    out.set_item("merges", merges)?;
    out.set_item("chars_seen", chars_seen)?;
    out.set_item("unique_chunks", unique_chunks)?;
    Ok(out)
}

/// Splits `text` with `pattern` exactly as `train` does (for tests and debugging).
#[pyfunction]
fn split(pattern: &str, text: &str) -> PyResult<Vec<String>> {
    let regex = bpe::compile(pattern).map_err(PyValueError::new_err)?;
    let chunks = bpe::split(&regex, text).map_err(PyRuntimeError::new_err)?;
    Ok(chunks.into_iter().map(str::to_owned).collect())
}

#[pymodule]
fn _bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(split, m)?)?;
    m.add("MAX_VOCAB", bpe::MAX_VOCAB)?;
    Ok(())
}
