//! The OpenAI-compatible side: `POST /v1/chat/completions` (plain or streamed as server-sent
//! events) and `GET /v1/models`, answered by a local model on its own thread. Requests are
//! decoded in one continuous batch: one arriving while others generate joins them at the next
//! step, and one that finishes leaves at once; a request whose client went away stops
//! generating. `response_format` JSON (an object, or one valid against a JSON schema) is
//! enforced by constrained decoding.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use medcoder_infer::{
    ContinuousBatch, FallbackToEos, FinishReason, GenerateRequest, Generation, JsonSchema,
    JsonSchemaProcessor, LogitsProcessor, SamplingParams, StopConditions, TokenTrie,
};
use medcoder_models::{ChatMessage, LoadedModel};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use utoipa::ToSchema;

use crate::batch_intake::{next_job, Intake};
use crate::config::GenerationConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::{ApiJson, AppState};

/// A message of the conversation.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionMessage {
    pub role: String,
    pub content: String,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormat {
    /// `text`; `json_object` (any JSON object) or `json_schema` (JSON valid against
    /// `json_schema.schema`), both enforced by constrained decoding.
    #[serde(rename = "type")]
    pub kind: String,
    /// With `json_schema`: the schema. Keywords outside the supported subset (types,
    /// properties, required, additionalProperties, items, minItems/maxItems, enum, const,
    /// local $ref, anyOf/oneOf of different types) are refused with 400 naming them.
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    /// Accepted; the schema is always enforced.
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatCompletionMessage>,
    #[serde(default, deserialize_with = "crate::whole_number::optional")]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "crate::whole_number::optional")]
    #[schema(minimum = 1, maximum = 1048576)]
    pub max_completion_tokens: Option<usize>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    pub stop: Option<StopField>,
    #[serde(default, deserialize_with = "crate::whole_number::optional")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub response_format: Option<ResponseFormat>,
    /// Choices per request: only 1.
    #[serde(default, deserialize_with = "crate::whole_number::optional")]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatCompletionMessage,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

struct ChatJob {
    request: GenerateRequest,
    /// Constrained decoding (JSON), if any.
    processors: Vec<Box<dyn LogitsProcessor>>,
    /// Text pieces as they become final, for a streamed request.
    stream: Option<mpsc::UnboundedSender<String>>,
    reply: oneshot::Sender<Result<Generation, String>>,
}

/// The model behind the chat endpoint and the queue to its thread.
#[derive(Debug)]
pub struct ChatService {
    pub served_name: String,
    pub created: u64,
    sender: mpsc::Sender<ChatJob>,
    config: GenerationConfig,
    template: Option<medcoder_models::ChatTemplate>,
    bos: Option<String>,
    eos: Option<String>,
    tokenizer: medcoder_models::ModelTokenizer,
    stop_token_ids: Vec<u32>,
    /// The vocabulary as bytes, for JSON constrained decoding.
    token_trie: Arc<TokenTrie>,
    pub description: String,
}

impl std::fmt::Debug for ChatJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatJob")
            .field("prompt_tokens", &self.request.prompt_ids.len())
            .finish()
    }
}

impl ChatService {
    pub fn start(
        model: LoadedModel,
        config: GenerationConfig,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, std::io::Error> {
        let served_name = config
            .served_name
            .clone()
            .unwrap_or_else(|| config.model.clone());
        let description = format!("{} ({})", config.model, model.source.display());
        let template = model.tokenizer.chat_template.clone();
        let bos = model.tokenizer.bos_token.clone();
        let eos = model.tokenizer.eos_token.clone();
        let tokenizer = model.tokenizer.clone();
        let stop_token_ids = model.stop_token_ids.clone();
        let token_trie = Arc::new(TokenTrie::new(TokenTrie::texts_of(&model.tokenizer)));
        let (sender, receiver) = mpsc::channel(capacity);
        let max_batch = config.max_batch;
        std::thread::Builder::new()
            .name("generation".into())
            .spawn(move || generation_loop(model, receiver, max_batch, metrics))?;
        Ok(Self {
            served_name,
            created: unix_now(),
            sender,
            config,
            template,
            bos,
            eos,
            tokenizer,
            stop_token_ids,
            token_trie,
            description,
        })
    }

    /// The logits processors a `response_format` asks for: none for text, a JSON grammar for
    /// `json_object` and `json_schema` (400 naming what is not supported).
    fn format_processors(
        &self,
        format: Option<&ResponseFormat>,
    ) -> Result<Vec<Box<dyn LogitsProcessor>>, ApiError> {
        let bad = |message: String| {
            ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "unsupported_response_format",
                message,
            )
        };
        let schema = match format.map(|f| f.kind.as_str()) {
            None | Some("text") => return Ok(Vec::new()),
            Some("json_object") => JsonSchema::any_object(),
            Some("json_schema") => {
                let Some(schema) = format
                    .and_then(|f| f.json_schema.as_ref())
                    .and_then(|j| j.schema.as_ref())
                else {
                    return Err(bad(
                        "response_format.json_schema.schema: missing (the JSON schema to follow)"
                            .into(),
                    ));
                };
                JsonSchema::compile(schema)
                    .map_err(|e| bad(format!("response_format.json_schema.schema: {e}")))?
            }
            Some(other) => {
                return Err(bad(format!(
                    "response_format `{other}` is not supported: text, json_object or json_schema"
                )))
            }
        };
        let eos = self.stop_token_ids.clone();
        let mut processors: Vec<Box<dyn LogitsProcessor>> = vec![Box::new(
            JsonSchemaProcessor::new(Arc::new(schema), self.token_trie.clone(), eos.clone()),
        )];
        // A vocabulary without the one token the grammar needs ends the output rather than
        // failing the request.
        if let Some(&eos_token_id) = eos.first() {
            processors.push(Box::new(FallbackToEos { eos_token_id }));
        }
        Ok(processors)
    }

    /// The request as a generation: prompt through the chat template, sampling and stops.
    fn generate_request(&self, r: &ChatCompletionRequest) -> Result<GenerateRequest, ApiError> {
        if r.model != self.served_name {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model `{}` is not served here; this server serves `{}`",
                    r.model, self.served_name
                ),
            ));
        }
        if r.n.unwrap_or(1) != 1 {
            return Err(ApiError::unprocessable("n: only 1 choice per request"));
        }
        if r.messages.is_empty() {
            return Err(ApiError::unprocessable("messages: at least one message"));
        }
        let Some(template) = &self.template else {
            return Err(ApiError::unprocessable(format!(
                "{} has no chat template (a base model): use a chat model",
                self.served_name
            )));
        };
        let max_tokens = r
            .max_completion_tokens
            .or(r.max_tokens)
            .unwrap_or(self.config.default_max_tokens);
        if max_tokens == 0 || max_tokens > self.config.max_tokens_limit {
            return Err(ApiError::unprocessable(format!(
                "max_tokens: {max_tokens} is outside 1..={}",
                self.config.max_tokens_limit
            )));
        }
        let messages: Vec<ChatMessage> = r
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, m.content.clone()))
            .collect();
        let prompt = template
            .render(&messages, true, self.bos.as_deref(), self.eos.as_deref())
            .map_err(|e| ApiError::unprocessable(format!("messages: {e}")))?;
        let prompt_ids = self
            .tokenizer
            .encode(&prompt)
            .map_err(|e| ApiError::unprocessable(format!("messages: {e}")))?;
        let mut stop = StopConditions::new(max_tokens);
        for &token in &self.stop_token_ids {
            stop = stop.with_stop_token(token);
        }
        match &r.stop {
            Some(StopField::One(s)) => stop = stop.with_stop_string(s.clone()),
            Some(StopField::Many(list)) => {
                if list.len() > 4 {
                    return Err(ApiError::unprocessable("stop: at most 4 sequences"));
                }
                for s in list {
                    stop = stop.with_stop_string(s.clone());
                }
            }
            None => {}
        }
        stop.validate()
            .map_err(|e| ApiError::unprocessable(format!("stop: {e}")))?;
        let temperature = r.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::unprocessable("temperature: must be within 0..=2"));
        }
        let mut sampling = if temperature == 0.0 {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature,
                ..SamplingParams::default()
            }
        };
        if let Some(top_p) = r.top_p {
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(ApiError::unprocessable("top_p: must be within (0, 1]"));
            }
            sampling.top_p = top_p;
        }
        sampling.seed = r.seed;
        Ok(GenerateRequest {
            prompt_ids,
            sampling,
            stop,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A request in the running batch: where its text and its answer go.
struct Active {
    stream: Option<mpsc::UnboundedSender<String>>,
    reply: oneshot::Sender<Result<Generation, String>>,
}

impl Active {
    /// Streams `text`; false once the client is gone (generation then stops).
    fn forward(&self, text: &str) -> bool {
        let streaming = text.is_empty()
            || self
                .stream
                .as_ref()
                .is_none_or(|s| s.send(text.to_string()).is_ok());
        streaming && !self.reply.is_closed()
    }

    fn answer(self, result: Result<Generation, String>, metrics: &Metrics) {
        if let Ok(generation) = &result {
            metrics
                .tokens_generated
                .fetch_add(generation.token_ids.len() as u64, Ordering::Relaxed);
        }
        let _ = self.reply.send(result);
    }
}

/// The generation thread: one continuous batch of up to `max_batch` sequences. Between two
/// decode steps, waiting requests join (prefilled a piece per step, then decoded with the
/// others); finished ones are answered and leave. It sleeps only while nothing is generating.
fn generation_loop(
    model: LoadedModel,
    mut receiver: mpsc::Receiver<ChatJob>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    let mut batch = ContinuousBatch::new(&model);
    loop {
        while batch.len() < max_batch.max(1) {
            let gone = |job: &ChatJob| job.reply.is_closed();
            let job = match next_job(&mut receiver, batch.is_empty(), &metrics.queue_depth, gone) {
                Intake::Job(job) => job,
                Intake::NoneWaiting => break,
                Intake::Closed => return,
            };
            let ChatJob {
                request,
                processors,
                stream,
                reply,
            } = job;
            let active = Active { stream, reply };
            if let Err(refused) = batch.join(request, processors, active) {
                let (active, error) = *refused;
                active.answer(Err(error.to_string()), &metrics);
            }
        }
        match batch.step(Active::forward) {
            Ok(finished) => {
                for (active, generation) in finished {
                    active.answer(generation.map_err(|e| e.to_string()), &metrics);
                }
            }
            Err(failure) => {
                for active in failure.abandoned {
                    active.answer(Err(failure.error.to_string()), &metrics);
                }
            }
        }
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "stop",
    }
}

/// OpenAI's chat completions.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, body = ChatCompletion, description = "the completion; with `stream: true`, server-sent `chat.completion.chunk` events ending in `[DONE]`"),
        (status = 400, body = crate::error::ErrorBody, description = "not JSON, or a response_format (JSON schema keyword) that is not supported"),
        (status = 404, body = crate::error::ErrorBody, description = "no generation model, or another model asked for"),
        (status = 413, body = crate::error::ErrorBody, description = "body over the size limit"),
        (status = 415, body = crate::error::ErrorBody, description = "not application/json"),
        (status = 422, body = crate::error::ErrorBody, description = "a field missing or out of range"),
        (status = 503, body = crate::error::ErrorBody, description = "loading, or the queue is full (Retry-After)"),
        (status = 504, body = crate::error::ErrorBody, description = "over the request timeout")))]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let Some(chat) = state.chat() else {
        return Err(state.chat_unavailable());
    };
    let generate = chat.generate_request(&request)?;
    let processors = chat.format_processors(request.response_format.as_ref())?;
    let prompt_tokens = generate.prompt_ids.len();
    let (reply, answer) = oneshot::channel();
    let (stream, pieces) = if request.stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    state.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    let job = ChatJob {
        request: generate,
        processors,
        stream,
        reply,
    };
    if chat.sender.try_send(job).is_err() {
        state.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::queue_full());
    }
    let id = format!("chatcmpl-{:x}", rand_id());
    let created = unix_now();
    let model = chat.served_name.clone();
    if let Some(pieces) = pieces {
        let chunk = move |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
        };
        let first = chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        );
        let text_chunk = chunk.clone();
        let body = UnboundedReceiverStream::new(pieces)
            .map(move |text| text_chunk(serde_json::json!({"content": text}), None));
        // The last chunk carries the finish reason, once the generation thread answers.
        let mut tail = Some((answer, chunk));
        let last = tokio_stream::once(())
            .then(move |()| {
                let tail = tail.take();
                async move {
                    let (answer, chunk) = tail?;
                    let finish = match answer.await {
                        Ok(Ok(generation)) => finish_reason(generation.finish_reason),
                        _ => "stop",
                    };
                    Some(chunk(serde_json::json!({}), Some(finish)))
                }
            })
            .filter_map(|last| last);
        let events = tokio_stream::once(first)
            .chain(body)
            .chain(last)
            .map(|value| Ok::<_, Infallible>(Event::default().data(value.to_string())))
            .chain(tokio_stream::once(Ok(Event::default().data("[DONE]"))));
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response());
    }
    let timeout = Duration::from_secs_f64(state.config.limits.request_timeout_s);
    let generation = match tokio::time::timeout(timeout, answer).await {
        Err(_) => return Err(ApiError::timeout(state.config.limits.request_timeout_s)),
        Ok(Err(_)) => return Err(ApiError::not_ready("the generation engine")),
        Ok(Ok(Err(error))) => {
            return Err(ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "generation_failed",
                error,
            ))
        }
        Ok(Ok(Ok(generation))) => generation,
    };
    let completion_tokens = generation.token_ids.len();
    Ok(axum::Json(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatCompletionMessage {
                role: "assistant".into(),
                content: generation.text,
            },
            finish_reason: finish_reason(generation.finish_reason),
        }],
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        },
    })
    .into_response())
}

/// The models this server generates with (OpenAI's model list).
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn list_models(State(state): State<Arc<AppState>>) -> axum::Json<ModelList> {
    let data = state
        .chat()
        .map(|chat| ModelCard {
            id: chat.served_name.clone(),
            object: "model",
            created: chat.created,
            owned_by: "medcoder",
        })
        .into_iter()
        .collect();
    axum::Json(ModelList {
        object: "list",
        data,
    })
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(unix_now());
    hasher.finish()
}
