//! A small run of the whole benchmark, so that it keeps working: every runner (Sluice, the
//! native baseline, Quix Streams) processes its input and the benchmark's own checks pass
//! (exact output counts, committed offsets at the log ends, word counts equal to an
//! independent count). Nothing here looks at how fast anything was.

use std::process::Command;

#[test]
fn a_small_run_of_every_part_checks_out() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--records", "3200", "--word-lines", "2000", "--vocabulary", "1000"])
        .args(["--peer-records", "640", "--peer-word-lines", "400", "--batch-records", "800"])
        .args(["--repeat", "1", "--overhead-batches", "4", "--log"])
        .arg(log.path())
        .output()
        .expect("run sluice-bench");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "sluice-bench failed:\n{stderr}\n{stdout}");
    for row in [
        "| ETL | native baseline",
        "| ETL | Sluice (`host run",
        "| ETL | Sluice with `--task-deadline off`",
        "| ETL | Quix Streams",
        "| word count | native baseline",
        "| word count | Sluice",
        "| word count | Quix Streams",
        "| ETL plugin alone | native",
        "| ETL plugin alone | Sluice",
        "| Wasm boundary | native",
        "| Wasm boundary | Sluice",
        "| **host overhead**",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in the report:\n{stdout}");
    }
}
