//! The one shape every edge answers an error with — the control API, the gateway and the peer
//! transport: an HTTP status, a stable machine-readable code and a message for humans. Each
//! layer's error type converts into it beside its own definition (`From` impls), so this module
//! depends on nothing of the crate.

use serde::{Deserialize, Serialize};

/// An error answer: HTTP status, a stable machine-readable code, and a message for humans.
/// Body: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
    pub fn invalid_body(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_body", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(500, "internal", message)
    }
    pub fn to_json(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.clone(),
                message: self.message.clone(),
            },
        };
        serde_json::to_vec(&body).expect("error bodies serialise")
    }
}
