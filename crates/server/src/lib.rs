//! `medcoder serve`: the coding REST API and an OpenAI-compatible chat endpoint (axum). The
//! server listens at once and loads its engines in the background (`/ready` answers 503 until
//! they are up); engines run on their own threads behind bounded queues, never in a handler.

pub mod api;
mod batch_intake;
pub mod chat;
mod coding_queue;
pub mod config;
mod error;
mod metrics;
mod middleware;
mod whole_number;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{header, HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use medcoder_assets::MedcoderHome;
use medcoder_coding::engine::load_code_sets;
use medcoder_coding::Coder;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use chat::ChatService;
pub use coding_queue::CodingQueue;
pub use config::{hash_api_key, ServeConfig};
pub use error::{ApiError, ServerError};
use metrics::Metrics;
use middleware::RateLimiter;

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub config: ServeConfig,
    metrics: Arc<Metrics>,
    rate_limiter: RateLimiter,
    coding: OnceLock<(Arc<Coder>, CodingQueue, f64)>,
    chat: OnceLock<ChatService>,
    load_error: Mutex<Option<String>>,
    started_unix: u64,
}

impl AppState {
    fn new(config: ServeConfig) -> Self {
        let rate_limiter = RateLimiter::new(config.auth.rate_limit_per_minute);
        Self {
            config,
            metrics: Arc::new(Metrics::default()),
            rate_limiter,
            coding: OnceLock::new(),
            chat: OnceLock::new(),
            load_error: Mutex::new(None),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    pub fn coder(&self) -> Option<&Coder> {
        self.coding.get().map(|(coder, _, _)| coder.as_ref())
    }

    /// Notes the coding engine has answered so far.
    pub fn metrics_notes_coded(&self) -> u64 {
        self.metrics
            .notes_coded
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn queue(&self) -> Option<&CodingQueue> {
        self.coding.get().map(|(_, queue, _)| queue)
    }

    fn coder_load_seconds(&self) -> f64 {
        self.coding.get().map(|(_, _, s)| *s).unwrap_or(0.0)
    }

    fn chat(&self) -> Option<&ChatService> {
        self.chat.get()
    }

    fn chat_unavailable(&self) -> ApiError {
        if self.config.generation.is_none() {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "no_generation_model",
                "this server has no generation model: set `generation.model` in serve.yaml",
            )
        } else {
            ApiError::not_ready("the generation model")
        }
    }

    fn load_error(&self) -> Option<String> {
        self.load_error.lock().ok().and_then(|e| e.clone())
    }

    fn fail_load(&self, error: String) {
        tracing::error!(%error, "loading failed: /ready answers 503");
        if let Ok(mut slot) = self.load_error.lock() {
            slot.get_or_insert(error);
        }
    }
}

/// JSON bodies whose rejections answer with the status and the field at fault.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(Self(value))
    }
}

/// The routes, middleware and limits around `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limits = &state.config.limits;
    let mut router = Router::new()
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/v1/model", get(api::model_info))
        .route("/v1/code", post(api::code_note))
        .route("/v1/code/batch", post(api::code_batch))
        .route("/v1/code/pdf", post(api::code_pdf))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(chat::list_models))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(api::openapi_json))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authorize,
        ));
    let origins: Vec<HeaderValue> = state
        .config
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if !origins.is_empty() {
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::observe,
        ))
        .with_state(state)
}

/// A server bound to its address, loading its engines.
#[derive(Debug)]
pub struct BoundServer {
    pub address: SocketAddr,
    pub state: Arc<AppState>,
    listener: tokio::net::TcpListener,
}

/// Binds the configured address (port 0 picks a free one) and starts loading the engines on
/// blocking threads.
pub async fn bind(config: ServeConfig, home: MedcoderHome) -> Result<BoundServer, ServerError> {
    let address = config.address()?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| ServerError::Config(format!("cannot listen on {address}: {e}")))?;
    let address = listener.local_addr()?;
    let state = Arc::new(AppState::new(config));
    let loading = state.clone();
    tokio::task::spawn_blocking(move || load_engines(&loading, &home));
    Ok(BoundServer {
        address,
        state,
        listener,
    })
}

impl BoundServer {
    /// Serves until `shutdown` resolves, then stops taking connections and lets the requests
    /// in flight finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let app = router(self.state.clone());
        axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        tracing::info!("server stopped");
        Ok(())
    }
}

fn load_engines(state: &AppState, home: &MedcoderHome) {
    let config = &state.config;
    let started = Instant::now();
    let kb = load_code_sets(home);
    match Coder::build(&config.engine, kb, home) {
        Ok(coder) => {
            let seconds = started.elapsed().as_secs_f64();
            let workers = match (config.limits.workers, coder.parallel()) {
                (0, true) => std::thread::available_parallelism().map_or(1, |n| n.get()),
                (0, false) => 1,
                (n, _) => n,
            };
            state.metrics.record_load("coding", seconds);
            tracing::info!(engine = %coder.description, workers, seconds, "coding engine ready");
            let coder = Arc::new(coder);
            let queue = CodingQueue::start(
                coder.clone(),
                workers,
                config.limits.queue_capacity,
                config.limits.llm_batch,
                state.metrics.clone(),
            );
            let _ = state.coding.set((coder, queue, seconds));
        }
        Err(error) => {
            state.fail_load(format!("the coding engine: {error}"));
            return;
        }
    }
    if let Some(generation) = &config.generation {
        let started = Instant::now();
        match load_generation_model(generation, home) {
            Ok(model) => match ChatService::start(
                model,
                generation.clone(),
                config.limits.queue_capacity,
                state.metrics.clone(),
            ) {
                Ok(service) => {
                    let seconds = started.elapsed().as_secs_f64();
                    state.metrics.record_load("generation", seconds);
                    tracing::info!(model = %service.description, seconds, "generation model ready");
                    let _ = state.chat.set(service);
                }
                Err(error) => state.fail_load(format!("the generation thread: {error}")),
            },
            Err(error) => state.fail_load(format!("the generation model: {error}")),
        }
    }
}

fn load_generation_model(
    generation: &config::GenerationConfig,
    home: &MedcoderHome,
) -> Result<medcoder_models::LoadedModel, String> {
    let resolved = generation
        .model
        .parse::<medcoder_assets::ModelRef>()
        .and_then(|m| m.resolve(home))
        .map_err(|e| e.to_string())?;
    let device = generation
        .device
        .parse::<medcoder_models::DeviceSpec>()?
        .device()
        .map_err(|e| e.to_string())?;
    medcoder_models::load_model(&resolved, &device, None).map_err(|e| e.to_string())
}
