//! End-to-end tests for erel live in `tests/`.
