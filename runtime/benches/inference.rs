//! In-process inference time per call, on every fixture, at batch 1 and 32,
//! single-threaded: the Rust side of `bench/inference/compare.sh`, which runs
//! onnxruntime and LiteRT on the same inputs in the same run.
//!
//! Inputs are the fixture's own test rows (`<model>.expected.json`): batch 1
//! cycles through the 16 rows one at a time, batch 32 repeats them to fill
//! the batch, exactly as `bench/ort_inference.py` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use outpost_runtime::model::{LoadOptions, Model};
use outpost_runtime::tensor::{TensorData, TensorValues};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    inputs: BTreeMap<String, JsonTensor>,
}

#[derive(Deserialize)]
struct JsonTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Rows `ixs` of an input, stacked into one batch.
fn batch_of(t: &JsonTensor, ixs: impl Iterator<Item = usize>) -> TensorData {
    let row_len: usize = t.shape.iter().skip(1).product();
    let mut data = Vec::new();
    let mut n = 0;
    for ix in ixs {
        data.extend_from_slice(&t.data[ix * row_len..(ix + 1) * row_len]);
        n += 1;
    }
    let mut shape = t.shape.clone();
    shape[0] = n;
    TensorData { shape, values: TensorValues::F32(data) }
}

fn bench_fixtures(c: &mut Criterion) {
    // Unset or empty: every fixture (compare.sh passes MODELS through, empty
    // when not given).
    let only = std::env::var("OUTPOST_BENCH_MODELS").ok().filter(|m| !m.is_empty());
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .expect("fixtures/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".onnx") || n.ends_with(".tflite"))
        .filter(|n| only.as_ref().is_none_or(|o| o.split(',').any(|m| m == n)))
        .collect();
    names.sort();
    for name in names {
        let path = fixtures().join(&name);
        let model = match Model::load(&path, &LoadOptions::default()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipping {name}: {e}");
                continue;
            }
        };
        let expected: Expected = serde_json::from_slice(
            &std::fs::read(fixtures().join(format!("{name}.expected.json"))).expect("expected.json"),
        )
        .expect("expected.json parses");
        let specs = model.signature().inputs.clone();
        let rows = expected.inputs.values().next().map(|t| t.shape[0]).unwrap_or(1);
        let mut group = c.benchmark_group(name.clone());
        // batch 1: one row per call, cycling through the test rows.
        let singles: Vec<Vec<TensorData>> = (0..rows)
            .map(|r| specs.iter().map(|s| batch_of(&expected.inputs[&s.name], r..r + 1)).collect())
            .collect();
        let mut i = 0;
        group.bench_function("batch1", |b| {
            b.iter(|| {
                i = (i + 1) % singles.len();
                model.run(singles[i].clone()).expect("runs")
            })
        });
        let batch32: Vec<TensorData> = specs
            .iter()
            .map(|s| batch_of(&expected.inputs[&s.name], (0..32).map(|k| k % rows)))
            .collect();
        group.bench_function("batch32", |b| b.iter(|| model.run(batch32.clone()).expect("runs")));
        group.finish();
    }
}

criterion_group!(benches, bench_fixtures);
criterion_main!(benches);
