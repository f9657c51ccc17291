//! `medcoder bench join` end to end on the SmolLM2 asset (skipped, saying so, when it is not
//! installed): both prefill modes run and report. Speeds are not asserted here; the bench
//! itself is the proof, side by side in one run.

mod support;

use medcoder_assets::{MedcoderHome, ModelRef};
use serde_json::Value;

#[test]
fn bench_join_reports_chunked_and_whole_prefill_side_by_side() {
    let Ok(home) = MedcoderHome::from_env() else {
        eprintln!("skipping: no medcoder home");
        return;
    };
    let alias = "smollm2-135m-instruct";
    if let Err(error) = alias.parse::<ModelRef>().and_then(|r| r.resolve(&home)) {
        eprintln!("skipping: {alias} not installed ({error})");
        return;
    }
    let args = [
        "bench",
        "join",
        "--model",
        alias,
        "--prompt-tokens",
        "300",
        "--before",
        "2",
        "--json",
    ];
    let run = support::medcoder(home.root(), &args, None);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["prompt_tokens"], 300, "{report}");
    assert_eq!(report["chunked"]["prefill_chunk"], 256, "{report}");
    assert_eq!(report["whole"]["prefill_chunk"], Value::Null, "{report}");
    for mode in ["chunked", "whole"] {
        for field in ["step_before_ms", "longest_wait_ms", "first_token_ms"] {
            let value = report[mode][field].as_f64().unwrap_or(-1.0);
            assert!(value > 0.0, "{mode}.{field}: {report}");
        }
    }
    assert!(
        report["stall_ratio"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    // Too long a prompt for the bench's note is refused, naming the flag.
    let args = [
        "bench",
        "join",
        "--model",
        alias,
        "--prompt-tokens",
        "1000000",
    ];
    let run = support::medcoder(home.root(), &args, None);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--prompt-tokens"), "{}", run.stderr);
}
