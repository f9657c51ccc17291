//! `medcoder code` and `medcoder eval` end to end on a small CodiEsp-layout corpus the test
//! writes: the retrieval engine fitted on train codes dev, resumes, writes CodiEsp TSVs, and
//! eval scores it; bad input fails naming what is wrong, and a bad batch line is skipped.

#![allow(clippy::unwrap_used)]

#[path = "../../coding/tests/support/openai_stub.rs"]
mod openai_stub;
#[path = "../../coding/tests/support/pdf_fixture.rs"]
mod pdf_fixture;
mod support;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use support::medcoder;

/// Three kinds of case report, each with its codes; `n` variations of each.
fn cases(n: usize, offset: usize) -> Vec<Value> {
    let themes = [
        (
            "Type 2 diabetes mellitus with poor glycemic control and polyuria; metformin was started.",
            vec!["e11.9"],
            vec![],
        ),
        (
            "Community acquired pneumonia of the right lower lobe with fever and productive cough; chest radiograph showed consolidation.",
            // R51 is a header in the US 2026 code set (R51.0, R51.9): CodiEsp's Spanish
            // edition still uses it.
            vec!["j18.9", "r50.9", "r51"],
            vec!["bw03zzz"],
        ),
        (
            "Fracture of the femoral neck after a fall at home; hip replacement surgery was performed.",
            vec!["s72.009a", "w19.xxxa"],
            vec!["0sr9019"],
        ),
    ];
    let mut out = Vec::new();
    for i in 0..n {
        for (t, (text, dx, px)) in themes.iter().enumerate() {
            out.push(json!({
                "id": format!("case-{}-{t}", i + offset),
                "text_en": format!("Case {}. A patient of {} years. {text}", i + offset, 40 + i),
                "text_es": "",
                "diagnoses": dx,
                "procedures": px,
                "evidence": [],
            }));
        }
    }
    out
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// The corpus imported into `<dir>/c.duckdb`; returns the database and the CodiEsp folder.
fn prepared_corpus(dir: &Path, home: &Path) -> (PathBuf, PathBuf) {
    let src = dir.join("codiesp");
    std::fs::create_dir_all(&src).unwrap();
    write_jsonl(&src.join("codiesp_train.jsonl"), &cases(5, 0));
    write_jsonl(&src.join("codiesp_dev.jsonl"), &cases(2, 100));
    let db = dir.join("c.duckdb");
    let args = ["prepare", "codiesp", "--src", src.to_str().unwrap()];
    let run = medcoder(
        home,
        &[&args[..], &["--db", db.to_str().unwrap(), "--lang", "en"]].concat(),
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    (db, src)
}

/// `medcoder code - --db DB --dataset codiesp EXTRA…` with `note` on stdin.
fn code_note(home: &Path, db: &Path, extra: &[&str], note: &str) -> support::Run {
    let args = [
        "code",
        "-",
        "--db",
        db.to_str().unwrap(),
        "--dataset",
        "codiesp",
    ];
    medcoder(home, &[&args[..], extra].concat(), Some(note))
}

#[test]
fn with_the_code_set_codes_carry_descriptions_and_evidence() {
    let Some(home) = support::icd_home() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (db, _) = prepared_corpus(tmp.path(), home.root());
    let note = "Known type 2 diabetes mellitus. Today she has polyuria.";
    let run = code_note(home.root(), &db, &["--format", "json"], note);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let p: Value = serde_json::from_str(&run.stdout).unwrap();
    let top = &p["diagnoses"][0];
    assert_eq!(top["code"], "E11.9");
    assert_eq!(top["billable"], true);
    assert!(
        top["description"].as_str().unwrap().contains("diabetes"),
        "{top}"
    );
    let evidence = &top["evidence"][0];
    let start = evidence["start"].as_u64().unwrap() as usize;
    let end = evidence["end"].as_u64().unwrap() as usize;
    let quoted: String = note.chars().skip(start).take(end - start).collect();
    assert_eq!(quoted, evidence["text"].as_str().unwrap());
    assert!(quoted.contains("diabetes"), "{quoted}");
    assert_eq!(top["assertion"], "present");
    // The code sets' editions are named in the prediction; the minilm-l6 asset, when
    // installed, adds the semantic signals from its distilled token vectors (`--embedder
    // auto`), or from its encoder when named, `none` leaves them out, and `--format codiesp`
    // needs a folder.
    assert!(
        p["code_sets"].as_str().unwrap().contains("ICD-10-CM"),
        "{p}"
    );
    let embedded = home
        .asset_dir("minilm-l6")
        .join("model.safetensors")
        .is_file();
    let model = p["model"].as_str().unwrap();
    assert_eq!(
        model.contains("static token embeddings"),
        embedded,
        "{model}"
    );
    if embedded {
        // Naming the asset runs its encoder over every token instead.
        let contextual = code_note(
            home.root(),
            &db,
            &["--format", "json", "--embedder", "minilm-l6"],
            note,
        );
        let contextual: Value = serde_json::from_str(&contextual.stdout).unwrap();
        let model = contextual["model"].as_str().unwrap();
        assert!(
            model.contains("sentence embeddings") && !model.contains("static"),
            "{model}"
        );
        assert_eq!(contextual["diagnoses"][0]["code"], "E11.9");
    }
    let plain = code_note(
        home.root(),
        &db,
        &["--format", "json", "--embedder", "none"],
        note,
    );
    let plain: Value = serde_json::from_str(&plain.stdout).unwrap();
    assert!(!plain["model"].as_str().unwrap().contains("embeddings"));
    assert_eq!(plain["diagnoses"][0]["code"], "E11.9");
    let run = code_note(home.root(), &db, &["--format", "codiesp"], note);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--codiesp-out"), "{}", run.stderr);
    // A denied finding is flagged, and an assigned header code is warned about.
    let json_of = |note: &str| -> Value {
        let run = code_note(home.root(), &db, &["--format", "json"], note);
        serde_json::from_str(&run.stdout).unwrap()
    };
    let p = json_of("The patient denies diabetes mellitus.");
    assert_eq!(p["diagnoses"][0]["assertion"], "negated", "{p}");
    let p = json_of("Community acquired pneumonia with fever and productive cough.");
    let warnings = p["warnings"].to_string();
    assert!(warnings.contains("R51"), "{p}");
}

#[test]
fn retrieval_codes_a_split_resumes_and_eval_scores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (db, src) = prepared_corpus(tmp.path(), &home);
    let db_s = db.to_str().unwrap();
    let preds = tmp.path().join("preds.jsonl");
    let tsv = tmp.path().join("tsv");
    let code_args = [
        "code",
        "--db",
        db_s,
        "--dataset",
        "codiesp",
        "--split",
        "dev",
        "--out",
        preds.to_str().unwrap(),
        "--codiesp-out",
        tsv.to_str().unwrap(),
    ];
    let run = medcoder(&home, &code_args, None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("coded 6 notes"), "{}", run.stdout);
    let lines: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    let pneumonia = lines.iter().find(|l| l["id"] == "case-100-1").unwrap();
    assert_eq!(pneumonia["diagnoses"][0]["assigned"], true);
    let top: Vec<&str> = pneumonia["diagnoses"].as_array().unwrap()[..2]
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert!(top.contains(&"J18.9") && top.contains(&"R50.9"), "{top:?}");
    assert_eq!(pneumonia["procedures"][0]["code"], "BW03ZZZ");
    // CodiEsp's layout: id<TAB>code, lower case, in rank order.
    let d_tsv = std::fs::read_to_string(tsv.join("D.tsv")).unwrap();
    assert!(d_tsv.lines().any(|l| l == "case-100-1\tj18.9"), "{d_tsv}");
    // The cached index and the already-coded notes make a re-run a no-op.
    let run = medcoder(&home, &code_args, None);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("coded 0 notes (6 already"),
        "{}",
        run.stdout
    );
    assert_eq!(std::fs::read_to_string(&preds).unwrap().lines().count(), 6);
    // Scored against the database's dev split and against a gold JSONL file alike.
    let report = tmp.path().join("report");
    let run = medcoder(
        &home,
        &[
            "eval",
            "--pred",
            preds.to_str().unwrap(),
            "--gold",
            db_s,
            "--dataset",
            "codiesp",
            "--split",
            "dev",
            "--report",
            report.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let d = &json["kinds"][0];
    assert_eq!(d["kind"], "diagnosis");
    assert!(d["code"]["map"].as_f64().unwrap() > 0.99, "{d}");
    assert!(d["code"]["micro"]["f1"].as_f64().unwrap() > 0.99, "{d}");
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("| diagnosis | code | 6 |"));
    let run = medcoder(
        &home,
        &[
            "eval",
            "--pred",
            preds.to_str().unwrap(),
            "--gold",
            src.join("codiesp_dev.jsonl").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("| diagnosis | code | 6 | 1.000"),
        "{}",
        run.stdout
    );

    // The benchmark codes the split's notes and reports throughput and latency.
    let bench = [
        "bench",
        "code",
        "--db",
        db_s,
        "--dataset",
        "codiesp",
        "--split",
        "dev",
    ];
    let run = medcoder(
        &home,
        &[&bench[..], &["--notes", "8", "--json"]].concat(),
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let b: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(b["notes"], 8);
    assert!(b["notes_per_s"].as_f64().unwrap() > 0.0, "{b}");
    assert!(b["latency_p99_ms"].as_f64().unwrap() >= b["latency_p50_ms"].as_f64().unwrap());

    // A batch file: a malformed line and an empty note are reported and skipped.
    let batch = tmp.path().join("batch.jsonl");
    std::fs::write(
        &batch,
        "{\"id\": \"a\", \"text\": \"Pneumonia with fever and cough.\"}\nnot json\n{\"id\": \"b\", \"text\": \" \"}\n",
    )
    .unwrap();
    let out = tmp.path().join("batch-preds.jsonl");
    let run = medcoder(
        &home,
        &[
            "code",
            "--db",
            db_s,
            "--dataset",
            "codiesp",
            "--batch",
            batch.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    assert!(run.stderr.contains("note b: empty text"), "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 1);

    // One note on stdin, as JSON; the note's text never reaches the logs.
    let secret = "Secret-Name has type 2 diabetes mellitus with polyuria.";
    let run = code_note(&home, &db, &["--format", "json", "-v"], secret);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let p: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(p["diagnoses"][0]["code"], "E11.9");
    assert!(!run.stderr.contains("Secret-Name"));
    // The same as a FHIR R4 Bundle of Conditions.
    let run = code_note(&home, &db, &["--format", "fhir"], secret);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let bundle: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    let condition = &bundle["entry"][0]["resource"];
    assert_eq!(condition["resourceType"], "Condition");
    assert_eq!(
        condition["code"]["coding"][0]["system"],
        "http://hl7.org/fhir/sid/icd-10-cm"
    );
    assert_eq!(condition["code"]["coding"][0]["code"], "E11.9");

    // Bad input: named, non-zero exit.
    for (input, why) in [("", "empty"), ("%PDF-1.7 binary", "PDF")] {
        let run = code_note(&home, &db, &[], input);
        assert_ne!(run.code, Some(0));
        assert!(run.stderr.contains(why), "{why}: {}", run.stderr);
    }
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"fiebre y tos \xe9").unwrap();
    let run = medcoder(
        &home,
        &[
            "code",
            latin1.to_str().unwrap(),
            "--db",
            db_s,
            "--dataset",
            "codiesp",
        ],
        None,
    );
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("not UTF-8"), "{}", run.stderr);
    let run = code_note(&home, &db, &["--engine", "magic"], "x");
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("engine `magic`"), "{}", run.stderr);
}

/// `medcoder code --split dev` then `medcoder eval --report` on it (and the CodiEsp TSVs of
/// both); returns report.json and the folder everything went into.
fn code_dev_and_report(home: &Path, db: &Path, dir: &Path) -> Value {
    let preds = dir.join("preds.jsonl");
    let db_s = db.to_str().unwrap();
    let run = medcoder(
        home,
        &[
            "code",
            "--db",
            db_s,
            "--dataset",
            "codiesp",
            "--split",
            "dev",
            "--out",
            preds.to_str().unwrap(),
            "--codiesp-out",
            dir.join("pred").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = medcoder(
        home,
        &[
            "eval",
            "--pred",
            preds.to_str().unwrap(),
            "--gold",
            db_s,
            "--dataset",
            "codiesp",
            "--split",
            "dev",
            "--report",
            dir.join("report").to_str().unwrap(),
            "--codiesp-gold-out",
            dir.join("gold").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let json = std::fs::read_to_string(dir.join("report").join("report.json")).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[test]
fn eval_report_has_every_file_metric_and_provenance_and_the_codiesp_gold() {
    let tmp = tempfile::tempdir().unwrap();
    // A home without the code sets: validity is checked for the shape only, and says so.
    let home = tmp.path().join("home");
    let (db, _) = prepared_corpus(tmp.path(), &home);
    let json = code_dev_and_report(&home, &db, tmp.path());
    let report = tmp.path().join("report");

    for png in [
        "top_k_diagnosis.png",
        "top_k_procedure.png",
        "chapter_f1_diagnosis.png",
        "chapter_f1_procedure.png",
    ] {
        let bytes = std::fs::read(report.join(png)).unwrap();
        assert!(bytes.len() > 1000, "{png}: {} bytes", bytes.len());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    let leftovers: Vec<String> = std::fs::read_dir(&report)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Provenance.
    let p = &json["provenance"];
    assert_eq!(p["predictions"]["engines"], json!(["retrieval"]), "{p}");
    let model = p["predictions"]["models"][0].as_str().unwrap();
    assert!(model.contains("codiesp train"), "{model}");
    assert_eq!(p["predictions"]["notes"], 6);
    let sha = p["predictions"]["sha256"].as_str().unwrap();
    assert!(
        sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
        "{sha}"
    );
    assert!(p["predictions"]["file"]
        .as_str()
        .unwrap()
        .ends_with("preds.jsonl"));
    assert!(p["gold"]["file"].as_str().unwrap().ends_with("c.duckdb"));
    assert_eq!(p["gold"]["dataset"], "codiesp");
    assert_eq!(p["gold"]["split"], "dev");
    assert_eq!(p["medcoder_version"], env!("CARGO_PKG_VERSION"));
    assert!(p["evaluated_at"].as_str().unwrap().ends_with('Z'), "{p}");
    assert!(p["code_sets"].is_null(), "{p}");

    // Every metric, for both kinds.
    let kinds = json["kinds"].as_array().unwrap();
    assert_eq!(kinds.len(), 2);
    for (k, name) in kinds.iter().zip(["diagnosis", "procedure"]) {
        assert_eq!(k["kind"], name);
        for level in ["code", "category"] {
            let s = &k[level];
            for metric in ["map", "map_predicted_only", "macro_f1", "macro_precision"] {
                assert!(s[metric].is_f64(), "{name} {level} {metric}: {s}");
            }
            assert!(s["micro"]["f1"].is_f64());
            assert_eq!(s["at_k"].as_array().unwrap().len(), 50, "{name} {level}");
        }
        let h = &k["hierarchical"];
        assert!(h["f1"].as_f64().unwrap() >= k["code"]["micro"]["f1"].as_f64().unwrap());
        assert!(!k["chapters"].as_array().unwrap().is_empty());
        let ranked = &k["code_validity"]["ranked"];
        assert_eq!(ranked["malformed"], 0, "{ranked}");
        assert!(
            ranked["us_code_set"].is_null(),
            "not checked, not 0: {ranked}"
        );
        assert!(k["code_validity"]["gold"]["codes"].as_u64().unwrap() > 0);
    }
    assert_eq!(json["plots"].as_array().unwrap().len(), 4);
    let definitions = json["definitions"].as_object().unwrap();
    assert!(definitions.contains_key("hierarchical P / R / F1"));
    assert!(definitions.contains_key("not in the US code set"));

    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| diagnosis | code | 6 |"), "{md}");
    assert!(md.contains("ICD code sets | not installed"), "{md}");
    assert!(md.contains("not checked"), "{md}");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        html.contains("<img src=\"chapter_f1_procedure.png\""),
        "{html}"
    );
    assert!(html.contains(sha), "{html}");

    // The gold in CodiEsp's layout, next to the predictions' TSVs.
    let gold = |name: &str| std::fs::read_to_string(tmp.path().join("gold").join(name)).unwrap();
    assert!(gold("D.tsv").lines().any(|l| l == "case-100-1\tr51"));
    assert!(gold("P.tsv").lines().any(|l| l == "case-100-2\t0sr9019"));
    assert!(gold("D_codes.tsv").lines().any(|l| l == "w19.xxxa"));
    assert!(gold("P_codes.tsv").lines().any(|l| l == "bw03zzz"));
    assert!(tmp.path().join("pred").join("D.tsv").is_file());
}

#[test]
fn with_the_code_sets_eval_counts_codes_the_us_release_has_only_as_headers() {
    let Some(home) = support::icd_home() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (db, _) = prepared_corpus(tmp.path(), home.root());
    let json = code_dev_and_report(home.root(), &db, tmp.path());
    let cm = json["provenance"]["code_sets"]["icd10_cm"]
        .as_str()
        .unwrap();
    assert!(cm.contains("ICD-10-CM"), "{cm}");
    // R51 (the Spanish edition's code) is a header in the US release: in the gold of the two
    // pneumonia notes, and among the codes predicted for them.
    let d = &json["kinds"][0]["code_validity"];
    let gold = &d["gold"]["us_code_set"];
    assert_eq!(gold["us_header_only"], 2, "{d}");
    assert_eq!(gold["not_in_us_code_set"], 0, "{d}");
    assert_eq!(d["gold"]["frequent_invalid"][0]["code"], "R51", "{d}");
    assert_eq!(
        d["gold"]["frequent_invalid"][0]["why"], "us_header_only",
        "{d}"
    );
    let ranked = &d["ranked"]["us_code_set"];
    assert!(ranked["us_header_only"].as_u64().unwrap() >= 1, "{d}");
    assert_eq!(d["ranked"]["malformed"], 0, "{d}");
    let md = std::fs::read_to_string(tmp.path().join("report").join("report.md")).unwrap();
    assert!(md.contains("| R51 | "), "{md}");
}

#[test]
fn openai_engine_codes_notes_through_an_openai_compatible_endpoint() {
    use openai_stub::{chat_completion, Reply, StubServer};
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (db, _) = prepared_corpus(tmp.path(), &home);
    // Lower case, an invalid code and a quote from the note; a note asking for garbage gets it.
    let answer = r#"{"diagnoses":[{"code":"e11.9","evidence":"type 2 diabetes"},{"code":"Z99.99","evidence":""}],"procedures":[{"code":"0sr9019","evidence":"hip replacement"}]}"#;
    let stub = StubServer::start(move |_, body| {
        if body.contains("GARBAGE") {
            Reply::ok("<html>not an API</html>".into())
        } else {
            Reply::ok(chat_completion(answer))
        }
    });
    let url = stub.base_url();
    let openai = [
        "--engine",
        "openai",
        "--openai-model",
        "stub-model",
        "--openai-api-key-env",
        "MEDCODER_TEST_KEY",
    ];
    let note = "Secret-Name has type 2 diabetes. Hip replacement in 2019.";
    let run = support::medcoder_with_env(
        &home,
        &[
            &[
                "code",
                "-",
                "--db",
                db.to_str().unwrap(),
                "--dataset",
                "codiesp",
            ][..],
            &openai,
            &["--openai-base-url", &url, "--format", "json", "-v"],
        ]
        .concat(),
        Some(note),
        &[("MEDCODER_TEST_KEY", "sk-test-secret")],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let p: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(p["engine"], "openai");
    assert_eq!(p["diagnoses"][0]["code"], "E11.9");
    assert_eq!(p["procedures"][0]["code"], "0SR9019");
    let evidence = &p["diagnoses"][0]["evidence"][0];
    let (start, end) = (
        evidence["start"].as_u64().unwrap() as usize,
        evidence["end"].as_u64().unwrap() as usize,
    );
    let quoted: String = note.chars().skip(start).take(end - start).collect();
    assert_eq!(quoted, "type 2 diabetes");
    let warnings = p["warnings"].to_string();
    assert!(
        warnings.contains("Z99.99") && warnings.contains("codiesp train"),
        "{p}"
    );
    // The key goes to the endpoint only; the note never reaches the logs.
    assert!(stub.heads()[0].contains("Bearer sk-test-secret"));
    for output in [&run.stdout, &run.stderr] {
        assert!(!output.contains("sk-test-secret") && !output.contains("Secret-Name"));
    }

    // A batch: the note the endpoint answers with garbage is skipped, the others are coded;
    // the base URL from $OPENAI_BASE_URL.
    let batch = tmp.path().join("batch.jsonl");
    std::fs::write(
        &batch,
        "{\"id\": \"a\", \"text\": \"Type 2 diabetes.\"}\n{\"id\": \"b\", \"text\": \"GARBAGE please\"}\n{\"id\": \"c\", \"text\": \"Type 2 diabetes, hip replacement.\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("preds.jsonl");
    let batch_args = [
        "code",
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
        "--dataset",
        "codiesp",
    ];
    let run = support::medcoder_with_env(
        &home,
        &[&batch_args[..], &openai].concat(),
        None,
        &[("OPENAI_BASE_URL", url.as_str())],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("coded 2 notes"), "{}", run.stdout);
    assert!(
        run.stderr.contains("note b:") && run.stderr.contains("not JSON"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);

    // An endpoint that is down: a clear error naming it, non-zero exit.
    let down = openai_stub::closed_port_url();
    let run = code_note(
        &home,
        &db,
        &[
            &openai[..],
            &["--openai-base-url", &down, "--openai-retries", "1"],
        ]
        .concat(),
        note,
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains(&down) && run.stderr.contains("cannot connect"),
        "{}",
        run.stderr
    );
    // No base URL at all: says where to give one.
    let run = support::medcoder_with_env(
        &home,
        &[
            &[
                "code",
                "-",
                "--db",
                db.to_str().unwrap(),
                "--dataset",
                "codiesp",
            ][..],
            &openai,
        ]
        .concat(),
        Some(note),
        &[("OPENAI_BASE_URL", "")],
    );
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--openai-base-url"), "{}", run.stderr);
}

#[test]
fn a_pdf_note_is_coded_from_its_text_layer_and_one_without_text_is_refused() {
    use pdf_fixture::{pdf, Protection};
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (db, _) = prepared_corpus(tmp.path(), &home);
    let code_file = |path: &Path| {
        let args = ["code", path.to_str().unwrap(), "--db", db.to_str().unwrap()];
        medcoder(
            &home,
            &[&args[..], &["--dataset", "codiesp", "--format", "json"]].concat(),
            None,
        )
    };
    let note = tmp.path().join("discharge-17.pdf");
    let content = "BT /F1 12 Tf 72 720 Td (Type 2 diabetes mellitus with poor glycemic) Tj \
                   0 -14 Td (control and polyuria.) Tj ET";
    std::fs::write(&note, pdf(&[content], Protection::None)).unwrap();
    let run = code_file(&note);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let p: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(p["id"], "discharge-17");
    assert_eq!(p["diagnoses"][0]["code"], "E11.9");
    for (name, protection, page, why) in [
        (
            "scan.pdf",
            Protection::None,
            "0 0 612 792 re f",
            "no text layer",
        ),
        (
            "locked.pdf",
            Protection::Password,
            "BT /F1 12 Tf 72 720 Td (Diabetes) Tj ET",
            "encrypted",
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, pdf(&[page], protection)).unwrap();
        let run = code_file(&path);
        assert_ne!(run.code, Some(0), "{name}");
        assert!(
            run.stderr.contains(name) && run.stderr.contains(why),
            "{name}: {}",
            run.stderr
        );
    }
}
