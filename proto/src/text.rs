//! Bounds on the human-readable text both sides put in messages, and the one way to
//! shorten text to such a bound.
//!
//! Strings in requests come from people and files (paths, release names, archive entry
//! names, user names) and may hold any UTF-8. Cutting one at a byte offset panics when
//! the offset falls inside a multi-byte character (`str` indexing, see
//! [`str::is_char_boundary`]), so text is only ever cut by [`shorten`] or at an offset
//! from [`floor_char_boundary`]. Nothing here changes any encoded byte: these bound
//! what a message *says*, not how it is framed.

use std::borrow::Cow;

/// Longest `ErrorReply::message` the agent sends, in bytes. Well under
/// [`MAX_FRAME`](crate::MAX_FRAME), so a refusal that quotes a long input still fits
/// in one frame and reaches the master.
pub const MAX_ERROR_MESSAGE: usize = 8 * 1024;

/// Longest quotation of one input (a path, a name, an archive entry) inside a message,
/// in bytes, before it is shortened with [`shorten`].
pub const MAX_QUOTED: usize = 256;

/// What marks text as shortened.
const ELLIPSIS: &str = "…";

/// The largest index at most `index` that is a character boundary of `text` (the
/// length of `text` when `index` is beyond it). Stable-Rust twin of the unstable
/// `str::floor_char_boundary`.
pub fn floor_char_boundary(text: &str, index: usize) -> usize {
    if index >= text.len() {
        return text.len();
    }
    // A UTF-8 character is at most 4 bytes, so a boundary is at most 3 bytes back.
    (index.saturating_sub(3)..=index)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// `text` when it is at most `max` bytes long; otherwise its longest prefix ending on a
/// character boundary followed by `…`, at most `max` bytes in all (just the prefix when
/// `max` is too small for the `…`). Never splits a character, never panics.
///
/// ```
/// use erel_proto::text::shorten;
/// assert_eq!(shorten("release", 16), "release");
/// assert_eq!(shorten("aéé", 4), "a…");
/// ```
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    if max < ELLIPSIS.len() {
        return Cow::Borrowed(&text[..floor_char_boundary(text, max)]);
    }
    let cut = floor_char_boundary(text, max - ELLIPSIS.len());
    Cow::Owned(format!("{}{ELLIPSIS}", &text[..cut]))
}

/// An input quoted in a message: as is when at most [`MAX_QUOTED`] bytes, else its
/// start shortened with [`shorten`] and its full length, e.g. `aééé… (1201 bytes)`.
pub fn quote(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_QUOTED {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!(
        "{} ({} bytes)",
        shorten(text, MAX_QUOTED),
        text.len()
    ))
}

/// An error and its causes (its [`source`](std::error::Error::source) chain) on one
/// line, joined by `: ` as anyhow's `{:#}` writes them, but without a cause whose text
/// an outer message already holds: many errors quote their source in their own text
/// too, and nothing should be said twice. Both programs print their final error so.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_unchanged_and_borrowed() {
        assert!(matches!(shorten("abc", 3), Cow::Borrowed("abc")));
        assert!(matches!(quote("abc"), Cow::Borrowed("abc")));
        assert_eq!(shorten("", 0), "");
    }

    #[test]
    fn never_splits_a_character_at_any_bound() {
        // 1-, 2-, 3- and 4-byte characters, cut at every possible bound.
        let text = format!("a{}{}{}", "é".repeat(300), "€".repeat(50), "🦀".repeat(20));
        for max in 0..=text.len() + 2 {
            let short = shorten(&text, max);
            assert!(short.len() <= max, "max {max}: {} bytes", short.len());
            assert!(text.starts_with(short.trim_end_matches('…')), "max {max}");
            if max < text.len() && max >= ELLIPSIS.len() {
                assert!(short.ends_with('…'), "max {max}");
            }
        }
    }

    #[test]
    fn the_issue_input_is_shortened_on_a_boundary() {
        // `a` then 600 `é`: byte 64 is inside an `é`.
        let dest = format!("a{}", "é".repeat(600));
        assert_eq!(dest.len(), 1201);
        assert!(!dest.is_char_boundary(64));
        let short = shorten(&dest, 64);
        assert_eq!(short, format!("a{}…", "é".repeat(30)));
        let quoted = quote(&dest);
        assert!(quoted.ends_with("… (1201 bytes)"), "{quoted}");
        assert!(quoted.len() <= MAX_QUOTED + " (1201 bytes)".len());
    }

    #[test]
    fn floor_finds_the_boundary_at_or_before() {
        let text = "a🦀b";
        assert_eq!(floor_char_boundary(text, 0), 0);
        assert_eq!(floor_char_boundary(text, 1), 1);
        for inside in 2..=4 {
            assert_eq!(floor_char_boundary(text, inside), 1);
        }
        assert_eq!(floor_char_boundary(text, 5), 5);
        assert_eq!(floor_char_boundary(text, 99), text.len());
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        #[derive(Debug)]
        struct Connect(std::io::Error);
        impl std::fmt::Display for Connect {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "cannot connect to 127.0.0.1:1: {}", self.0)
            }
        }
        impl std::error::Error for Connect {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        #[derive(Debug)]
        struct Context(&'static str, Connect);
        impl std::fmt::Display for Context {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Context {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.1)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let error = Context("web-1", Connect(io));
        assert_eq!(
            error_chain(&error),
            "web-1: cannot connect to 127.0.0.1:1: Connection refused"
        );
    }
}
