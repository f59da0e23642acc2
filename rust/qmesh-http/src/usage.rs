//! Token usage read from a relayed OpenAI-style answer without decoding it:
//! the last `"prompt_tokens": N` and `"completion_tokens": N` seen, whether
//! in a whole JSON body or in a stream's final usage event.

/// Bytes kept from the end of one piece, so a figure split between two
/// pieces is still found.
const CARRY: usize = 64;

#[derive(Debug, Default, Clone)]
pub struct UsageScan {
    pub tokens_in: u64,
    pub tokens_out: u64,
    carry: Vec<u8>,
}

impl UsageScan {
    /// Look at the next piece of the body.
    pub fn absorb(&mut self, piece: &[u8]) {
        if memchr::memmem::find(piece, b"_tokens").is_some()
            || memchr::memmem::find(&self.carry, b"_tok").is_some()
        {
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
        if let Some(n) = last_number(data, b"\"prompt_tokens\"") {
            self.tokens_in = n;
        }
        if let Some(n) = last_number(data, b"\"completion_tokens\"") {
            self.tokens_out = n;
        }
    }
}

/// The number after the last `key` (then optional spaces, `:`, optional spaces).
fn last_number(data: &[u8], key: &[u8]) -> Option<u64> {
    let mut found = None;
    for start in memchr::memmem::find_iter(data, key) {
        let rest = &data[start + key.len()..];
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
