//! An exported GGUF file in LM Studio's layout: LM Studio lists the models of its models folder
//! (`~/.lmstudio/models` unless changed in its settings) as `<publisher>/<model-repo>/<file>.gguf`
//! and ignores a GGUF that sits anywhere else. The file is hard-linked into that layout (no
//! second copy on disk), or copied where a link cannot be made (another file system), and a
//! README says how to hand the folder to LM Studio. Every file is written to a temp name and
//! renamed into place, as the export itself.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::TrainError;

/// Where the layout went.
#[derive(Debug, Clone, Serialize)]
pub struct LmStudioLayout {
    /// The models folder the layout is rooted at (`<root>/<publisher>/<repo>/<file>`).
    pub root: PathBuf,
    /// The GGUF inside it.
    pub gguf: PathBuf,
    pub readme: PathBuf,
    /// Whether the GGUF is a hard link to the export (else a copy).
    pub hard_linked: bool,
}

/// A publisher or repo folder name: LM Studio reads one path component each, so anything but
/// letters, digits, `.`, `_` and `-` becomes `-`.
pub fn folder_name(raw: &str) -> String {
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(['-', '.']).to_string();
    if name.is_empty() {
        "model".into()
    } else {
        name
    }
}

/// Puts `gguf` at `<root>/<publisher>/<repo>/<its file name>`, with a README in `<root>`.
pub fn write_lmstudio_layout(
    gguf: &Path,
    root: &Path,
    publisher: &str,
    repo: &str,
) -> Result<LmStudioLayout, TrainError> {
    let file_name = gguf
        .file_name()
        .ok_or_else(|| TrainError::Run(format!("{}: not a file path", gguf.display())))?;
    let (publisher, repo) = (folder_name(publisher), folder_name(repo));
    let dir = root.join(&publisher).join(&repo);
    fs_err::create_dir_all(&dir)?;
    let target = dir.join(file_name);
    let temp = dir.join(format!(
        ".{}.partial-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temp);
    let mut hard_linked = false;
    crate::atomic::write_through(&target, &temp, |temp| {
        if std::fs::hard_link(gguf, temp).is_ok() {
            hard_linked = true;
        } else {
            fs_err::copy(gguf, temp)?;
        }
        Ok(())
    })?;
    crate::atomic::sync_dir(&dir);
    let readme = root.join("README.md");
    crate::atomic::write_file(&readme, readme_text(&laid_out(root)).as_bytes())?;
    crate::atomic::sync_dir(root);
    Ok(LmStudioLayout {
        root: root.to_path_buf(),
        gguf: target,
        readme,
        hard_linked,
    })
}

/// Every `<publisher>/<repo>/<file>.gguf` under `root`, sorted: a second export into the same
/// folder adds to the README's list rather than replacing it.
fn laid_out(root: &Path) -> Vec<String> {
    let children = |dir: &Path| -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        paths.sort();
        paths
    };
    let mut files = Vec::new();
    for publisher in children(root).into_iter().filter(|p| p.is_dir()) {
        for repo in children(&publisher).into_iter().filter(|p| p.is_dir()) {
            for file in children(&repo) {
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.ends_with(".gguf") && !name.starts_with('.') {
                    let folder = |p: &Path| {
                        p.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    };
                    files.push(format!("{}/{}/{name}", folder(&publisher), folder(&repo)));
                }
            }
        }
    }
    files
}

fn readme_text(files: &[String]) -> String {
    let list: String = files.iter().map(|f| format!("- `{f}`\n")).collect();
    let example = files
        .first()
        .map(String::as_str)
        .unwrap_or("PUBLISHER/REPO/FILE.gguf");
    let publisher = example.split('/').next().unwrap_or_default();
    format!(
        "# Using these models in LM Studio\n\
         \n\
         This folder is laid out as LM Studio's models folder (`<publisher>/<model-repo>/<file>.gguf`):\n\
         \n\
         {list}\
         \n\
         The chat template and stop tokens are inside each GGUF, so LM Studio formats chats as\n\
         the model was trained.\n\
         \n\
         Either point LM Studio at this folder (My Models → the models directory → Change), or\n\
         copy the publisher folder into its models folder, keeping the two levels:\n\
         \n\
         ```sh\n\
         cp -r {publisher} ~/.lmstudio/models/\n\
         ```\n\
         \n\
         or let LM Studio's command line do the same for one file:\n\
         \n\
         ```sh\n\
         lms import {example}\n\
         ```\n\
         \n\
         Then `lms ls` lists it and `lms load` (or the model picker) loads it.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_are_single_safe_components() {
        assert_eq!(folder_name("medcoder"), "medcoder");
        assert_eq!(folder_name("coder@20260401 v2/x"), "coder-20260401-v2-x");
        assert_eq!(folder_name("../.."), "model");
        assert_eq!(folder_name(""), "model");
    }

    #[test]
    fn the_gguf_lands_in_publisher_repo_file_with_a_readme_and_is_replaced_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let gguf = tmp.path().join("coder-q4_k_m.gguf");
        std::fs::write(&gguf, b"GGUF one").unwrap();
        let root = tmp.path().join("lmstudio");
        let layout = write_lmstudio_layout(&gguf, &root, "medcoder", "coder-GGUF").unwrap();
        let expected = root.join("medcoder/coder-GGUF/coder-q4_k_m.gguf");
        assert_eq!(layout.gguf, expected);
        assert!(layout.hard_linked, "same file system: a hard link");
        assert_eq!(
            std::fs::read(&expected).ok().as_deref(),
            Some(&b"GGUF one"[..])
        );
        let readme = std::fs::read_to_string(&layout.readme).unwrap_or_default();
        assert!(
            readme.contains("medcoder/coder-GGUF/coder-q4_k_m.gguf"),
            "{readme}"
        );
        assert!(readme.contains("lms import"), "{readme}");
        // A new export replaces the file (the rename breaks the old link, so the layout
        // follows the new file) and leaves no temp file behind.
        std::fs::remove_file(&gguf).unwrap();
        std::fs::write(&gguf, b"GGUF two").unwrap();
        write_lmstudio_layout(&gguf, &root, "medcoder", "coder-GGUF").unwrap();
        assert_eq!(
            std::fs::read(&expected).ok().as_deref(),
            Some(&b"GGUF two"[..])
        );
        let entries = std::fs::read_dir(root.join("medcoder/coder-GGUF"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(entries, 1);
    }
}
