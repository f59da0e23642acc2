//! The read-only backstop, decided in the engine for every relayed stream.
//!
//! A read-only application's sessions start with
//! `default_transaction_read_only=on`, and the statement guard refuses the
//! texts that could turn it off. A function's body can still turn it off
//! where no text check sees; PostgreSQL then reports the new value in a
//! ParameterStatus, just before the ReadyForQuery that ends the statement's
//! answer. [`AnswerCut`] watches one read of the server's bytes for that
//! report: from it on, the client gets nothing more, and the stream ends
//! ([`crate::Ending::ReadOnlyOff`]) with the connection's setting still
//! off, never to be lent again. The audit still follows what the server
//! answered; the statement being answered is recorded with [`SQLSTATE`].

use qmesh_pg as pg;

/// The kind of the server's reports of a setting (ParameterStatus).
const REPORT: u8 = b'S';

/// What a read-only session's server scanner reports, besides what its tap
/// asks for: the report, and the completions of answers (CommandComplete,
/// ReadyForQuery), so that the cut falls before the completion of the
/// answer the report is in. All three are short: a relay-mode scanner
/// collects what it reports whole before passing it on, and a message
/// longer than the stream's credit would stall it.
pub(crate) const WATCHED: &[u8] = b"SCZ";

/// The error the session ends with (read_only_sql_transaction), the
/// audit's outcome for the statement whose answer turned the setting off.
pub(crate) const SQLSTATE: [u8; 5] = *b"25006";

/// Whether a ParameterStatus body tells a read-only session its setting is
/// off: a server reports it as on or off, so anything but on (or a report
/// that does not parse) is taken as off.
fn turned_off(body: &[u8]) -> bool {
    pg::backend::parameter_status(body).map_or(true, |(name, value)| {
        name == b"default_transaction_read_only" && value != b"on"
    })
}

/// One read of the server's bytes on their way to the client (from a
/// relay-mode scanner, every byte in order, reporting [`WATCHED`]), cut
/// where the setting is reported off: from the start of the answer it is
/// in, as far as this read holds it, so the client never takes that answer
/// for a success (it never gets its completion; rows that came before it
/// in this read, or in an earlier one, it may). What came before stays:
/// whole answers before it in the same read (a pipelining client's), and
/// the rest of a message the client began to receive with the read before,
/// so the session's closing error is never read as the end of a torn one.
pub(crate) struct AnswerCut {
    /// Bytes for the client.
    pub(crate) out: Vec<u8>,
    /// Bytes of the server's that the client does not get.
    pub(crate) swallowed: usize,
    /// The setting is off: nothing more goes.
    pub(crate) off: bool,
    read_only: bool,
    /// How much of `out` stays if the answer is cut: up to the last
    /// ReadyForQuery, else up to the first message boundary of this read.
    /// None until the first whole message of this read.
    answered: Option<usize>,
}

impl AnswerCut {
    /// For a read of `capacity` bytes, of a session that is `read_only`
    /// (else nothing is cut) and whose setting is already `off`.
    pub(crate) fn new(capacity: usize, read_only: bool, off: bool) -> AnswerCut {
        AnswerCut {
            out: Vec::with_capacity(capacity),
            swallowed: 0,
            off,
            read_only,
            answered: None,
        }
    }

    /// Bytes of no reported message.
    pub(crate) fn pass(&mut self, bytes: &[u8]) {
        if self.off {
            self.swallowed += bytes.len();
        } else {
            self.out.extend_from_slice(bytes);
        }
    }

    /// Before a whole reported message `raw` (type `tag`) is passed on:
    /// whether it is held back, the setting being off (from this message
    /// on, or before it). A held message is counted as swallowed; the
    /// caller still shows it to the audit.
    pub(crate) fn withheld(&mut self, tag: u8, raw: &[u8]) -> bool {
        if self.off {
            self.swallowed += raw.len();
            return true;
        }
        let boundary = *self.answered.get_or_insert(self.out.len());
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        if self.read_only && tag == REPORT && turned_off(body) {
            // The session ends; what the server ran is done (a pipelined
            // write after it included: the role's privileges are the
            // guarantee, see guard.py).
            self.off = true;
            self.swallowed += self.out.len() - boundary + raw.len();
            self.out.truncate(boundary);
            return true;
        }
        false
    }

    /// A reported message that was not held back, passed on.
    pub(crate) fn push(&mut self, tag: u8, raw: &[u8]) {
        self.out.extend_from_slice(raw);
        if tag == b'Z' {
            self.answered = Some(self.out.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        pg::encode::message(tag, body).unwrap()
    }

    fn reported(name: &str, value: &str) -> Vec<u8> {
        msg(b'S', format!("{name}\0{value}\0").as_bytes())
    }

    fn cut(cut: &mut AnswerCut, messages: &[Vec<u8>]) {
        for raw in messages {
            if !cut.withheld(raw[0], raw) {
                cut.push(raw[0], raw);
            }
        }
    }

    #[test]
    fn the_answer_that_turns_the_setting_off_is_held_back_and_what_came_before_goes() {
        let earlier = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")];
        let lifting = [
            msg(b'C', b"SELECT 1\0"),
            reported("default_transaction_read_only", "off"),
            msg(b'Z', b"I"),
        ];
        let mut read = AnswerCut::new(64, true, false);
        read.pass(b"end of a row");
        cut(&mut read, &[&earlier[..], &lifting[..]].concat());
        assert!(read.off);
        assert_eq!(read.out, [&b"end of a row"[..], &earlier.concat()].concat());
        assert_eq!(read.swallowed, lifting.concat().len());
        // Whatever comes after is swallowed too.
        read.pass(b"more");
        assert_eq!(read.out.len(), 12 + earlier.concat().len());
    }

    #[test]
    fn with_no_whole_message_before_it_only_the_rest_of_a_begun_one_goes() {
        let mut read = AnswerCut::new(64, true, false);
        read.pass(b"end of a row");
        cut(
            &mut read,
            &[
                msg(b'C', b"SELECT 1\0"),
                reported("default_transaction_read_only", "x"),
            ],
        );
        assert_eq!(read.out, b"end of a row");
    }

    #[test]
    fn on_other_settings_and_sessions_that_are_not_read_only_pass_unchanged() {
        let answer = [
            reported("default_transaction_read_only", "on"),
            reported("application_name", "shop"),
            msg(b'Z', b"I"),
        ];
        let mut read = AnswerCut::new(64, true, false);
        cut(&mut read, &answer);
        assert!(!read.off);
        assert_eq!(read.out, answer.concat());
        let off = [
            reported("default_transaction_read_only", "off"),
            msg(b'Z', b"I"),
        ];
        let mut writable = AnswerCut::new(64, false, false);
        cut(&mut writable, &off);
        assert_eq!(writable.out, off.concat());
        // A malformed report to a read-only session is taken as off.
        let mut read = AnswerCut::new(64, true, false);
        cut(&mut read, &[msg(b'S', b"no terminator")]);
        assert!(read.off);
    }
}
