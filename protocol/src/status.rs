//! Response codes. The numbers are part of the public text protocol (`<code>||<message>`), so
//! they never change meaning; new ones are only ever appended.

/// The outcome of a request, as a number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Success; the payload is the result (empty for `set`).
    Ok = 0,
    /// The request could not be parsed (missing separator, empty key, bad frame).
    ParseError = 1,
    /// The key does not exist.
    NotFound = 2,
    /// The command verb is not one the server knows.
    InvalidCommand = 3,
    /// No worker of the key's pair could be reached; retrying later may succeed.
    Unavailable = 4,
    /// The request is larger than the configured limit.
    TooLarge = 5,
    /// The server failed in a way that is not the client's fault.
    ServerError = 6,
    /// A conditional write (`NX`, `XX`) whose condition did not hold; nothing was written.
    NotApplied = 7,
    /// Authentication is required, or the credentials were wrong.
    NoAuth = 8,
    /// The authenticated user may not run this command.
    NoPerm = 9,
    /// The key holds a value the command cannot use: another type (a hash read as a
    /// string), or not a number for a counter. The message is Redis' text.
    WrongType = 10,
    /// Worker to orchestrator: the key's slot is not this worker's pair's under the map it
    /// holds (the request was routed by an older one). The payload is the worker's map epoch;
    /// the orchestrator reads the newer map and routes again.
    Moved = 11,
    /// Worker to orchestrator, on a `replicate` with bases: the primary computed from a
    /// value that lacks a write this worker took alone (its partner missed it). Nothing was
    /// taken; the orchestrator revokes the change on the primary (`Op::Revoke`), which must
    /// refill.
    Diverged = 12,
}

impl Status {
    /// The wire number.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Reads a wire number; unknown numbers (from a newer peer) read as [`Status::ServerError`]
    /// so an old client still reports a failure instead of misreading it as success.
    pub fn from_code(code: u8) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::ParseError,
            2 => Status::NotFound,
            3 => Status::InvalidCommand,
            4 => Status::Unavailable,
            5 => Status::TooLarge,
            7 => Status::NotApplied,
            8 => Status::NoAuth,
            9 => Status::NoPerm,
            10 => Status::WrongType,
            11 => Status::Moved,
            12 => Status::Diverged,
            _ => Status::ServerError,
        }
    }

    /// The message sent with this code when there is nothing more specific to say.
    pub fn default_message(self) -> &'static str {
        match self {
            Status::Ok => "",
            Status::ParseError => "parse error",
            Status::NotFound => "key not found",
            Status::InvalidCommand => "invalid command type",
            Status::Unavailable => "no worker of this key's pair is reachable",
            Status::TooLarge => "request too large",
            Status::ServerError => "server error",
            Status::NotApplied => "condition not met; nothing written",
            Status::NoAuth => "authentication required",
            Status::NoPerm => "not permitted for this user",
            Status::Moved => "the key's slot has moved; the cluster map has changed",
            Status::Diverged => {
                "the worker that ran this read-modify-write lacks a write its partner took \
                 alone; nothing was kept; retry"
            }
            Status::WrongType => {
                "WRONGTYPE Operation against a key holding the wrong kind of value"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_is_error() {
        for code in 0..=12u8 {
            assert_eq!(Status::from_code(code).code(), code);
        }
        assert_eq!(Status::from_code(200), Status::ServerError);
    }
}
