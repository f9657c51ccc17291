use super::*;

fn run_dir(root: &Path, name: &str, weights: &[u8]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        "model: tiny-llama\nlora:\n  r: 4\n",
    )
    .unwrap();
    dir
}

fn register(registry: &ModelRegistry, name: &str, dir: &Path) -> (ModelEntry, bool) {
    registry
        .register(&RegisterRequest {
            name: name.into(),
            run_dir: dir.to_path_buf(),
            ..RegisterRequest::default()
        })
        .unwrap()
}

#[test]
fn register_records_hashes_config_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let dir = run_dir(tmp.path(), "run1", b"weights-1");
    let (entry, created) = register(&registry, "coder", &dir);
    assert!(created);
    assert_eq!(entry.stage, Stage::Dev);
    assert_eq!(entry.base_model.as_deref(), Some("tiny-llama"));
    assert_eq!(entry.files.len(), 2);
    assert!(is_version(&entry.version), "{}", entry.version);
    assert_eq!(&entry.version[9..], &entry.content_sha256[..12]);
    let (expected, _) = sha256_file(&dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(entry.adapter_sha256, expected);
    assert_eq!(
        entry.training_config.as_ref().unwrap()["lora"]["r"],
        serde_json::json!(4)
    );
    assert!(entry.created_at.ends_with('Z'));

    let (again, created) = register(&registry, "coder", &dir);
    assert!(!created);
    assert_eq!(again.version, entry.version);
    assert_eq!(registry.list().unwrap().len(), 1);
    assert!(!tmp.path().join("registry/registry.lock").exists());
}

#[test]
fn register_refuses_a_folder_without_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let err = registry
        .register(&RegisterRequest {
            name: "coder".into(),
            run_dir: tmp.path().to_path_buf(),
            ..RegisterRequest::default()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
}

#[test]
fn promote_demotes_the_previous_production_and_resolve_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let (v1, _) = register(&registry, "coder", &run_dir(tmp.path(), "a", b"one"));
    let (v2, _) = register(&registry, "coder", &run_dir(tmp.path(), "b", b"two"));
    register(&registry, "other", &run_dir(tmp.path(), "c", b"three"));
    assert_ne!(v1.version, v2.version);

    let (_, demoted) = registry.promote(&v1.id(), Stage::Production).unwrap();
    assert_eq!(demoted, None);
    assert_eq!(
        registry.resolve("coder@production").unwrap().version,
        v1.version
    );
    let (_, demoted) = registry.promote(&v2.id(), Stage::Production).unwrap();
    assert_eq!(demoted, Some(v1.id()));
    assert_eq!(
        registry.resolve("coder@production").unwrap().version,
        v2.version
    );
    assert_eq!(
        registry.resolve("coder@staging").unwrap().version,
        v1.version
    );
    assert_eq!(registry.resolve("coder").unwrap().version, v2.version);
    assert_eq!(registry.resolve(&v1.id()).unwrap().version, v1.version);
    let production = registry
        .list()
        .unwrap()
        .into_iter()
        .filter(|m| m.stage == Stage::Production)
        .count();
    assert_eq!(production, 1);
}

#[test]
fn remove_refuses_production_and_keeps_files() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let dir_a = run_dir(tmp.path(), "a", b"one");
    let (v1, _) = register(&registry, "coder", &dir_a);
    let (v2, _) = register(&registry, "coder", &run_dir(tmp.path(), "b", b"two"));
    registry.promote(&v1.id(), Stage::Production).unwrap();
    let err = registry.remove(&v1.id()).unwrap_err().to_string();
    assert!(
        err.contains(&v1.id()) && err.contains("production"),
        "{err}"
    );
    registry.remove(&v2.id()).unwrap();
    assert_eq!(registry.list().unwrap().len(), 1);
    assert!(tmp.path().join("b/adapter_model.safetensors").exists());
    let err = registry.remove("coder").unwrap_err().to_string();
    assert!(err.contains("exact version"), "{err}");
    assert!(dir_a.exists());
}

#[test]
fn bad_names_versions_and_unknown_models_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let err = registry.resolve("bad name").unwrap_err().to_string();
    assert!(err.contains("bad model name 'bad name'"), "{err}");
    let err = registry.resolve("coder@v1").unwrap_err().to_string();
    assert!(err.contains("bad version 'v1'"), "{err}");
    let err = registry.resolve("coder").unwrap_err().to_string();
    assert!(err.contains("no model named 'coder'"), "{err}");
    register(&registry, "coder", &run_dir(tmp.path(), "a", b"one"));
    let err = registry
        .resolve("coder@production")
        .unwrap_err()
        .to_string();
    assert!(err.contains("coder has no production version"), "{err}");
    let err = registry
        .resolve("coder@20260101-0123456789ab")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("coder@20260101-0123456789ab is not registered"),
        "{err}"
    );
    assert!("prod".parse::<Stage>().is_err());
    assert!(parse_spec("../x").is_err());
}

#[test]
fn eval_headline_reads_the_report_json_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("report.json");
    let prf =
        serde_json::json!({"precision": 0.5, "recall": 0.25, "f1": 0.3, "tp": 1, "fp": 1, "fn": 3});
    let level = serde_json::json!({"micro": prf, "macro_f1": 0.2, "macro_precision": 0.2,
        "macro_recall": 0.2, "map": 0.4, "map_predicted_only": 0.4, "at_k": []});
    let json = serde_json::json!({
        "provenance": {}, "notes_gold": 3, "notes_predicted": 3,
        "kinds": [{"kind": "diagnosis", "notes": 3, "code": level, "category": level,
                   "hierarchical": {"f1": 0.35}}]
    });
    std::fs::write(&report, json.to_string()).unwrap();
    let headline = EvalHeadline::from_report(&report).unwrap();
    assert_eq!(headline.notes_gold, 3);
    let diagnosis = &headline.kinds["diagnosis"];
    assert_eq!(diagnosis.micro_f1, 0.3);
    assert_eq!(diagnosis.map, 0.4);
    assert_eq!(diagnosis.hierarchical_f1, Some(0.35));
    std::fs::write(&report, "{}").unwrap();
    let err = EvalHeadline::from_report(&report).unwrap_err().to_string();
    assert!(err.contains("notes_gold"), "{err}");
}

#[test]
fn concurrent_registrations_all_land() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..8)
        .map(|i| run_dir(tmp.path(), &format!("run{i}"), format!("w{i}").as_bytes()))
        .collect();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    std::thread::scope(|scope| {
        for dir in &dirs {
            let registry = registry.clone();
            scope.spawn(move || register(&registry, "coder", dir));
        }
    });
    assert_eq!(registry.list().unwrap().len(), 8);
}

#[test]
fn model_choice_resolves_registered_adapters_and_models_and_leaves_paths_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let home = MedcoderHome::at(tmp.path().join("home"));
    let registry = ModelRegistry::open(&home);
    let dir = run_dir(tmp.path(), "run1", b"weights-1");
    let (entry, _) = register(&registry, "coder", &dir);
    registry.promote(&entry.id(), Stage::Production).unwrap();
    let choose = |model: Option<&str>, adapter: Option<&str>| {
        resolve_model_choice(model, adapter.map(Path::new), &home)
    };
    // A registered adapter: its run folder on its recorded base, unless --model names one.
    for spec in ["coder@production", &entry.id()] {
        let choice = choose(None, Some(spec)).unwrap();
        assert_eq!(choice.model, "tiny-llama", "{spec}");
        assert_eq!(choice.adapter.as_deref(), Some(entry.adapter_dir.as_path()));
        assert_eq!(choice.entry.as_ref().map(ModelEntry::id), Some(entry.id()));
    }
    let other = choose(Some("other-base"), Some("coder@production")).unwrap();
    assert_eq!(other.model, "other-base");
    // A registered name as --model, without an adapter.
    let by_model = choose(Some(&entry.id()), None).unwrap();
    assert_eq!(by_model.model, "tiny-llama");
    assert!(by_model.adapter.is_some());
    // Paths and unregistered names pass through untouched.
    let plain = choose(Some("smollm2-135m-instruct"), Some(dir.to_str().unwrap())).unwrap();
    assert_eq!(plain.model, "smollm2-135m-instruct");
    assert_eq!(plain.adapter.as_deref(), Some(dir.as_path()));
    assert!(plain.entry.is_none());
    let hub = choose(Some("unregistered@production"), None).unwrap();
    assert_eq!(hub.model, "unregistered@production");
    assert!(hub.entry.is_none());
    // What cannot be resolved says so.
    let missing = choose(None, Some("coder@staging")).unwrap_err().to_string();
    assert!(
        missing.contains("coder has no staging version"),
        "{missing}"
    );
    let none = choose(None, None).unwrap_err().to_string();
    assert!(none.contains("give --model"), "{none}");
}

#[test]
fn record_artifacts_updates_the_version_it_names() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::at(tmp.path().join("registry"));
    let (first, _) = register(&registry, "coder", &run_dir(tmp.path(), "run1", b"w1"));
    let (second, _) = register(&registry, "coder", &run_dir(tmp.path(), "run2", b"w2"));
    let gguf = tmp.path().join("coder.gguf");
    let updated = registry
        .record_artifacts(&first.id(), None, Some(&gguf))
        .unwrap();
    assert_eq!(updated.gguf.as_deref(), Some(gguf.as_path()));
    assert_eq!(registry.resolve(&first.id()).unwrap().gguf, Some(gguf));
    assert_eq!(registry.resolve(&second.id()).unwrap().gguf, None);
    assert!(registry.record_artifacts("nobody@dev", None, None).is_err());
}
