//! What the fuzz tests (`fuzz_*.rs`) share: how many cases to run, and byte
//! mutations of valid inputs.
//!
//! `cargo test` runs a bounded number of cases per decoder (the whole fuzz
//! suite in about 30 s in debug on 2 cores). `OUTPOST_FUZZ_CASES=N` runs N
//! cases per fast decoder instead (and N/100, at least the default, for
//! model loading, which takes milliseconds a case), e.g.
//!
//! ```sh
//! OUTPOST_FUZZ_CASES=100000 cargo test -p outpost-runtime --test fuzz_predict
//! ```
//!
//! See docs/fuzzing.md.
#![allow(dead_code)]

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};

/// Cases for a fast decoder: `default`, or `OUTPOST_FUZZ_CASES`.
pub fn cases(default: u32) -> u32 {
    std::env::var("OUTPOST_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Cases for a slow decoder (model loading): `default`, or a hundredth of
/// `OUTPOST_FUZZ_CASES` (never fewer than `default`).
pub fn slow_cases(default: u32) -> u32 {
    std::env::var("OUTPOST_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(default, |n| (n / 100).max(default))
}

/// A proptest config of `n` cases. Failures are not persisted to files (a
/// crash found becomes a named regression test with its literal input
/// instead), and shrinking is bounded so a failure reports quickly.
pub fn config(n: u32) -> Config {
    Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        max_shrink_iters: 2_000,
        ..Config::default()
    }
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit at (index mod len).
    Flip(usize, u8),
    /// Overwrite one byte.
    Set(usize, u8),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove up to `n` bytes.
    Remove(usize, usize),
    /// Keep only the first (index mod len) bytes.
    Truncate(usize),
    /// Copy a span elsewhere (duplicates structure: arrays, fields).
    Duplicate(usize, usize, usize),
    /// Overwrite 4 or 8 bytes with a large little-endian number (length
    /// fields enlarged).
    BigLe(usize, u64, bool),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(1u64 << 31),
        Just(1u64 << 40),
        any::<u64>(),
        0u64..4096,
    ];
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1usize..256, any::<usize>()).prop_map(|(a, n, b)| Mutation::Duplicate(a, n, b)),
        2 => (any::<usize>(), big, any::<bool>()).prop_map(|(i, v, wide)| Mutation::BigLe(i, v, wide)),
    ]
}

/// Applies `edits` to a copy of `seed`.
pub fn mutate(seed: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in edits {
        let len = b.len();
        match m {
            Mutation::Flip(i, bit) if len > 0 => b[i % len] ^= 1 << bit,
            Mutation::Set(i, v) if len > 0 => b[i % len] = *v,
            Mutation::Insert(i, bytes) => {
                let at = i % (len + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                let end = (at + n).min(len);
                b.drain(at..end);
            }
            Mutation::Truncate(i) => b.truncate(i % (len + 1)),
            Mutation::Duplicate(a, n, to) if len > 0 => {
                let start = a % len;
                let end = (start + n).min(len);
                let span = b[start..end].to_vec();
                let at = to % (b.len() + 1);
                b.splice(at..at, span);
            }
            Mutation::BigLe(i, v, wide) => {
                let w = if *wide { 8 } else { 4 };
                if len >= w {
                    let at = i % (len - w + 1);
                    b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
    b
}

/// `seed` with 1..=`max` mutations.
pub fn mutated(seed: Vec<u8>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(mutation(), 1..=max).prop_map(move |edits| mutate(&seed, &edits))
}
