//! `medcoder serve`: the coding API and an OpenAI-compatible endpoint over HTTP. Settings come
//! from `serve.yaml` (`--config`), with the flags below overriding it; the resolved config is
//! printed at start without secrets.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use medcoder_assets::MedcoderHome;
use medcoder_coding::engine::{EngineConfig, EngineKind};
use medcoder_server::config::GenerationConfig;
use medcoder_server::{hash_api_key, ServeConfig};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The server's settings (host, port, engine, generation model, limits, keys, CORS).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    port: Option<u16>,
    /// The coding engine (overrides `engine.engine`).
    #[arg(long)]
    engine: Option<EngineKind>,
    /// The prepared database the engine is fitted on (overrides `engine.db`).
    #[arg(long)]
    db: Option<PathBuf>,
    /// The dataset in it (overrides `engine.dataset`).
    #[arg(long)]
    dataset: Option<String>,
    /// llm engine: the model (overrides `engine.model`).
    #[arg(long)]
    model: Option<String>,
    /// llm engine: a LoRA adapter folder (overrides `engine.adapter`).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// The model behind /v1/chat/completions (overrides `generation.model`).
    #[arg(long)]
    chat_model: Option<String>,
    /// Print the SHA-256 of an API key, as `auth.api_key_sha256` lists it, and exit.
    #[arg(long, value_name = "KEY")]
    hash_key: Option<String>,
}

pub fn run(args: ServeArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    if let Some(key) = &args.hash_key {
        outln!("{}", hash_api_key(key));
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = match &args.config {
        Some(file) => {
            let mut config = ServeConfig::from_yaml_file(file)?;
            let base = file.parent().unwrap_or(std::path::Path::new("."));
            config.resolve_paths(base);
            config
        }
        None => ServeConfig::default(),
    };
    apply_overrides(&mut config.engine, &args);
    if let Some(host) = args.host {
        config.host = host;
    }
    if let Some(port) = args.port {
        config.port = port;
    }
    if let Some(model) = args.chat_model {
        config
            .generation
            .get_or_insert_with(GenerationConfig::default)
            .model = model;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    if config.engine.needs_dataset() {
        config.engine.dataset_source()?;
    }
    eprintln!(
        "medcoder serve, resolved config:\n{}",
        config.resolved_without_secrets()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = medcoder_server::bind(config, home.clone()).await?;
        eprintln!(
            "listening on http://{} (GET /ready answers 200 once the engine is loaded)",
            server.address
        );
        server.run(shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn apply_overrides(engine: &mut EngineConfig, args: &ServeArgs) {
    if let Some(kind) = args.engine {
        engine.engine = kind;
    }
    if let Some(db) = &args.db {
        engine.db = Some(db.clone());
    }
    if let Some(dataset) = &args.dataset {
        engine.dataset = Some(dataset.clone());
    }
    if let Some(model) = &args.model {
        engine.model = Some(model.clone());
    }
    if let Some(adapter) = &args.adapter {
        engine.adapter = Some(adapter.clone());
    }
}

/// Ctrl-C or SIGTERM: stop taking connections and drain the requests in flight.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: draining requests in flight");
}
