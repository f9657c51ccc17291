//! What wraps every request: a request id, one log line (id, route, status, sizes, timing —
//! never the body: notes are PHI), the metrics, and API keys with per-key rate limits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::hash_api_key;
use crate::error::ApiError;
use crate::AppState;

pub const REQUEST_ID: &str = "x-request-id";

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Request id, log line and metrics for every request.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| {
            format!(
                "{:x}-{:x}",
                state.started_unix,
                NEXT_REQUEST.fetch_add(1, Ordering::Relaxed)
            )
        });
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let request_bytes = content_length(request.headers());
    let mut response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    state.metrics.record_request(&route, status, seconds);
    tracing::info!(
        request_id = %id,
        %method,
        route = %route,
        status,
        request_bytes,
        response_bytes = content_length(response.headers()),
        ms = seconds * 1e3,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

fn content_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Token buckets: `per_minute` requests a minute per caller, in bursts of up to `per_minute`.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` to go on, or the seconds until the caller's next request is allowed.
    pub fn check(&self, caller: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let (tokens, last) = buckets.entry(caller.to_string()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * per_second).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / per_second).ceil().max(1.0) as u64)
        }
    }
}

/// With keys configured, a valid `Authorization: Bearer KEY` is required (401 otherwise);
/// then the caller's rate limit (429 with Retry-After). `/health` and `/ready` stay open.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/health" || path == "/ready" {
        return next.run(request).await;
    }
    let keys = &state.config.auth.api_key_sha256;
    let caller = if keys.is_empty() {
        request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "anonymous".into())
    } else {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(hash_api_key);
        match presented {
            Some(hash) if keys.iter().any(|k| constant_time_eq(k, &hash)) => hash,
            Some(_) => {
                return unauthorized("the API key is not valid");
            }
            None => {
                return unauthorized("an API key is required: Authorization: Bearer KEY");
            }
        }
    };
    if let Err(seconds) = state.rate_limiter.check(&caller) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "over the rate limit of {} requests a minute",
                state.config.auth.rate_limit_per_minute
            ),
        )
        .retry_after(seconds)
        .into_response();
    }
    next.run(request).await
}

fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Equal hex digests, compared without an early exit.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_says_when_to_retry() {
        let limiter = RateLimiter::new(3);
        for _ in 0..3 {
            limiter.check("k").expect("within the burst");
        }
        let wait = limiter.check("k").expect_err("over the limit");
        assert!((1..=20).contains(&wait), "{wait}");
        limiter.check("other").expect("callers are separate");
        RateLimiter::new(0).check("k").expect("0 = unlimited");
    }

    #[test]
    fn digests_compare_case_insensitively() {
        assert!(constant_time_eq("abcd", "ABCD"));
        assert!(!constant_time_eq("abcd", "abce"));
        assert!(!constant_time_eq("abcd", "abc"));
    }
}
