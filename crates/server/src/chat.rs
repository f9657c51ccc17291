//! The OpenAI-compatible side: `POST /v1/chat/completions` (plain or streamed as server-sent
//! events) and `GET /v1/models`, answered by a local model on its own thread. Requests waiting
//! together are generated as one batch; a streamed request runs alone so its tokens flow as they
//! come; a request whose client went away stops generating.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use medcoder_infer::{FinishReason, GenerateRequest, Generation, SamplingParams, StopConditions};
use medcoder_models::{ChatMessage, LoadedModel};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use utoipa::ToSchema;

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
    /// `text` (the only one this server generates); `json_object` and `json_schema` are
    /// refused with 400 so that clients fall back to text.
    #[serde(rename = "type")]
    pub kind: String,
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
            description,
        })
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
        if let Some(format) = &r.response_format {
            if format.kind != "text" {
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "unsupported_response_format",
                    format!(
                        "response_format `{}` is not supported by this server: ask for text",
                        format.kind
                    ),
                ));
            }
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

/// The generation thread: waits for a request, takes every other waiting non-streamed one (up
/// to `max_batch`) and generates them together.
fn generation_loop(
    model: LoadedModel,
    mut receiver: mpsc::Receiver<ChatJob>,
    max_batch: usize,
    metrics: Arc<Metrics>,
) {
    let mut pending: VecDeque<ChatJob> = VecDeque::new();
    loop {
        let Some(first) = pending.pop_front().or_else(|| receiver.blocking_recv()) else {
            break;
        };
        let mut batch = vec![first];
        if batch[0].stream.is_none() {
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(job) if job.stream.is_some() => pending.push_back(job),
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        metrics
            .queue_depth
            .fetch_sub(batch.len() as i64, Ordering::Relaxed);
        batch.retain(|job| !job.reply.is_closed());
        if batch.len() > 1 {
            let requests = batch.iter().map(|j| j.request.clone()).collect();
            match medcoder_infer::generate_batch(&model, requests) {
                Ok(generations) => {
                    for (job, generation) in batch.into_iter().zip(generations) {
                        metrics
                            .tokens_generated
                            .fetch_add(generation.token_ids.len() as u64, Ordering::Relaxed);
                        let _ = job.reply.send(Ok(generation));
                    }
                }
                Err(error) => {
                    for job in batch {
                        let _ = job.reply.send(Err(error.to_string()));
                    }
                }
            }
        } else if let Some(job) = batch.pop() {
            let ChatJob {
                request,
                stream,
                reply,
            } = job;
            let result = medcoder_infer::generate(&model, request, Vec::new(), |text| {
                // Stop as soon as the client is gone.
                let streaming = stream
                    .as_ref()
                    .is_none_or(|s| s.send(text.to_string()).is_ok());
                streaming && !reply.is_closed()
            });
            if let Ok(generation) = &result {
                metrics
                    .tokens_generated
                    .fetch_add(generation.token_ids.len() as u64, Ordering::Relaxed);
            }
            let _ = reply.send(result.map_err(|e| e.to_string()));
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
        (status = 400, body = crate::error::ErrorBody, description = "not JSON, or a response_format other than text"),
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
