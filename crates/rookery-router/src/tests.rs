//! Router scenarios.
