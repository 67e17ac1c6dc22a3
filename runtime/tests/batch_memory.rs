//! Batch mode keeps resident memory flat: a file far larger than the bound
//! passes through with the peak resident set (VmHWM) growing by less than
//! the bound. Alone in its test binary, because the peak is per process and
//! other tests running in parallel would move it.
//!
//! The size is what a debug build gets through in well under a minute; the
//! benchmark (`bench/batch/run.sh`) runs the 1,000,000-row file and reports
//! the release build's peak.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use outpost_runtime::batch::{run_files, BatchOptions, ProgressMode};
use outpost_runtime::model::{LoadOptions, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures").join(name)
}

/// Peak resident set of this process in KiB (Linux).
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn resident_memory_stays_flat_on_a_large_file() {
    let Some(_) = vm_hwm_kib() else {
        eprintln!("no /proc/self/status: skipping (Linux only)");
        return;
    };
    const ROWS: usize = 600_000;
    const BOUND_MIB: u64 = 40;

    let dir = std::env::temp_dir().join(format!("outpost-batch-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("big.csv");
    let output = dir.join("out.csv");

    // The test rows repeated, written line by line: generating the file
    // must not raise the peak itself.
    let text = std::fs::read_to_string(fixture("data/bc_test.csv")).unwrap();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    {
        let mut w = BufWriter::new(std::fs::File::create(&input).unwrap());
        writeln!(w, "{header}").unwrap();
        for i in 0..ROWS {
            writeln!(w, "{}", rows[i % rows.len()]).unwrap();
        }
        w.flush().unwrap();
    }
    let file_mib = std::fs::metadata(&input).unwrap().len() / (1024 * 1024);
    assert!(file_mib > 2 * BOUND_MIB, "the file ({file_mib} MiB) must dwarf the bound for the test to mean anything");

    let model = Model::load(fixture("bc_mlp.onnx"), &LoadOptions::default()).unwrap();
    let options = BatchOptions { label_column: true, threads: 2, progress: ProgressMode::Hidden, ..BatchOptions::default() };
    // A first short run so lazily allocated runtime state (thread stacks,
    // tract scratch space, allocator arenas) is in the baseline.
    let small = dir.join("small.csv");
    std::fs::write(&small, format!("{header}\n{}\n", rows[..50].join("\n"))).unwrap();
    run_files(&model, &small, &output, None, &options).unwrap();

    let before = vm_hwm_kib().unwrap();
    let summary = run_files(&model, &input, &output, None, &options).unwrap();
    let after = vm_hwm_kib().unwrap();
    let grew_mib = (after.saturating_sub(before)) / 1024;
    eprintln!(
        "{ROWS} rows, {file_mib} MiB in: peak RSS {} MiB → {} MiB (+{grew_mib} MiB); {summary}",
        before / 1024,
        after / 1024
    );
    assert_eq!(summary.rows_ok, ROWS as u64);
    assert_eq!(summary.rows_bad, 0);
    assert!(grew_mib < BOUND_MIB, "peak RSS grew by {grew_mib} MiB on a {file_mib} MiB file (bound {BOUND_MIB} MiB)");
    let _ = std::fs::remove_dir_all(&dir);
}
