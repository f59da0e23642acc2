//! The one error family: what a peer did wrong, with the status a server
//! answers it with.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The status to answer a client with (a response's fault is reported
    /// with 502).
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        HttpError::new(400, message)
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for HttpError {}
