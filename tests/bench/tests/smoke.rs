//! A small run of the whole benchmark, so that it keeps working: every runner (Sluice, the
//! native baseline, Quix Streams) processes its input and the benchmark's own checks pass
//! (exact output counts, committed offsets at the log ends, word counts equal to an
//! independent count), and the report lands in the generated section of a copy of
//! docs/BENCHMARKS.md, the rest of it untouched. Nothing here looks at how fast anything was.

use std::process::Command;

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/BENCHMARKS.md");
const BEGIN: &str = "<!-- sluice-bench: begin";
const END: &str = "<!-- sluice-bench: end -->";

/// The document without its generated section.
fn outside_generated(document: &str) -> (&str, &str) {
    let begin = document.find(BEGIN).expect("begin marker");
    let end = document.find(END).expect("end marker");
    (&document[..begin], &document[end..])
}

#[test]
fn a_small_run_of_every_part_checks_out_and_rewrites_the_generated_section() {
    let dir = tempfile::tempdir().unwrap();
    let (docs, log) = (dir.path().join("BENCHMARKS.md"), dir.path().join("bench.log"));
    let original = std::fs::read_to_string(DOCS).unwrap();
    std::fs::write(&docs, &original).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .args(["--records", "3200", "--word-lines", "2000", "--vocabulary", "1000"])
        .args(["--peer-records", "640", "--peer-word-lines", "400", "--batch-records", "800"])
        .args(["--repeat", "1", "--overhead-batches", "4", "--log"])
        .arg(&log)
        .arg("--write-docs")
        .arg(&docs)
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
        "| host overhead, metrics and page scraped back to back",
        "| host overhead, metrics and page scraped every second",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in the report:\n{stdout}");
    }
    // Every runner measured something: no rate or ratio is missing.
    assert!(!stdout.contains("NaN") && !stdout.contains("| – |"), "a measure is missing:\n{stdout}");

    let rewritten = std::fs::read_to_string(&docs).unwrap();
    assert_eq!(outside_generated(&rewritten), outside_generated(&original), "only the generated section changes");
    let begin = rewritten.find(BEGIN).unwrap();
    assert!(rewritten[begin..].contains(stdout.trim()), "the report is the generated section");
}
