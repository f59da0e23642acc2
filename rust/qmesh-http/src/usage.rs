//! Token usage read from a relayed OpenAI-style answer without decoding it:
//! the last `"prompt_tokens": N` and `"completion_tokens": N` seen, whether
//! in a whole JSON body or in a stream's final usage event.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Bytes kept from the end of one piece, so a figure split between two
/// pieces is still found.
const CARRY: usize = 64;

/// The searchers for what the scan looks for, built once: building one
/// costs more than searching a piece of an answer with it.
struct Searchers {
    tokens: Finder<'static>,
    tok: Finder<'static>,
    prompt: Finder<'static>,
    completion: Finder<'static>,
}

static SEARCHERS: LazyLock<Searchers> = LazyLock::new(|| Searchers {
    tokens: Finder::new(b"_tokens"),
    tok: Finder::new(b"_tok"),
    prompt: Finder::new(b"\"prompt_tokens\""),
    completion: Finder::new(b"\"completion_tokens\""),
});

#[derive(Debug, Default, Clone)]
pub struct UsageScan {
    pub tokens_in: u64,
    pub tokens_out: u64,
    carry: Vec<u8>,
}

impl UsageScan {
    /// Look at the next piece of the body.
    pub fn absorb(&mut self, piece: &[u8]) {
        if SEARCHERS.tokens.find(piece).is_some() || SEARCHERS.tok.find(&self.carry).is_some() {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(piece);
            self.scan(&joined);
            self.keep_tail(&joined);
        } else {
            self.keep_tail(piece);
        }
    }

    fn keep_tail(&mut self, data: &[u8]) {
        let tail = &data[data.len().saturating_sub(CARRY)..];
        self.carry.clear();
        self.carry.extend_from_slice(tail);
    }

    fn scan(&mut self, data: &[u8]) {
        if let Some(n) = last_number(data, &SEARCHERS.prompt) {
            self.tokens_in = n;
        }
        if let Some(n) = last_number(data, &SEARCHERS.completion) {
            self.tokens_out = n;
        }
    }
}

/// The number after the last `key` (then optional spaces, `:`, optional spaces).
fn last_number(data: &[u8], key: &Finder<'static>) -> Option<u64> {
    let mut found = None;
    for start in key.find_iter(data) {
        let rest = &data[start + key.needle().len()..];
        let rest = rest.trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 12 || digits == rest.len() {
            continue; // none, absurd, or possibly cut short by the piece's end
        }
        found = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_figures_win_even_split_across_pieces() {
        let mut scan = UsageScan::default();
        scan.absorb(b"data: {\"usage\":{\"prompt_tokens\": 3,\"completion_tok");
        scan.absorb(b"ens\":7}}\n\n");
        assert_eq!((scan.tokens_in, scan.tokens_out), (3, 7));
        scan.absorb(b"{\"prompt_tokens\":12,\"completion_tokens\":40}");
        assert_eq!((scan.tokens_in, scan.tokens_out), (12, 40));
    }

    #[test]
    fn nothing_to_read_leaves_zero() {
        let mut scan = UsageScan::default();
        scan.absorb(b"{\"choices\":[]}");
        scan.absorb(b"\"prompt_tokens\": \"x\"}");
        assert_eq!((scan.tokens_in, scan.tokens_out), (0, 0));
    }
}
