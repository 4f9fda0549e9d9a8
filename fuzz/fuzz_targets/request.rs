//! Every request's decoding and execution against a temporary root.
//!
//! The input is what a master sends after its `Hello` (which the target sends first):
//! frames, and the raw bytes of `WriteFile` transfers, in any order. The agent serves it
//! as one session on a fresh root: `Ping`, `WriteFile` with the input's bytes (offer,
//! begin, raw bytes, commit), `Unpack` of whatever the input wrote (archives included),
//! `Start` and `Stop` of releases, and every refusal on the way (bad frames, bad paths,
//! modes, sizes, digests, names, a second `Hello`).
//!
//! `Start` runs nothing: the root is on a `noexec` file system (see the crate's
//! documentation), so a start reaches the agent's spawn and is refused by the kernel;
//! what is covered is everything up to and around `execve` (names, versions, argv, user,
//! environment, records, the refusal's answer), not a running release.
//!
//! Checked, besides "nothing panics": every frame the agent sends is a whole `Response`,
//! the first is its `Hello`, none is an `Internal` error, nothing is written beside the
//! root, and no unpack staging is left.
#![no_main]

use erel_fuzz::Fresh;
use erel_proto::{ErrorKind, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fresh = Fresh::new();
    let answers = fresh.serve(data);
    assert!(
        matches!(answers.first(), Some(Response::Hello(_))),
        "the agent's first answer is not its Hello: {answers:?}"
    );
    for answer in &answers {
        if let Response::Error(error) = answer {
            assert_ne!(
                error.kind,
                ErrorKind::Internal,
                "internal error: {}",
                error.message
            );
        }
    }
});
