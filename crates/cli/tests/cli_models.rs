//! End-to-end test of `medcoder models`: register a run folder written here, list, promote,
//! show @production, refuse to remove the production version; `code --adapter name@stage`
//! resolves through the registry.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use support::{assert_ok, json, medcoder, Run};

fn fake_run(dir: &Path, weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        "model: tiny-base\ndataset: demo\nlora:\n  r: 4\n",
    )
    .unwrap();
}

fn models(home: &Path, args: &[&str]) -> Run {
    let mut all = vec!["models"];
    all.extend_from_slice(args);
    medcoder(home, &all, None)
}

#[test]
fn register_list_promote_show_and_refuse_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (run_a, run_b) = (tmp.path().join("run-a"), tmp.path().join("run-b"));
    fake_run(&run_a, b"weights a");
    fake_run(&run_b, b"weights b");
    let run_a_arg = run_a.to_string_lossy().into_owned();

    let first = models(
        &home,
        &["register", "--name", "coder", "--run", &run_a_arg, "--json"],
    );
    assert_ok(&first);
    let v1 = json(&first)["version"].as_str().unwrap().to_string();
    assert_eq!(json(&first)["base_model"], "tiny-base");
    let again = models(&home, &["register", "--name", "coder", "--run", &run_a_arg]);
    assert_ok(&again);
    assert!(
        again
            .stdout
            .contains(&format!("already registered: coder@{v1}")),
        "{}",
        again.stdout
    );
    let second = models(
        &home,
        &[
            "register",
            "--name",
            "coder",
            "--run",
            &run_b.to_string_lossy(),
            "--json",
        ],
    );
    assert_ok(&second);
    let v2 = json(&second)["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);

    let list = models(&home, &["list"]);
    assert_ok(&list);
    assert!(list.stdout.starts_with("NAME"), "{}", list.stdout);
    assert!(
        list.stdout.contains(&v1) && list.stdout.contains(&v2),
        "{}",
        list.stdout
    );
    let listed = json(&models(&home, &["list", "--json"]));
    assert_eq!(listed.as_array().unwrap().len(), 2);

    let (id1, id2) = (format!("coder@{v1}"), format!("coder@{v2}"));
    assert_ok(&models(&home, &["promote", &id1, "--stage", "production"]));
    let promoted = models(&home, &["promote", &id2, "--stage", "production"]);
    assert_ok(&promoted);
    assert!(
        promoted.stdout.contains(&format!("{id1} → staging")),
        "{}",
        promoted.stdout
    );
    let shown = models(&home, &["show", "coder@production"]);
    assert_ok(&shown);
    assert_eq!(json(&shown)["version"], v2.as_str());
    assert_eq!(json(&shown)["stage"], "production");
    assert_eq!(
        json(&models(&home, &["show", "coder@staging"]))["version"],
        v1.as_str()
    );

    let refused = models(&home, &["remove", &id2]);
    assert_eq!(refused.code, Some(2), "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains(&format!("refusing to remove {id2}")),
        "{}",
        refused.stderr
    );
    let removed = models(&home, &["remove", &id1]);
    assert_ok(&removed);
    assert!(removed.stdout.contains("not deleted"), "{}", removed.stdout);
    assert!(run_a.join("adapter_model.safetensors").exists());

    let bad = models(&home, &["show", "coder@latest"]);
    assert_eq!(bad.code, Some(2));
    assert!(
        bad.stderr.contains("bad version 'latest'"),
        "{}",
        bad.stderr
    );

    // `code --adapter name@stage` goes through the registry.
    let coded = medcoder(
        &home,
        &[
            "code",
            "--engine",
            "llm",
            "--allowed",
            "us",
            "--adapter",
            "coder@dev",
            "-",
        ],
        Some("Patient with pneumonia."),
    );
    assert_eq!(coded.code, Some(2), "{}", coded.stdout);
    assert!(
        coded.stderr.contains("coder has no dev version"),
        "{}",
        coded.stderr
    );
    // …and `@production` resolves to its adapter and base model (a fake one here: the load
    // fails naming it).
    let coded = medcoder(
        &home,
        &[
            "code",
            "--engine",
            "llm",
            "--allowed",
            "us",
            "--adapter",
            "coder@production",
            "-",
        ],
        Some("Patient with pneumonia."),
    );
    assert_eq!(coded.code, Some(2), "{}", coded.stdout);
    assert!(coded.stderr.contains("tiny-base"), "{}", coded.stderr);
}
