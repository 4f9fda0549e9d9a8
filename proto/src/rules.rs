//! What both sides must agree on beyond the bytes of a frame: which release names the
//! agent accepts, where a release version lives under the agent's root, what a `Start`
//! without an argv runs, which file modes a `WriteFile` may ask for, how long a `Stop`
//! may wait, and what each message (and each request's answer) is called in logs and
//! errors.

use std::fmt;
use std::time::Duration;

use crate::messages::{Request, Response};

/// Longest release name or version, in bytes.
pub const MAX_RELEASE_NAME_LEN: usize = 128;

/// Why a release name or version is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameFault {
    /// Longer than [`MAX_RELEASE_NAME_LEN`] bytes; holds the length.
    TooLong(usize),
    /// Empty, starting with `.`, or holding a byte other than letters, digits, `.`,
    /// `_`, `-` and `+`.
    Characters,
}

impl fmt::Display for NameFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameFault::TooLong(len) => write!(
                f,
                "{len} bytes long, above the limit of {MAX_RELEASE_NAME_LEN} bytes"
            ),
            NameFault::Characters => {
                f.write_str("use letters, digits, '.', '_', '-', '+'; no leading '.'")
            }
        }
    }
}

/// The rule for release names and versions: one path component of letters, digits,
/// `.`, `_`, `-` and `+`, not starting with `.`, at most [`MAX_RELEASE_NAME_LEN`] bytes.
pub fn check_release_name(name: &str) -> Result<(), NameFault> {
    if name.len() > MAX_RELEASE_NAME_LEN {
        return Err(NameFault::TooLong(name.len()));
    }
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'));
    ok.then_some(()).ok_or(NameFault::Characters)
}

/// The directory under the agent's root that holds the versions of all releases.
pub const RELEASES_DIR: &str = "releases";

/// Where a release version is unpacked, relative to the agent's root:
/// `releases/<name>/<version>`. Start runs it from there.
pub fn version_dir(name: &str, version: &str) -> String {
    format!("{RELEASES_DIR}/{name}/{version}")
}

/// What the agent runs when a `Start` names no argv: `bin/<name> foreground`, as a
/// release built by rebar3 or mix starts.
pub fn default_argv(name: &str) -> Vec<String> {
    vec![format!("bin/{name}"), "foreground".to_string()]
}

/// The longest grace between SIGTERM and SIGKILL the agent grants a `Stop`; a longer
/// one is cut to this.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(600);

/// Why a file mode is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeFault {
    /// It has the setuid, setgid or sticky bit.
    SpecialBits,
    /// It has bits above those (beyond `0o7777`), so it is no permission mode at all.
    NotPermission,
}

impl fmt::Display for ModeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModeFault::SpecialBits => "setuid, setgid and sticky bits are refused",
            ModeFault::NotPermission => "not a permission mode (at most 0o777)",
        })
    }
}

/// The rule for a written file's mode: permission bits only, at most `0o777`; setuid,
/// setgid and sticky are refused.
pub fn check_file_mode(mode: u32) -> Result<(), ModeFault> {
    if mode & 0o7000 != 0 {
        return Err(ModeFault::SpecialBits);
    }
    if mode > 0o777 {
        return Err(ModeFault::NotPermission);
    }
    Ok(())
}

/// The name of the answer the agent gives `request` when it goes ahead: `Pong` for
/// `Ping`, `WriteOffer` for `WriteFile` (its first answer), and so on.
pub fn answer_name(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "Hello",
        Request::Ping(_) => "Pong",
        Request::WriteFile(_) => "WriteOffer",
        Request::Unpack(_) => "Unpacked",
        Request::Start(_) => "Started",
        Request::Stop(_) => "Stopped",
    }
}

impl Request {
    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "Hello",
            Request::Ping(_) => "Ping",
            Request::WriteFile(_) => "WriteFile",
            Request::Unpack(_) => "Unpack",
            Request::Start(_) => "Start",
            Request::Stop(_) => "Stop",
        }
    }
}

impl Response {
    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Hello(_) => "Hello",
            Response::Pong(_) => "Pong",
            Response::WriteOffer(_) => "WriteOffer",
            Response::Written(_) => "Written",
            Response::Unpacked(_) => "Unpacked",
            Response::Started(_) => "Started",
            Response::Stopped(_) => "Stopped",
            Response::Error(_) => "Error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_names_are_single_bounded_components() {
        for good in ["beat", "0.2.0+build.1", "a_b-c", &"a".repeat(128)] {
            assert_eq!(check_release_name(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "x\0", "é"] {
            assert_eq!(
                check_release_name(bad),
                Err(NameFault::Characters),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_release_name(&"a".repeat(129)),
            Err(NameFault::TooLong(129))
        );
        assert_eq!(version_dir("beat", "0.2.0"), "releases/beat/0.2.0");
        assert_eq!(default_argv("beat"), ["bin/beat", "foreground"]);
    }

    #[test]
    fn file_modes_are_permission_bits_only() {
        for good in [0, 0o600, 0o644, 0o755, 0o777] {
            assert_eq!(check_file_mode(good), Ok(()), "{good:o}");
        }
        for special in [0o4755, 0o2755, 0o1777] {
            assert_eq!(check_file_mode(special), Err(ModeFault::SpecialBits));
        }
        assert_eq!(check_file_mode(0o10000), Err(ModeFault::NotPermission));
    }

    #[test]
    fn each_request_names_its_answer() {
        let ping = Request::Ping(crate::Ping {});
        assert_eq!(answer_name(&ping), "Pong");
    }
}
