//! The coding routes (`/v1/code`, `/v1/code/batch`), liveness and readiness, what is loaded
//! (`/v1/model`), metrics and the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use medcoder_coding::{CodingError, NotePrediction};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::coding_queue::SubmitError;
use crate::error::{ApiError, ErrorBody};
use crate::{ApiJson, AppState};

/// A note to code.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    /// The caller's id for the note, echoed back (`note` when absent).
    pub id: Option<String>,
    /// The note, plain UTF-8 text (not blank).
    #[schema(min_length = 1, pattern = r"\S")]
    pub text: String,
    #[serde(default)]
    pub options: CodeOptions,
}

#[derive(Debug, Default, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeOptions {
    /// Codes per kind kept at most (the ranking's head).
    #[serde(default, deserialize_with = "crate::whole_number::optional")]
    #[schema(minimum = 0)]
    pub top: Option<usize>,
    /// Only the codes above the engine's threshold (the ones a coder is handed).
    #[serde(default)]
    pub assigned_only: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct FormatQuery {
    /// `json` (default: the prediction as `medcoder code --format json` writes it) or `fhir`
    /// (a FHIR R4 Bundle of Condition and Procedure resources for the assigned codes).
    pub format: Option<String>,
}

/// Notes to code together (1 to `limits.max_batch_notes`).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct CodeBatch(pub Vec<CodeRequest>);

impl utoipa::PartialSchema for CodeBatch {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ArrayBuilder::new()
            .items(utoipa::openapi::Ref::from_schema_name("CodeRequest"))
            .min_items(Some(1))
            .description(Some(
                "Notes to code together (1 to `limits.max_batch_notes`).",
            ))
            .build()
            .into()
    }
}

impl ToSchema for CodeBatch {}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    pub results: Vec<BatchItem>,
}

/// One note of a batch: its prediction, or why it failed (the others are unaffected).
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<NotePrediction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the server runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelInfo {
    pub engine: String,
    /// The engine's own description: model, adapter, data it was fitted on, allowed codes.
    pub model: String,
    pub base_model: Option<String>,
    pub adapter: Option<String>,
    pub device: String,
    /// medcoder's version.
    pub version: &'static str,
    /// ICD-10-CM / ICD-10-PCS editions the codes are described and checked with.
    pub code_sets: Option<String>,
    pub load_seconds: f64,
    /// The model behind `/v1/chat/completions`, if any.
    pub chat_model: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[utoipa::path(get, path = "/health", responses((status = 200, body = Health, description = "the process is up")))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/ready", responses((status = 200, body = Health, description = "engines loaded"),
    (status = 503, body = ErrorBody, description = "still loading, or loading failed")))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    if let Some(error) = state.load_error() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "load_failed",
            error,
        ));
    }
    if state.coder().is_none() || (state.config.generation.is_some() && state.chat().is_none()) {
        return Err(ApiError::not_ready("the engine"));
    }
    Ok(Json(Health { status: "ready" }))
}

#[utoipa::path(get, path = "/v1/model", responses((status = 200, body = ModelInfo), (status = 503, body = ErrorBody)))]
pub async fn model_info(State(state): State<Arc<AppState>>) -> Result<Json<ModelInfo>, ApiError> {
    let coder = state
        .coder()
        .ok_or_else(|| ApiError::not_ready("the engine"))?;
    let engine = &state.config.engine;
    let code_sets = coder.code_sets().map(|kb| {
        format!(
            "ICD-10-CM {} / ICD-10-PCS {}",
            kb.cm.version, kb.pcs.version
        )
    });
    Ok(Json(ModelInfo {
        engine: coder.kind.as_str().to_string(),
        model: coder.description.clone(),
        base_model: engine.model.clone(),
        adapter: engine.adapter.as_ref().map(|p| p.display().to_string()),
        device: engine.device.clone(),
        version: env!("CARGO_PKG_VERSION"),
        code_sets,
        load_seconds: state.coder_load_seconds(),
        chat_model: state.chat().map(|c| c.description.clone()),
    }))
}

/// Codes one note: the same answer as `medcoder code --format json`.
#[utoipa::path(post, path = "/v1/code", request_body = CodeRequest, params(FormatQuery),
    responses((status = 200, body = NotePrediction),
        (status = 400, body = ErrorBody, description = "not JSON"),
        (status = 413, body = ErrorBody, description = "body over the size limit"),
        (status = 415, body = ErrorBody, description = "not application/json"),
        (status = 422, body = ErrorBody, description = "a field missing or wrong, an empty note, or a note over the length limit"),
        (status = 503, body = ErrorBody, description = "loading, or the queue is full (Retry-After)"),
        (status = 504, body = ErrorBody, description = "over the request timeout")))]
pub async fn code_note(
    State(state): State<Arc<AppState>>,
    Query(query): Query<FormatQuery>,
    ApiJson(request): ApiJson<CodeRequest>,
) -> Result<Response, ApiError> {
    let deadline = deadline(&state);
    let format = OutputFormat::parse(query.format.as_deref())?;
    let id = request.id.unwrap_or_else(|| "note".into());
    check_note(&state, &id, &request.text)?;
    let queue = state
        .queue()
        .ok_or_else(|| ApiError::not_ready("the engine"))?;
    let answer = queue.submit(id, request.text).map_err(submit_error)?;
    let prediction = await_prediction(&state, deadline, answer).await?;
    Ok(format.render(trim(prediction, &request.options)))
}

/// Codes several notes (at most `limits.max_batch_notes`). A note that is blank or over the
/// length limit refuses the batch (422 naming it); a note the engine fails on is reported in
/// its place and the rest are coded.
#[utoipa::path(post, path = "/v1/code/batch", request_body = CodeBatch,
    responses((status = 200, body = BatchResult),
        (status = 400, body = ErrorBody, description = "not JSON"),
        (status = 413, body = ErrorBody, description = "body over the size limit"),
        (status = 415, body = ErrorBody, description = "not application/json"),
        (status = 422, body = ErrorBody, description = "a field missing or wrong, or too many notes"),
        (status = 503, body = ErrorBody, description = "loading, or the queue is full (Retry-After)"),
        (status = 504, body = ErrorBody, description = "over the request timeout")))]
pub async fn code_batch(
    State(state): State<Arc<AppState>>,
    ApiJson(CodeBatch(requests)): ApiJson<CodeBatch>,
) -> Result<Json<BatchResult>, ApiError> {
    let deadline = deadline(&state);
    let limit = state.config.limits.max_batch_notes;
    if requests.is_empty() || requests.len() > limit {
        return Err(ApiError::unprocessable(format!(
            "a batch holds 1 to {limit} notes; this one has {}",
            requests.len()
        )));
    }
    let queue = state
        .queue()
        .ok_or_else(|| ApiError::not_ready("the engine"))?;
    // Input problems refuse the whole batch, naming the note; engine failures are reported in
    // the note's place and the others are coded.
    let mut notes = Vec::with_capacity(requests.len());
    let mut options = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let id = request.id.unwrap_or_else(|| format!("note-{}", i + 1));
        check_note(&state, &id, &request.text)
            .map_err(|e| ApiError::unprocessable(format!("[{i}]: {}", e.message)))?;
        notes.push((id, request.text));
        options.push(request.options);
    }
    let ids: Vec<String> = notes.iter().map(|(id, _)| id.clone()).collect();
    let answers = queue.submit_all(notes).map_err(submit_error)?;
    let mut results = Vec::with_capacity(ids.len());
    for ((id, answer), options) in ids.into_iter().zip(answers).zip(options) {
        let (prediction, error) = match await_prediction(&state, deadline, answer).await {
            Ok(prediction) => (Some(trim(prediction, &options)), None),
            Err(error) if error.status == StatusCode::GATEWAY_TIMEOUT => return Err(error),
            Err(error) => (None, Some(error.message)),
        };
        results.push(BatchItem {
            id,
            prediction,
            error,
        });
    }
    Ok(Json(BatchResult { results }))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", description = "Prometheus text format")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "medcoder",
        description = "ICD-10 coding of clinical notes, and an OpenAI-compatible chat endpoint."
    ),
    paths(
        health,
        ready,
        model_info,
        code_note,
        code_batch,
        metrics,
        crate::chat::chat_completions,
        crate::chat::list_models
    ),
    components(schemas(
        CodeRequest,
        CodeOptions,
        BatchResult,
        BatchItem,
        ModelInfo,
        Health,
        ErrorBody,
        NotePrediction,
        medcoder_coding::CodedItem,
        medcoder_coding::EvidenceSpan,
        medcoder_coding::CodeKind
    ))
)]
pub struct ApiDoc;

/// The note's length against the limit (422 stating both), and not empty.
fn check_note(state: &AppState, id: &str, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::unprocessable(format!("note {id}: text is empty")));
    }
    let limit = state.config.limits.max_note_chars;
    let chars = text.chars().count();
    if chars > limit {
        return Err(ApiError::unprocessable(format!(
            "note {id}: text is {chars} characters; the limit is {limit}"
        )));
    }
    Ok(())
}

fn submit_error(error: SubmitError) -> ApiError {
    match error {
        SubmitError::Full => ApiError::queue_full(),
        SubmitError::Closed => ApiError::not_ready("the engine (shutting down)"),
    }
}

/// When a request that starts now must be answered.
fn deadline(state: &AppState) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs_f64(state.config.limits.request_timeout_s)
}

async fn await_prediction(
    state: &AppState,
    deadline: tokio::time::Instant,
    answer: oneshot::Receiver<Result<NotePrediction, CodingError>>,
) -> Result<NotePrediction, ApiError> {
    match tokio::time::timeout_at(deadline, answer).await {
        Err(_) => Err(ApiError::timeout(state.config.limits.request_timeout_s)),
        Ok(Err(_)) => Err(ApiError::not_ready("the engine (shutting down)")),
        Ok(Ok(Err(CodingError::Input { what, why }))) => {
            Err(ApiError::unprocessable(format!("{what}: {why}")))
        }
        Ok(Ok(Err(error))) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "coding_failed",
            error.to_string(),
        )),
        Ok(Ok(Ok(prediction))) => Ok(prediction),
    }
}

fn trim(mut prediction: NotePrediction, options: &CodeOptions) -> NotePrediction {
    for list in [&mut prediction.diagnoses, &mut prediction.procedures] {
        if options.assigned_only {
            list.retain(|c| c.assigned);
        }
        if let Some(top) = options.top {
            list.truncate(top);
        }
    }
    prediction
}

/// How a prediction is written back.
#[derive(Debug, Clone, Copy)]
enum OutputFormat {
    Json,
    Fhir,
}

impl OutputFormat {
    fn parse(format: Option<&str>) -> Result<Self, ApiError> {
        match format.unwrap_or("json") {
            "json" => Ok(Self::Json),
            "fhir" => Ok(Self::Fhir),
            other => Err(ApiError::unprocessable(format!(
                "format: `{other}` is not one of json, fhir"
            ))),
        }
    }

    fn render(self, prediction: NotePrediction) -> Response {
        match self {
            Self::Json => Json(prediction).into_response(),
            Self::Fhir => (
                [(header::CONTENT_TYPE, "application/fhir+json")],
                Json(medcoder_coding::fhir::to_fhir_bundle(&prediction)),
            )
                .into_response(),
        }
    }
}

/// A PDF note (multipart form: the file in part `file`, an optional `id` part): its text
/// layer is coded like `/v1/code`'s text. A PDF without text (a scan) or an encrypted one is
/// refused with 422 saying so.
#[utoipa::path(post, path = "/v1/code/pdf", params(FormatQuery),
    request_body(content_type = "multipart/form-data", description = "part `file`: the PDF; part `id` (optional): the note's id"),
    responses((status = 200, body = NotePrediction),
        (status = 400, body = ErrorBody, description = "not a multipart form"),
        (status = 413, body = ErrorBody, description = "body over the size limit"),
        (status = 415, body = ErrorBody, description = "not multipart/form-data"),
        (status = 422, body = ErrorBody, description = "no `file` part, not a PDF, no text layer, encrypted, or over the length limit"),
        (status = 503, body = ErrorBody, description = "loading, or the queue is full (Retry-After)"),
        (status = 504, body = ErrorBody, description = "over the request timeout")))]
pub async fn code_pdf(
    State(state): State<Arc<AppState>>,
    Query(query): Query<FormatQuery>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let deadline = deadline(&state);
    let format = OutputFormat::parse(query.format.as_deref())?;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "expected multipart/form-data with the PDF in part `file`: {}",
                e.body_text()
            ),
        )
    })?;
    let (mut id, mut pdf) = (None, None);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?;
        match name.as_str() {
            "file" => pdf = Some(bytes),
            "id" => id = Some(String::from_utf8_lossy(&bytes).into_owned()),
            _ => {}
        }
    }
    let Some(pdf) = pdf else {
        return Err(ApiError::unprocessable(
            "file: the form has no `file` part (the PDF)",
        ));
    };
    let id = id.unwrap_or_else(|| "note".into());
    let text = tokio::task::spawn_blocking(move || medcoder_coding::pdf::pdf_text(&pdf))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "pdf_failed",
                e.to_string(),
            )
        })?
        .map_err(|e| ApiError::unprocessable(format!("file: {e}")))?;
    check_note(&state, &id, &text)?;
    let queue = state
        .queue()
        .ok_or_else(|| ApiError::not_ready("the engine"))?;
    let answer = queue.submit(id, text).map_err(submit_error)?;
    let prediction = await_prediction(&state, deadline, answer).await?;
    Ok(format.render(prediction))
}
