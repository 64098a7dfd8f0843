//! Splitting a sealed record into Nova-sized metadata values and joining them back.
//!
//! Chunks are named `<field>_<index>` with a decimal index without leading zeros, each at most
//! [`MAX_VALUE_LEN`] bytes, every chunk but the last exactly that long. Joining checks the names
//! and lengths; whether the joined bytes are the record that was sealed is for the AEAD to say.

/// The longest metadata value (Nova's system-metadata column limit).
pub const MAX_VALUE_LEN: usize = 255;

/// The most chunks a field may have (bounds the join; a sealed password needs 5).
pub const MAX_CHUNKS: usize = 16;

/// Why stored chunks cannot be joined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk key that is not `<field>_<index>`.
    #[error("chunk key {0:?} is not a chunk of this field")]
    BadName(String),
    /// The same index twice, or a missing index.
    #[error("chunk indexes are not exactly 0..{0}")]
    NotContiguous(usize),
    /// A chunk longer than the value limit, empty, or short before the last.
    #[error("chunk {0} has a bad length")]
    BadLength(usize),
    /// More chunks than [`MAX_CHUNKS`], or none.
    #[error("wrong number of chunks: {0}")]
    Count(usize),
}

/// The name of chunk `index` of `field`.
pub fn chunk_key(field: &str, index: usize) -> String {
    format!("{field}_{index}")
}

/// Splits `sealed` into `(key, value)` pairs of at most [`MAX_VALUE_LEN`] bytes.
pub fn split<'a>(field: &str, sealed: &'a [u8]) -> Vec<(String, &'a [u8])> {
    sealed
        .chunks(MAX_VALUE_LEN)
        .enumerate()
        .map(|(i, c)| (chunk_key(field, i), c))
        .collect()
}

/// Joins chunks read back from the store (in any order) into the sealed record.
pub fn join(field: &str, chunks: &[(String, Vec<u8>)]) -> Result<Vec<u8>, ChunkError> {
    let n = chunks.len();
    if n == 0 || n > MAX_CHUNKS {
        return Err(ChunkError::Count(n));
    }
    let mut ordered: Vec<Option<&[u8]>> = vec![None; n];
    for (key, value) in chunks {
        let index = parse_index(field, key).ok_or_else(|| ChunkError::BadName(key.clone()))?;
        let slot = ordered.get_mut(index).ok_or(ChunkError::NotContiguous(n))?;
        if slot.replace(value).is_some() {
            return Err(ChunkError::NotContiguous(n));
        }
    }
    let mut out = Vec::with_capacity(n * MAX_VALUE_LEN);
    for (i, value) in ordered.into_iter().enumerate() {
        let value = value.ok_or(ChunkError::NotContiguous(n))?;
        let last = i + 1 == n;
        let len_ok = if last {
            (1..=MAX_VALUE_LEN).contains(&value.len())
        } else {
            value.len() == MAX_VALUE_LEN
        };
        if !len_ok {
            return Err(ChunkError::BadLength(i));
        }
        out.extend_from_slice(value);
    }
    Ok(out)
}

/// The index in `<field>_<index>`, refusing leading zeros and signs so each index has one name.
fn parse_index(field: &str, key: &str) -> Option<usize> {
    let digits = key.strip_prefix(field)?.strip_prefix('_')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && digits.len() <= 2;
    canonical.then(|| digits.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(parts: Vec<(String, &[u8])>) -> Vec<(String, Vec<u8>)> {
        parts.into_iter().map(|(k, v)| (k, v.to_vec())).collect()
    }

    #[test]
    fn split_then_join_in_any_order() {
        let data: Vec<u8> = (0..1057u32).map(|i| i as u8).collect();
        let parts = split("password", &data);
        assert_eq!(parts.len(), 5);
        assert_eq!(parts[0].0, "password_0");
        assert!(parts.iter().all(|(_, v)| v.len() <= MAX_VALUE_LEN));
        let mut chunks = owned(parts);
        chunks.reverse();
        assert_eq!(join("password", &chunks).unwrap(), data);
    }

    #[test]
    fn join_refuses_missing_duplicate_and_foreign_chunks() {
        let data = vec![7u8; 600];
        let chunks = owned(split("password", &data));
        // Dropping trailing chunks at a chunk boundary leaves a well-formed prefix: `join` cannot
        // know the record is short; the sealed-record length and the AEAD tag refuse it.
        assert_eq!(
            join("password", &chunks[..2]).unwrap().len(),
            2 * MAX_VALUE_LEN
        );
        let mut short_middle = chunks.clone();
        short_middle[1].1.truncate(90);
        assert_eq!(
            join("password", &short_middle),
            Err(ChunkError::BadLength(1))
        );
        let mut missing_middle = chunks.clone();
        missing_middle.remove(1);
        assert!(matches!(
            join("password", &missing_middle),
            Err(ChunkError::NotContiguous(_))
        ));
        let mut dup = chunks.clone();
        dup[1].0 = "password_0".into();
        assert!(matches!(
            join("password", &dup),
            Err(ChunkError::NotContiguous(_))
        ));
        for bad in [
            "password_00",
            "password_+1",
            "password_",
            "passwordx_1",
            "other_1",
            "password_1a",
        ] {
            let mut renamed = chunks.clone();
            renamed[1].0 = bad.into();
            assert!(join("password", &renamed).is_err(), "{bad}");
        }
        assert_eq!(join("password", &[]), Err(ChunkError::Count(0)));
        let mut long = chunks.clone();
        long[2].1 = vec![0; 256];
        assert_eq!(join("password", &long), Err(ChunkError::BadLength(2)));
    }
}
