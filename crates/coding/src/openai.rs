//! The `openai` engine: any OpenAI-compatible chat endpoint (LiteLLM, vLLM, Ollama, a hosted
//! API) asked for the note's codes as JSON (`response_format: json_schema`), or as plain text
//! where the server does not take a schema. Its answer is read by [`crate::model_answer`] and
//! every code is checked against the allowed code set: what is not in it is dropped and said
//! in the prediction's warnings. Quoted evidence is located in the note.
//!
//! The API key is read from an environment variable whose name is configured; the key itself
//! is never stored in the config, printed or logged, and neither is the note or the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medcoder_icd::IcdKnowledge;
use medcoder_train::PromptTemplate;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::assertion::assertion_in_note;
use crate::model_answer::{parse_answer, AllowedSet, AnswerItem};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, EvidenceSpan, NotePrediction};
use crate::text::find_quote;
use crate::CodingError;

/// Where the endpoint is and how to talk to it (`openai:` in `serve.yaml`, `--openai-*` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenaiConfig {
    /// e.g. `http://localhost:4000/v1`; `$OPENAI_BASE_URL` when not given.
    pub base_url: Option<String>,
    /// The model name the endpoint knows.
    pub model: Option<String>,
    /// The environment variable holding the API key (none sent when it is unset).
    pub api_key_env: String,
    /// Seconds one request may take, answer included.
    pub timeout_s: f64,
    /// Retries after a connection error, 429 or 5xx.
    pub retries: u32,
    /// The first retry's wait; each next one doubles it (a 429's Retry-After wins).
    pub backoff_ms: u64,
    /// Sampling temperature; `None` leaves it to the server (some models take no other).
    pub temperature: Option<f32>,
    /// Answer tokens at most; `None` leaves it to the server.
    pub max_tokens: Option<u32>,
}

impl Default for OpenaiConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            model: None,
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 120.0,
            retries: 3,
            backoff_ms: 500,
            temperature: Some(0.0),
            max_tokens: None,
        }
    }
}

/// The environment variable a missing base URL is read from.
pub const BASE_URL_ENV: &str = "OPENAI_BASE_URL";

/// The longest wait between two attempts, whatever Retry-After asks.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// What the model is told besides the note: the task and the answer's form.
const INSTRUCTIONS: &str = "You are an experienced clinical coder. Assign ICD-10 codes to the \
clinical note the user sends: diagnosis codes (ICD-10-CM, written with their dot, e.g. E11.9) \
and procedure codes (ICD-10-PCS, seven characters, e.g. 0SR9019), only for what the note \
documents. For each code, quote the words of the note that support it, copied exactly. \
Answer with JSON only, in this form: {\"diagnoses\": [{\"code\": \"E11.9\", \"evidence\": \
\"quoted words\"}], \"procedures\": [{\"code\": \"0SR9019\", \"evidence\": \"quoted words\"}]}. \
Use empty lists when nothing applies.";

/// What one request came to.
enum Outcome {
    /// The answer's text.
    Content(String),
    /// Worth another attempt (after `wait` when the server said how long).
    Retry {
        why: String,
        wait: Option<Duration>,
    },
    /// A 400 naming `response_format`: the server takes no JSON schema.
    RejectsSchema,
    Fail(String),
}

pub struct OpenaiEngine {
    agent: ureq::Agent,
    /// `…/chat/completions`.
    url: String,
    model: String,
    api_key: Option<String>,
    api_key_env: String,
    config: OpenaiConfig,
    template: PromptTemplate,
    allowed: AllowedSet,
    kb: Option<Arc<IcdKnowledge>>,
    /// Whether `response_format` is still sent: cleared the first time the server refuses it.
    structured: AtomicBool,
    name: String,
}

impl std::fmt::Debug for OpenaiEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenaiEngine")
            .field("url", &display_url(&self.url))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "(set)"))
            .field("allowed", &self.allowed.len())
            .finish_non_exhaustive()
    }
}

impl OpenaiEngine {
    pub fn new(
        config: &OpenaiConfig,
        template: PromptTemplate,
        allowed: AllowedSet,
        kb: Option<Arc<IcdKnowledge>>,
    ) -> Result<Self, CodingError> {
        let base_url = config
            .base_url
            .clone()
            .or_else(|| std::env::var(BASE_URL_ENV).ok())
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| {
                CodingError::Invalid(format!(
                    "the openai engine needs the endpoint's base URL: --openai-base-url or \
                     ${BASE_URL_ENV} (e.g. http://localhost:4000/v1)"
                ))
            })?;
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(CodingError::Invalid(format!(
                "openai base URL `{}`: give an http:// or https:// URL (e.g. http://localhost:4000/v1)",
                display_url(&base_url)
            )));
        }
        let model = config.model.clone().ok_or_else(|| {
            CodingError::Invalid(
                "the openai engine needs the model's name at the endpoint: --openai-model".into(),
            )
        })?;
        if allowed.is_empty() {
            return Err(CodingError::Invalid(
                "the openai engine needs a non-empty set of allowed codes".into(),
            ));
        }
        if !(config.timeout_s.is_finite() && config.timeout_s > 0.0) {
            return Err(CodingError::Invalid(format!(
                "openai timeout {}: give seconds above 0",
                config.timeout_s
            )));
        }
        let api_key = std::env::var(&config.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        tracing::debug!(
            api_key_env = %config.api_key_env,
            api_key_set = api_key.is_some(),
            "openai engine"
        );
        let timeout = Duration::from_secs_f64(config.timeout_s);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .user_agent(concat!("medcoder/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let name = format!(
            "openai {model} at {}, answers checked against the {} codes of {}",
            display_url(base_url.trim_end_matches('/')),
            allowed.len(),
            allowed.source
        );
        Ok(Self {
            agent,
            url,
            model,
            api_key,
            api_key_env: config.api_key_env.clone(),
            config: config.clone(),
            template,
            allowed,
            kb,
            structured: AtomicBool::new(true),
            name,
        })
    }

    /// What the engine is: model, endpoint and the allowed code set.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn predict(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
    ) -> Result<NotePrediction, CodingError> {
        let started = Instant::now();
        let content = self.chat(id, text)?;
        let mut prediction = NotePrediction {
            id: id.to_string(),
            diagnoses: Vec::new(),
            procedures: Vec::new(),
            warnings: Vec::new(),
            engine: "openai".into(),
            model: self.name.clone(),
            elapsed_ms: 0.0,
            code_sets: None,
        };
        for item in parse_answer(&content) {
            self.add(&mut prediction, item, text, describe);
        }
        prediction.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(prediction)
    }

    /// One code of the answer into the prediction: validated, described, with its evidence
    /// located in the note; a code outside the allowed set becomes a warning.
    fn add(
        &self,
        prediction: &mut NotePrediction,
        item: AnswerItem,
        note: &str,
        describe: &CodeDescriber<'_>,
    ) {
        let Some((code, kind)) = self.allowed.resolve(&item.code) else {
            let warning = self.dropped(&item.code);
            if !prediction.warnings.contains(&warning) {
                prediction.warnings.push(warning);
            }
            return;
        };
        let evidence: Vec<EvidenceSpan> = item
            .evidence
            .iter()
            .filter_map(|quote| find_quote(note, quote))
            .map(|span| EvidenceSpan {
                start: span.start,
                end: span.end,
                text: span.text,
            })
            .collect();
        let list = match kind {
            CodeKind::Diagnosis => &mut prediction.diagnoses,
            CodeKind::Procedure => &mut prediction.procedures,
        };
        if let Some(existing) = list.iter_mut().find(|c| c.code == code) {
            for span in evidence {
                if !existing.evidence.contains(&span) {
                    existing.evidence.push(span);
                }
            }
            return;
        }
        let described = describe(code, kind);
        list.push(CodedItem {
            code: code.to_string(),
            rank: list.len() + 1,
            confidence: 1.0,
            assigned: true,
            description: described.as_ref().map(|(d, _)| d.clone()),
            billable: described.map(|(_, b)| b),
            assertion: evidence.first().map(|e| assertion_in_note(note, e.start)),
            evidence,
        });
    }

    /// Why a code of the answer was dropped: the code sets' reason where they have one.
    fn dropped(&self, written: &str) -> String {
        let why = match self.kb.as_deref().map(|kb| kb.validate(written)) {
            Some(Err(error)) => error.to_string(),
            _ => format!(
                "not among the {} allowed codes of {}",
                self.allowed.len(),
                self.allowed.source
            ),
        };
        format!("dropped `{written}` from the model's answer: {why}")
    }

    /// The model's answer for a note: retried on connection errors, 429 and 5xx; asked again
    /// without a JSON schema where the server refuses one.
    fn chat(&self, id: &str, note: &str) -> Result<String, CodingError> {
        let system = match &self.template.system {
            Some(system) => format!("{system}\n\n{INSTRUCTIONS}"),
            None => INSTRUCTIONS.to_string(),
        };
        let messages = json!([
            {"role": "system", "content": system},
            {"role": "user", "content": self.template.user_text(note)},
        ]);
        let mut retries = 0;
        loop {
            let structured = self.structured.load(Ordering::Relaxed);
            match self.post(&self.request_body(&messages, structured), structured) {
                Outcome::Content(content) => return Ok(content),
                Outcome::RejectsSchema => {
                    tracing::warn!(url = %display_url(&self.url), "the endpoint takes no response_format: asking for plain text");
                    self.structured.store(false, Ordering::Relaxed);
                }
                Outcome::Retry { why, wait } => {
                    if retries >= self.config.retries {
                        let attempts = retries + 1;
                        let plural = if attempts == 1 { "" } else { "s" };
                        return Err(self
                            .error(&format!("{why} (gave up after {attempts} attempt{plural})")));
                    }
                    let backoff = Duration::from_millis(self.config.backoff_ms)
                        .saturating_mul(1 << retries.min(16));
                    let wait = wait.unwrap_or(backoff).min(MAX_WAIT);
                    tracing::warn!(note = id, retry = retries + 1, wait_ms = wait.as_millis() as u64, %why, "openai endpoint: retrying");
                    std::thread::sleep(wait);
                    retries += 1;
                }
                Outcome::Fail(why) => return Err(self.error(&why)),
            }
        }
    }

    fn request_body(&self, messages: &Value, structured: bool) -> Value {
        let mut body = json!({"model": self.model, "messages": messages});
        if let Some(t) = self.config.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.config.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if structured {
            body["response_format"] = answer_schema();
        }
        body
    }

    /// One request; `structured`: it carries `response_format`.
    fn post(&self, body: &Value, structured: bool) -> Outcome {
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = match request.send(body.to_string()) {
            Ok(response) => response,
            Err(error) => return transport_outcome(&error, self.config.timeout_s),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = match response
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
        {
            Ok(text) => text,
            Err(error) => {
                return Outcome::Retry {
                    why: format!("reading the response: {error}"),
                    wait: None,
                }
            }
        };
        match status {
            200..=299 => content_of(&text),
            429 => Outcome::Retry {
                why: format!("HTTP 429 (rate limited): {}", server_message(&text)),
                wait: retry_after,
            },
            500..=599 => Outcome::Retry {
                why: format!("HTTP {status}: {}", server_message(&text)),
                wait: retry_after,
            },
            400 if structured
                && (text.contains("response_format") || text.contains("json_schema")) =>
            {
                Outcome::RejectsSchema
            }
            _ => {
                let hint = match status {
                    401 | 403 => format!(
                        " (check the API key in ${}{})",
                        self.api_key_env,
                        if self.api_key.is_some() {
                            ""
                        } else {
                            ", which is unset"
                        }
                    ),
                    404 => " (check the base URL, which usually ends in /v1, and the model name)"
                        .to_string(),
                    _ => String::new(),
                };
                Outcome::Fail(format!("HTTP {status}: {}{hint}", server_message(&text)))
            }
        }
    }

    fn error(&self, why: &str) -> CodingError {
        CodingError::Endpoint {
            url: display_url(&self.url),
            why: why.to_string(),
        }
    }
}

/// `response_format` asking for `{"diagnoses": [{code, evidence}], "procedures": [...]}`.
fn answer_schema() -> Value {
    let items = json!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "evidence": {"type": "string"}},
            "required": ["code", "evidence"],
            "additionalProperties": false,
        },
    });
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "icd10_codes",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {"diagnoses": items, "procedures": items},
                "required": ["diagnoses", "procedures"],
                "additionalProperties": false,
            },
        },
    })
}

/// A request that got no HTTP answer: connection problems are retried, other timeouts not
/// (the model is slow, and asking again costs as much).
fn transport_outcome(error: &ureq::Error, timeout_s: f64) -> Outcome {
    match error {
        ureq::Error::Timeout(ureq::Timeout::Connect | ureq::Timeout::Resolve)
        | ureq::Error::Io(_)
        | ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound => Outcome::Retry {
            why: format!("cannot connect: {error}"),
            wait: None,
        },
        ureq::Error::Timeout(_) => Outcome::Fail(format!("no answer within {timeout_s} s")),
        other => Outcome::Fail(other.to_string()),
    }
}

/// The answer's text from a chat completion: `choices[0].message.content` (a string, or a
/// list of text parts).
fn content_of(body: &str) -> Outcome {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return Outcome::Fail(format!(
            "the response is not JSON ({} bytes, starting `{}`)",
            body.len(),
            snippet(body)
        ));
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        return Outcome::Fail(format!(
            "the endpoint answered an error: {}",
            message_of(error)
        ));
    }
    let message = &value["choices"][0]["message"];
    match &message["content"] {
        Value::String(text) => Outcome::Content(text.clone()),
        Value::Array(parts) => Outcome::Content(
            parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => match message["refusal"].as_str() {
            Some(refusal) => Outcome::Fail(format!("the model refused: {}", snippet(refusal))),
            None => Outcome::Fail(
                "the response is not a chat completion (no choices[0].message.content)".into(),
            ),
        },
    }
}

/// The server's own words for an error: `error.message` of a JSON body, else its start.
fn server_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(value) if value.get("error").is_some() => message_of(&value["error"]),
        Ok(value) if value.get("detail").is_some() => message_of(&value["detail"]),
        _ if body.trim().is_empty() => "(empty body)".into(),
        _ => snippet(body),
    }
}

fn message_of(error: &Value) -> String {
    match error {
        Value::String(s) => snippet(s),
        other => match other.get("message").and_then(Value::as_str) {
            Some(message) => snippet(message),
            None => snippet(&other.to_string()),
        },
    }
}

/// The start of a text, on one line, for an error message.
fn snippet(text: &str) -> String {
    const CHARS: usize = 200;
    let mut out: String = text
        .chars()
        .take(CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > CHARS {
        out.push('…');
    }
    out.trim().to_string()
}

/// A URL without the user and password it may carry.
fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
#[path = "../tests/support/openai_stub.rs"]
mod openai_stub;

#[cfg(test)]
mod tests {
    use super::openai_stub::{chat_completion, Reply, StubServer};
    use super::*;

    fn engine(base_url: &str, retries: u32) -> OpenaiEngine {
        let allowed = AllowedSet::new(
            &[
                ("E11.9".into(), CodeKind::Diagnosis),
                ("I10".into(), CodeKind::Diagnosis),
                ("J18.9".into(), CodeKind::Diagnosis),
                ("0SR9019".into(), CodeKind::Procedure),
            ],
            "test codes".into(),
        );
        let config = OpenaiConfig {
            base_url: Some(base_url.into()),
            model: Some("stub-model".into()),
            api_key_env: "MEDCODER_TEST_UNSET_KEY".into(),
            timeout_s: 10.0,
            retries,
            backoff_ms: 1,
            ..OpenaiConfig::default()
        };
        OpenaiEngine::new(&config, PromptTemplate::default(), allowed, None).unwrap()
    }

    const NOTE: &str =
        "Known type 2 diabetes mellitus. Denies high blood pressure.\nRight hip replaced.";

    fn predict(engine: &OpenaiEngine) -> Result<NotePrediction, CodingError> {
        engine.predict("n1", NOTE, &|_, _| None)
    }

    fn codes(items: &[CodedItem]) -> Vec<&str> {
        items.iter().map(|c| c.code.as_str()).collect()
    }

    #[test]
    fn a_json_schema_answer_gives_validated_codes_with_located_evidence() {
        let answer = r#"{"diagnoses":[{"code":"E11.9","evidence":"TYPE 2 diabetes mellitus"},{"code":"I10","evidence":"high blood pressure"},{"code":"E11.9","evidence":"not in the note"}],"procedures":[{"code":"0SR9019","evidence":"Right hip replaced"}]}"#;
        let stub = StubServer::start(move |_, _| Reply::ok(chat_completion(answer)));
        let p = predict(&engine(&stub.base_url(), 0)).unwrap();
        assert_eq!(codes(&p.diagnoses), ["E11.9", "I10"]);
        assert_eq!(codes(&p.procedures), ["0SR9019"]);
        let e = &p.diagnoses[0].evidence;
        assert_eq!(e.len(), 1, "the quote not in the note is ignored");
        assert_eq!(e[0].text, "type 2 diabetes mellitus");
        let chars: Vec<char> = NOTE.chars().collect();
        assert_eq!(
            chars[e[0].start..e[0].end].iter().collect::<String>(),
            e[0].text
        );
        assert_eq!(
            p.diagnoses[1].assertion,
            Some(crate::assertion::Assertion::Negated)
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.engine, "openai");
        // The request: the model, the schema, the note as the user's turn.
        let request: Value = serde_json::from_str(&stub.requests()[0]).unwrap();
        assert_eq!(request["model"], "stub-model");
        assert_eq!(request["response_format"]["type"], "json_schema");
        assert_eq!(request["messages"][0]["role"], "system");
        assert!(request["messages"][1]["content"]
            .as_str()
            .unwrap()
            .ends_with(NOTE));
    }

    #[test]
    fn a_messy_plain_text_answer_is_parsed_and_invalid_codes_are_warned_about() {
        let answer = "Let me think about this note step by step. The diabetes is type 2.\n\n\
                      Final answer:\n\
                      1. e119 - Type 2 diabetes mellitus (\"type 2 diabetes\")\n\
                      2. **E11.99** - made up\n\
                      3. I10: hypertension\n\
                      - 0sr9019 Replacement of right hip";
        let stub = StubServer::start(move |_, _| Reply::ok(chat_completion(answer)));
        let p = predict(&engine(&stub.base_url(), 0)).unwrap();
        assert_eq!(codes(&p.diagnoses), ["E11.9", "I10"]);
        assert_eq!(codes(&p.procedures), ["0SR9019"]);
        assert_eq!(p.diagnoses[0].evidence[0].text, "type 2 diabetes");
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("E11.99") && p.warnings[0].contains("test codes"));
    }

    #[test]
    fn a_429_is_retried_after_the_time_it_asks() {
        let stub = StubServer::start(|n, _| match n {
            0 => Reply::new(429, r#"{"error":{"message":"slow down"}}"#).header("Retry-After", "0"),
            _ => Reply::ok(chat_completion(
                r#"{"diagnoses":[{"code":"J18.9","evidence":""}],"procedures":[]}"#,
            )),
        });
        let p = predict(&engine(&stub.base_url(), 2)).unwrap();
        assert_eq!(codes(&p.diagnoses), ["J18.9"]);
        assert_eq!(stub.requests().len(), 2);
    }

    #[test]
    fn a_server_error_that_persists_fails_after_the_retries_naming_the_url() {
        let stub = StubServer::start(|_, _| Reply::new(500, "upstream exploded"));
        let error = predict(&engine(&stub.base_url(), 2))
            .unwrap_err()
            .to_string();
        assert_eq!(stub.requests().len(), 3);
        assert!(error.contains(&stub.base_url()), "{error}");
        assert!(error.contains("HTTP 500: upstream exploded"), "{error}");
        assert!(error.contains("after 3 attempts"), "{error}");
    }

    #[test]
    fn a_server_without_json_schema_is_asked_for_plain_text() {
        let stub = StubServer::start(|n, _| match n {
            0 => Reply::new(
                400,
                r#"{"error":{"message":"response_format of type json_schema is not supported"}}"#,
            ),
            _ => Reply::ok(chat_completion("I10")),
        });
        let engine = engine(&stub.base_url(), 0);
        assert_eq!(codes(&predict(&engine).unwrap().diagnoses), ["I10"]);
        assert_eq!(codes(&predict(&engine).unwrap().diagnoses), ["I10"]);
        let requests: Vec<Value> = stub
            .requests()
            .iter()
            .map(|r| serde_json::from_str(r).unwrap())
            .collect();
        assert_eq!(
            requests.len(),
            3,
            "one refusal, then plain text for both notes"
        );
        assert!(requests[0].get("response_format").is_some());
        assert!(requests[1].get("response_format").is_none());
        assert!(requests[2].get("response_format").is_none());
    }

    #[test]
    fn other_client_errors_and_garbage_fail_at_once_and_say_why() {
        let stub = StubServer::start(|_, _| Reply::new(401, r#"{"error":{"message":"bad key"}}"#));
        let error = predict(&engine(&stub.base_url(), 3))
            .unwrap_err()
            .to_string();
        assert_eq!(stub.requests().len(), 1, "a 401 is not retried");
        assert!(
            error.contains("HTTP 401: bad key") && error.contains("$MEDCODER_TEST_UNSET_KEY"),
            "{error}"
        );
        let stub = StubServer::start(|_, _| Reply::ok("<html>proxy login</html>".into()));
        let error = predict(&engine(&stub.base_url(), 3))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not JSON") && error.contains("<html>"),
            "{error}"
        );
    }

    #[test]
    fn an_endpoint_that_is_down_is_named() {
        let url = openai_stub::closed_port_url();
        let error = predict(&engine(&url, 1)).unwrap_err().to_string();
        assert!(
            error.contains(&url) && error.contains("cannot connect"),
            "{error}"
        );
        assert!(error.contains("after 2 attempts"), "{error}");
    }

    #[test]
    fn the_api_key_and_url_credentials_are_not_shown() {
        assert_eq!(
            display_url("https://u:secret@host:1/v1"),
            "https://***@host:1/v1"
        );
        assert_eq!(display_url("http://host/v1/x@y"), "http://host/v1/x@y");
        std::env::set_var("MEDCODER_TEST_OPENAI_KEY", "sk-secret");
        let config = OpenaiConfig {
            base_url: Some("http://127.0.0.1:9/v1".into()),
            model: Some("m".into()),
            api_key_env: "MEDCODER_TEST_OPENAI_KEY".into(),
            ..OpenaiConfig::default()
        };
        let allowed = AllowedSet::new(&[("I10".into(), CodeKind::Diagnosis)], "t".into());
        let engine = OpenaiEngine::new(&config, PromptTemplate::default(), allowed, None).unwrap();
        assert!(!format!("{engine:?}").contains("sk-secret"));
        assert!(!serde_json::to_string(&config)
            .unwrap()
            .contains("sk-secret"));
    }
}
