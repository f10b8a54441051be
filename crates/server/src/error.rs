//! Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with
//! the status code OpenAI's clients expect for each kind.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, as a dotted path (`messages.0.content`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A request the server understood but cannot accept (400).
    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// An invalid value of one field (400, `param` set).
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        Self::invalid(message)
            .with_param(param)
            .with_code("invalid_value")
    }

    /// A body that is not JSON at all (400).
    pub fn malformed_json(detail: impl std::fmt::Display) -> ApiError {
        Self::invalid(format!(
            "We could not parse the JSON body of your request ({detail}). \
             The body must be a JSON object."
        ))
        .with_code("invalid_json")
    }

    pub fn model_not_found(model: &str, served: &str) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model '{model}' does not exist; this server serves '{served}'."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    pub fn context_length(param: &str, message: impl Into<String>) -> ApiError {
        Self::invalid(message)
            .with_param(param)
            .with_code("context_length_exceeded")
    }

    pub fn unauthorized() -> ApiError {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
        )
        .with_code("invalid_api_key")
    }

    pub fn not_found(path: &str) -> ApiError {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown URL {path}: this server has POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST/GET /v1/contexts, GET/DELETE /v1/contexts/ID, GET /health and GET /metrics."),
        )
        .with_code("unknown_url")
    }

    pub fn method_not_allowed() -> ApiError {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "This URL does not accept that HTTP method.",
        )
        .with_code("method_not_allowed")
    }

    pub fn too_large(limit: usize) -> ApiError {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than this server's limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// The queue of waiting requests is full (503 with `Retry-After`).
    pub fn overloaded(queue: usize, retry_after: u64) -> ApiError {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "The server is at capacity: {queue} requests are already waiting for KV memory. \
                 Retry after {retry_after} s."
            ),
        )
        .with_code("server_overloaded");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn shutting_down() -> ApiError {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server is shutting down and takes no new requests.",
        )
        .with_code("shutting_down");
        e.retry_after = Some(5);
        e
    }

    pub fn timeout(secs: f64) -> ApiError {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!("The request did not finish within the server's limit of {secs:.0} s."),
        )
        .with_code("timeout")
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body, also sent as a server-sent event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
