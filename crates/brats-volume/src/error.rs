//! One error type for the core library, classified so services can map it to a gRPC status.

/// What kind of failure an error is, which decides the status a service answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (maps to INVALID_ARGUMENT); retrying will not help.
    InvalidInput,
    /// An object, file or key does not exist (NOT_FOUND).
    NotFound,
    /// What the caller wants to create exists already (ALREADY_EXISTS); retrying will not help.
    AlreadyExists,
    /// A store or upstream could not be reached (UNAVAILABLE); retrying may help.
    Unavailable,
    /// A failure inside this process (INTERNAL).
    Internal,
}

/// An error from the core library; its message names the file or field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Input data or a request field is invalid.
    #[error("{0}")]
    Invalid(String),
    /// An object or file is missing.
    #[error("{0}")]
    NotFound(String),
    /// A store could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// An object that must be new exists already (see `Stores::put_new`).
    #[error("{0}")]
    AlreadyExists(String),
    /// Anything else: I/O on local scratch space, serialization bugs.
    #[error("{0}")]
    Internal(String),
}

impl CoreError {
    /// Classifies the error for status mapping.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Invalid(_) => ErrorKind::InvalidInput,
            CoreError::NotFound(_) => ErrorKind::NotFound,
            CoreError::Unavailable(_) => ErrorKind::Unavailable,
            CoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            CoreError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for an invalid-input error.
    pub fn invalid(msg: impl Into<String>) -> Self {
        CoreError::Invalid(msg.into())
    }
}

/// Result alias used across the crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
