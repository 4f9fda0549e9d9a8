//! When a failed command is tried again: the one retry policy of the master's
//! commands ([`RetryPolicy`]), shared by an operator's single command and a rollout's
//! [`super::HostSession`], and the error a command ends with once it gives up
//! ([`gave_up`]).

use std::time::Duration;

use erel_proto::ErrorKind;

use crate::error::Error;

/// How long an agent answering `Busy` (it still holds what a cut connection held: a
/// file's staging, an `Unpack` running to its end) is asked again: it hands over within
/// its own takeover bound (seconds), so a repeated command waits that out.
pub(crate) const BUSY_WAIT: Duration = Duration::from_secs(60);
/// How long a push asks again an agent busy with another push of the same file.
pub(crate) const PUSH_BUSY_WAIT: Duration = Duration::from_secs(180);
/// First pause before asking a busy agent again; it doubles up to [`BUSY_PAUSE_MAX`].
const BUSY_PAUSE_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between two tries of a `Busy` command.
const BUSY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Connections opened again for one command after a connection problem.
const RECONNECTS: u32 = 1;
/// Pause before opening a connection again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(300);

/// What to do after a command failed; every agent command is safe to repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Ask again on the same connection after the pause (the agent was busy).
    Again(Duration),
    /// Open a new connection and ask again after the pause (the connection failed).
    Reconnect(Duration),
    /// Report the error.
    GiveUp,
}

/// The one retry policy of the master's commands: a `Busy` agent is asked again, with
/// growing pauses, for up to [`BUSY_WAIT`]; a failed connection is opened again once;
/// anything else is reported at once.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    reconnects: u32,
    busy_pause: Duration,
    busy_wait: Duration,
}

impl RetryPolicy {
    /// The policy for one command, before its first try.
    pub(crate) fn new() -> Self {
        RetryPolicy {
            reconnects: 0,
            busy_pause: BUSY_PAUSE_FIRST,
            busy_wait: BUSY_WAIT,
        }
    }

    /// The policy of a push that waits for another master's push of the same file:
    /// that one may run for several takeovers, so a busy agent is asked again for up
    /// to [`PUSH_BUSY_WAIT`].
    pub(crate) fn for_push() -> Self {
        RetryPolicy {
            busy_wait: PUSH_BUSY_WAIT,
            ..RetryPolicy::new()
        }
    }

    /// What to do after `error`, `waited` after the first try began.
    pub(crate) fn after(&mut self, error: &Error, waited: Duration) -> Retry {
        if error.agent_kind() == Some(ErrorKind::Busy) {
            if waited + self.busy_pause > self.busy_wait {
                return Retry::GiveUp;
            }
            let pause = self.busy_pause;
            self.busy_pause = (pause * 2).min(BUSY_PAUSE_MAX);
            return Retry::Again(pause);
        }
        if error.is_transient() && self.reconnects < RECONNECTS {
            self.reconnects += 1;
            return Retry::Reconnect(RECONNECT_PAUSE);
        }
        Retry::GiveUp
    }
}

/// The error a retried command ends with: a `Busy` waited out for a second or more
/// says for how long.
pub(crate) fn gave_up(error: Error, waited: Duration) -> Error {
    match error {
        Error::Agent { host, mut reply }
            if reply.kind == erel_proto::ErrorKind::Busy && waited >= Duration::from_secs(1) =>
        {
            reply.message = format!(
                "{} (still so after retrying for {} s)",
                reply.message,
                waited.as_secs()
            );
            Error::Agent { host, reply }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_waited_out_a_broken_connection_reopened_once_anything_else_reported() {
        use erel_proto::ErrorReply;
        let agent = |kind| Error::Agent {
            host: "web-1".into(),
            reply: ErrorReply::new(kind, "held"),
        };
        let mut policy = RetryPolicy::new();
        assert_eq!(
            policy.after(&agent(ErrorKind::Busy), Duration::ZERO),
            Retry::Again(BUSY_PAUSE_FIRST)
        );
        assert_eq!(
            policy.after(&agent(ErrorKind::Busy), Duration::ZERO),
            Retry::Again(BUSY_PAUSE_FIRST * 2)
        );
        assert_eq!(
            policy.after(&agent(ErrorKind::Busy), BUSY_WAIT),
            Retry::GiveUp,
            "bounded"
        );
        assert_eq!(
            policy.after(&agent(ErrorKind::NotFound), Duration::ZERO),
            Retry::GiveUp
        );
        let lost = Error::Protocol {
            host: "web-1".into(),
            message: "reset".into(),
        };
        assert_eq!(
            policy.after(&lost, Duration::ZERO),
            Retry::Reconnect(RECONNECT_PAUSE)
        );
        assert_eq!(policy.after(&lost, Duration::ZERO), Retry::GiveUp, "once");
    }

    #[test]
    fn a_busy_waited_out_says_for_how_long() {
        use erel_proto::{ErrorKind, ErrorReply};
        let agent = |kind, message: &str| Error::Agent {
            host: "web-1".into(),
            reply: ErrorReply::new(kind, message),
        };
        let err = gave_up(
            agent(ErrorKind::NotFound, "archive not found: a"),
            Duration::from_secs(60),
        );
        assert_eq!(err.to_string(), "web-1: archive not found: a");
        let err = gave_up(
            agent(ErrorKind::Busy, "another request is working on a"),
            Duration::from_secs(60),
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "web-1: busy: another request is working on a (still so after retrying for 60 s)"
            ),
            "{text}"
        );
    }
}
