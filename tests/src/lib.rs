//! End-to-end tests for erel: real agents and masters as processes, real TLS on
//! loopback, real release tarballs. The tests live in `tests/e2e/` (one binary with a
//! `helper` module); `src/bin/` rebuilds `erel-boot` and `erel` under names the tests
//! can find.
