//! `medcoder bench join` end to end on the SmolLM2 asset (skipped, saying so, when it is not
//! installed): both prefill modes run and report. Speeds are not asserted here; the bench
//! itself is the proof, side by side in one run.

mod support;

use serde_json::Value;

#[test]
fn bench_join_reports_chunked_and_whole_prefill_side_by_side() {
    let alias = "smollm2-135m-instruct";
    let Some(home) = support::home_with_model(alias) else {
        return;
    };
    let join = |prompt_tokens: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "join",
            "--model",
            alias,
            "--prompt-tokens",
            prompt_tokens,
        ];
        args.extend(extra);
        support::medcoder(home.root(), &args, None)
    };
    let run = join("300", &["--before", "2", "--json"]);
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
    let run = join("1000000", &[]);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--prompt-tokens"), "{}", run.stderr);
}
